"""What minray-cluster runs on a host, over an open ssh.Connection.

A probe (one small Python program, sent on stdin) says which Python and
minray the host has, which minray nodes run there and how the host sees the
SSH connection; nodes are started and stopped with the host's own `minray
start` / `minray stop`. The cluster token goes to a 0600 file over SFTP,
never on a command line, and is deleted once the node has read it.
"""
import json
import os
import shlex
import sys

from minray.cluster_tool.ssh import HostError

STATE_DIR = ".minray"                       # under the remote user's home (mode 0700)
PROBE_MARK = "MINRAY-PROBE "
PROBE_TIMEOUT_S = 60.0
KILL_GRACE_S = 5                            # after a step's timeout, before SIGKILL

_PROBE = r"""
import json, os, shutil, sys
info = {"python": sys.executable, "python_version": sys.version.split()[0],
        "has_timeout": shutil.which("timeout") is not None}
ssh = os.environ.get("SSH_CONNECTION", "").split()
if len(ssh) == 4:
    info["seen_client_ip"], info["own_ip"] = ssh[0], ssh[2]
try:
    import minray
    info["minray"] = minray.__version__
    from minray import node_launcher
    info["nodes"] = [{"address": n.address, "head_address": n.head_address,
                      "is_head": n.is_head, "pid": n.pid}
                     for n in node_launcher.local_nodes(detached_only=True)]
except Exception as exc:
    info["error"] = "%s: %s" % (type(exc).__name__, exc)
print("MINRAY-PROBE " + json.dumps(info))
"""


class Probe:
    """What a host has: its Python, minray version and running nodes."""

    def __init__(self, python, info):
        self.python = python                # the command that ran it
        self.executable = info.get("python")
        self.minray = info.get("minray")
        self.error = info.get("error")
        self.nodes = info.get("nodes") or []
        self.seen_client_ip = info.get("seen_client_ip")   # this machine, as the host sees it
        self.own_ip = info.get("own_ip")                   # the host's address we reached
        self.has_timeout = info.get("has_timeout")         # coreutils' timeout is there

    def bounded(self, argv, seconds):
        """argv as a shell command the host ends after `seconds` (if it can):
        a step we stop waiting for must not go on running there."""
        if self.has_timeout:
            argv = ["timeout", "-k", str(KILL_GRACE_S), str(max(1, int(seconds))), *argv]
        return shlex.join(argv)

    def nodes_of(self, head_address):
        return [n for n in self.nodes if n["is_head"] is False
                and n.get("head_address") == head_address]


def python_candidates(python):
    """The Pythons to try on a host: the one given, else the same path as
    ours (a venv or conda env replicated across hosts), else python3."""
    return [python] if python else list(dict.fromkeys([sys.executable, "python3"]))


def probe(conn, python=None, need_minray=True):
    """Probe the host with the first Python that runs (and has minray, if
    need_minray); HostError if none does."""
    tried, without_minray = [], None
    for candidate in python_candidates(python):
        code, out, err = conn.run(f"{shlex.quote(candidate)} -", PROBE_TIMEOUT_S,
                                  stdin_data=_PROBE)
        line = next((l for l in out.splitlines() if l.startswith(PROBE_MARK)), None)
        if code != 0 or line is None:
            tried.append(f"{candidate} ({_last_line(err) or f'exit code {code}'})")
            continue
        found = Probe(candidate, json.loads(line[len(PROBE_MARK):]))
        if found.minray is not None and found.error:
            raise HostError(f"can't list the minray nodes there ({found.error})")
        if found.minray is not None or not need_minray:
            return found
        without_minray = without_minray or found
    if without_minray is not None:
        raise HostError(
            f"minray is not installed for {without_minray.executable} on the host "
            f"({without_minray.error}): install it there (minray-cluster upgrade does), or "
            "point --python at a Python that has it")
    raise HostError("no usable Python on the host; tried " + ", ".join(tried)
                    + ": pass --python PATH (the Python that has minray there)")


def state_dir(conn):
    """~/.minray on the host (0700), made if missing."""
    directory = f"{conn.home()}/{STATE_DIR}"
    conn.make_dirs(directory, mode=0o700)
    conn.chmod(directory, 0o700)
    return directory


def start_node(conn, found, head_address, token, node_args, timeout):
    """`minray start --address ...` on the host, listening on the address we
    reached it at, the token in a 0600 file of its own (hosts may share a
    home directory) removed afterwards; HostError with minray's message if
    it fails."""
    token_path = f"{state_dir(conn)}/token-{os.urandom(8).hex()}"
    conn.write_private(token_path, token.hex() + "\n")
    argv = [found.python, "-m", "minray.scripts.cli", "start", "--address", head_address,
            "--token-file", token_path, "--node-ip-address", found.own_ip or conn.host.host]
    for flag, value in (("--num-cpus", node_args.get("num_cpus")),
                        ("--num-gpus", node_args.get("num_gpus")),
                        ("--resources", node_args.get("resources"))):
        if value is not None:
            argv += [flag, str(value)]
    try:
        code, out, err = conn.run(found.bounded(argv, timeout), timeout + KILL_GRACE_S + 5)
    finally:
        conn.remove(token_path)
    _check(code, out, err, "minray start", timeout)
    return out


def node_address(conn, found, head_address):
    """The address of the host's node of that cluster, just started; HostError
    if none runs."""
    nodes = probe(conn, found.python).nodes_of(head_address)
    if not nodes:
        raise HostError("minray start reported success but no node runs there")
    return nodes[0]["address"]


def stop_nodes(conn, found, timeout):
    """`minray stop` on the host: the nodes `minray start` started there."""
    argv = [found.python, "-m", "minray.scripts.cli", "stop"]
    code, out, err = conn.run(found.bounded(argv, timeout), timeout + KILL_GRACE_S + 5)
    _check(code, out, err, "minray stop", timeout)
    return out


TIMED_OUT_CODES = (124, 137)       # coreutils' timeout: TERM, then KILL


def _check(code, out, err, what, timeout):
    if code in TIMED_OUT_CODES:
        raise HostError(f"`{what}` did not finish within {timeout:g} s (ended there)")
    if code != 0:
        raise HostError(f"{what} failed there: {_last_line(err) or _last_line(out)}")


def _last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else ""
