"""Object transfer between nodes (the object manager).

Each node manager serves its store's objects on a TCP port of its own
(`TransferServer`, one thread per connection) and pulls objects from other
nodes with `Puller` (a few threads). A pull is one authenticated connection
(minray.wire's handshake): the puller asks for an object id; the server
answers with its size and metadata, then streams the bytes straight from
its shared-memory arena; the puller receives them with recv_into straight
into the object it created in its own arena. No copy of the object is made
in Python memory on either side, and neither side's event loop waits for it.

Integrity: between hosts, the server follows the bytes with an HMAC-SHA256
of the object id and data under the cluster token, and the puller checks it
before it seals the object, so a party on the path can't alter an object
unseen. Between two nodes on one machine (both on loopback addresses) there
is no path to guard, and the hashing (about 0.4 GB/s on one core) is left
out. MINRAY_TRANSFER_INTEGRITY=1 asks for it always, =0 never (on a network
you trust); the puller asks for what it wants, and the server sends the MAC
if the puller or its own setting asks for it. The bytes are not encrypted.

Concurrent pulls of one object are merged into one.
"""
import asyncio
import hashlib
import hmac
import ipaddress
import logging
import mmap
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from minray import wire
from minray.exceptions import ObjectExistsError, ObjectStoreFullError

log = logging.getLogger("minray.node_manager")

CHUNK_BYTES = 8 << 20
PULL_THREADS = 4
CONNECT_TIMEOUT_S = 10.0
MAKE_ROOM_TIMEOUT_S = 120.0 # spilling to disk to make room for a pulled object
IDLE_TIMEOUT_S = 30.0       # a peer silent this long mid-transfer is given up on


def integrity_setting():
    """True (always), False (never) or None (only between hosts), from the
    environment."""
    value = os.environ.get("MINRAY_TRANSFER_INTEGRITY", "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"MINRAY_TRANSFER_INTEGRITY must be 1, 0 or auto, got {value!r}")


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _mac(token, object_id):
    return hmac.new(token, b"object" + object_id, hashlib.sha256)


def accept_client(sock, token):
    """The server side of minray.wire's handshake on a blocking socket."""
    nonce, hello = wire.server_hello()
    sock.sendall(hello)
    reply = wire.recv_exact(sock, wire.REPLY_SIZE)
    try:
        proof = wire.check_client_reply(token, nonce, reply)
    except wire.AuthenticationError:
        sock.sendall(wire.REJECTED)
        raise
    sock.sendall(proof)


class TransferServer:
    """Serves this node's objects to pulling nodes."""

    def __init__(self, store, token, host, spilled_file=lambda object_id: None):
        self.store = store
        self.token = token
        self.spilled_file = spilled_file    # object id -> (path, meta, size) or None
        self.listener = socket.create_server((host, 0), backlog=wire.LISTEN_BACKLOG)
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.closed = False
        self.integrity = integrity_setting()
        self.auth_failures = wire.WarningLimiter(log)

    def start(self):
        threading.Thread(target=self._accept_loop, daemon=True,
                         name="minray-transfer-server").start()

    def close(self):
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass

    def _accept_loop(self):
        while not self.closed:
            try:
                sock, peer = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock, peer), daemon=True,
                             name="minray-transfer").start()

    def _serve(self, sock, peer):
        try:
            sock.settimeout(wire.HANDSHAKE_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                accept_client(sock, self.token)
            except (wire.AuthenticationError, OSError, ConnectionError) as exc:
                self.auth_failures.warning("object transfer: refused %s: %s", peer, exc)
                return
            sock.settimeout(IDLE_TIMEOUT_S)
            while True:
                try:
                    request = read_frame(sock)
                except (ConnectionError, OSError):
                    return
                if not (isinstance(request, tuple) and len(request) == 3
                        and request[0] == "pull" and isinstance(request[1], bytes)):
                    return
                with_mac = bool(request[2]) or self.integrity is True
                if not self._send_object(sock, request[1], with_mac):
                    return
        finally:
            sock.close()

    def _send_object(self, sock, object_id, with_mac):
        try:
            pinned = self.store.get(object_id)
        except Exception as exc:          # not here (evicted, freed, spilled) or a bad id
            sent = self._send_spilled(sock, object_id, with_mac, exc)
            if sent is not None:
                return sent
            try:                          # restored from its file meanwhile
                pinned = self.store.get(object_id)
            except Exception as again:
                sock.sendall(wire.encode(("missing", f"{type(again).__name__}: {again}")))
                return True
        try:
            with memoryview(pinned) as data:
                sock.sendall(wire.encode(("object", len(data), pinned.metadata, with_mac)))
                self._send_bytes(sock, object_id, with_mac, data)
            return True
        except OSError:
            return False
        finally:
            pinned.release()

    def _send_bytes(self, sock, object_id, with_mac, data):
        mac = _mac(self.token, object_id) if with_mac else None
        for offset in range(0, len(data), CHUNK_BYTES):
            with data[offset:offset + CHUNK_BYTES] as chunk:
                sock.sendall(chunk)
                if mac is not None:
                    mac.update(chunk)
        if mac is not None:
            sock.sendall(mac.digest())

    def _send_spilled(self, sock, object_id, with_mac, store_error):
        """An object spilled to disk here is sent from its file; None if its
        file went meanwhile (it was restored into the store)."""
        found = self.spilled_file(object_id) if isinstance(object_id, bytes) else None
        if found is None:
            sock.sendall(wire.encode(("missing", f"{type(store_error).__name__}: "
                                                 f"{store_error}")))
            return True
        try:
            with open(found[0], "rb") as f:
                data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) \
                    if found[2] else memoryview(b"")
        except OSError:
            return None
        try:
            with data:
                sock.sendall(wire.encode(("object", len(data), found[1], with_mac)))
                self._send_bytes(sock, object_id, with_mac, data)
            return True
        except OSError:
            return False


