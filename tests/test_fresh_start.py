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
    import json
    import subprocess
    import sys
    from minray.session import create_session_dir, remove_orphaned_arenas
    root, shm = tmp_path / "root", tmp_path / "shm"
    shm.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sessions = {}
    for label, pid in (("dead", dead.pid), ("alive", os.getpid()), ("starting", None)):
        session = create_session_dir(root=str(root))
        if pid is not None:
            with open(os.path.join(session, "node.json"), "w") as f:
                json.dump({"pid": pid}, f)
        arena = shm / f"minray-{os.path.basename(session)}-0011aabb"
        arena.write_bytes(b"\0" * 16)
        sessions[label] = arena
    foreign = shm / "minray-session-20000101-000000-1-abcdef-0011aabb"   # not in this root
    foreign.write_bytes(b"\0")
    remove_orphaned_arenas(str(root), shm_dir=str(shm))
    assert not sessions["dead"].exists()
    assert sessions["alive"].exists() and sessions["starting"].exists() and foreign.exists()
