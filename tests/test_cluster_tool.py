"""minray-cluster against real sshd servers on loopback addresses, each a
stand-in for a machine (tests/sshd_hosts.py), driven as a user runs it."""
import contextlib
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from minray.cluster_tool.workers_file import WorkersFileError, parse_workers
from sshd_hosts import FakeHost, keygen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_IPS = ("127.0.0.2", "127.0.0.3")
STATE_DIR = os.path.expanduser("~/.minray")     # the hosts' (this machine's user's)


class Hosts:
    """The fake hosts, a workers.txt listing them, and how to run the tool."""

    def __init__(self, tmp_path, hosts, user_key):
        self.tmp_path = tmp_path
        self.hosts = hosts
        self.user_key = user_key
        self.known_hosts = tmp_path / "known_hosts"
        self.known_hosts.write_text("".join(h.known_hosts_line + "\n" for h in hosts))
        # This machine's own minray (the head) keeps to a session root of the
        # test's, apart from any other cluster here; HOME too (the tool reads
        # ~/.ssh/known_hosts: only the test's known hosts count).
        self.env = dict(os.environ, PYTHONPATH=REPO, HOME=str(tmp_path / "home"),
                        MINRAY_SESSION_ROOT=str(tmp_path / "head-sessions"))
        self.workers = tmp_path / "workers.txt"
        self.workers.write_text("# the test cluster\n\n"
                                + "".join(f"{h.spec}   # {h.ip}\n" for h in hosts))

    def run(self, *args, workers=None, timeout=240, extra=()):
        """minray-cluster ARGS (the options a user would give, with ours)."""
        command, rest = args[0], list(args[1:])
        argv = [sys.executable, "-m", "minray.cluster_tool.cli", command,
                str(workers or self.workers), "--ssh-key", str(self.user_key),
                "--known-hosts", str(self.known_hosts), "--timeout", "60", "--port", "0",
                *extra, *rest]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=self.env)


def table_line(output, host):
    """The host's row in a minray-cluster report."""
    return next(l for l in output.splitlines() if l.startswith(host.spec + " "))


@contextlib.contextmanager
def fake_hosts(tmp_path, python_path):
    """The fake hosts; afterwards every minray node they or the head ran is stopped."""
    user_key = tmp_path / "user_key"
    public = keygen(user_key, "minray-test-user")
    made = []
    try:
        for ip in HOST_IPS:
            made.append(FakeHost(str(tmp_path / ip), ip, public, python_path=python_path))
        yield Hosts(tmp_path, made, user_key)
    finally:
        for host in made:
            host.stop_minray()
            host.stop()
        # The head `up` started on this machine.
        subprocess.run([sys.executable, "-m", "minray.scripts.cli", "stop", "--force"],
                       capture_output=True, timeout=120, env=dict(
                           os.environ, PYTHONPATH=REPO,
                           MINRAY_SESSION_ROOT=str(tmp_path / "head-sessions")))


@pytest.fixture
def hosts(tmp_path):
    """Hosts whose Python has minray (this test run's)."""
    with fake_hosts(tmp_path, os.environ.get("PYTHONPATH")) as made:
        yield made


@pytest.fixture
def bare_hosts(tmp_path):
    """Hosts whose Python has no minray until minray-cluster installs it."""
    with fake_hosts(tmp_path, None) as made:
        yield made


