"""The `minray` command line: start, stop, status, list.

    minray start --head                         a head on 127.0.0.1:6380
    minray start --address HOST:PORT            join this machine to that cluster
    minray status                               nodes, resources, task counts
    minray list tasks|actors|objects|nodes|jobs|names|errors
    minray stop                                 stop what `minray start` started here

The cluster token never goes on a command line (where `ps` shows it): a
joining node reads it from --token-file, from MINRAY_TOKEN, or, on the head's
own machine, from the head's session.
"""
import argparse
import json
import os
import sys
import time

from minray.exceptions import RaySystemError
from minray.session import SESSION_ROOT

LATEST_SESSION = os.path.join(SESSION_ROOT, "session_latest")
LIST_TABLES = ("tasks", "actors", "objects", "nodes", "jobs", "names", "errors")
ID_WIDTH = 16                   # hex digits of an id shown in tables
CONTROL_STORE_WAIT_S = 30.0     # a head just started brings its control store up


class CommandError(Exception):
    """A failure to report as one line, without a traceback."""


# ------------------------------------------------------------ start

def cmd_start(args):
    from minray import node_launcher as launcher
    if args.head == (args.address is not None):
        raise CommandError("say what to start: `minray start --head` for a new cluster, or "
                           "`minray start --address HOST:PORT` to join one")
    if args.head and args.token_file:
        raise CommandError("--token-file is for joining a cluster; a head makes a new token")
    if not args.head and args.num_gcs_shards is not None:
        raise CommandError("--num-gcs-shards applies to the head only")
    options = {"node_ip_address": args.node_ip_address, "num_cpus": args.num_cpus,
               "num_gpus": args.num_gpus, "resources": _resources_option(args.resources),
               "object_store_memory": args.object_store_memory, "num_workers": args.num_workers}
    if args.restart and not args.head:
        raise CommandError("--restart restarts a head: use it with --head")
    if args.head and args.restart:
        session = launcher.dead_head_session()
        if session is None:
            raise CommandError("no head started on this machine has died: there is nothing "
                               "to restart (start a new cluster with `minray start --head`)")
        node = _start(launcher, head=True, port=args.port or 0, resume_session=session,
                      **options)
        print(f"Restarted the minray head {_short(node.node_id)} at {node.address} "
              f"(pid {node.pid}) in {session}: the other nodes link to it again.")
    elif args.head:
        port = launcher.DEFAULT_HEAD_PORT if args.port is None else args.port
        node = _start(launcher, head=True, port=port,
                      num_gcs_shards=args.num_gcs_shards or 1, **options)
        _print_head_started(node)
    else:
        try:
            head_address = launcher.normalize_address(args.address)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        token = _join_token(launcher, args, head_address)
        node = _start(launcher, head=False, head_address=head_address, token=token,
                      port=args.port or 0, **options)
        print(f"Started a minray node {_short(node.node_id)} at {node.address} (pid {node.pid}), "
              f"joined to the cluster at {node.head_address or head_address}.")
        print(f"  Session and logs: {node.session_dir}")
        print(f"Connect a driver on this machine with minray.init(address=\"{head_address}\").")
        print("Stop the nodes started on this machine with: minray stop")


def _start(launcher, **kwargs):
    try:
        return launcher.start_node(**kwargs)
    except (launcher.NodeStartError, ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None


def _resources_option(text):
    if text is None:
        return None
    try:
        resources = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"--resources must be a JSON object such as '{{\"accel\": 2}}': "
                           f"{exc}") from None
    if not isinstance(resources, dict):
        raise CommandError(f"--resources must be a JSON object such as '{{\"accel\": 2}}', "
                           f"got {text!r}")
    return resources


