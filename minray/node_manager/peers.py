"""Links between node managers: one authenticated TCP connection each way.

Every node manager listens on TCP (its address, "ip:port") beside its Unix
socket, with the same token handshake (minray.wire). A node sends to another
only over the connection it opened itself, so the messages from one node to
another arrive in the order they were sent (a borrow before the free that
follows it); the connection the other side opened carries the other
direction. Messages received on either are handled as coming from the same
`Peer`.

A `Peer` stands for a remote node in the object directory and the task
tables: like a client connection, it has send() and closed, so a peer can
own, borrow, wait for or run objects and tasks. Messages sent before its
connection is up are queued; the connection is retried until the cluster
view says the node is dead.
"""
import asyncio
import logging

from minray import wire

log = logging.getLogger("minray.node_manager")

RECONNECT_DELAY_S = 0.2


def parse_address(address):
    """("ip", port) of an "ip:port" node address; ValueError if malformed."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"a node address is 'host:port', got {address!r}")
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise ValueError(f"a node address is 'host:port' with a port from 1 to 65535, "
                         f"got {address!r}")
    return host, number


class Peer:
    """A remote node manager, as seen from this one."""

    role = "node"
    worker = None
    embedded_owner = False

    def __init__(self, table, address):
        self.table = table
        self.address = address
        self.node_id = None
        self.link = None             # the connection we opened (we send on it)
        self.pending = []            # messages waiting for that connection
        self.connecting = False
        self.closed = False          # the node is dead: nothing more goes to it
        self.functions = set()       # ids of the functions whose code we sent it
        self.peer = f"node {address}"

    def send(self, message):
        if self.closed:
            return
        link = self.link
        if link is not None and not link.closed:
            link.send(message)
            return
        self.pending.append(message)
        if not self.connecting:
            self.connecting = True
            asyncio.ensure_future(self._connect())

    async def _connect(self):
        loop = asyncio.get_running_loop()
        host, port = parse_address(self.address)
        failures = 0
        while not self.closed:
            try:
                sock, key = await loop.run_in_executor(
                    None, wire.connect_with_key, (host, port), self.table.token)
                transport, link = await loop.create_connection(
                    lambda: self.table.link_factory(self, key), sock=sock)
            except (wire.AuthenticationError, wire.ProtocolError) as exc:
                # Another cluster's node, or another minray version: retrying
                # can't help.
                log.error("node %s refused the connection: %s", self.address, exc)
                self.connecting = False
                self.table.link_failed(self, str(exc), final=True)
                return
            except OSError as exc:
                failures += 1
                self.table.link_failed(self, f"{type(exc).__name__}: {exc}", final=False,
                                       attempts=failures)
                await asyncio.sleep(RECONNECT_DELAY_S)
                continue
            link.send(("hello", "node", self.table.hello_info))
            link._flush()             # alone in the first frame, which must be small
            self.link = link
            self.connecting = False
            pending, self.pending = self.pending, []
            for message in pending:
                link.send(message)
            return
        self.connecting = False

    def link_lost(self, link):
        if self.link is link:
            self.link = None
            # The node may come back as a new process (a restarted head)
            # without our code: what is sent from now on carries it again.
            self.functions.clear()
            if self.pending and not self.closed and not self.connecting:
                self.connecting = True
                asyncio.ensure_future(self._connect())

    def died(self):
        """The cluster view says the node is dead: drop its link and queue."""
        self.closed = True
        self.pending = []
        link, self.link = self.link, None
        if link is not None and not link.closed:
            link._flush()                 # (what we just told it still goes out)
            link.transport.close()

    def __repr__(self):
        return f"<peer {self.address}>"


class PeerTable:
    """The peers this node talks to, by address."""

    def __init__(self, token, hello_info, link_factory):
        self.token = token
        # (peer, frame key) -> the protocol of a connection we opened
        self.link_factory = link_factory
        self.hello_info = hello_info      # what we tell a node we connect to
        self.peers = {}
        # (peer, reason, final, attempts) -> None: a connection could not be
        # made (final: retrying can't help)
        self.on_link_failed = None

    def link_failed(self, peer, reason, final, attempts=1):
        if self.on_link_failed is not None:
            self.on_link_failed(peer, reason, final, attempts)

    def get(self, address):
        peer = self.peers.get(address)
        if peer is None:
            peer = self.peers[address] = Peer(self, address)
        return peer

    def known(self, address):
        return self.peers.get(address)

    def values(self):
        return list(self.peers.values())
