"""The minray-cluster commands, each run on every host of workers.txt in
parallel; each returns the rows of its per-host report and an exit code
(non-zero if any host failed)."""
import concurrent.futures
import os
import shlex
import sys
import threading
import time

from minray.cluster_tool import remote
from minray.cluster_tool.ssh import Connection, HostError

REGISTER_POLL_S = 0.2
PROGRESS_INTERVAL_S = 1.0
_print_lock = threading.Lock()


def say(text, stream=None):
    """Print whole lines from any thread."""
    with _print_lock:
        print(text, file=stream or sys.stdout, flush=True)


class Settings:
    """The options every command shares (from the command line)."""

    def __init__(self, ssh, python=None, parallel=16, timeout=60.0, node_args=None,
                 head_address=None, head_port=None):
        self.ssh = ssh                      # ssh.SshOptions
        self.python = python
        self.parallel = parallel
        self.timeout = timeout
        self.node_args = node_args or {}    # num_cpus, num_gpus, resources (JSON text)
        self.head_address = head_address    # the IP hosts reach the head on
        self.head_port = head_port


def on_every_host(hosts, settings, step, progress=False):
    """Run step(conn, row) for each host in parallel, with an open connection;
    the rows (dicts with at least host, state, error), in workers.txt order.
    progress: say each host's outcome as it comes."""
    rows = [{"host": host.name, "state": "", "error": ""} for host in hosts]

    def one(index):
        host, row = hosts[index], rows[index]
        started = time.monotonic()
        conn = Connection(host, settings.ssh)
        try:
            conn.open()
            row["reached"] = True
            step(conn, row)
        except HostError as exc:
            row["state"], row["error"] = row.get("failed_state") or "failed", str(exc)
        except Exception as exc:          # a bug must not hide the other hosts' results
            row["state"], row["error"] = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
            row.pop("failed_state", None)
            row["time"] = f"{time.monotonic() - started:.1f}s"
            if progress:
                say(f"{row['host']}: {row['state']}" + (" (see below)" if row["error"] else ""))

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=settings.parallel)
    try:
        list(pool.map(one, range(len(hosts))))
    except KeyboardInterrupt:
        # Ctrl-C: hosts not begun are left alone (and say so); those under
        # way finish their step, each bounded by --timeout.
        pool.shutdown(wait=False, cancel_futures=True)
        for row in rows:
            if not row["state"] and not row["error"]:
                row["state"], row["error"] = "skipped", "interrupted (Ctrl-C) before it began"
        say("minray-cluster: interrupted; waiting for the hosts under way ...", sys.stderr)
        pool.shutdown(wait=True)
        return rows
    pool.shutdown(wait=True)
    return rows


def exit_code(rows):
    return 1 if any(row["error"] for row in rows) else 0


# ------------------------------------------------------------ the local head

def local_head():
    """The head started with `minray start` on this machine, or None."""
    from minray import node_launcher
    heads = [n for n in node_launcher.local_nodes(detached_only=True) if n.is_head]
    return heads[-1] if heads else None


def ensure_head(settings, head_ip):
    """The running head, or one started now on head_ip; (Node, started)."""
    from minray import node_launcher
    head = local_head()
    if head is not None:
        return head, False
    port = node_launcher.DEFAULT_HEAD_PORT if settings.head_port is None else settings.head_port
    say(f"Starting the head on {head_ip}:{port} (minray start --head)...")
    node_args = settings.node_args
    resources = node_args.get("resources")
    try:
        head = node_launcher.start_node(
            head=True, node_ip_address=head_ip, port=port, num_cpus=node_args.get("num_cpus"),
            num_gpus=node_args.get("num_gpus"),
            resources=None if resources is None else _json(resources))
    except (node_launcher.NodeStartError, ValueError, OSError) as exc:
        raise SystemExit(f"minray-cluster: could not start the head: {exc}") from None
    return head, True


def cluster_nodes(head):
    """The head's view of the cluster: address -> node row ({} if the head
    does not answer: every node then shows as not registered)."""
    from minray import node_launcher
    try:
        rows = node_launcher.query_node(head.session_dir, "nodes") or []
    except Exception as exc:                  # a head stopped or hung under us
        say(f"minray-cluster: the head at {head.address} did not answer ({exc})",
            sys.stderr)
        return {}
    return {row["address"]: row for row in rows}


def _json(text):
    import json
    return json.loads(text)


def _ip(address):
    return address.rsplit(":", 1)[0] if address else None


# ------------------------------------------------------------ up

