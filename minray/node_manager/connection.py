"""A node manager's connections: to its drivers and workers (Unix socket)
and to other node managers (TCP, frames sealed with a MAC).

A connection checks each message against minray.protocol before the node
manager's handler sees it, unpacks a "batch" of submissions into the
messages it holds, and sends objects announced in a row as one "objs"
message.
"""
from minray import wire
from minray.protocol import (
    BATCHED, NODE_MANAGER_MESSAGE_LENGTHS, PEER_ONLY, TO_NODE_MANAGER, bad_message,
)

OBJECTS_MESSAGE_BYTES = 256 * 1024   # an "objs" message is sent once about this big
OBJECT_BYTES = 80                    # an object's entry besides its inline value


class Connection(wire.FramedServerProtocol):
    first_max_frame = wire.FIRST_MAX_FRAME
    default_max_frame = wire.ORDINARY_MAX_FRAME
    message_max_frame = wire.NODE_MANAGER_MAX_FRAME
    seal_tcp_frames = True        # links with other node managers may cross hosts

    def __init__(self, manager):
        super().__init__(manager.token, name="node manager", batcher=manager.batcher)
        self.manager = manager
        self.role = None
        self.worker = None
        self.embedded_owner = False
        self.peer_node = None       # the Peer, on a link with another node manager
        self.job_info = {}          # a driver's hello (its job)
        self.pending_objects = []   # "obj" messages to send as one "objs" ...
        self.pending_object_bytes = 0   # ... and about how big it is

    def message_received(self, message):
        # (wire.decode gives plain data; a well-formed message is a tuple
        # whose name has the right number of fields)
        if (type(message) is not tuple or not message or type(message[0]) is not str
                or NODE_MANAGER_MESSAGE_LENGTHS.get(message[0]) != len(message)):
            raise wire.ProtocolError(bad_message(message, TO_NODE_MANAGER))
        if self.closed:
            return
        peer = self.peer_node
        if peer is None:
            if message[0] in PEER_ONLY:
                raise wire.ProtocolError(f"{message[0]!r} is a message between node managers")
            if message[0] == "batch":
                self._handle_batch(message[1])
            else:
                self.manager.handle(self, message)
        elif message[0] == "batch":
            raise wire.ProtocolError("'batch' is sent by drivers and workers only")
        else:
            self.manager.handle(peer, message)

    def _handle_batch(self, messages):
        """A run of submissions, each handled as if it came alone."""
        if type(messages) is not list or not all(
                type(m) is tuple and len(m) == 2 and type(m[0]) is str and m[0] in BATCHED
                for m in messages):
            raise wire.ProtocolError("a 'batch' holds a list of ('submit' | 'actor_call', "
                                     "spec) messages")
        handle = self.manager.handle
        for message in messages:
            if self.closed:
                return
            handle(self, message)

    def send(self, message):
        # Objects announced in a row go out as one "objs" message: decoding
        # one message per object cost the driver more than the object did.
        if message[0] == "obj" and self.peer_node is None:
            if not self.closed:
                if not self.pending_objects and not self.outbox:
                    self.batcher.mark(self)
                self.pending_objects.append(message[1:])
                payload = message[4]
                self.pending_object_bytes += OBJECT_BYTES + (
                    len(payload) if type(payload) is bytes else 0)
                if self.pending_object_bytes >= OBJECTS_MESSAGE_BYTES:
                    # Into the output now: it counts there against what a
                    # peer that stops reading may have waiting (wire).
                    self._queue_objects()
            return
        if self.pending_objects:        # (none once closed: see _close_now)
            self._queue_objects()
        super().send(message)

    def _queue_objects(self):
        objects, self.pending_objects = self.pending_objects, []
        self.pending_object_bytes = 0
        self._queue(wire.encode(("objs", objects)))

    def _close_now(self):
        self.pending_objects = []
        self.pending_object_bytes = 0
        super()._close_now()

    def _flush(self):
        if self.pending_objects:
            self._queue_objects()
        super()._flush()

    def lost(self):
        self.manager.connection_lost(self)


class OutboundLink(Connection):
    """A connection this node manager opened to another: the handshake was
    done as its client (minray.node_manager.peers), so it starts
    authenticated and expects no hello."""

    def __init__(self, manager, peer, frame_key):
        super().__init__(manager)
        self.role = "node"
        self.peer_node = peer
        self.sealer = wire.FrameSealer(frame_key, we_are_server=False)

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=wire.OUTPUT_HIGH_WATER, low=wire.OUTPUT_LOW_WATER)
        self.peer = f"node {self.peer_node.address}"
        self.is_authenticated = True
        self.frames_received = 1

    def lost(self):
        self.peer_node.link_lost(self)
