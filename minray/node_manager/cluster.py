"""Cluster membership: which nodes exist, what they hold, which are alive.

The head node manager keeps the cluster view. A node joins by connecting
to the head (minray.node_manager.peers) and saying hello with its id,
address, resources and minray version; the head answers "joined" (or
"refused", naming both versions when they differ), records the node in the
control store's nodes table, and from then on sends every node the whole
view ("nodes") whenever it changes and once per heartbeat interval.

Every node sends the head a heartbeat with its load (free resources, queued
and running tasks, object store use) every HEARTBEAT_INTERVAL_S. A node
whose connection to the head closes (its process died) is marked dead at
once; one that goes silent (stopped, cut off) after MINRAY_NODE_TIMEOUT_S.
Each node manager then fails or retries what depended on it
(NodeManager.node_died).
"""
import asyncio
import logging
import os
import time

from minray import __version__
from minray._core.scheduler import shape_resources

log = logging.getLogger("minray.node_manager")

HEARTBEAT_INTERVAL_S = 0.5
# Tasks one node may have sent to another and not seen finish, per CPU of the
# receiving node: enough to keep its workers' pipelines full of short tasks.
SPILL_CREDITS_PER_CPU = 8
# Tries (RECONNECT_DELAY_S apart) to reach the head when joining, before the
# node gives up: nothing listens at that address.
JOIN_CONNECT_ATTEMPTS = 10