def up(hosts, settings):
    """Start a head here if none runs, then a node on every host that joins it."""
    head = local_head()
    head_ip = settings.head_address
    if head is None and head_ip is None:
        head_ip = _our_address(hosts, settings)
    head, started = ensure_head(settings, head_ip)
    from minray import __version__ as head_version
    from minray.session import read_token
    token = read_token(head.session_dir)
    say(("Started" if started else "Using") + f" the head at {head.address}.")

    def start(conn, row):
        found = remote.probe(conn, settings.python)
        row["python"] = found.executable
        if found.minray != head_version:
            raise HostError(f"the host has minray {found.minray}, the head {head_version}: "
                            "run minray-cluster upgrade to put one version everywhere")
        ours = found.nodes_of(head.address)
        if ours:
            row["state"], row["address"] = "already running", ours[0]["address"]
            return
        others = [n for n in found.nodes if n["head_address"] != head.address]
        if others:
            other = others[0]
            raise HostError(f"a minray node of another cluster runs there (at "
                            f"{other['address']}, head {other['head_address'] or 'itself'}): "
                            "stop it with minray-cluster down or `minray stop` on the host")
        if _is_loopback(_ip(head.address)) and not _is_loopback(found.own_ip or conn.host.host):
            raise HostError(f"the head listens on {head.address}, which other machines can't "
                            "reach: stop it (minray stop) and run up again, or start it with "
                            "--node-ip-address set to this machine's address")
        row["failed_state"] = "not started"
        remote.start_node(conn, found, head.address, token, settings.node_args,
                          settings.timeout)
        row["failed_state"] = "started, not confirmed"
        row["state"], row["address"] = "started", remote.node_address(conn, found, head.address)

    rows = on_every_host(hosts, settings, start, progress=True)
    _wait_registered(head, rows, settings.timeout)
    return rows, head


def _our_address(hosts, settings):
    """This machine's address as the hosts see it: from the first host that
    answers over SSH (how the host sees the connection, else our end of it)."""
    for host in hosts:
        conn = Connection(host, settings.ssh)
        try:
            conn.open()
            local = conn.local_address()
            try:
                return remote.probe(conn, settings.python, need_minray=False).seen_client_ip \
                    or local
            except HostError:
                return local
        except HostError:
            continue
        finally:
            conn.close()
    return "127.0.0.1"          # no host answers: they all fail below, each saying why


def _wait_registered(head, rows, timeout):
    """Wait until the nodes of the rows are alive in the head's view; fill in
    their CPUs and GPUs; a node that never registers is an error."""
    waiting = [row for row in rows if row.get("address") and not row["error"]]
    deadline = time.monotonic() + timeout
    while True:
        view = cluster_nodes(head)
        pending = [row for row in waiting if not view.get(row["address"], {}).get("alive")]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(REGISTER_POLL_S)
    for row in waiting:
        node = view.get(row["address"])
        if node is None or not node.get("alive"):
            row["error"] = (f"its node ({row['address']}) did not register with the head within "
                            f"{timeout:g} s: see its logs with minray-cluster exec ... -- "
                            "minray status, or the node's session logs there")
            continue
        resources = node.get("resources") or {}
        row["cpus"] = _amount(resources.get("CPU"))
        row["gpus"] = _amount(resources.get("GPU"))


def _amount(value):
    if value is None:
        return "0"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _is_loopback(ip):
    import ipaddress
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


# ------------------------------------------------------------ down

def down(hosts, settings, keep_head=False):
    """Stop the nodes on every host, then (unless keep_head) the head here."""
    def stop(conn, row):
        found = remote.probe(conn, settings.python)
        if not found.nodes:
            row["state"] = "not running"
            return
        remote.stop_nodes(conn, found, settings.timeout)
        after = remote.probe(conn, found.python)
        if after.nodes:
            raise HostError(f"{len(after.nodes)} node(s) still run there after minray stop")
        row["state"] = "stopped"

    rows = on_every_host(hosts, settings, stop)
    head_row = None
    head = local_head()
    if not keep_head:
        from minray import node_launcher
        head_row = {"host": "(head, this machine)", "state": "not running", "error": ""}
        if head is not None:
            if node_launcher.stop_node(head):
                head_row["state"] = f"stopped ({head.address})"
            else:
                head_row["error"] = f"the head at {head.address} (pid {head.pid}) did not stop"
    return rows, head_row


# ------------------------------------------------------------ status

