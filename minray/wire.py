"""Framing and authentication for every minray connection (TCP or Unix socket).

Handshake, before anything else crosses the connection:

    server -> client   b"MRAY" | version (1 byte) | server nonce (32 bytes)
    client -> server   client nonce (32) | HMAC(token, "client" | server nonce | client nonce)
    server -> client   HMAC(token, "server" | client nonce | server nonce)
                       (or REJECTED, then close, when the client's proof is wrong)

Both sides prove they hold the cluster token, so neither unpickles a byte from
an impostor. Only fixed-size raw bytes are read before that. Afterwards every
message is a frame: a 4-byte little-endian length and a pickle of plain data
(tuples, lists, dicts, bytes, str, numbers, None), read with an unpickler that
refuses every global, so even an authenticated peer cannot make us run code.

Limits, so that no peer can make a service use memory or disk without bound:
frames have size limits by message kind (the first frame after the handshake
and ordinary messages are small; only messages that carry code or many values
may be large); a peer whose output piles up unread is not read from until it
drains, and is dropped if its backlog keeps growing; failed handshakes and
dropped peers are logged at a bounded rate.
"""
import hashlib
import hmac
import io
import mmap
import os
import pickle
import socket
import struct
import time

from minray.protocol import PROTOCOL_VERSION

HELLO_MAGIC = b"MRAY"
NONCE_SIZE = 32
DIGEST_SIZE = 32
HELLO_SIZE = len(HELLO_MAGIC) + 1 + NONCE_SIZE
REPLY_SIZE = NONCE_SIZE + DIGEST_SIZE
FRAME_HEADER = struct.Struct("<I")
HANDSHAKE_TIMEOUT_S = 10.0
# Listening sockets queue this many connections not yet accepted (the kernel
# caps it at net.core.somaxconn): a node starting many workers at once, or a
# burst of drivers, must not see "connection refused".
LISTEN_BACKLOG = 4096

# Frame size limits: bytes of pickle after the 4-byte length prefix.
MAX_FRAME = 1 << 30              # the most anything accepts (clients reading services too)
# Reads: a blocking socket's recv_into a buffer kept for it (no allocation per
# read); an asyncio server's reads stay below glibc's mmap threshold (128 KB).
RECV_SIZE = 1 << 20
SERVER_READ_SIZE = 64 << 10
FIRST_MAX_FRAME = 64 << 10       # a connection's first frame: a hello, before it said who it is
ORDINARY_MAX_FRAME = 1 << 20     # a message whose kind is not listed with a larger limit
LARGE_MAX_FRAME = MAX_FRAME      # a listed kind that can legitimately be large
# Node-manager-bound messages that can be large: exported code (a closure can
# capture big objects), specs and results carrying many inline values (up to
# 100 KB each), and lists of ids (a get or free of millions of refs).
NODE_MANAGER_MAX_FRAME = dict.fromkeys(
    ("fn", "actor_create", "submit", "batch", "actor_call", "done", "put",
     "sub", "borrow", "free", "escape", "value", "run", "nodes", "create", "call"), LARGE_MAX_FRAME)


