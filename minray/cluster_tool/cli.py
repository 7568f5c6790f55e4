"""The `minray-cluster` command line (run on the head machine).

    minray-cluster up workers.txt               head here + a node on every host
    minray-cluster down workers.txt             stop the nodes, then the head
    minray-cluster status workers.txt           one row per host
    minray-cluster exec workers.txt -- CMD ...  run a command on every host
    minray-cluster sync workers.txt DIR [REMOTE_DIR]
    minray-cluster upgrade workers.txt [--wheel PATH | --pip SPEC | --git URL[@REF]]
"""
import argparse
import json
import sys
import tempfile

from minray.cluster_tool import commands
from minray.cluster_tool.ssh import SshOptions
from minray.cluster_tool.workers_file import WorkersFileError, read_workers


def _parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("workers", help="workers.txt: one [user@]host[:port] per line")
    ssh = common.add_argument_group("SSH")
    ssh.add_argument("--ssh-user", help="user on the hosts (default: the one in workers.txt, "
                     "else yours)")
    ssh.add_argument("--ssh-key", help="private key file (default: the SSH agent and ~/.ssh "
                     "keys, as ssh does)")
    ssh.add_argument("--ssh-port", type=int, default=22, help="port where workers.txt gives "
                     "none (default 22)")
    ssh.add_argument("--known-hosts", help="a known-hosts file to use besides "
                     "~/.ssh/known_hosts (new keys are recorded in it)")
    ssh.add_argument("--accept-new-host-keys", action="store_true",
                     help="record the key of a host seen for the first time (ssh's "
                     "accept-new); a changed key is always refused")
    common.add_argument("--python", help="the Python on the hosts (default: this Python's "
                        "path, else python3)")
    common.add_argument("--parallel", type=int, default=16, help="hosts worked on at once")
    common.add_argument("--timeout", type=float, default=60.0,
                        help="seconds for each step on a host (connect, start, command)")
    node = common.add_argument_group("nodes (up, upgrade)")
    node.add_argument("--num-cpus", type=float, help="CPUs of each node (default: the host's)")
    node.add_argument("--num-gpus", type=int, help="GPUs of each node")
    node.add_argument("--resources", help="custom resources of each node as JSON")
    node.add_argument("--head-address", help="the IP the hosts reach this machine on "
                      "(default: found from the SSH connection)")
    node.add_argument("--port", type=int, help="the head's port (default 6380)")

    parser = argparse.ArgumentParser(
        prog="minray-cluster", description="Manage a minray cluster over SSH: a head on this "
        "machine, a node on every host of workers.txt.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", parents=[common], help="start the head (if needed) and a node on "
                   "every host")
    down = sub.add_parser("down", parents=[common], help="stop every host's node, then the "
                          "head")
    down.add_argument("--keep-head", action="store_true", help="leave the head running")
    sub.add_parser("status", parents=[common], help="reachable, node running, registered, "
                   "version: one row per host")
    sub.add_parser("exec", parents=[common], help="run a command on every host",
                   usage="minray-cluster exec workers.txt [options] -- CMD [ARG ...]")
    sync = sub.add_parser("sync", parents=[common], help="copy a directory to every host "
                          "(changed files only)")
    sync.add_argument("local_dir")
    sync.add_argument("remote_dir", nargs="?", help="default: the same absolute path")
    upgrade = sub.add_parser("upgrade", parents=[common], help="install minray on every host "
                             "and restart the nodes")
    source = upgrade.add_mutually_exclusive_group()
    source.add_argument("--wheel", help="a minray wheel to install")
    source.add_argument("--pip", dest="pip_spec", help="a pip requirement, e.g. minray==0.2")
    source.add_argument("--git", dest="git_url", help="URL[@REF] of a minray repository")
    return parser


def _settings(args):
    if args.resources is not None:
        try:
            if not isinstance(json.loads(args.resources), dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise SystemExit(f"minray-cluster: --resources must be a JSON object such as "
                             f"'{{\"accel\": 2}}' ({exc})") from None
    if args.parallel < 1:
        raise SystemExit("minray-cluster: --parallel must be at least 1")
    if args.timeout <= 0:
        raise SystemExit("minray-cluster: --timeout must be a positive number of seconds")
    ssh = SshOptions(user=args.ssh_user, key=args.ssh_key, port=args.ssh_port,
                     known_hosts=args.known_hosts, accept_new=args.accept_new_host_keys,
                     timeout=args.timeout)
    return commands.Settings(
        ssh, python=args.python, parallel=args.parallel, timeout=args.timeout,
        node_args={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus,
                   "resources": args.resources},
        head_address=args.head_address, head_port=args.port)


def report(rows, columns):
    """The per-host table, then each failed host's error in full."""
    from minray.state import format_table
    print(format_table([{c: row.get(c, "") or "" for c in columns} for row in rows],
                       max_width=48))
    for row in rows:
        if row.get("error"):
            print(f"{row['host']}: {row['error']}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    # exec's command is everything after the first "--" (its own options too).
    command = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    args = _parser().parse_args(argv)
    if command and args.command != "exec":
        raise SystemExit(f"minray-cluster {args.command}: unexpected arguments after --: "
                         f"{' '.join(command)}")
    try:
        hosts = read_workers(args.workers)
    except WorkersFileError as exc:
        raise SystemExit(f"minray-cluster: {exc}") from None
    settings = _settings(args)
    if args.command == "up":
        rows, head = commands.up(hosts, settings)
        report(rows, ("host", "state", "address", "cpus", "gpus", "python", "time"))
        alive = sum(1 for r in rows if not r["error"])
        print(f"{alive} of {len(rows)} host(s) up; head at {head.address}. Connect a driver "
              f"here with minray.init(address=\"{head.address}\").")
        return commands.exit_code(rows)
    if args.command == "down":
        rows, head_row = commands.down(hosts, settings, keep_head=args.keep_head)
        report(rows + ([head_row] if head_row else []), ("host", "state", "time"))
        return commands.exit_code(rows + ([head_row] if head_row else []))
    if args.command == "status":
        rows, head = commands.status(hosts, settings)
        print(f"head: {head.address}" if head else "head: none running on this machine")
        report(rows, ("host", "state", "node", "registered", "minray", "python", "time"))
        return commands.exit_code(rows)
    if args.command == "exec":
        if not command:
            raise SystemExit("minray-cluster exec: give the command after --, e.g. "
                             "minray-cluster exec workers.txt -- uptime")
        rows = commands.execute(hosts, settings, command)
        report(rows, ("host", "state", "exit", "time"))
        return commands.exit_code(rows)
    if args.command == "sync":
        rows, files, total = commands.sync(hosts, settings, args.local_dir, args.remote_dir)
        print(f"{args.local_dir}: {files} file(s), {commands._size(total)}")
        report(rows, ("host", "state", "files", "sent", "time"))
        return commands.exit_code(rows)
    if args.command == "upgrade":
        with tempfile.TemporaryDirectory(prefix="minray-wheel-") as work_dir:
            wheel = args.wheel
            if wheel is None and args.pip_spec is None and args.git_url is None:
                wheel = commands.build_wheel(work_dir)
            rows, versions = commands.upgrade(hosts, settings, wheel=wheel,
                                              pip_spec=args.pip_spec, git_url=args.git_url)
        report(rows, ("host", "state", "before", "minray", "time"))
        if len(versions) > 1:
            print("MIXED VERSIONS: the head and hosts run minray " + ", ".join(sorted(versions))
                  + "; nodes on a version other than the head's can't join it", file=sys.stderr)
            return 1
        return commands.exit_code(rows)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
