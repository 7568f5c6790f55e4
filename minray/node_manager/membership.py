"""This node's membership in the cluster: joining the head, accepting nodes
(on the head), a head that was restarted, a head that is gone.

A node joins by linking to the head, which answers "joined" with where the
control store is. If the head's node manager dies, the other nodes go on for
MINRAY_HEAD_TIMEOUT_S; a head restarted in the dead one's session (same
address, token and control store) is linked to again by every node, which
then tells it what only it knows (its actors' names). The restarted head
expects the nodes the control store lists as alive, and declares dead those
that do not come back.
"""
import asyncio
import logging
import os
import time

from minray import wire

log = logging.getLogger("minray.node_manager")

JOIN_TIMEOUT_S = 30.0


class JoinError(RuntimeError):
    """This node could not join the cluster (unreachable head, refused)."""


class Membership:
    def __init__(self, manager):
        self.manager = manager          # the NodeManager
        self.head_node_id = None        # the head we joined (a restarted one has another)

    async def expect_known_nodes(self):
        """A restarted head: the nodes the control store lists as alive should
        link to us again; those that do not within the node timeout are
        declared dead (and what they held is dealt with everywhere)."""
        try:
            rows = await asyncio.get_running_loop().run_in_executor(None, self._known_nodes)
        except Exception as exc:
            log.error("could not read the nodes table of the control store: %s", exc)
            return
        self.manager.cluster.expect(rows)

    def _known_nodes(self):
        from minray.gcs import GcsClient
        from minray.gcs.supervisor import shard_map_file
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not os.path.exists(shard_map_file(self.manager.session_dir)):
            if time.monotonic() > deadline:
                raise TimeoutError("the control store did not start")
            time.sleep(0.05)
        client = GcsClient.from_session(self.manager.session_dir)
        try:
            return [row for _, row in client.scan("nodes", limit=1 << 20)
                    if isinstance(row, dict)]
        finally:
            client.close()

    def head_lost(self, why):
        """This node stops: its drivers hear why before their connection closes."""
        log.error("%s: this node stops", why)
        for conn in self.manager.drivers:
            conn.send(("error", f"{why}: the node manager of this driver stops"))
        self.manager.stopping.set()

    async def join(self):
        head = self.manager.head_address
        try:
            info = await asyncio.wait_for(self.manager.cluster.joined, JOIN_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise JoinError(f"cannot join the cluster at {head}: the head did not answer "
                            f"within {JOIN_TIMEOUT_S:.0f} s") from None
        except ConnectionRefusedError as exc:
            raise JoinError(f"cannot join the cluster at {head}: {exc}") from None
        # Our log goes to the head's control store, like every node's.
        from minray.gcs.supervisor import shard_map_file, write_shard_map
        session_dir = self.manager.session_dir
        os.makedirs(os.path.dirname(shard_map_file(session_dir)), mode=0o700, exist_ok=True)
        write_shard_map(session_dir, _shard_addresses(info))
        self.head_node_id = info.get("head_node_id")

    def peer_hello(self, conn, info):
        """Another node manager opened a link to us (a node joining, on the head)."""
        if not isinstance(info, dict) or not isinstance(info.get("address"), str):
            raise wire.ProtocolError("a node's hello must carry its address")
        conn.role = "node"
        address = info["address"]
        if self.manager.cluster.is_head:
            known = self.manager.cluster.nodes.get(address)
            refused = None
            if known is None and info.get("node_id") in self.manager.cluster.declared_dead:
                refused = (f"node {address} was declared dead before the head restarted; "
                           "stop it and start a fresh node to rejoin")
            elif known is None:
                refused = self.manager.cluster.on_hello(conn, info)
            elif not known.alive:
                refused = (f"node {address} was marked dead; stop it and start a fresh node "
                           "to rejoin")
            if refused is not None:
                log.warning("refused node %s: %s", address, refused)
                conn.send(("refused", refused))
                conn._flush()              # it must hear why before the link closes
                conn.closed = True
                conn.transport.close()
                return
            if known is None:
                self._send_joined(conn)
        peer = self.manager.peers.get(address)
        peer.node_id = info.get("node_id")
        conn.peer_node = peer
        conn.peer = f"node {address}"

    def _send_joined(self, conn, waited=0.0):
        """Accept a node: tell it where the control store is (which the head
        may still be starting)."""
        from minray.gcs.supervisor import read_shard_map
        try:
            shards = read_shard_map(self.manager.session_dir)
        except FileNotFoundError:
            if waited < JOIN_TIMEOUT_S:
                asyncio.get_running_loop().call_later(0.05, self._send_joined, conn, waited + 0.05)
            return
        conn.send(("joined", {"gcs": shards, "head_node_id": self.manager.node_id}))

    def on_joined(self, peer, info):
        if peer.address != self.manager.head_address or not isinstance(info, dict):
            raise wire.ProtocolError(f"'joined' from {peer.address}, which is not our head")
        _shard_addresses(info)                          # (checked before anything changes)
        if self.manager.cluster.joined.done():
            self._rejoined(info)
        self.manager.cluster.on_joined(info)

    def _rejoined(self, info):
        """The head accepted us again. A restarted one (another node id): its
        tables came back from the control store, but what the dead one held
        in memory is gone, as on any node's death; and what only we know (our
        actors' names), it hears again."""
        head_id = info.get("head_node_id")
        if head_id == self.head_node_id:
            return                                      # (the same head, a new link)
        self.head_node_id = head_id
        manager = self.manager
        log.warning("the head %s was restarted (node %s); linked to it again",
                    manager.head_address,
                    head_id.hex()[:8] if isinstance(head_id, bytes) else "?")
        from minray.gcs.supervisor import write_shard_map
        write_shard_map(manager.session_dir, _shard_addresses(info))
        self._old_head_died()
        manager.actors.claim_names_again()

    def _old_head_died(self):
        """The dead head's tasks, actors and objects, as a node death's (but
        the address stays a live peer: the new head has it)."""
        manager = self.manager
        address = manager.head_address
        peer = manager.peers.known(address)
        if peer is not None:
            peer.functions.clear()                      # the new head has no code of ours
        manager.tasks.node_died(address)
        manager.actors.node_died(address)
        manager.recovery.node_died(address)
        if peer is not None:
            manager.objects.forget_connection(peer)
        manager.dispatcher.schedule()

    def on_refused(self, peer, reason):
        self.manager.cluster.on_refused(reason)


def _shard_addresses(info):
    """The control store's shard addresses a "joined" message carries, checked."""
    shards = info.get("gcs")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str)
            and isinstance(a[1], int) for a in shards):
        raise wire.ProtocolError(f"'joined' must list the shards as (host, port), got "
                                 f"{shards!r:.100}")
    return [tuple(a) for a in shards]
