"""A template process that forks new workers in milliseconds.

Starting a Python worker from scratch costs ~0.2 s of interpreter start and
imports on this machine; forking one from a single-threaded process that has
already imported the worker code costs a few milliseconds. The node manager
starts one zygote and writes one JSON line per worker to its stdin; the zygote
exits when that pipe closes (the node manager is gone).
"""
import ctypes
import json
import os
import signal
import sys

# One math-library thread per worker unless the user chose otherwise: workers
# already run one per CPU, and oversubscribed BLAS threads thrash (a numpy
# matrix-vector product ran 18x slower with two threads on a busy 2-core
# machine). Set before numpy is ever imported in a worker.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

from minray.worker.executor import run_worker   # noqa: E402  (imports the fork inherits)


PR_SET_PDEATHSIG = 1


def serve(requests):
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)     # children are reaped for us
    zygote_pid = os.getpid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None                    # not Linux: workers exit when their task ends
    for line in requests:
        request = json.loads(line)
        if os.fork() == 0:
            _die_with_parent(prctl, zygote_pid)
            _become_worker(request)


def _die_with_parent(prctl, zygote_pid):
    """Get SIGKILL when the zygote exits, as it does when the node manager is
    gone (even killed -9): a worker busy in a task is then not left running."""
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != zygote_pid:      # the zygote died before prctl took effect
        os._exit(1)


def _become_worker(request):
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if request.get("log_file"):
            fd = os.open(request["log_file"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
        os.environ["MINRAY_WORKER_ID"] = request["worker_id"]
        run_worker(request["socket"], request["session_dir"], request["store"],
                   bytes.fromhex(request["node_id"]), request["worker_id"],
                   log_file=bool(request.get("log_file")))
    except BaseException:
        import traceback
        traceback.print_exc(file=sys.__stderr__)    # (not forwarded: we exit now)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main():
    serve(sys.stdin)


if __name__ == "__main__":
    main()