def status(hosts, settings):
    head = local_head()
    view = cluster_nodes(head) if head is not None else {}

    def look(conn, row):
        row["state"] = "reachable"
        found = remote.probe(conn, settings.python)
        row["minray"], row["python"] = found.minray, found.executable
        ours = found.nodes_of(head.address) if head is not None else []
        row["node"] = (ours[0]["address"] if ours else
                       f"other cluster ({found.nodes[0]['head_address']})" if found.nodes
                       else "none")
        node = view.get(ours[0]["address"]) if ours else None
        row["registered"] = "alive" if node and node.get("alive") else \
            "dead" if node else "no"

    rows = on_every_host(hosts, settings, look)
    for row in rows:
        if row["error"] and not row.get("reached"):
            row["state"] = "unreachable"
    return rows, head


# ------------------------------------------------------------ exec

def execute(hosts, settings, command):
    """Run command (argv) on every host; each host's output under its name."""
    line = shlex.join(command)
    # Ended there too when it overruns (where the host has coreutils' timeout).
    bounded = (f"if command -v timeout >/dev/null 2>&1; then exec timeout -k "
               f"{remote.KILL_GRACE_S} {max(1, int(settings.timeout))} {line}; "
               f"else exec {line}; fi")

    def run(conn, row):
        code, out, err = conn.run(bounded, settings.timeout + remote.KILL_GRACE_S + 5)
        text = "".join(f"  {l}\n" for l in (out + err).splitlines())
        say(f"--- {row['host']} (exit {code})\n{text}".rstrip("\n"))
        row["state"], row["exit"] = ("ok" if code == 0 else "failed"), str(code)
        if code != 0:
            row["error"] = f"exit code {code}"

    return on_every_host(hosts, settings, run)


# ------------------------------------------------------------ sync

_MANIFEST = r"""
import hashlib, json, os, sys
root = sys.argv[1]
out = {}
for base, dirs, files in os.walk(root):
    for name in files:
        path = os.path.join(base, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[os.path.relpath(path, root)] = [os.path.getsize(path), digest.hexdigest()]
print("MINRAY-MANIFEST " + json.dumps(out))
"""


def _parse_manifest(out):
    import json
    line = next((l for l in out.splitlines() if l.startswith("MINRAY-MANIFEST ")), None)
    return None if line is None else json.loads(line[len("MINRAY-MANIFEST "):])


def local_manifest(root):
    """{relative path: [size, sha256]} of root's files, by the same program
    the hosts run."""
    import subprocess
    result = subprocess.run([sys.executable, "-", root], input=_MANIFEST, capture_output=True,
                            text=True)
    manifest = _parse_manifest(result.stdout)
    if result.returncode != 0 or manifest is None:
        raise SystemExit(f"minray-cluster sync: can't read {root}: {result.stderr.strip()}")
    return manifest


def sync(hosts, settings, local_dir, remote_dir=None):
    """Copy local_dir to every host, sending only files whose size or content
    differ there; rows report files and bytes sent."""
    local_dir = os.path.abspath(local_dir)
    if not os.path.isdir(local_dir):
        raise SystemExit(f"minray-cluster sync: {local_dir} is not a directory")
    remote_dir = remote_dir or local_dir
    manifest = local_manifest(local_dir)
    total = sum(size for size, _ in manifest.values())

    def copy(conn, row):
        found = remote.probe(conn, settings.python, need_minray=False)
        code, out, err = conn.run(shlex.join([found.python, "-", remote_dir]),
                                  settings.timeout, stdin_data=_MANIFEST)
        there = _parse_manifest(out)
        if code != 0 or there is None:
            raise HostError(f"could not list {remote_dir} there: {err.strip() or out.strip()}")
        changed = [rel for rel, entry in sorted(manifest.items()) if there.get(rel) != entry]
        sent = sent_bytes = 0
        last_report = time.monotonic()
        for rel in changed:
            target = f"{remote_dir}/{rel}"
            conn.make_dirs(os.path.dirname(target))
            source = os.path.join(local_dir, rel)
            conn.put(source, target)
            conn.chmod(target, os.stat(source).st_mode & 0o777)
            sent += 1
            sent_bytes += manifest[rel][0]
            if time.monotonic() - last_report > PROGRESS_INTERVAL_S:
                last_report = time.monotonic()
                say(f"{row['host']}: {sent}/{len(changed)} files, {_size(sent_bytes)}")
        row["state"] = "synced"
        row["files"] = f"{sent}/{len(manifest)}"
        row["sent"] = _size(sent_bytes)

    rows = on_every_host(hosts, settings, copy)
    return rows, len(manifest), total


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