def _env_bytes(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number <= 0:
        raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
    return number


# Flow control. A peer whose unsent output passes the high-water mark is not
# read from (it cannot make us produce more for it) until its output is back
# under the low-water mark. Output can still keep coming for it meanwhile
# (pushes caused by others: objects becoming ready, published changes): if
# MAX_OUTPUT_BACKLOG bytes more are queued for it while it reads less than
# READ_PROGRESS_BYTES, it has stopped reading, and it is dropped. A peer that
# reads is never dropped for being slower than a burst of output.
OUTPUT_HIGH_WATER = 4 << 20
OUTPUT_LOW_WATER = 1 << 20
MAX_OUTPUT_BACKLOG = _env_bytes("MINRAY_MAX_OUTPUT_BACKLOG", 256 << 20)
READ_PROGRESS_BYTES = 64 << 10

# Warnings about failed handshakes and dropped peers: at most this many per
# interval and kind, then one line saying how many more were left out.
WARNINGS_PER_INTERVAL = 20
WARNING_INTERVAL_S = 10.0

# Sent instead of the server's proof when the client's proof is wrong, so the
# client can tell "wrong token" from a connection that merely broke.
REJECTED = b"MRAY-REJECTED".ljust(DIGEST_SIZE, b"\0")


class AuthenticationError(ConnectionError):
    """The peer did not prove it holds the cluster token."""


class ProtocolError(ConnectionError):
    """The peer sent bytes that are not a valid minray frame."""


def _mac(token, label, first, second):
    return hmac.new(token, label + first + second, hashlib.sha256).digest()


def server_hello():
    nonce = os.urandom(NONCE_SIZE)
    return nonce, HELLO_MAGIC + bytes([PROTOCOL_VERSION]) + nonce


def check_client_reply(token, server_nonce, reply):
    """Verify the client's proof; return the server's proof to send back."""
    if len(reply) != REPLY_SIZE:
        raise AuthenticationError("short authentication reply")
    client_nonce, proof = reply[:NONCE_SIZE], reply[NONCE_SIZE:]
    if not hmac.compare_digest(proof, _mac(token, b"client", server_nonce, client_nonce)):
        raise AuthenticationError("wrong cluster token")
    return _mac(token, b"server", client_nonce, server_nonce)


def client_reply(token, hello):
    """Answer a server hello; return (reply bytes, expected server proof)."""
    if len(hello) != HELLO_SIZE or not hello.startswith(HELLO_MAGIC):
        raise ProtocolError("the peer is not a minray service (bad hello)")
    if hello[len(HELLO_MAGIC)] != PROTOCOL_VERSION:
        raise ProtocolError(
            f"the peer speaks minray protocol {hello[len(HELLO_MAGIC)]}, we speak "
            f"{PROTOCOL_VERSION}: run the same minray version everywhere")
    server_nonce = hello[len(HELLO_MAGIC) + 1:]
    client_nonce = os.urandom(NONCE_SIZE)
    proof = _mac(token, b"client", server_nonce, client_nonce)
    return client_nonce + proof, _mac(token, b"server", client_nonce, server_nonce)


# Between hosts, a party on the path could alter or inject frames after the
# handshake. Connections whose server class sets `seal_tcp_frames` (node
# manager to node manager, clients of the control store) carry MACs over TCP:
# what one flush writes (one or more frames) goes as one outer frame whose
# payload is those frames and a MAC: HMAC-SHA256 (its first 16 bytes) of the
# direction, a counter and the payload, under a key derived from the token and
# both handshake nonces. An outer frame that fails the check is never
# unpickled: the connection is dropped. One MAC per flush rather than per
# message keeps the cost off each task. (Frames are not encrypted.)
FRAME_MAC_SIZE = 16


def frame_key(token, server_nonce, client_nonce):
    return _mac(token, b"frames", server_nonce, client_nonce)


class FrameSealer:
    """Adds and checks the MACs of one connection end."""

    def __init__(self, key, we_are_server):
        self.key = key
        self.send_label, self.receive_label = (b"s2c", b"c2s") if we_are_server \
            else (b"c2s", b"s2c")
        self.sent = 0
        self.received = 0

    def _mac(self, label, counter, payload):
        # HMAC-SHA256 (truncated): with SHA instructions it is about twice
        # as fast as keyed BLAKE2b on the large batches the log writes.
        mac = hmac.new(self.key, label + counter.to_bytes(8, "little"), "sha256")
        mac.update(payload)
        return mac.digest()[:FRAME_MAC_SIZE]

    def seal(self, payload):
        """The outer frame carrying `payload` (encoded frames) and its MAC."""
        mac = self._mac(self.send_label, self.sent, payload)
        self.sent += 1
        return FRAME_HEADER.pack(len(payload) + FRAME_MAC_SIZE) + payload + mac

    def open(self, sealed):
        """The payload of a received outer frame, if its MAC is right."""
        if len(sealed) < FRAME_MAC_SIZE:
            raise ProtocolError("a frame too short to carry its MAC")
        payload, mac = sealed[:-FRAME_MAC_SIZE], sealed[-FRAME_MAC_SIZE:]
        if not hmac.compare_digest(mac, self._mac(self.receive_label, self.received, payload)):
            raise ProtocolError("a frame's MAC is wrong: altered or injected on the way")
        self.received += 1
        return payload


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise ProtocolError(f"frame refers to {module}.{name}: only plain data is accepted")


def encode(message):
    payload = pickle.dumps(message, protocol=5)
    return FRAME_HEADER.pack(len(payload)) + payload


def decode(payload):
    return _load(io.BytesIO(payload))


def _load(stream):
    """One message (plain data only) from where the stream stands."""
    try:
        return _PlainDataUnpickler(stream).load()
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from None


def decode_frames(buffer, max_frame=MAX_FRAME, first_max_frame=None):
    """Yield (message, frame size) of the complete frames at the start of a
    bytearray, consuming them, as split_frames and decode would.

    The frames are read from one copy of their bytes: a stream and two
    copies per frame cost about as much as decoding a small message.
    `first_max_frame` is the limit of the first frame, if another. A frame
    whose pickle ends before or after the frame does is refused.
    """
    header_size = FRAME_HEADER.size
    end = 0                              # the end of the last complete frame
    limit = first_max_frame if first_max_frame is not None else max_frame
    too_big = None                       # raised once the frames before it are handled
    while len(buffer) - end >= header_size:
        (length,) = FRAME_HEADER.unpack_from(buffer, end)
        if length > limit:
            too_big = ProtocolError(f"frame of {length} bytes exceeds the {limit} byte limit")
            break
        limit = max_frame
        if len(buffer) - end - header_size < length:
            break
        end += header_size + length
    if not end:
        if too_big is not None:
            raise too_big
        return
    data = bytes(memoryview(buffer)[:end])
    stream = io.BytesIO(data)
    position = 0
    try:
        while position < end:
            (length,) = FRAME_HEADER.unpack_from(data, position)
            start = position + header_size
            stream.seek(start)
            # (an unpickler per frame: each frame is a pickle of its own, and
            # CPython's unpickler cannot reset its memo between them)
            message = _load(stream)
            position = start + length
            if stream.tell() != position:
                raise ProtocolError("a frame's pickle does not end where the frame does")
            yield message, length
        if too_big is not None:
            raise too_big
    finally:
        del buffer[:position]


def split_frames(buffer, max_frame=MAX_FRAME, first_max_frame=None):
    """Yield complete frame payloads from a bytearray, consuming them.

    The frames yielded are removed from the buffer when the generator ends or
    is closed, even early. `max_frame` is the largest length prefix accepted
    (`first_max_frame` for the first frame, if another); a larger one raises
    ProtocolError before its body is waited for.
    """
    start = 0
    limit = first_max_frame if first_max_frame is not None else max_frame
    try:
        while len(buffer) - start >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(buffer, start)
            if length > limit:
                raise ProtocolError(f"frame of {length} bytes exceeds the {limit} byte limit")
            limit = max_frame
            body_start = start + FRAME_HEADER.size
            if len(buffer) - body_start < length:
                break
            payload = bytes(buffer[body_start:body_start + length])
            start = body_start + length
            yield payload
    finally:
        del buffer[:start]


def message_limit(message, limits, default, kind_index=0):
    """(kind, size limit) of a decoded message, by its kind (an item of its tuple)."""
    try:
        kind = message[kind_index] if type(message) is tuple else None
        return kind, limits.get(kind, default)
    except (IndexError, TypeError):         # no kind, or an unhashable one
        return None, default


_PEERCRED = struct.Struct("3i")       # pid, uid, gid


def peer_pid(sock):
    """The pid of the process that connected a Unix socket, as the kernel
    recorded it (not anything the peer said); None where it can't tell."""
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, _uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, option,
                                                           _PEERCRED.size))
    except OSError:
        return None
    return pid or None