def _join_token(launcher, args, head_address):
    """The cluster token: --token-file, else MINRAY_TOKEN, else the session of
    a node of that cluster on this machine."""
    try:
        if args.token_file:
            return launcher.read_token_file(args.token_file)
        if os.environ.get(launcher.TOKEN_ENV):
            return launcher.parse_token(os.environ[launcher.TOKEN_ENV].strip(),
                                        f"the environment variable {launcher.TOKEN_ENV}")
        token = launcher.find_cluster_token(head_address)
    except (OSError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    if token is None:
        raise CommandError(
            f"no token for the cluster at {head_address}: copy the head's token file (its path "
            "is printed by `minray start --head`) to this machine, readable only by you "
            f"(chmod 600), and pass --token-file PATH, or set {launcher.TOKEN_ENV} to its "
            "contents. Never put the token itself on a command line.")
    return token


def _print_head_started(node):
    token_path = os.path.join(node.session_dir, "token")
    print(f"Started the minray head {_short(node.node_id)} at {node.address} (pid {node.pid}).")
    print(f"  Session and logs: {node.session_dir}")
    print(f"  Cluster token:    {token_path} (mode 0600; whoever holds it can run code "
          "on the cluster)")
    print()
    print("To join another machine to this cluster, copy the token file there (chmod 600) "
          "and run:")
    print(f"    minray start --address {node.address} --token-file PATH_TO_TOKEN")
    print("  (or set MINRAY_TOKEN to the file's contents instead of --token-file; on this "
          "machine neither is needed)")
    print("To connect a driver on a machine of the cluster:")
    print(f"    minray.init(address=\"{node.address}\")    # or address=\"auto\" for the "
          "newest node started there")
    print("To stop the nodes started on this machine: minray stop")


# ------------------------------------------------------------ stop

def cmd_stop(args):
    from minray import node_launcher as launcher
    nodes = launcher.local_nodes(detached_only=True)
    # Other nodes before heads: they leave the cluster while the head still runs.
    nodes.sort(key=lambda node: node.is_head)
    stopped = 0
    for node in nodes:
        if launcher.stop_node(node, force=args.force, grace_s=args.grace):
            stopped += 1
            role = "head" if node.is_head else "node"
            print(f"Stopped the minray {role} at {node.address} (pid {node.pid}).")
    stale = launcher.clean_stale_sessions()
    if not stopped:
        print("No minray nodes started by `minray start` were running on this machine."
              + (f" Cleaned up {stale} session(s) left by stopped nodes." if stale else ""))


# ------------------------------------------------------------ status

def _session_for(args):
    from minray.local_cluster import find_node_socket
    from minray.session import UnsafeSessionPathError
    address = getattr(args, "session_dir", None) or args.address or "auto"
    try:
        session_dir, _ = find_node_socket(address)
    except (ConnectionError, ValueError, UnsafeSessionPathError) as exc:
        raise CommandError(f"{exc}") from None
    return session_dir


def cmd_status(args):
    from minray import node_launcher as launcher
    session_dir = _session_for(args)
    with launcher.tool_client(session_dir) as client:
        nodes = _node_rows(client, session_dir)
        totals = client.request_info("resources")
    alive = [n for n in nodes if n.get("alive")]
    head = next((n for n in nodes if n.get("is_head")), None)
    where = f" at {head['address']}" if head and head.get("address") else ""
    print(f"minray cluster{where}: {len(alive)} node(s) alive, {len(nodes) - len(alive)} dead")
    print()
    print(_format_table([_node_status_row(n) for n in nodes]))
    print()
    print("Resources (used / total over live nodes):")
    total, available = totals.get("total", {}), totals.get("available", {})
    for name in sorted(total, key=_resource_order):
        used = total[name] - available.get(name, 0)
        print(f"  {name:<12} {_amount(name, used)} / {_amount(name, total[name])}")
    used_store = sum(n.get("store_used") or 0 for n in alive)
    capacity = sum(n.get("store_capacity") or 0 for n in alive)
    print(f"  {'object store':<12} {_size(used_store)} / {_size(capacity)}")
    pending = sum(_pending(n) or 0 for n in alive)
    running = sum(n.get("running") or 0 for n in alive)
    print(f"Tasks: {pending} pending, {running} running")


def _node_rows(client, session_dir):
    """The cluster's nodes as the node manager lists them; from a node manager
    without that list, this node alone (from its stats and resources)."""
    nodes = client.request_info("nodes")
    if nodes is not None:
        return nodes
    from minray.node_launcher import read_node_info
    stats = client.request_info("stats") or {}
    resources = client.request_info("resources") or {}
    store = stats.get("store") or {}
    info = read_node_info(session_dir) or {}
    tasks = client.request_info("tasks") or []
    return [{"node_id": client.welcome["node_id"].hex(), "address": info.get("address"),
             "alive": True, "is_head": info.get("is_head", True),
             "resources": resources.get("total", {}),
             "available": resources.get("available", {}),
             "store_used": store.get("used"), "store_capacity": store.get("capacity"),
             "pending": sum(1 for t in tasks if t.get("state") == "PENDING"),
             "running": sum(1 for t in tasks if t.get("state") == "RUNNING")}]


def _node_status_row(node):
    total, available = node.get("resources") or {}, node.get("available") or {}
    used = ", ".join(f"{name} {_amount(name, total[name] - available.get(name, 0))}/"
                     f"{_amount(name, total[name])}"
                     for name in sorted(total, key=_resource_order))
    store = (f"{_size(node.get('store_used') or 0)} / {_size(node.get('store_capacity') or 0)}"
             if node.get("store_capacity") else "")
    return {"node": _short(node.get("node_id")) + (" (head)" if node.get("is_head") else ""),
            "address": node.get("address") or "", "state": "ALIVE" if node.get("alive")
            else "DEAD", "resources used/total": used, "object store": store,
            "pending": _pending(node), "running": node.get("running", "")}


def _pending(node):
    # The interface names it "pending"; a node manager may call its queue "ready".
    pending = node.get("pending")
    return node.get("ready", "") if pending is None else pending


def _resource_order(name):
    return ({"CPU": 0, "GPU": 1, "memory": 2}.get(name, 3), name)


def _amount(name, value):
    if name == "memory":
        return _size(value)
    return f"{value:g}"


# ------------------------------------------------------------ list

def cmd_list(args):
    from minray import node_launcher as launcher
    session_dir = _session_for(args)
    with launcher.tool_client(session_dir) as client:
        rows = LISTERS[args.table](client, session_dir, args.limit)
    print(_format_table(rows[:args.limit]))


def _gcs_rows(session_dir, table, limit):
    from minray import state
    from minray.gcs import GcsClient
    client = GcsClient.from_session(_control_store_session(session_dir), reconnect_timeout=5.0)
    try:
        return state.rows(table, client, limit=limit)
    finally:
        client.close()


def _control_store_session(session_dir):
    """A session that knows where the cluster's control store listens: this
    node's once the head has started it (the head serves before its control
    store is up), else the head's, when the head runs on this machine."""
    from minray.gcs.supervisor import shard_map_file
    from minray.node_launcher import find_local_node, read_node_info
    info = read_node_info(session_dir) or {}
    sessions = [session_dir]
    if not info.get("is_head", True) and info.get("head_address"):
        head_session = find_local_node(info["head_address"])
        if head_session:
            sessions.append(head_session)
    deadline = time.monotonic() + CONTROL_STORE_WAIT_S
    while True:
        for session in sessions:
            if os.path.exists(shard_map_file(session)):
                return session
        if time.monotonic() > deadline:
            raise CommandError(
                f"the cluster's control store is not known in {session_dir}; run this command "
                "on the head's machine")
        time.sleep(0.02)


def _live_rows(client, session_dir, what):
    """Rows a node manager holds in memory ("tasks", "objects") from this node
    and every other node of the same cluster running on this machine (a node
    answers for itself only; nodes on other machines are not reachable here)."""
    from minray.node_launcher import local_nodes, query_node, read_node_info
    rows = list(client.request_info(what) or [])
    head_address = (read_node_info(session_dir) or {}).get("head_address")
    if head_address:
        for node in local_nodes():
            if node.head_address == head_address and node.session_dir != session_dir:
                try:
                    rows.extend(query_node(node.session_dir, what) or [])
                except (OSError, ConnectionError, RaySystemError):
                    continue            # it stopped while we asked: nothing live there
    return rows


def _list_tasks(client, session_dir, limit):
    live = _live_rows(client, session_dir, "tasks")
    rows = [{"id": _short(t["id"]), "name": t.get("name"), "state": t.get("state"),
             "node": _short(t.get("node")), "ended": ""} for t in live]
    seen = {t["id"] for t in live}
    for task in _gcs_rows(session_dir, "tasks", limit):
        if task["id"] in seen:
            continue
        rows.append({"id": _short(task["id"]), "name": task.get("name"),
                     "state": task.get("state"), "node": _short(task.get("node")),
                     "ended": _time(task.get("time"))})
    return rows


def _list_actors(client, session_dir, limit):
    return [{"id": _short(a["id"]), "class": a.get("class_name"), "state": a.get("state"),
             "name": a.get("name") or "", "namespace": a.get("namespace") or "",
             "node": _short(a.get("node")), "detached": "yes" if a.get("detached") else "",
             "restarts left": a.get("restarts_left", "")}
            for a in _gcs_rows(session_dir, "actors", limit)]


def _list_objects(client, session_dir, limit):
    live = _live_rows(client, session_dir, "objects")
    rows = [{"id": _short(o["id"]), "kind": o.get("kind"), "size": _size(o.get("size")),
             "node": _short(o.get("node")), "made by task": ""} for o in live]
    seen = {o["id"] for o in live}
    for obj in _gcs_rows(session_dir, "objects", limit):
        if obj["id"] in seen:
            continue
        rows.append({"id": _short(obj["id"]), "kind": obj.get("kind"),
                     "size": _size(obj.get("size")), "node": _short(obj.get("node")),
                     "made by task": _short(obj.get("task_id"))})
    return rows


def _list_nodes(client, session_dir, limit):
    return [_node_status_row(n) for n in _node_rows(client, session_dir)]


def _list_jobs(client, session_dir, limit):
    from minray.node_launcher import TOOL_NAMESPACE
    # The connections of minray's own tools (this command included) are not jobs.
    return [_readable(row) for row in _gcs_rows(session_dir, "jobs", limit)
            if row.get("namespace") != TOOL_NAMESPACE]


def _list_names(client, session_dir, limit):
    # The head knows every name; the local nodes are asked too, in case the
    # head runs on another machine.
    rows = {}
    for row in _live_rows(client, session_dir, ("actor", None)):
        key = (row.get("namespace") or "", row["name"])
        if key not in rows or row.get("detached") is not None:    # the creator's row wins
            rows[key] = row
    return [{"name": r["name"], "namespace": r.get("namespace"), "class": r.get("class_name"),
             "state": r.get("state"), "actor": _short(r.get("actor_id")),
             "detached": {True: "yes", False: "no"}.get(r.get("detached"), ""),
             "node": r.get("node") or ""}
            for _, r in sorted(rows.items())]


def _list_errors(client, session_dir, limit):
    records = {row["id"]: row for row in _gcs_rows(session_dir, "errors", limit)}
    for key, record in client.request_info("errors") or []:
        records[key] = dict(record, id=key)
    rows = sorted(records.values(), key=lambda r: r.get("time") or 0)
    return [{"time": _time(r.get("time")), "type": r.get("type"),
             "function": r.get("function") or "", "task": _short(r.get("task_id")),
             "message": _first_line(r.get("message"))} for r in rows]


LISTERS = {"tasks": _list_tasks, "actors": _list_actors, "objects": _list_objects,
           "nodes": _list_nodes, "jobs": _list_jobs, "names": _list_names,
           "errors": _list_errors}


# ------------------------------------------------------------ formatting

def _short(hex_id):
    if not hex_id:
        return ""
    if isinstance(hex_id, bytes):
        hex_id = hex_id.hex()
    return hex_id[:ID_WIDTH]


def _time(epoch):
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or epoch <= 0:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _size(nbytes):
    if not isinstance(nbytes, (int, float)) or isinstance(nbytes, bool):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _first_line(text):
    """The line of a message a reader wants: for a traceback, the exception's
    first line ("ValueError: ..."), else the message's first line."""
    if not text:
        return ""
    lines = str(text).splitlines()
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            for after in lines[index + 1:]:
                if after.strip() and not after.startswith((" ", "\t")):
                    return after.strip()
    return next((line.strip() for line in lines if line.strip()), "")


def _readable(row):
    """A row of a table whose layout this command does not know in detail:
    times as local times, bytes as hex, no nested pickles."""
    out = {}
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                "time" in key or key in ("start", "end", "started", "ended")):
            value = _time(value)
        elif isinstance(value, bytes):
            value = _short(value)
        elif isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, default=lambda v: _short(v) if isinstance(v, bytes)
                               else str(v))
        elif key == "id" or key.endswith("_id"):
            value = _short(value)
        elif isinstance(value, str):
            value = _first_line(value)
        out[key] = value
    return out