# ------------------------------------------------------------ upgrade

def build_wheel(work_dir):
    """A wheel of this machine's minray, built from its source tree."""
    import subprocess
    import minray
    source = os.path.dirname(os.path.dirname(os.path.abspath(minray.__file__)))
    if not os.path.exists(os.path.join(source, "setup.py")):
        raise SystemExit(
            "minray-cluster upgrade: this machine's minray was not installed from a source "
            f"tree ({source} has no setup.py): pass --wheel PATH, --pip SPEC or --git URL")
    say(f"Building a wheel of minray {minray.__version__} from {source} ...")
    # With this environment's Cython and setuptools if it has them (quick,
    # offline), else in pip's isolated build environment.
    for isolation in (["--no-build-isolation"], []):
        result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                                 *isolation, "-w", work_dir, source],
                                capture_output=True, text=True)
        wheels = [f for f in os.listdir(work_dir) if f.endswith(".whl")]
        if result.returncode == 0 and wheels:
            break
    if result.returncode != 0 or not wheels:
        raise SystemExit("minray-cluster upgrade: building the wheel failed:\n"
                         + (result.stderr or result.stdout)[-2000:])
    return os.path.join(work_dir, wheels[0])


def upgrade(hosts, settings, wheel=None, pip_spec=None, git_url=None):
    """Install minray on every host, then restart their nodes on it."""
    from minray import __version__ as head_version
    from minray.session import read_token
    head = local_head()
    token = read_token(head.session_dir) if head is not None else None

    def restart(conn, row, found):
        """Start the host's node again (after it was stopped to upgrade)."""
        if head is None:
            raise HostError("its node was stopped and no head runs on this machine: run "
                            "minray-cluster up")
        remote.start_node(conn, found, head.address, token, settings.node_args,
                          settings.timeout)
        row["address"] = remote.node_address(conn, found, head.address)

    def install(conn, row):
        found = remote.probe(conn, settings.python, need_minray=False)
        row["before"] = row["minray"] = found.minray
        copied = None
        if wheel is not None:
            # A directory of its own: hosts may share a home directory.
            directory = f"{remote.state_dir(conn)}/wheel-{os.urandom(8).hex()}"
            conn.make_dirs(directory, mode=0o700)
            copied = f"{directory}/{os.path.basename(wheel)}"
            say(f"{row['host']}: copying {os.path.basename(wheel)} ...")
            conn.put(wheel, copied)
            # minray itself whatever version is there; its dependencies only if missing.
            steps = [["--force-reinstall", "--no-deps", copied], [copied]]
        elif pip_spec is not None:
            steps = [["--upgrade", pip_spec]]
        else:
            steps = [["--upgrade", f"git+{git_url}"]]
        had_nodes = bool(found.nodes)
        if had_nodes:
            remote.stop_nodes(conn, found, settings.timeout)
        try:
            for spec in steps:
                say(f"{row['host']}: pip install {' '.join(spec)}")
                code, out, err = conn.run(
                    shlex.join([found.python, "-m", "pip", "install", "-q", *spec]),
                    max(settings.timeout, 600))
                if code != 0:
                    lines = (err or out).strip().splitlines()
                    raise HostError(f"pip install failed: {lines[-1] if lines else code}")
        except HostError as exc:
            row["failed_state"] = "not installed"
            if had_nodes and found.minray is not None:
                try:
                    restart(conn, row, found)          # back on the version it had
                    row["failed_state"] = "not installed, node restarted"
                except HostError as again:
                    exc = HostError(f"{exc}; restarting its node failed: {again}")
            raise exc from None
        finally:
            if copied is not None:
                conn.remove(copied)
                conn.remove(os.path.dirname(copied), directory=True)
        after = remote.probe(conn, found.python)
        row["minray"] = after.minray
        row["state"] = "installed"
        if after.minray != head_version:
            raise HostError(f"the host now has minray {after.minray} but the head runs "
                            f"{head_version}: its node was not restarted (it would be refused); "
                            "install the same version on this machine and run minray-cluster up")
        if had_nodes:
            row["failed_state"] = "installed, node not restarted"
            restart(conn, row, after)
            row["state"] = "installed, node restarted"

    rows = on_every_host(hosts, settings, install, progress=True)
    if head is not None:
        _wait_registered(head, [r for r in rows if r.get("address")], settings.timeout)
    versions = {row["minray"] for row in rows if row.get("minray")} | {head_version}
    return rows, versions