# ---------------------------------------------------------------- blocking side

def recv_exact(sock, n):
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionResetError("connection closed by the peer")
        chunks += chunk
    return bytes(chunks)


def connect(address, token, timeout=HANDSHAKE_TIMEOUT_S):
    """Open an authenticated blocking socket to a minray service.

    `address` is (host, port) for TCP or a filesystem path for a Unix socket.
    """
    return connect_with_key(address, token, timeout)[0]


def connect_with_key(address, token, timeout=HANDSHAKE_TIMEOUT_S):
    """connect(), and the key for per-frame MACs (FrameSealer) on it."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        hello = recv_exact(sock, HELLO_SIZE)
        reply, expected = client_reply(token, hello)
        sock.sendall(reply)
        server_proof = recv_exact(sock, DIGEST_SIZE)
        if server_proof == REJECTED:
            raise AuthenticationError(
                "the service rejected our cluster token (wrong token, or another cluster's)")
        if not hmac.compare_digest(server_proof, expected):
            raise AuthenticationError("the service failed to prove it holds the cluster token")
        sock.settimeout(None)
        key = frame_key(token, hello[len(HELLO_MAGIC) + 1:], reply[:NONCE_SIZE])
        return sock, key
    except BaseException:
        sock.close()
        raise


def recv_buffer():
    """A writable view of RECV_SIZE bytes for recv_into. Private anonymous
    memory: only the pages reads actually fill become resident (a bytearray
    would be zeroed, all of it, in every process), and a forked child gets
    its own copy."""
    return memoryview(mmap.mmap(-1, RECV_SIZE, flags=mmap.MAP_PRIVATE))


class FrameReader:
    """Reads frames from a blocking socket, buffering partial reads; with a
    FrameSealer, each outer frame's MAC is checked before its frames are read."""

    def __init__(self, sock, sealer=None):
        self.sock = sock
        self.sealer = sealer
        self.buffer = bytearray()
        self.ready = []
        self.view = None                # reused for every recv (see RECV_SIZE)

    def read(self):
        while not self.ready:
            if self.view is None:
                self.view = recv_buffer()
            n = self.sock.recv_into(self.view)
            if not n:
                raise ConnectionResetError("connection closed by the peer")
            self.buffer += self.view[:n]
            if self.sealer is None:
                self.ready.extend(message for message, _ in decode_frames(self.buffer))
                continue
            for frame in split_frames(self.buffer):
                inner = bytearray(self.sealer.open(frame))
                self.ready.extend(message for message, _ in decode_frames(inner))
                if inner:
                    raise ProtocolError("a sealed frame ends inside a frame")
        return self.ready.pop(0)