def test_up_runs_a_job_on_every_host_then_status_and_down(hosts):
    up = hosts.run("up", extra=("--num-cpus", "1"))
    assert up.returncode == 0, up.stdout + up.stderr
    for host in hosts.hosts:
        line = table_line(up.stdout, host)
        assert " started " in line and host.ip in line, up.stdout
    # The token went to each host in a file of its own, removed once read.
    assert not [f for f in os.listdir(STATE_DIR) if f.startswith("token-")]
    head_address = re.search(r"head at (\S+?)\. Connect", up.stdout).group(1)

    # A job on the cluster `up` made: its tasks land on the head and every host.
    job = textwrap.dedent("""
        import sys, time, minray
        minray.init(address=sys.argv[1])

        @minray.remote(num_cpus=1)
        def where():
            time.sleep(0.3)
            return minray.get_runtime_context().get_node_id()

        print("NODES", len(set(minray.get([where.remote() for _ in range(24)]))))
    """)
    result = subprocess.run([sys.executable, "-c", job, head_address], capture_output=True,
                            text=True, timeout=120, env=hosts.env)
    assert result.returncode == 0, result.stderr
    assert "NODES 3" in result.stdout, result.stdout

    # Idempotent: nothing new starts.
    again = hosts.run("up")
    assert again.returncode == 0, again.stdout + again.stderr
    for host in hosts.hosts:
        assert "already running" in table_line(again.stdout, host), again.stdout
    assert " started" not in again.stdout

    status = hosts.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    import minray
    for host in hosts.hosts:
        line = next(l for l in status.stdout.splitlines() if l.startswith(host.spec))
        assert "reachable" in line and "alive" in line and minray.__version__ in line

    down = hosts.run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stdout.count("stopped") >= len(hosts.hosts) + 1      # and the head
    after = hosts.run("status")
    for host in hosts.hosts:
        line = next(l for l in after.stdout.splitlines() if l.startswith(host.spec))
        assert "none" in line
    assert "head: none running" in after.stdout


def test_exec_prints_each_host_and_sums_up_exit_codes(hosts):
    ok = hosts.run("exec", "--", "sh", "-c", "echo hello from $MINRAY_SESSION_ROOT")
    assert ok.returncode == 0, ok.stderr
    for host in hosts.hosts:
        assert f"--- {host.spec} (exit 0)" in ok.stdout
        assert f"hello from {host.session_root}" in ok.stdout
    failing = hosts.run("exec", "--", "sh", "-c", "exit 3")
    assert failing.returncode == 1
    assert failing.stdout.count("exit code 3") == len(hosts.hosts)


def test_sync_sends_only_what_changed(hosts, tmp_path):
    source = tmp_path / "app"
    (source / "pkg").mkdir(parents=True)
    (source / "pkg" / "data.bin").write_bytes(os.urandom(300_000))
    # The fake hosts share this machine's disk: each gets a target of its own
    # (one workers.txt per host), as separate machines would have.
    for host in hosts.hosts:
        (source / "main.py").write_text("print('v1')\n")
        workers = tmp_path / f"{host.ip}.txt"
        workers.write_text(host.spec + "\n")
        target = tmp_path / f"deployed-{host.ip}"
        first = hosts.run("sync", str(source), str(target), workers=workers)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "2/2" in first.stdout and "300.0 KB" in first.stdout
        assert (target / "main.py").read_text() == "print('v1')\n"
        assert (target / "pkg" / "data.bin").read_bytes() == \
            (source / "pkg" / "data.bin").read_bytes()

        second = hosts.run("sync", str(source), str(target), workers=workers)
        assert second.returncode == 0
        assert "0/2" in second.stdout and "0 B" in second.stdout        # nothing sent

        (source / "main.py").write_text(f"print('{host.ip}')\n")   # new content
        third = hosts.run("sync", str(source), str(target), workers=workers)
        assert "1/2" in third.stdout
        assert (target / "main.py").read_text() == f"print('{host.ip}')\n"