def read_frame(sock):
    """One frame from a blocking socket, reading nothing past it."""
    (length,) = wire.FRAME_HEADER.unpack(wire.recv_exact(sock, wire.FRAME_HEADER.size))
    if length > wire.ORDINARY_MAX_FRAME:
        raise wire.ProtocolError(f"a transfer header of {length} bytes is too large")
    return wire.decode(wire.recv_exact(sock, length))


class Puller:
    """Pulls objects from other nodes into the local store.

    pull(object_id, addresses, done) fetches from the first of `addresses`
    (transfer addresses) that has it; done(object_id, error, gone) is then
    called on the event loop (error None: sealed here with a primary pin;
    gone: no holder has it any more, as opposed to a failure here).
    """

    def __init__(self, store, token, loop, make_room=None):
        self.store = store
        self.token = token
        self.loop = loop
        self.make_room = make_room          # coroutine (size) -> bool: spill for room
        self.executor = ThreadPoolExecutor(PULL_THREADS, thread_name_prefix="minray-pull")
        self.in_flight = {}                 # object id -> [done callbacks]
        self.integrity = integrity_setting()

    def pull(self, object_id, addresses, done):
        waiting = self.in_flight.get(object_id)
        if waiting is not None:
            waiting.append(done)
            return
        self.in_flight[object_id] = [done]
        self.executor.submit(self._pull, object_id, list(addresses))

    def _pull(self, object_id, addresses):
        errors = []
        gone = True              # every holder refused to connect or said it has none
        for address in addresses:
            try:
                self._fetch(object_id, address)
                self.loop.call_soon_threadsafe(self._finish, object_id, None, False)
                return
            except Exception as exc:
                errors.append(f"{address}: {type(exc).__name__}: {exc}")
                gone = gone and isinstance(exc, (LookupError, ConnectionRefusedError))
        why = "; ".join(errors) or "no node holds a copy"
        self.loop.call_soon_threadsafe(self._finish, object_id, why, gone)

    def _finish(self, object_id, error, gone):
        for done in self.in_flight.pop(object_id, ()):
            done(object_id, error, gone)

    def _fetch(self, object_id, address):
        host, _, port = address.rpartition(":")
        sock = wire.connect((host, int(port)), self.token, timeout=CONNECT_TIMEOUT_S)
        want_mac = self.integrity if self.integrity is not None else not (
            is_loopback(host) and is_loopback(sock.getsockname()[0]))
        try:
            sock.settimeout(IDLE_TIMEOUT_S)
            sock.sendall(wire.encode(("pull", object_id, want_mac)))
            header = read_frame(sock)
            if header[0] == "missing":
                raise LookupError(f"the node does not have it ({header[1]})")
            _, size, meta, with_mac = header
            if want_mac and not with_mac:
                raise wire.AuthenticationError(
                    "the node sent the object without its MAC, and this node requires one "
                    "(MINRAY_TRANSFER_INTEGRITY): set it the same on every node")
            try:
                buf = self._create(object_id, size, meta)
            except ObjectExistsError:
                if self.store.hold_primary(object_id):
                    return                     # a copy is here already
                raise
            sealed = False
            try:
                self._receive_into(sock, memoryview(buf), object_id, with_mac)
                buf = None
                self.store.seal(object_id, True)
                sealed = True
            finally:
                buf = None
                if not sealed:
                    self.store.abort(object_id)
        finally:
            sock.close()

    def _create(self, object_id, size, meta):
        """Room for a pulled object; a full store spills to make it (this
        thread waits for the event loop to do so)."""
        try:
            return self.store.create_object(object_id, size, meta, map_now=False)
        except ObjectStoreFullError:
            if self.make_room is None or size > self.store.capacity:
                raise
            room = asyncio.run_coroutine_threadsafe(self.make_room(size), self.loop)
            if not room.result(MAKE_ROOM_TIMEOUT_S):
                raise
            return self.store.create_object(object_id, size, meta, map_now=False)

    def _receive_into(self, sock, view, object_id, with_mac):
        size = len(view)
        mac = _mac(self.token, object_id) if with_mac else None
        got = 0
        while got < size:
            with view[got:got + CHUNK_BYTES] as window:
                n = sock.recv_into(window)
                if n == 0:
                    raise ConnectionResetError("the node closed the connection mid-object")
                if mac is not None:
                    with window[:n] as received:
                        mac.update(received)     # while the bytes are still in cache
            got += n
        if mac is not None:
            trailer = wire.recv_exact(sock, wire.DIGEST_SIZE)
            if not hmac.compare_digest(trailer, mac.digest()):
                raise wire.AuthenticationError("the object's MAC does not match: altered "
                                               "on the way, or sent by a wrong node")
        view.release()

    def close(self):
        self.executor.shutdown(wait=False, cancel_futures=True)