def _format_table(rows):
    from minray.state import format_table
    return format_table(rows, max_width=60)


# ------------------------------------------------------------ main

def _parser():
    from minray.node_launcher import DEFAULT_HEAD_PORT, TOKEN_ENV
    parser = argparse.ArgumentParser(prog="minray", description="minray cluster commands")
    sub = parser.add_subparsers(dest="command", required=True)

    start = sub.add_parser(
        "start", help="start a head (--head) or join this machine to a cluster (--address)",
        description="Start a node manager that runs until `minray stop`. The cluster token "
        f"comes from --token-file or {TOKEN_ENV}, never from the command line.")
    start.add_argument("--head", action="store_true", help="start a new cluster's head")
    start.add_argument("--address", help="HOST:PORT of the head to join")
    start.add_argument("--restart", action="store_true",
                       help="with --head: take over the cluster of the head that died on this "
                       "machine (its token, control store and address)")
    start.add_argument("--port", type=int, help=f"TCP port for peers (head default "
                       f"{DEFAULT_HEAD_PORT}; a joining node takes any free port)")
    start.add_argument("--node-ip-address", default="127.0.0.1",
                       help="the address this node listens on and tells peers (default "
                       "127.0.0.1)")
    start.add_argument("--num-cpus", type=float, help="CPUs (default: this machine's)")
    start.add_argument("--num-gpus", type=int, help="GPUs (default: CUDA_VISIBLE_DEVICES)")
    start.add_argument("--resources", help="custom resources as JSON, e.g. '{\"accel\": 2}'")
    start.add_argument("--object-store-memory", type=int, help="object store bytes")
    start.add_argument("--num-workers", type=int, help="worker processes (default: CPUs)")
    start.add_argument("--num-gcs-shards", type=int, help="control store shards (head only)")
    start.add_argument("--token-file", help="a 0600 file holding the cluster token (joining)")
    start.add_argument("--token", help=argparse.SUPPRESS)
    start.set_defaults(func=cmd_start)

    stop = sub.add_parser("stop", help="stop the nodes `minray start` started on this machine")
    stop.add_argument("--force", action="store_true", help="SIGKILL at once")
    stop.add_argument("--grace", type=float, default=10.0,
                      help="seconds to wait after SIGTERM before SIGKILL (default 10)")
    stop.set_defaults(func=cmd_stop)

    status = sub.add_parser("status", help="print the cluster's nodes, resources and tasks")
    status.add_argument("--address", help="HOST:PORT of the cluster (default: the newest "
                        "node started on this machine)")
    status.set_defaults(func=cmd_status)

    listing = sub.add_parser("list", help="print tasks, actors, objects, nodes, jobs, "
                             "named actors or errors")
    listing.add_argument("table", choices=LIST_TABLES)
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--address", help="HOST:PORT of the cluster (default: the newest "
                         "node started on this machine)")
    listing.add_argument("--session-dir", help=f"a session directory (default "
                         f"{LATEST_SESSION})")
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if getattr(args, "token", None) is not None:
        sys.exit("minray: refusing --token: a token on the command line is visible to every "
                 "user in `ps`. Put it in a file only you can read and pass --token-file, or "
                 "set MINRAY_TOKEN.")
    try:
        args.func(args)
    except CommandError as exc:
        sys.exit(f"minray: {exc}")
    except (ConnectionError, PermissionError) as exc:
        sys.exit(f"minray: {exc}")


if __name__ == "__main__":
    main()