def _seconds_setting(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def node_timeout_s():
    return _seconds_setting("MINRAY_NODE_TIMEOUT_S", 3.0)


def head_timeout_s():
    """How long a node goes on without hearing from its head (the cluster is
    gone, or this node was cut off and declared dead) before it stops: the
    time a head has to be restarted (MINRAY_HEAD_TIMEOUT_S)."""
    return _seconds_setting("MINRAY_HEAD_TIMEOUT_S", max(30.0, 10 * node_timeout_s()))


class NodeInfo:
    """One node as the cluster view knows it (plain data in messages; its
    node_id in hex)."""

    FIELDS = ("node_id", "address", "transfer_address", "is_head", "resources",
              "available", "ready", "running", "store_used", "store_capacity", "alive",
              "pid", "hostname")

    def __init__(self, **fields):
        for name in self.FIELDS:
            setattr(self, name, fields.get(name))
        self.alive = fields.get("alive", True)
        self.last_heard = time.monotonic()

    def row(self):
        return {name: getattr(self, name) for name in self.FIELDS}


class ClusterView:
    """The nodes of the cluster; on the head, also their registration and
    heartbeats. `on_node_died(address)` is called once per node that dies."""

    def __init__(self, own, head_address, peers, lineage, on_node_died):
        self.own = own                     # NodeInfo of this node
        self.address = own.address
        self.head_address = head_address
        self.is_head = own.is_head
        self.peers = peers
        self.lineage = lineage
        self.on_node_died = on_node_died
        self.nodes = {own.address: own}
        self.joined = None                 # future: set when the head accepted us
        self.load = None                   # () -> this node's load fields
        self.timeout_s = node_timeout_s()
        self.dead_addresses = set()
        self.in_flight = {}                # address -> our tasks running or queued there
        self.on_head_lost = None           # (why) -> None: a node whose head is gone stops
        self.rebalance = None              # () -> None: move queued tasks to nodes with room
        self.heard_from_head = time.monotonic()
        # A restarted head: address -> (row, deadline) of nodes the control
        # store lists as alive that have not linked to us again yet.
        self.expected = {}
        self.declared_dead = set()         # (hex) ids of nodes the control store lists dead

    # ------------------------------------------------------------ both sides
    def start(self):
        loop = asyncio.get_running_loop()
        self.joined = loop.create_future()
        if self.is_head:
            self._record(self.own)
            self.joined.set_result(None)
        else:
            head = self.peers.get(self.head_address)
            head.send(("heartbeat", self._load_fields()))
        return asyncio.ensure_future(self._heartbeats())

    async def _heartbeats(self):
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            if self.rebalance is not None:
                self.rebalance()
            if self.is_head:
                self.update_own(self._load_fields())
                self._check_timeouts()
                self.broadcast()
            else:
                self.peers.get(self.head_address).send(("heartbeat", self._load_fields()))
                silent = time.monotonic() - self.heard_from_head
                if silent > head_timeout_s() and self.on_head_lost is not None:
                    self.on_head_lost(
                        f"no word from the head {self.head_address} for {silent:.0f} s (a head "
                        "that died must be restarted within MINRAY_HEAD_TIMEOUT_S, "
                        f"{head_timeout_s():.0f} s)")
                    return

    def _load_fields(self):
        return self.load() if self.load is not None else {}

    def _update(self, info, load):
        for name in ("available", "ready", "running", "store_used", "store_capacity"):
            if name in load:
                setattr(info, name, load[name])
        info.last_heard = time.monotonic()

    def update_own(self, load):
        self._update(self.own, load)

    def alive_nodes(self):
        return [n for n in self.nodes.values() if n.alive]

    def is_alive(self, address):
        """Whether a node is alive as far as we know (one not heard of yet is)."""
        node = self.nodes.get(address)
        return node is None or node.alive

    def rows(self):
        return [n.row() for n in self.nodes.values()]

    def totals(self):
        """Resources summed over live nodes: (total, available)."""
        total, available = {}, {}
        for node in self.alive_nodes():
            for name, amount in (node.resources or {}).items():
                total[name] = total.get(name, 0.0) + amount
            for name, amount in (node.available or node.resources or {}).items():
                available[name] = available.get(name, 0.0) + amount
        return total, available

    # ------------------------------------------------------------ head side
    def on_hello(self, conn, info):
        """A node asks to join (on the connection it opened). Returns the
        reason it was refused, or None."""
        version = info.get("version")
        if version != __version__:
            return (f"this node runs minray {version} but the head runs minray {__version__}: "
                    "install the same version on every node")
        address = info.get("address")
        if address in self.nodes and self.nodes[address].alive \
                and self.nodes[address].node_id != info.get("node_id"):
            return f"a live node already has the address {address}"
        node = NodeInfo(**{name: info.get(name) for name in NodeInfo.FIELDS})
        node.alive = True
        node.available = dict(node.resources or {})
        self.nodes[address] = node
        self.dead_addresses.discard(address)
        self._record(node)
        log.info("node %s (%s) joined with %s", address, str(info.get("node_id"))[:8],
                 node.resources)
        self.broadcast()
        return None

    def on_heartbeat(self, peer, load):
        node = self.nodes.get(peer.address)
        if node is None or not node.alive:
            return
        self._update(node, load)

    def link_lost(self, address):
        """The connection a node opened to us closed: its process is gone."""
        node = self.nodes.get(address)
        if self.is_head and node is not None and node.alive and node is not self.own:
            self.mark_dead(node, "its connection to the head closed")

    def expect(self, rows):
        """A restarted head: the newest record of each node marked alive."""
        newest = {}
        for row in rows:
            address = row.get("address")
            if isinstance(address, str) and (address not in newest or
                                             row.get("time", 0) > newest[address].get("time", 0)):
                newest[address] = row
        deadline = time.monotonic() + max(3 * self.timeout_s, 5.0)
        self.declared_dead.update(row.get("node_id") for row in rows
                                  if row.get("state") == "DEAD")
        for address, row in newest.items():
            if row.get("state") == "ALIVE" and address != self.own.address \
                    and address not in self.nodes:
                self.expected[address] = (row, deadline)
        if self.expected:
            log.info("restarted head: waiting for %d node(s) to link again: %s",
                     len(self.expected), ", ".join(sorted(self.expected)))

    def _check_expected(self, now):
        for address, (row, deadline) in list(self.expected.items()):
            if address in self.nodes:
                del self.expected[address]
            elif now > deadline:
                del self.expected[address]
                node = self.nodes[address] = NodeInfo(
                    **{name: row.get(name) for name in NodeInfo.FIELDS})
                self.mark_dead(node, "it did not link to the restarted head")

    def _check_timeouts(self):
        now = time.monotonic()
        if self.expected:
            self._check_expected(now)
        for node in self.alive_nodes():
            if node is not self.own and now - node.last_heard > self.timeout_s:
                self.mark_dead(node, f"no heartbeat for {now - node.last_heard:.1f} s")

    def mark_dead(self, node, why):
        node.alive = False
        node.available = {}
        log.warning("node %s is dead: %s", node.address, why)
        self._record(node)
        self.broadcast()
        # If it still runs (stopped, cut off), it must hear it and stop.
        self.peers.get(node.address).send(("nodes", self.rows()))
        self._died(node.address)

    def broadcast(self):
        rows = self.rows()
        for node in self.alive_nodes():
            if node is not self.own:
                self.peers.get(node.address).send(("nodes", rows))

    def _record(self, node):
        row = node.row()
        row["state"] = "ALIVE" if node.alive else "DEAD"
        row["host"] = node.address.rpartition(":")[0]
        row["time"] = time.time()
        self.lineage.log("nodes", bytes.fromhex(node.node_id), row)

    # ------------------------------------------------------------ node side
    def on_joined(self, info):
        if not self.joined.done():
            self.joined.set_result(info)

    def link_failed(self, peer, reason, final, attempts):
        """A connection to a node failed. While joining, the head's failures
        end the join: at once if retrying can't help, or after a few tries
        (no head listens there)."""
        if self.is_head or peer.address != self.head_address or self.joined is None \
                or self.joined.done():
            return
        if final:
            self.joined.set_exception(ConnectionRefusedError(reason))
        elif attempts >= JOIN_CONNECT_ATTEMPTS:
            self.joined.set_exception(ConnectionRefusedError(
                f"no head answers there ({reason}, {attempts} tries)"))

    def on_refused(self, reason):
        if not self.joined.done():
            self.joined.set_exception(ConnectionRefusedError(reason))

    def on_nodes(self, rows):
        """The head's view: adopt it; deaths are acted on once."""
        self.heard_from_head = time.monotonic()
        for row in rows:
            address = row["address"]
            if address == self.address:
                if not row.get("alive") and self.on_head_lost is not None:
                    # (it stopped answering for a while: the others have
                    # already given up on what it held)
                    self.on_head_lost("the head declared this node dead")
                continue
            node = self.nodes.get(address)
            if node is None:
                node = self.nodes[address] = NodeInfo(**row)
            else:
                for name in NodeInfo.FIELDS:
                    setattr(node, name, row.get(name))
            if not node.alive:
                self._died(address)

    def _died(self, address):
        if address in self.dead_addresses:
            return
        self.dead_addresses.add(address)
        peer = self.peers.known(address)
        if peer is not None:
            peer.died()
            del self.peers.peers[address]
        self.on_node_died(address)

    # ------------------------------------------------------------ global scheduler
    def pick_node(self, resources, arg_bytes=None, exclude=(), need_room=True):
        """The live node to send a task to, or None.

        Only nodes that could ever run it; with need_room, only those with
        room for more of our tasks now (SPILL_CREDITS_PER_CPU tasks in flight
        per CPU, counted until they finish: the credit flows back as fast as
        the node works, not once per heartbeat). Among those: the node
        holding the most bytes of its arguments, then the least loaded.
        """
        best, best_key = None, None
        for node in self.alive_nodes():
            if node.address in exclude or not _fits(node.resources or {}, resources):
                continue
            if need_room and not self._has_credit(node):
                continue
            load = self._in_flight_per_cpu(node) + (node.ready or 0) / _cpus(node)
            key = ((arg_bytes or {}).get(node.address, 0), -load)
            if best_key is None or key > best_key:
                best, best_key = node, key
        if best is not None:
            self.took_credit(best.address)
        return best

    def _in_flight_per_cpu(self, node):
        return self.in_flight.get(node.address, 0) / _cpus(node)

    def _has_credit(self, node):
        """Fewer of our tasks in flight there than SPILL_CREDITS_PER_CPU per CPU."""
        return self._in_flight_per_cpu(node) < SPILL_CREDITS_PER_CPU

    def took_credit(self, address):
        self.in_flight[address] = self.in_flight.get(address, 0) + 1

    def nodes_with_room(self, addresses=None):
        """Live nodes (among `addresses`) with credit left for our tasks."""
        for node in self.alive_nodes():
            if node is self.own or (addresses is not None and node.address not in addresses):
                continue
            if self._has_credit(node):
                yield node

    def movable_shape(self, node, ready_counts, local_load):
        """A resource shape of ready tasks here that could go to `node` now
        (it fits the node, the node has credit, and it has fewer of our tasks
        per CPU than wait here), or None."""
        if not self._has_credit(node) or self._in_flight_per_cpu(node) >= local_load:
            return None
        for shape, count in ready_counts.items():
            if count and _fits(node.resources or {}, shape_resources(shape)):
                return shape
        return None

    def task_returned(self, address):
        count = self.in_flight.get(address, 0) - 1
        if count > 0:
            self.in_flight[address] = count
        else:
            self.in_flight.pop(address, None)

    def pick_node_for_actor(self, needed, exclude, need_room):
        """A live node to host an actor: one whose free resources (as of its
        last heartbeat, less what we placed there since) fit it, the freest
        first; without need_room, any node that could ever fit it."""
        best, best_free = None, None
        for node in self.alive_nodes():
            if node.address in exclude or not _fits(node.resources or {}, needed):
                continue
            available = node.available or {}
            if need_room and not _fits(available, needed):
                continue
            free = available.get("CPU", 0.0)
            if best is None or free > best_free:
                best, best_free = node, free
        if best is not None and best.available:
            best.available = {name: amount - needed.get(name, 0.0)
                              for name, amount in best.available.items()}
        return best

    def room_elsewhere(self, needed):
        return any(node is not self.own and _fits(node.available or {}, needed)
                   for node in self.alive_nodes())

    def idle_elsewhere(self, resources, local_load):
        """Whether another live node could take one more of our tasks now:
        it has credit left, and fewer of our tasks per CPU than `local_load`
        (tasks waiting here per CPU)."""
        return any(node is not self.own and _fits(node.resources or {}, resources)
                   and self._has_credit(node) and self._in_flight_per_cpu(node) < local_load
                   for node in self.alive_nodes())


def _cpus(node):
    return max(1.0, (node.resources or {}).get("CPU", 1.0))


def _fits(available, request):
    return all(amount <= available.get(name, 0.0) + 1e-9 for name, amount in request.items())
