"""Starting a cluster as a newcomer does: from a directory that holds an
unbuilt minray source tree, with startup failures that explain themselves,
and logs that outlive the session."""
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

from minray_driver import REPO, run_driver, session_retired


@pytest.fixture
def session_root():
    root = tempfile.mkdtemp(prefix="mr-fs-", dir="/tmp")
    yield root
    subprocess.run(["rm", "-rf", root])


def test_processes_import_the_drivers_minray_not_the_current_directorys(tmp_path, session_root):
    # The README's first command runs `python docs/examples/pi.py` from a
    # checkout: the current directory holds a ./minray that cannot be
    # imported (its Cython core is not built there). The driver imports the
    # installed minray; every process it starts must do the same.
    shadow = tmp_path / "minray"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(
        "raise ImportError('the unbuilt source tree in the current directory was imported')\n")
    script_dir = tmp_path / "examples"
    script_dir.mkdir()
    script = script_dir / "driver.py"
    script.write_text(textwrap.dedent("""
        import minray
        minray.init(num_cpus=2)

        @minray.remote
        def square(x):
            return x * x

        print("RESULT", minray.get([square.remote(i) for i in range(4)]))
        minray.shutdown()
    """))
    env = dict(os.environ, PYTHONPATH=REPO, MINRAY_SESSION_ROOT=session_root)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RESULT [0, 1, 4, 9]" in proc.stdout
    assert "unbuilt source tree" not in proc.stderr


def test_a_failed_start_says_why_and_keeps_its_logs(session_root):
    # An arena larger than /dev/shm can hold: the node manager refuses to
    # start; the driver's error carries the node manager's own reason.
    proc = run_driver("""
        import os
        import minray
        from minray.exceptions import RaySystemError
        try:
            minray.init(num_cpus=1, object_store_memory=1 << 50)
        except RaySystemError as exc:
            print("ERROR", str(exc).replace(chr(10), " | "))
    """, env={"MINRAY_SESSION_ROOT": session_root})
    line = next(l for l in proc.stdout.splitlines() if l.startswith("ERROR"))
    assert "failed to start" in line and "exited with code" in line
    assert "/dev/shm has only" in line                        # the node manager's reason
    logs = line.split("The logs are in ")[1].split(";")[0]
    assert os.path.isfile(os.path.join(logs, "node_manager.log"))


def test_logs_are_kept_after_shutdown_and_old_sessions_pruned(session_root):
    from minray.session import KEEP_FINISHED_SESSIONS
    code = """
        import minray
        context = minray.init(num_cpus=1)
        print("SESSION", context["session_dir"])
        minray.shutdown()
    """
    sessions = []
    for _ in range(KEEP_FINISHED_SESSIONS + 2):
        out = run_driver(code, env={"MINRAY_SESSION_ROOT": session_root}).stdout
        sessions.append(out.split("SESSION ")[1].split()[0])
    latest = os.path.realpath(os.path.join(session_root, "session_latest"))
    assert latest == sessions[-1]
    for session in sessions[-KEEP_FINISHED_SESSIONS:]:
        assert session_retired(session), os.listdir(session)
        assert os.path.getsize(os.path.join(session, "logs", "node_manager.log")) > 0
    # Only the newest finished sessions are kept.
    kept = sorted(n for n in os.listdir(session_root) if n.startswith("session-"))
    assert len(kept) == KEEP_FINISHED_SESSIONS
    assert not os.path.exists(sessions[0])


def test_import_minray_loads_nothing_heavy():
    # paramiko is a declared dependency for the cluster tooling; nothing of
    # it (or of numpy, Arrow, LMDB, psutil, asyncio) is paid for by `import minray`.
    heavy = ["numpy", "pyarrow", "psutil", "paramiko", "lmdb", "asyncio", "torch"]
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, minray; "
         f"print([m for m in {heavy!r} if m in sys.modules])"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"



def test_arenas_of_killed_sessions_are_removed_at_the_next_start(tmp_path):
    """A node manager killed with -9 can't remove its arena; the next
    session started on the machine does (and leaves live ones alone)."""
    script = textwrap.dedent("""
        import glob, os, signal, subprocess, sys
        import minray
        from minray.local_cluster import LocalCluster
        def arenas(cluster):
            return glob.glob(f"/dev/shm/minray-{os.path.basename(cluster.session_dir)}-*")
        killed = LocalCluster(num_cpus=1, object_store_memory=8 << 20)
        killed.start()
        assert arenas(killed)
        os.kill(killed.process.pid, signal.SIGKILL)
        killed.process.wait()
        live = LocalCluster(num_cpus=1, object_store_memory=8 << 20)
        live.start()                  # a new session cleans up after the killed one
        print("killed:", len(arenas(killed)), "live:", len(arenas(live)))
        live.stop()
    """)
    env = dict(os.environ, MINRAY_SESSION_ROOT=str(tmp_path / "sessions"), PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "killed: 0 live: 1" in result.stdout
