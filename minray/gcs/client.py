"""Client of the sharded control store.

Keys are routed to shards by hash. Writes are buffered and sent in batches
(one frame, one LMDB transaction per batch) by whoever fills a batch or by a
flusher thread shortly after the first buffered write, so a loop writing
thousands of task specs pays no round trip per write. Reads are synchronous
and see the caller's own earlier writes (pending writes to that shard are sent
first). When a shard restarts, the client reconnects, re-sends the batches the
old connection never acknowledged, and re-subscribes.
"""
import collections
import itertools
import logging
import threading
import time
import zlib

from minray import wire
from minray.gcs.tables import TABLES, decode_value, encode_value

log = logging.getLogger("minray.gcs")

DEFAULT_BATCH = 1000
DEFAULT_FLUSH_DELAY_S = 0.002
DEFAULT_RECONNECT_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 30.0
# Write batches sent but not yet acknowledged are kept for re-sending after a
# reconnect; past this many, the sender waits for acknowledgements first.
MAX_UNACKED_BATCHES = 64
MAX_KEY_BYTES = 511              # LMDB's key size limit
_TABLE_SET = frozenset(TABLES)


class ControlStoreError(Exception):
    """The control store refused a request or could not be reached."""


def shard_for(key, num_shards):
    return zlib.crc32(key) % num_shards


class _Connection:
    """An authenticated socket with in-order request/response matching."""

    def __init__(self, address, token, reconnect_timeout, read_timeout=None):
        self.address = address
        self.token = token
        self.reconnect_timeout = reconnect_timeout
        self.read_timeout = read_timeout
        self.link = None               # wire.SealedSocket
        self.ids = itertools.count(1)

    def ensure(self):
        if self.link is not None:
            return
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.01
        while True:
            try:
                handshake = min(wire.HANDSHAKE_TIMEOUT_S, max(0.1, deadline - time.monotonic()))
                self.link = wire.SealedSocket(self.address, self.token, timeout=handshake)
                self.link.settimeout(self.read_timeout)
                return
            except wire.AuthenticationError:
                raise
            except OSError as exc:
                if time.monotonic() + delay > deadline:
                    raise ControlStoreError(
                        f"control store shard at {self.address} is unreachable after "
                        f"{self.reconnect_timeout:.0f} s ({exc}); is the head node running?") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)

    def reset(self):
        if self.link is not None:
            try:
                self.link.close()
            except OSError:
                pass
        self.link = None

    def send(self, op, args):
        request_id = next(self.ids)
        self.link.send((request_id, op, args))
        return request_id


class _Shard:
    """Requests and batched writes to one shard (one connection, one lock)."""

    def __init__(self, address, token, reconnect_timeout, request_timeout=REQUEST_TIMEOUT_S):
        # A reply that does not come within the request timeout counts as a
        # lost connection (a hung server): reconnect, give up at the deadline.
        self.conn = _Connection(address, token, reconnect_timeout, request_timeout)
        self.lock = threading.Lock()
        self.pending = []                       # writes not yet sent
        self.unacked = collections.OrderedDict()  # request id -> batch
        self.write_error = None
        self.resend_unacked = False     # set when a connection was lost

    def _retrying(self, action):
        """Run action() on a live connection, reconnecting on connection loss."""
        deadline = time.monotonic() + self.conn.reconnect_timeout
        while True:
            try:
                self.conn.ensure()
                return action()
            except (OSError, wire.ProtocolError) as exc:
                if isinstance(exc, wire.AuthenticationError):
                    raise ControlStoreError(f"control store rejected us: {exc}") from None
                self.conn.reset()
                if time.monotonic() > deadline:
                    raise ControlStoreError(
                        f"lost the control store shard at {self.conn.address}: {exc}") from None
                self.resend_unacked = True
                log.info("control store shard %s: connection lost (%s), reconnecting",
                         self.conn.address, exc)

    def _send_write(self, batch):
        # Recorded before sending: a batch whose send fails stays in unacked
        # and is re-sent after the reconnect instead of being lost.
        request_id = next(self.conn.ids)
        self.unacked[request_id] = batch
        self.conn.link.send((request_id, "write", batch))

    def _resend_unacked(self):
        # Re-number all of them first, then send, so that a connection failing
        # half-way leaves every batch in unacked, still in order.
        batches = list(self.unacked.values())
        self.unacked.clear()
        for batch in batches:
            self.unacked[next(self.conn.ids)] = batch
        for request_id, batch in list(self.unacked.items()):
            self.conn.link.send((request_id, "write", batch))

    def _flush_locked(self):
        if self.resend_unacked:
            self.resend_unacked = False
            self._resend_unacked()
        if self.pending:
            batch, self.pending = self.pending, []
            self._send_write(batch)
        # Without this, a client that only writes would keep every batch it
        # ever sent (nobody reads the acknowledgements).
        while len(self.unacked) > MAX_UNACKED_BATCHES:
            self._take_reply(self.conn.link.read())

    def _take_reply(self, message):
        """Consume one reply; return it unless it acknowledged a write batch."""
        request_id, ok, result = message
        batch = self.unacked.pop(request_id, None)
        if batch is None:
            return message
        if not ok:
            self.write_error = ControlStoreError(f"a batch of {len(batch)} writes failed: {result}")
        return None

    def _raise_write_error(self):
        if self.write_error is not None:
            error, self.write_error = self.write_error, None
            raise error

    def flush(self, wait=False):
        with self.lock:
            if not (self.pending or self.resend_unacked or (wait and self.unacked)):
                self._raise_write_error()    # nothing to send: don't (re)connect
                return

            def action():
                self._flush_locked()
                while wait and self.unacked:
                    self._take_reply(self.conn.link.read())
            self._retrying(action)
            self._raise_write_error()

    def request(self, op, args):
        with self.lock:
            def action():
                self._flush_locked()
                request_id = self.conn.send(op, args)
                while True:
                    reply = self._take_reply(self.conn.link.read())
                    if reply is not None and reply[0] == request_id:
                        return reply
            _, ok, result = self._retrying(action)
            self._raise_write_error()
        if not ok:
            raise ControlStoreError(result)
        return result

    def close(self):
        with self.lock:
            self.conn.reset()