class SealedSocket:
    """A blocking client socket to a minray service whose TCP frames carry
    MACs (the server class sets seal_tcp_frames): send() seals, read() checks.
    Over a Unix socket nothing is sealed, as on the server's side."""

    def __init__(self, address, token, timeout=HANDSHAKE_TIMEOUT_S):
        self.sock, key = connect_with_key(address, token, timeout)
        self.sealer = None if isinstance(address, str) else FrameSealer(key, we_are_server=False)
        self.reader = FrameReader(self.sock, self.sealer)

    def send(self, message):
        """Send one message (a caller sending from several threads holds a lock)."""
        data = encode(message)
        self.sock.sendall(data if self.sealer is None else self.sealer.seal(data))

    def read(self):
        return self.reader.read()

    def settimeout(self, timeout):
        self.sock.settimeout(timeout)

    def close(self):
        self.sock.close()


# ---------------------------------------------------------------- asyncio side

class OutputBatcher:
    """Collects replies so each connection is written once per batch.

    While an incoming batch of frames is handled, messages only queue; at the
    end of the batch every connection with output is written in one call.
    Messages sent outside a batch (timers, callbacks) flush on the next loop
    iteration.
    """

    def __init__(self):
        self.dirty = []
        self.depth = 0
        self.scheduled = False
        self.before_flush = None      # hook run before writing (e.g. dispatch)

    def mark(self, protocol):
        self.dirty.append(protocol)
        if self.depth == 0 and not self.scheduled:
            import asyncio
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self):
        self.scheduled = False
        if self.before_flush is not None:
            self.before_flush()
        dirty, self.dirty = self.dirty, []
        for protocol in dirty:
            protocol._flush()


