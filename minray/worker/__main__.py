"""Entry point of a worker process (started by the node manager)."""
import argparse

from minray.worker.executor import run_worker


def main(argv=None):
    parser = argparse.ArgumentParser(description="minray worker")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--worker-id", required=True)
    args = parser.parse_args(argv)
    run_worker(args.socket, args.session_dir, args.store, bytes.fromhex(args.node_id),
               args.worker_id)


if __name__ == "__main__":
    main()