class Subscription:
    def __init__(self, client, table, key, callback):
        self.client, self.table, self.key, self.callback = client, table, key, callback

    def unsubscribe(self):
        self.client._unsubscribe(self)


class _SubscriberChannel:
    """A second connection per shard that receives pushes on a reader thread."""

    def __init__(self, address, token, reconnect_timeout, shard_number):
        self.conn = _Connection(address, token, reconnect_timeout)
        self.shard_number = shard_number
        self.subscriptions = {}        # (table, key) -> list of Subscription
        self.lock = threading.Lock()
        self.waiting = {}              # request id -> [event, reply]
        self.resubscribing = {}        # request id -> (table, key)
        self.closed = False
        self.thread = None

    def start(self):
        self.conn.ensure()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"minray-gcs-sub-{self.shard_number}")
        self.thread.start()

    def call(self, op, args, timeout=10.0, on_reply=None):
        """Send a request and wait for its reply.

        on_reply(result), if given, runs on the reader thread for a successful
        reply before any later push is delivered.
        """
        slot = [threading.Event(), None, on_reply]
        with self.lock:
            self.conn.ensure()
            request_id = next(self.conn.ids)
            self.waiting[request_id] = slot
            self.conn.link.send((request_id, op, args))
        if not slot[0].wait(timeout):
            raise ControlStoreError(f"control store did not answer {op} within {timeout} s")
        _, ok, result = slot[1]
        if not ok:
            raise ControlStoreError(result)
        return result

    def deliver(self, table, key, value):
        subs = self.subscriptions.get((table, key), []) + self.subscriptions.get((table, None), [])
        for sub in subs:
            try:
                sub.callback(table, key, decode_value(value))
            except Exception:
                log.exception("control store subscriber callback failed")

    def _run(self):
        while not self.closed:
            try:
                message = self.conn.link.read()
            except (OSError, wire.ProtocolError, AttributeError):
                if self.closed:
                    return
                self._reconnect()
                continue
            request_id, op_or_ok, result = message
            if request_id == 0:
                for table, key, value in result:
                    self.deliver(table, key, value)
                continue
            resubscribed = self.resubscribing.pop(request_id, None)
            if resubscribed is not None:
                if op_or_ok and resubscribed[1] is not None:
                    self.deliver(resubscribed[0], resubscribed[1], result)
                continue
            slot = self.waiting.pop(request_id, None)
            if slot is not None:
                if slot[2] is not None and op_or_ok:
                    try:
                        slot[2](result)
                    except Exception:
                        log.exception("control store subscriber callback failed")
                slot[1] = message
                slot[0].set()

    def _reconnect(self):
        with self.lock:
            self.conn.reset()
            for slot in self.waiting.values():
                slot[1] = (0, False, "connection to the control store was lost")
                slot[0].set()
            self.waiting.clear()
            try:
                self.conn.ensure()
            except ControlStoreError as exc:
                log.error("%s; subscriptions on shard %d stop", exc, self.shard_number)
                self.closed = True
                return
            # Re-subscribe. The replies to key subscriptions carry the current
            # value, delivered like a change, so nothing changed while we were
            # away is missed.
            self.resubscribing.clear()
            try:
                for table, key in list(self.subscriptions):
                    request_id = next(self.conn.ids)
                    self.resubscribing[request_id] = (table, key)
                    self.conn.link.send((request_id, "sub", (table, key)))
            except OSError as exc:
                # The new connection broke too: the reader's next read fails
                # and brings us back here.
                log.info("control store shard %d: re-subscribing failed (%s)",
                         self.shard_number, exc)

    def close(self):
        self.closed = True
        self.conn.reset()