class WarningLimiter:
    """Logs at most `limit` warnings per `interval_s` seconds.

    The rest are counted, and one line says how many were left out when the
    interval ends, so a flood of bad connections shows in the log without
    filling the disk.
    """

    def __init__(self, logger, limit=WARNINGS_PER_INTERVAL, interval_s=WARNING_INTERVAL_S):
        self.logger = logger
        self.limit = limit
        self.interval_s = interval_s
        self.window_end = 0.0
        self.logged = 0
        self.left_out = 0
        self.timer = None

    def warning(self, fmt, *args):
        now = time.monotonic()
        if now >= self.window_end:
            self.report_left_out()
            self.window_end = now + self.interval_s
            self.logged = 0
        if self.logged < self.limit:
            self.logged += 1
            self.logger.warning(fmt, *args)
            return
        self.left_out += 1
        if self.timer is None:
            import asyncio
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return                  # no loop: reported with the next warning
            self.timer = loop.call_later(self.window_end - now, self.report_left_out)

    def report_left_out(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.left_out:
            self.logger.warning("%d more warnings like the above were left out of the log "
                                "in the last %.0f s", self.left_out, self.interval_s)
            self.left_out = 0


_limiters = {}


def _limiter(name, authenticated):
    """One limiter per service and kind of peer, so a flood of strangers can't
    hide why an authenticated peer was dropped."""
    key = (name, authenticated)
    limiter = _limiters.get(key)
    if limiter is None:
        import logging
        limiter = _limiters[key] = WarningLimiter(logging.getLogger(f"minray.{name}"))
    return limiter


class FramedServerProtocol:
    """asyncio protocol: handshake first, then frames to message_received().

    Subclasses implement message_received(message) and may override
    authenticated() and lost(). Output goes through an OutputBatcher shared
    by all connections of a server. Class attributes set the frame size
    limits: `first_max_frame` for the first frame after the handshake, then
    `message_max_frame[kind]` for the kinds listed there (a message's kind is
    its item at `kind_index`) and `default_max_frame` for the others. A
    length prefix over the largest of them drops the peer before its body is
    read; a decoded message over its own kind's limit drops it too.
    """

    first_max_frame = MAX_FRAME
    default_max_frame = MAX_FRAME
    message_max_frame = {}
    kind_index = 0
    seal_tcp_frames = False

    def __init__(self, token, name="service", batcher=None):
        self.token = token
        self.name = name
        self.batcher = batcher or OutputBatcher()
        self.transport = None
        self.is_authenticated = False
        self.buffer = bytearray()
        self.peer = "?"
        self.peer_pid = None            # Unix sockets: the connecting process, per the kernel
        self.nonce = None
        self.handshake_timer = None
        self.outbox = []
        self.outbox_bytes = 0
        self.closed = False
        self.frames_received = 0
        self.largest_frame = max(self.default_max_frame,
                                 max(self.message_max_frame.values(), default=0))
        self.output_paused = False      # the transport's buffer is over its high-water mark
        self.input_held = False         # frames wait in self.buffer until our output drains
        # While paused: unsent bytes when we last saw the peer read, and bytes
        # queued for it since (what it read since = their sum - unsent now).
        self.unsent_at_progress = 0
        self.queued_since_progress = 0
        self.sealer = None              # FrameSealer, on sealed TCP connections

    def connection_made(self, transport):
        import asyncio
        self.transport = transport
        transport.set_write_buffer_limits(high=OUTPUT_HIGH_WATER, low=OUTPUT_LOW_WATER)
        # asyncio's selector transports read up to `max_size` bytes into a new
        # bytes object per recv; at its default (256 KB) glibc may serve each
        # one with mmap/mremap/munmap, three syscalls per read. Below the mmap
        # threshold they come from the heap.
        transport.max_size = SERVER_READ_SIZE
        self.peer = transport.get_extra_info("peername") or "unix socket"
        if self.peer == "unix socket":
            self.peer_pid = peer_pid(transport.get_extra_info("socket"))
            if self.peer_pid is not None:
                self.peer = f"unix socket (pid {self.peer_pid})"
        self.nonce, hello = server_hello()
        transport.write(hello)
        self.handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S, self._handshake_timeout)

    def _handshake_timeout(self):
        if not self.is_authenticated:
            self.drop("no authentication within the handshake timeout")

    def _warn(self, what, reason):
        _limiter(self.name, self.is_authenticated).warning(
            "%s: %s connection from %s: %s", self.name, what, self.peer, reason)

    def drop(self, reason):
        """Log why (at a bounded rate) and close the connection at once."""
        if self.closed:
            return
        self._warn("dropping", reason)
        self._close_now()
        self.transport.abort()

    def reject(self, reason):
        """Tell a peer with a wrong token so (it must not retry), then close."""
        if self.closed:
            return
        self._warn("rejecting", reason)
        self._close_now()
        self.transport.write(REJECTED)
        self.transport.close()

    def _close_now(self):
        # Nothing more is read or sent; lost() still runs from connection_lost.
        self.closed = True
        self.outbox.clear()
        self.outbox_bytes = 0
        self.buffer.clear()

    def connection_lost(self, exc):
        self._close_now()
        if self.handshake_timer:
            self.handshake_timer.cancel()
        self.lost()

    def lost(self):
        pass

    def authenticated(self):
        pass

    def send(self, message):
        if self.closed:
            return
        if not self.outbox:
            self.batcher.mark(self)
        self._queue(encode(message))

    def _queue(self, frame):
        """Add a frame to the output (the connection is marked for writing)."""
        if self.output_paused and self._stopped_reading(len(frame)):
            return
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)

    def _stopped_reading(self, more):
        """Count `more` bytes queued for a paused peer; drop it (and return
        True) if it has stopped reading."""
        unsent = self.transport.get_write_buffer_size() + self.outbox_bytes
        read = self.unsent_at_progress + self.queued_since_progress - unsent
        if read >= READ_PROGRESS_BYTES:
            self.unsent_at_progress, self.queued_since_progress = unsent, 0
        elif self.queued_since_progress + more > MAX_OUTPUT_BACKLOG:
            self.drop(f"it stopped reading: {unsent} bytes of output wait for it, and it read "
                      f"{max(read, 0)} bytes while {self.queued_since_progress} more were queued "
                      f"(the limit is MINRAY_MAX_OUTPUT_BACKLOG={MAX_OUTPUT_BACKLOG})")
            return True
        self.queued_since_progress += more
        return False

    def _flush(self):
        if not self.outbox or self.closed:
            return
        data = b"".join(self.outbox) if len(self.outbox) > 1 else self.outbox[0]
        self.outbox.clear()
        self.outbox_bytes = 0
        if self.sealer is not None:
            data = self.sealer.seal(data)
        self.transport.write(data)          # calls pause_writing if it can't all go
        if self.input_held and not self.output_paused:
            import asyncio
            asyncio.get_running_loop().call_soon(self._release_input)

    def data_received(self, data):
        self.buffer += data
        if not self.is_authenticated:
            if len(self.buffer) < REPLY_SIZE:
                return
            reply = bytes(self.buffer[:REPLY_SIZE])
            del self.buffer[:REPLY_SIZE]
            try:
                proof = check_client_reply(self.token, self.nonce, reply)
            except AuthenticationError as exc:
                self.reject(str(exc))
                return
            self.is_authenticated = True
            self.handshake_timer.cancel()
            self.transport.write(proof)
            if self.seal_tcp_frames and isinstance(self.peer, tuple):
                self.sealer = FrameSealer(frame_key(self.token, self.nonce, reply[:NONCE_SIZE]),
                                          we_are_server=True)
            self.authenticated()
        self._handle_frames()

    def _handle_frames(self):
        batcher = self.batcher
        batcher.depth += 1
        first_limit = self.first_max_frame if self.frames_received == 0 else None
        split = split_frames if self.sealer is not None else decode_frames
        frames = split(self.buffer, self.largest_frame, first_limit)
        try:
            for frame in frames:
                self.frames_received += 1
                if self.sealer is not None:
                    self._handle_sealed(self.sealer.open(frame))
                else:
                    self._handle_message(*frame)
                if self.closed:
                    break
                if self.outbox_bytes > OUTPUT_HIGH_WATER:
                    # Its requests made more output than it may have waiting:
                    # the rest of them wait until it has read that.
                    self.input_held = True
                    self.transport.pause_reading()
                    break
        except ProtocolError as exc:
            self.drop(str(exc))
        finally:
            frames.close()
            batcher.depth -= 1
            if batcher.depth == 0:
                batcher.flush()

    def _handle_message(self, message, size):
        if size > self.default_max_frame:
            kind, limit = message_limit(message, self.message_max_frame,
                                        self.default_max_frame, self.kind_index)
            if size > limit:
                raise ProtocolError(f"{kind!r} message of {size} bytes is "
                                    f"over the {limit}-byte limit for it")
        self.message_received(message)

    def _handle_sealed(self, frames):
        """The frames of one checked outer frame, each handled in turn."""
        inner = bytearray(frames)
        decoded = decode_frames(inner, self.largest_frame)
        try:
            for message, size in decoded:
                self._handle_message(message, size)
                if self.closed:
                    return
        finally:
            decoded.close()
        if inner:
            raise ProtocolError("a sealed frame ends inside a frame")

    def _release_input(self):
        if self.closed or not self.input_held or self.output_paused:
            return
        self.input_held = False
        self.transport.resume_reading()
        if self.buffer:
            self._handle_frames()

    def eof_received(self):
        return False

    def pause_writing(self):
        # The peer reads slower than we produce for it: read nothing more from
        # it, so it cannot ask for more, until it has caught up.
        self.output_paused = True
        self.unsent_at_progress = self.transport.get_write_buffer_size() + self.outbox_bytes
        self.queued_since_progress = 0
        if not self.closed:
            self.transport.pause_reading()

    def resume_writing(self):
        self.output_paused = False
        if self.closed:
            return
        if self.input_held:
            import asyncio
            asyncio.get_running_loop().call_soon(self._release_input)
        else:
            self.transport.resume_reading()
