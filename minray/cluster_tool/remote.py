"""What minray-cluster runs on a host, over an open ssh.Connection.

A probe (one small Python program) says which Python and minray the host
has, which minray nodes run there and how the host sees the SSH connection;
nodes are started and stopped with the host's own `minray start` / `minray
stop`. The cluster token goes to a 0600 file over SFTP, never on a command
line.
"""
import json
import shlex
import sys

from minray.cluster_tool.ssh import HostError

TOKEN_DIR = ".minray"                       # under the remote user's home (mode 0700)
TOKEN_NAME = "cluster-token"
PROBE_MARK = "MINRAY-PROBE "
PROBE_TIMEOUT_S = 60.0

_PROBE = r"""
import json, os, sys
info = {"python": sys.executable, "python_version": sys.version.split()[0]}
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

    def nodes_of(self, head_address):
        return [n for n in self.nodes if n["is_head"] is False
                and n.get("head_address") == head_address]


def python_candidates(python):
    """The Pythons to try on a host: the one given, else the same path as
    ours (a venv or conda env replicated across hosts), else python3."""
    return [python] if python else list(dict.fromkeys([sys.executable, "python3"]))


def probe(conn, python=None, need_minray=True):
    """Probe the host with the first Python that runs; HostError if none does
    (or, need_minray, if that Python has no minray)."""
    tried = []
    for candidate in python_candidates(python):
        code, out, err = conn.run(f"{shlex.quote(candidate)} -c {shlex.quote(_PROBE)}",
                                  PROBE_TIMEOUT_S)
        line = next((l for l in out.splitlines() if l.startswith(PROBE_MARK)), None)
        if code == 0 and line is not None:
            found = Probe(candidate, json.loads(line[len(PROBE_MARK):]))
            if found.minray is None and need_minray:
                raise HostError(
                    f"minray is not installed for {found.executable} on the host "
                    f"({found.error}): install it there (minray-cluster upgrade does), or "
                    "point --python at a Python that has it")
            return found
        tried.append(f"{candidate} ({_last_line(err) or f'exit code {code}'})")
    raise HostError("no usable Python on the host; tried " + ", ".join(tried)
                    + ": pass --python PATH (the Python that has minray there)")


def send_token(conn, token):
    """Write the cluster token to ~/.minray/cluster-token (0600); its path."""
    home = conn.home()
    directory = f"{home}/{TOKEN_DIR}"
    conn.make_dirs(directory, mode=0o700)
    conn.sftp.chmod(directory, 0o700)
    path = f"{directory}/{TOKEN_NAME}"
    conn.write_private(path, token.hex() + "\n")
    return path


def start_node(conn, found, head_address, token_path, node_ip, node_args, timeout):
    """`minray start --address ...` on the host; HostError with its message if it fails."""
    argv = [found.python, "-m", "minray.scripts.cli", "start", "--address", head_address,
            "--token-file", token_path, "--node-ip-address", node_ip]
    for flag, value in (("--num-cpus", node_args.get("num_cpus")),
                        ("--num-gpus", node_args.get("num_gpus")),
                        ("--resources", node_args.get("resources"))):
        if value is not None:
            argv += [flag, str(value)]
    code, out, err = conn.run(shlex.join(argv), timeout)
    if code != 0:
        raise HostError(f"minray start failed there: {_last_line(err) or _last_line(out)}")
    return out


def stop_nodes(conn, found, timeout):
    """`minray stop` on the host: the nodes `minray start` started there."""
    code, out, err = conn.run(shlex.join([found.python, "-m", "minray.scripts.cli", "stop"]),
                              timeout)
    if code != 0:
        raise HostError(f"minray stop failed there: {_last_line(err) or _last_line(out)}")
    return out


def _last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else ""
