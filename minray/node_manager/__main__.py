"""Entry point of a node manager process (started by minray.init or minray start).

On the head node it first starts the control store's shard servers, which it
supervises; every node manager then serves its Unix socket until stopped.
"""
import argparse
import gc
import json
import logging
import os
import sys

from minray.gcs import GcsClient, GcsProcesses
from minray.node_manager.server import JoinError, run_node_manager
from minray.session import read_token, retire_session_dir

LOG_FLUSH_DELAY_S = 0.05
# The node manager keeps a few container objects per task in flight, and
# Python's cyclic collector went through all of them again and again: with
# 20,000 tasks in flight it took a quarter of the node manager's time at
# thresholds 14 times Python's, and a fifth at 140 times (docs/benchmarks.md).
# Its per-task objects make no reference cycles, so automatic collection is
# off and the event loop collects when the node is idle, or once a minute
# (NodeManager._collect_cycles). Its long-lived state (imports, tables) is
# frozen out of the collections.

# The event loop gives up the GIL at every select and send, which is when the
# background threads (the lineage log's writer, the control-store flusher)
# should run. At Python's default (5 ms) they also forced it off mid-handler,
# and each such hand-over costs a wake-up of the other thread on a busy host.
SWITCH_INTERVAL_S = 0.02


def main(argv=None):
    parser = argparse.ArgumentParser(description="minray node manager")
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--resources", required=True, help="JSON dict, e.g. {\"CPU\": 2}")
    parser.add_argument("--object-store-memory", type=int, required=True)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--gpu-ids", help="JSON list of the GPU ids this node hands out "
                        "(its CUDA_VISIBLE_DEVICES); default 0 .. GPU-1")
    parser.add_argument("--head", action="store_true")
    parser.add_argument("--num-gcs-shards", type=int, default=1)
    parser.add_argument("--embedded", action="store_true",
                        help="started by a driver: remove the session when done")
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--ready-file")
    parser.add_argument("--no-log-to-driver", action="store_true",
                        help="workers write to log files instead of this terminal")
    parser.add_argument("--node-ip-address", default="127.0.0.1",
                        help="the address other nodes reach this one at")
    parser.add_argument("--port", type=int, default=0,
                        help="TCP port for other node managers (0: any free port)")
    parser.add_argument("--resume", action="store_true",
                        help="head only: take over the session of a head that died (same "
                        "token, control store and ports)")
    parser.add_argument("--head-address",
                        help="HOST:PORT of the head node manager to join (not with --head)")
    args = parser.parse_args(argv)
    if args.head == bool(args.head_address):
        parser.error("give exactly one of --head and --head-address")
    # Our own log goes to the session; the terminal is the workers' (and the
    # driver's), so users see their prints, not our bookkeeping.
    logs = os.path.join(args.session_dir, "logs")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    logging.basicConfig(level=logging.INFO, filename=os.path.join(logs, "node_manager.log"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = read_token(args.session_dir)
    node_id = os.urandom(16)
    resources = json.loads(args.resources)
    gpu_ids = json.loads(args.gpu_ids) if args.gpu_ids else None
    if gpu_ids is not None and len(gpu_ids) != int(resources.get("GPU", 0)):
        parser.error(f"--gpu-ids lists {len(gpu_ids)} GPUs but the resources say "
                     f"{resources.get('GPU', 0)}")
    if args.resume and not args.head:
        parser.error("--resume applies to a head")
    ports = None
    if args.resume:
        from minray.gcs.supervisor import read_shard_map
        try:
            ports = [port for _, port in read_shard_map(args.session_dir)]
        except FileNotFoundError:
            ports = None
    gcs_processes = (GcsProcesses(args.session_dir, len(ports) if ports else args.num_gcs_shards,
                                  host=args.node_ip_address, ports=ports)
                     if args.head else None)

    def connect_gcs():
        if gcs_processes is not None:
            gcs_processes.start()
        # The task log is background work: gathering it for 50 ms makes big
        # batches and keeps the control store from waking once per task.
        return GcsClient.from_session(args.session_dir, flush_delay=LOG_FLUSH_DELAY_S)

    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.disable()
    profile_path = os.environ.get("MINRAY_PROFILE_NODE_MANAGER")
    if profile_path:                  # developer aid: cProfile the whole run
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        run_node_manager(args.session_dir, node_id, resources, args.object_store_memory,
                         token, connect_gcs, args.num_workers, args.embedded, args.ready_file,
                         args.parent_pid, log_to_driver=not args.no_log_to_driver,
                         gpu_ids=gpu_ids, node_ip=args.node_ip_address, port=args.port,
                         head_address=args.head_address, resume=args.resume)
    except JoinError as exc:
        logging.getLogger("minray.node_manager").error("%s", exc)
        raise SystemExit(2)
    finally:
        if profile_path:
            profiler.disable()
            profiler.dump_stats(profile_path)
        if gcs_processes is not None:
            gcs_processes.stop()
        if args.embedded:
            retire_session_dir(args.session_dir)


if __name__ == "__main__":
    main()