class GcsClient:
    """Talks to every shard of one cluster's control store."""

    def __init__(self, addresses, token, batch_size=DEFAULT_BATCH,
                 flush_delay=DEFAULT_FLUSH_DELAY_S,
                 reconnect_timeout=DEFAULT_RECONNECT_TIMEOUT_S,
                 request_timeout=REQUEST_TIMEOUT_S):
        if not addresses:
            raise ValueError("GcsClient needs at least one shard address")
        self.addresses = [tuple(a) if not isinstance(a, str) else a for a in addresses]
        self.token = token
        self.batch_size = batch_size
        self.flush_delay = flush_delay
        self.shards = [_Shard(a, token, reconnect_timeout, request_timeout)
                       for a in self.addresses]
        self.reconnect_timeout = reconnect_timeout
        self.subscribers = [None] * len(self.shards)
        self._wake = threading.Condition()
        self._dirty = set()
        self._closed = False
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                         name="minray-gcs-flush")
        self._flusher.start()

    @classmethod
    def from_session(cls, session_dir, **kwargs):
        """Connect to the control store of a session directory on this machine."""
        from minray.gcs.supervisor import read_shard_map
        from minray.session import read_token
        return cls(read_shard_map(session_dir), read_token(session_dir), **kwargs)

    @classmethod
    def connect(cls, address, token, **kwargs):
        """Connect given any one shard's (host, port): it tells where the others are."""
        first = _Shard(tuple(address), token, kwargs.get("reconnect_timeout",
                                                         DEFAULT_RECONNECT_TIMEOUT_S))
        try:
            addresses = [tuple(a) for a in first.request("shards", ())]
        finally:
            first.close()
        return cls(addresses, token, **kwargs)

    @property
    def num_shards(self):
        return len(self.shards)

    def _shard(self, key):
        return shard_for(key, len(self.shards))

    @staticmethod
    def _check(table, key, prefix=False):
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
        if type(key) is not bytes:
            raise TypeError(f"control store keys are bytes, got {type(key).__name__}")
        if len(key) > MAX_KEY_BYTES or (not key and not prefix):
            raise ValueError(f"control store keys are 1 to {MAX_KEY_BYTES} bytes long, "
                             f"got {len(key)}")

    # -- writes ------------------------------------------------------------
    def put(self, table, key, value):
        """Buffer a write; it is sent within flush_delay (or when a batch fills)."""
        self._write(table, key, encode_value(value))

    def delete(self, table, key):
        self._write(table, key, None)

    def write_encoded(self, items):
        """Buffer many writes at once: [(table, key, encoded value or None
        to delete)], values made with minray.gcs.tables.encode_value. The
        same as put/delete per item, with one lock per shard instead of one
        per write (for writers of thousands of records at a time)."""
        num_shards = len(self.shards)
        for item in items:
            key = item[1]
            if item[0] not in _TABLE_SET or type(key) is not bytes \
                    or not 0 < len(key) <= MAX_KEY_BYTES:
                self._check(item[0], key)          # raises the error that says why
        if num_shards == 1:                        # (one shard: nothing to sort out)
            self._buffer(0, items)
            return
        by_shard = {}
        for item in items:
            by_shard.setdefault(zlib.crc32(item[1]) % num_shards, []).append(item)
        for number, writes in by_shard.items():
            self._buffer(number, writes)

    def _write(self, table, key, value):
        self._check(table, key)
        self._buffer(self._shard(key), ((table, key, value),))

    def _buffer(self, number, writes):
        """Queue writes for a shard; flush a full batch, else wake the flusher."""
        shard = self.shards[number]
        with shard.lock:
            shard.pending.extend(writes)
            full = len(shard.pending) >= self.batch_size
        if full:
            shard.flush()
        elif number not in self._dirty:
            # Unlocked check: the writes are appended first, so a shard already
            # marked dirty is flushed after them. Saves a lock per write.
            with self._wake:
                if not self._dirty:
                    self._wake.notify()
                self._dirty.add(number)

    def unsent_writes(self):
        """Writes buffered here and not yet sent (a shard that is away makes
        them pile up). Read without locks: an estimate for backpressure."""
        return sum(len(shard.pending) for shard in self.shards)

    def flush(self, wait=True):
        """Send buffered writes; with wait, until every shard acknowledged them."""
        for shard in self.shards:
            shard.flush(wait=wait)

    def _flush_loop(self):
        while True:
            with self._wake:
                while not self._dirty and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
            time.sleep(self.flush_delay)     # let a burst of writes gather
            with self._wake:
                if self._closed:             # close() flushed everything
                    return
                dirty, self._dirty = self._dirty, set()
            for number in dirty:
                try:
                    self.shards[number].flush()
                except ControlStoreError as exc:
                    log.error("control store write failed: %s", exc)

    # -- reads -------------------------------------------------------------
    def get(self, table, key):
        self._check(table, key)
        return decode_value(self.shards[self._shard(key)].request("get", (table, key)))

    def get_many(self, table, keys):
        """Values for many keys (None where missing), one request per shard."""
        by_shard = {}
        for i, key in enumerate(keys):
            self._check(table, key)
            by_shard.setdefault(self._shard(key), []).append(i)
        out = [None] * len(keys)
        for number, positions in by_shard.items():
            values = self.shards[number].request("mget", (table, [keys[i] for i in positions]))
            for i, value in zip(positions, values):
                out[i] = decode_value(value)
        return out

    def scan(self, table, prefix=b"", limit=None):
        """[(key, value)] of a table across all shards, sorted by key."""
        self._check(table, prefix, prefix=True)
        rows = []
        for shard in self.shards:
            rows.extend(shard.request("scan", (table, prefix, limit)))
        rows.sort(key=lambda kv: kv[0])
        if limit is not None:
            rows = rows[:limit]
        return [(k, decode_value(v)) for k, v in rows]

    def info(self):
        return [shard.request("info", ()) for shard in self.shards]

    # -- pub/sub -----------------------------------------------------------
    def publish(self, table, key, value):
        """Push a message to subscribers without storing it."""
        self._check(table, key)
        self.shards[self._shard(key)].request("pub", [(table, key, encode_value(value))])

    def subscribe(self, table, callback, key=None):
        """Call callback(table, key, value) on every change of a key or table.

        A key subscription first delivers the key's current value (None if
        absent), so a change made just before subscribing is not missed.
        Callbacks run on a background thread and must not block for long.
        """
        if key is None:
            if table not in TABLES:
                raise ValueError(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
            numbers = range(len(self.shards))
        else:
            self._check(table, key)
            numbers = [self._shard(key)]
        sub = Subscription(self, table, key, callback)
        # A key's current value is delivered by the reader thread as the reply
        # arrives, so it comes before any change pushed after it.
        on_reply = None if key is None else (
            lambda current: callback(table, key, decode_value(current)))
        for number in numbers:
            channel = self._subscriber(number)
            channel.subscriptions.setdefault((table, key), []).append(sub)
            channel.call("sub", (table, key), on_reply=on_reply)
        return sub

    def _subscriber(self, number):
        if self.subscribers[number] is None:
            channel = _SubscriberChannel(self.addresses[number], self.token,
                                         self.reconnect_timeout, number)
            channel.start()
            self.subscribers[number] = channel
        return self.subscribers[number]

    def _unsubscribe(self, sub):
        numbers = range(len(self.shards)) if sub.key is None else [self._shard(sub.key)]
        for number in numbers:
            channel = self.subscribers[number]
            if channel is None:
                continue
            subs = channel.subscriptions.get((sub.table, sub.key), [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                channel.subscriptions.pop((sub.table, sub.key), None)
                channel.call("unsub", (sub.table, sub.key))

    def close(self):
        try:
            self.flush(wait=True)
        except ControlStoreError as exc:
            log.warning("control store writes lost at close: %s", exc)
        with self._wake:
            self._closed = True
            self._wake.notify()
        for shard in self.shards:
            shard.close()
        for channel in self.subscribers:
            if channel is not None:
                channel.close()