def test_unknown_and_changed_host_keys_are_refused(hosts, tmp_path):
    unknown = tmp_path / "empty_known_hosts"
    unknown.write_text("")
    refused = hosts.run("exec", "--", "true", extra=("--known-hosts", str(unknown)))
    assert refused.returncode == 1
    assert refused.stdout.count("unknown host key") == len(hosts.hosts)
    assert "--accept-new-host-keys" in refused.stdout

    accepted = hosts.run("exec", "--", "true",
                         extra=("--known-hosts", str(unknown), "--accept-new-host-keys"))
    assert accepted.returncode == 0, accepted.stdout
    assert unknown.read_text().count("ssh-ed25519") == len(hosts.hosts)
    assert hosts.run("exec", "--", "true", extra=("--known-hosts", str(unknown))).returncode == 0

    # A changed key: the file holds another key for the first host.
    other = keygen(tmp_path / "other_host_key")
    first = hosts.hosts[0]
    changed = tmp_path / "changed_known_hosts"
    changed.write_text(f"[{first.ip}]:{first.port} {' '.join(other.split()[:2])}\n")
    result = hosts.run("exec", "--", "true",
                       extra=("--known-hosts", str(changed), "--accept-new-host-keys"))
    assert result.returncode == 1
    assert "CHANGED" in result.stdout and "ssh-keygen -R" in result.stdout


def test_bad_hosts_each_get_a_clear_error(hosts, tmp_path):
    import socket
    with socket.socket() as closed:            # a port nothing listens on
        closed.bind(("127.0.0.4", 0))
        refused_port = closed.getsockname()[1]
    workers = tmp_path / "mixed.txt"
    workers.write_text(f"{hosts.hosts[0].spec}\n127.0.0.4:{refused_port}\n"
                       f"nobody-here@{hosts.hosts[1].ip}:{hosts.hosts[1].port}\n")
    result = hosts.run("exec", "--", "true", workers=workers)
    assert result.returncode == 1
    assert f"--- {hosts.hosts[0].spec} (exit 0)" in result.stdout
    assert "connection refused" in result.stdout
    assert "authentication as nobody-here failed" in result.stdout

    # A port that takes connections but never speaks SSH (a hung host).
    with socket.socket() as silent:
        silent.bind(("127.0.0.4", 0))
        silent.listen()
        workers.write_text(f"127.0.0.4:{silent.getsockname()[1]}\n")
        hung = hosts.run("exec", "--", "true", workers=workers, extra=("--timeout", "3"))
    assert hung.returncode == 1
    assert "no SSH server answered within 3 s" in hung.stdout

    no_python = hosts.run("status", extra=("--python", "/nonexistent/python3"))
    assert no_python.returncode == 1
    assert no_python.stdout.count("no usable Python") == len(hosts.hosts)


