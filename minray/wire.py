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
"""
import hashlib
import hmac
import io
import os
import pickle
import socket
import struct

from minray.protocol import PROTOCOL_VERSION

HELLO_MAGIC = b"MRAY"
NONCE_SIZE = 32
DIGEST_SIZE = 32
HELLO_SIZE = len(HELLO_MAGIC) + 1 + NONCE_SIZE
REPLY_SIZE = NONCE_SIZE + DIGEST_SIZE
FRAME_HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30              # larger length prefixes drop the peer
HANDSHAKE_TIMEOUT_S = 10.0
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


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise ProtocolError(f"frame refers to {module}.{name}: only plain data is accepted")


def encode(message):
    payload = pickle.dumps(message, protocol=5)
    return FRAME_HEADER.pack(len(payload)) + payload


def decode(payload):
    try:
        return _PlainDataUnpickler(io.BytesIO(payload)).load()
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"undecodable frame: {exc}") from None


def split_frames(buffer):
    """Yield complete frame payloads from a bytearray, consuming them.

    Raises ProtocolError on a length prefix over MAX_FRAME.
    """
    start = 0
    end = len(buffer)
    while end - start >= FRAME_HEADER.size:
        (length,) = FRAME_HEADER.unpack_from(buffer, start)
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME} byte limit")
        if end - start - FRAME_HEADER.size < length:
            break
        body_start = start + FRAME_HEADER.size
        yield bytes(buffer[body_start:body_start + length])
        start = body_start + length
    del buffer[:start]


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
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
        reply, expected = client_reply(token, recv_exact(sock, HELLO_SIZE))
        sock.sendall(reply)
        server_proof = recv_exact(sock, DIGEST_SIZE)
        if server_proof == REJECTED:
            raise AuthenticationError(
                "the service rejected our cluster token (wrong token, or another cluster's)")
        if not hmac.compare_digest(server_proof, expected):
            raise AuthenticationError("the service failed to prove it holds the cluster token")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


class FrameReader:
    """Reads frames from a blocking socket, buffering partial reads."""

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.ready = []

    def read(self):
        while not self.ready:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError("connection closed by the peer")
            self.buffer += chunk
            self.ready.extend(split_frames(self.buffer))
        return decode(self.ready.pop(0))


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


class FramedServerProtocol:
    """asyncio protocol: handshake first, then frames to message_received().

    Subclasses implement message_received(message) and may override
    authenticated() and lost(). Output goes through an OutputBatcher shared
    by all connections of a server.
    """

    def __init__(self, token, name="service", batcher=None):
        self.token = token
        self.name = name
        self.batcher = batcher or OutputBatcher()
        self.transport = None
        self.is_authenticated = False
        self.buffer = bytearray()
        self.peer = "?"
        self.nonce = None
        self.handshake_timer = None
        self.outbox = []
        self.closed = False

    def connection_made(self, transport):
        import asyncio
        self.transport = transport
        self.peer = transport.get_extra_info("peername") or "unix socket"
        self.nonce, hello = server_hello()
        transport.write(hello)
        self.handshake_timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_TIMEOUT_S, self._handshake_timeout)

    def _handshake_timeout(self):
        if not self.is_authenticated:
            self.drop("no authentication within the handshake timeout")

    def drop(self, reason):
        import logging
        logging.getLogger(f"minray.{self.name}").warning(
            "%s: dropping connection from %s: %s", self.name, self.peer, reason)
        self.transport.abort()

    def reject(self, reason):
        """Tell a peer with a wrong token so (it must not retry), then close."""
        import logging
        logging.getLogger(f"minray.{self.name}").warning(
            "%s: rejecting connection from %s: %s", self.name, self.peer, reason)
        self.transport.write(REJECTED)
        self.transport.close()

    def connection_lost(self, exc):
        self.closed = True
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
        self.outbox.append(encode(message))

    def _flush(self):
        if self.outbox and not self.closed:
            self.transport.write(b"".join(self.outbox) if len(self.outbox) > 1 else self.outbox[0])
        self.outbox.clear()

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
            self.authenticated()
        batcher = self.batcher
        batcher.depth += 1
        try:
            for payload in split_frames(self.buffer):
                self.message_received(decode(payload))
        except ProtocolError as exc:
            self.drop(str(exc))
        finally:
            batcher.depth -= 1
            if batcher.depth == 0:
                batcher.flush()

    def eof_received(self):
        return False

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass
