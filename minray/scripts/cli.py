"""The `minray` command line."""
import argparse
import os
import sys

from minray.gcs.tables import TABLES
from minray.session import SESSION_ROOT

LATEST_SESSION = os.path.join(SESSION_ROOT, "session_latest")


def _client(args):
    from minray.gcs import GcsClient
    from minray.local_cluster import latest_session
    from minray.session import UnsafeSessionPathError, check_private
    try:
        # The latest-session link is followed only if it is ours and inside the root.
        session_dir = args.session_dir or latest_session()
        if os.path.exists(session_dir):
            check_private(session_dir, "session directory")
    except (UnsafeSessionPathError, ConnectionError) as exc:
        sys.exit(f"minray: {exc}")
    if not os.path.exists(session_dir):
        sys.exit(f"minray: no session at {session_dir}; start a cluster or pass --session-dir")
    return GcsClient.from_session(session_dir, reconnect_timeout=5.0)


def cmd_list(args):
    from minray import state
    client = _client(args)
    try:
        print(state.format_table(state.rows(args.table, client, limit=args.limit)))
    finally:
        client.close()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="minray", description="minray cluster commands")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="print a control-store table (tasks, objects, ...)")
    p_list.add_argument("table", choices=TABLES)
    p_list.add_argument("--limit", type=int, default=100)
    p_list.add_argument("--session-dir", help=f"session directory (default {LATEST_SESSION})")
    p_list.set_defaults(func=cmd_list)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