def test_malformed_or_empty_workers_file_is_reported_with_its_line(hosts, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("# ok\n127.0.0.2:22\nnot a host name!\n")
    result = hosts.run("status", workers=bad)
    assert result.returncode != 0
    assert "line 3" in result.stderr and "not a host name!" in result.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    result = hosts.run("status", workers=empty)
    assert result.returncode != 0 and "lists no hosts" in result.stderr


def test_workers_file_lines():
    hosts = parse_workers("a\nubuntu@10.0.0.5:2222  # gpu box\n[::1]:22\n# c\n\nhost-b")
    assert [(h.user, h.host, h.port) for h in hosts] == [
        (None, "a", None), ("ubuntu", "10.0.0.5", 2222), (None, "::1", 22),
        (None, "host-b", None)]
    with pytest.raises(WorkersFileError, match="line 2.*listed already on line 1"):
        parse_workers("a:22\na:22\n")
    with pytest.raises(WorkersFileError, match="port 99999"):
        parse_workers("a:99999\n")


def _host_python(tmp_path):
    """A virtualenv standing in for the hosts' Python: no minray of its own,
    the test environment's other packages (minray's dependencies) visible."""
    import site
    import sysconfig
    venv = tmp_path / "host-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = list(dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]))
    # A .pth line adds a directory but runs none of its own .pth files: an
    # editable install of minray there stays invisible.
    with open(os.path.join(purelib, "test-deps.pth"), "w") as f:
        f.write("".join(p + "\n" for p in ours))
    return str(python)


def test_upgrade_installs_minray_and_restarts_the_nodes(bare_hosts, tmp_path, monkeypatch):
    import minray
    hosts = bare_hosts
    # Its wheels need not be fast: leave the plain-Python modules uncompiled
    # (the build takes seconds instead of minutes on 2 cores).
    monkeypatch.setenv("MINRAY_PURE_PYTHON", "1")
    hosts.env = dict(hosts.env, MINRAY_PURE_PYTHON="1")
    python = _host_python(tmp_path)
    # The hosts share this machine's disk (one venv): one host at a time.
    options = ("--python", python, "--parallel", "1")

    missing = hosts.run("status", extra=options)
    assert missing.returncode == 1
    assert missing.stdout.count("minray is not installed") == len(hosts.hosts)
    refused = hosts.run("up", extra=options)
    assert refused.returncode == 1 and "minray is not installed" in refused.stdout

    # Default: a wheel built from this machine's minray source.
    first = hosts.run("upgrade", extra=options, timeout=900)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Building a wheel" in first.stdout
    assert all("installed" in table_line(first.stdout, h) for h in hosts.hosts)
    version = subprocess.run([python, "-c", "import minray, os; print(minray.__version__, "
                              "os.path.dirname(minray.__file__))"], capture_output=True,
                             text=True, cwd=str(tmp_path), env={
                                 k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                             ).stdout.split()
    assert version[0] == minray.__version__ and "host-venv" in version[1]

    up = hosts.run("up", extra=options + ("--num-cpus", "1"))
    assert up.returncode == 0, up.stdout + up.stderr

    # Again from a given wheel: the nodes restart on it and re-register.
    from minray.cluster_tool.commands import build_wheel
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = build_wheel(str(wheels))          # as `upgrade` builds it
    second = hosts.run("upgrade", "--wheel", str(wheel), extra=options, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert all("installed, node restarted" in table_line(second.stdout, h)
               for h in hosts.hosts), second.stdout
    status = hosts.run("status", extra=options)
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("alive") == len(hosts.hosts)


def test_a_host_that_hangs_during_up_is_reported_not_waited_for(hosts, tmp_path):
    # Its `minray start` never returns (a host wedged half-way through up).
    wedged = tmp_path / "wedged-python"
    wedged.write_text(f"#!/bin/sh\ncase \"$*\" in *scripts.cli\\ start*) exec sleep 600;; esac\n"
                      f"exec {sys.executable} \"$@\"\n")
    wedged.chmod(0o755)
    result = hosts.run("up", extra=("--python", str(wedged), "--timeout", "8"), timeout=120)
    assert result.returncode == 1
    for host in hosts.hosts:
        assert "not started" in table_line(result.stdout, host)
        assert f"{host.spec}: `minray start` did not finish within 8 s" in result.stdout
    # The head came up and says so; the hosts stay reported as failed.
    assert "head at" in result.stdout


def test_ctrl_c_skips_the_hosts_not_begun_and_reports_the_rest(hosts, tmp_path):
    import signal
    began = tmp_path / "began"
    wedged = tmp_path / "wedged-python"
    wedged.write_text(f"#!/bin/sh\ncase \"$*\" in *scripts.cli\\ start*) touch {began}; "
                      f"exec sleep 600;; esac\nexec {sys.executable} \"$@\"\n")
    wedged.chmod(0o755)
    argv = [sys.executable, "-m", "minray.cluster_tool.cli", "up", str(hosts.workers),
            "--ssh-key", str(hosts.user_key), "--known-hosts", str(hosts.known_hosts),
            "--port", "0", "--python", str(wedged), "--parallel", "1", "--timeout", "6"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=hosts.env)
    try:
        deadline = time.monotonic() + 60
        while not began.exists():          # the first host is inside its `minray start`
            assert time.monotonic() < deadline and process.poll() is None, process.stderr.read()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1
    assert "interrupted" in err
    first, second = hosts.hosts
    assert "not started" in table_line(out, first)       # its step ended by --timeout
    assert "skipped" in table_line(out, second)
    assert f"{second.spec}: interrupted (Ctrl-C) before it began" in out
