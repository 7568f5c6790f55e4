"""What tasks print, routed to the driver of their job, wherever it runs.

A worker sends its tasks' output tagged with the job id (minray.worker.output).
The job's driver is either connected to this node manager, or reached through
the peer the job's work came from: the first node that sent us a task, actor
or call of the job. That node in turn knew the job earlier, so following
first-learned routes leads to the driver's node. (Routes of a job whose
driver has left can go stale; output never goes back to the node it came
from, nor through more than MAX_HOPS nodes.) It normally arrives before the
results it goes with, which travel the same links.

Output no driver wants (the driver left, or a detached actor of a finished
job) goes to this node manager's own stdout when that is the terminal of the
driver that started the node, and is otherwise dropped: a worker of a node
started with `minray start` keeps a copy in its log file.
"""
import logging

from minray import ids
from minray.protocol import STDERR, STDOUT
from minray.runtime.core import print_output

ROUTES_MAX = 10_000            # jobs whose way to the driver is remembered
MAX_HOPS = 8                   # nodes forwarded output may pass (routes can go stale)

log = logging.getLogger("minray.node_manager")


class OutputRouter:
    def __init__(self, node_ip, print_unrouted):
        self.node_ip = node_ip
        self.print_unrouted = print_unrouted
        self.drivers = {}          # job id -> the driver's Connection on this node
        self.quiet_jobs = set()    # jobs whose driver said log_to_driver=False
        self.routes = {}           # job id -> Peer toward the job's driver

    # ------------------------------------------------------------ who wants what
    def driver_joined(self, conn, info):
        job_id = info.get("job_id")
        if not isinstance(job_id, bytes) or info.get("tool"):
            return
        if info.get("log_to_driver", True):
            self.drivers[job_id] = conn
        else:
            self.quiet_jobs.add(job_id)

    def driver_left(self, conn):
        job_id = conn.job_info.get("job_id")
        if self.drivers.get(job_id) is conn:
            del self.drivers[job_id]

    def learn_route(self, work_id, peer):
        """A task, actor or call (by its id) came from peer: its job's driver
        is that way, unless we already know a way."""
        job_id = work_id[:ids.JOB_ID_SIZE]
        known = self.routes.get(job_id)
        if (known is not None and not known.closed) or job_id in self.drivers:
            return
        if len(self.routes) >= ROUTES_MAX:
            del self.routes[next(iter(self.routes))]      # the oldest
        self.routes[job_id] = peer

    # ------------------------------------------------------------ routing
    def from_worker(self, conn, chunks):
        """A worker's ("output", [(job id, label, stream, text)])."""
        pid = conn.worker.pid if conn.worker is not None else "?"
        self._route([(job_id, f"{label} pid={pid}", stream_no, text)
                     for job_id, label, stream_no, text in _checked(chunks)])

    def from_peer(self, peer, hops, chunks):
        """Another node's ("forwarded_output", hops, [(job id, prefix, stream, text)])."""
        if type(hops) is not int:
            raise ValueError(f"hops must be an int, got {hops!r:.40}")
        self._route(list(_checked(chunks)), source=peer, hops=hops)

    def _route(self, chunks, source=None, hops=0):
        to_drivers, to_peers = {}, {}
        for job_id, prefix, stream_no, text in chunks:
            driver = self.drivers.get(job_id)
            if driver is not None and not driver.closed:
                to_drivers.setdefault(driver, []).append((prefix, stream_no, text))
                continue
            peer = self.routes.get(job_id)
            if (peer is not None and not peer.closed and peer is not source
                    and hops < MAX_HOPS and job_id not in self.quiet_jobs):
                if source is None:
                    prefix = f"{prefix}, ip={self.node_ip}"
                to_peers.setdefault(peer, []).append((job_id, prefix, stream_no, text))
            elif self.print_unrouted and job_id not in self.quiet_jobs:
                print_output([(prefix, stream_no, text)])
        for driver, driver_chunks in to_drivers.items():
            driver.send(("output", driver_chunks))
        for peer, peer_chunks in to_peers.items():
            peer.send(("forwarded_output", hops + 1, peer_chunks))


def _checked(chunks):
    """The well-formed (job id, str, stream, text) chunks; the rest is logged."""
    for chunk in chunks if isinstance(chunks, list) else ():
        if (isinstance(chunk, tuple) and len(chunk) == 4 and isinstance(chunk[0], bytes)
                and isinstance(chunk[1], str) and chunk[2] in (STDOUT, STDERR)
                and isinstance(chunk[3], str)):
            yield chunk
        else:
            log.warning("dropped a malformed output chunk: %.100r", chunk)
