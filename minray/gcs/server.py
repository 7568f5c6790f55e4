"""Control-store shard server: LMDB shards served over authenticated TCP.

One process serves one or more shards, each on its own listening socket, all
from one asyncio loop (see docs/control-store.md for why that is the default
on small machines and how to spread shards over processes instead).

Requests are frames (minray.wire) of the form (request_id, op, args); replies
are (request_id, ok, result) in request order; pushes to subscribers are
(0, "pub", [(table, key, value), ...]).

    write [(table, key, value), ...]   -> count      in order, one LMDB
                                                    transaction; None deletes
    get   (table, key)                 -> value | None
    mget  (table, [key, ...])          -> [value | None, ...]
    scan  (table, prefix, limit)       -> [(key, value), ...]
    sub   (table, key | None)          -> current value (key) | None (table)
    unsub (table, key | None)          -> None
    pub   [(table, key, value), ...]   -> count      push only, nothing stored
    info  ()                           -> shard number, entries per table, map size
    shards ()                          -> [[host, port], ...] of every shard
"""
import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from minray import wire
from minray.gcs.storage import (
    DEFAULT_MAP_BYTES, DEFAULT_MAX_MAP_BYTES, ControlStoreFullError, ShardStorage,
)
from minray.gcs.tables import TABLES
from minray.session import read_token

log = logging.getLogger("minray.gcs")


def shard_dir(session_dir, shard):
    return os.path.join(session_dir, "gcs", f"shard-{shard}")


def address_file(session_dir, shard):
    return os.path.join(session_dir, "gcs", f"shard-{shard}.addr")


class BadRequest(Exception):
    pass


MAX_KEY_BYTES = 511              # LMDB's compiled-in key size limit


def _check_table(table):
    if table not in TABLES:
        raise BadRequest(f"unknown table {table!r}; tables are {', '.join(TABLES)}")


def _check_key(key, prefix=False):
    if type(key) is not bytes:
        raise BadRequest(f"keys must be bytes, got {type(key).__name__}")
    if len(key) > MAX_KEY_BYTES or (not key and not prefix):
        raise BadRequest(f"keys must be 1 to {MAX_KEY_BYTES} bytes long, got {len(key)}")


class Shard:
    """One shard: its storage and its subscribers."""

    def __init__(self, number, storage, session_dir):
        self.number = number
        self.storage = storage
        self.session_dir = session_dir
        self.table_subscribers = {}       # table -> set of connections
        self.key_subscribers = {}         # (table, key) -> set of connections

    def publish(self, changes):
        """Push [(table, key, value or None)] to whoever subscribed."""
        if not self.table_subscribers and not self.key_subscribers:
            return
        per_connection = {}
        for change in changes:
            table, key = change[0], change[1]
            by_table = self.table_subscribers.get(table, ())
            for conn in by_table:
                per_connection.setdefault(conn, []).append(change)
            for conn in self.key_subscribers.get((table, key), ()):
                if conn not in by_table:    # once per connection, even if it has both
                    per_connection.setdefault(conn, []).append(change)
        for conn, items in per_connection.items():
            conn.send((0, "pub", items))

    def drop(self, conn):
        for subscribers in (self.table_subscribers, self.key_subscribers):
            for key in [k for k, conns in subscribers.items() if conn in conns]:
                subscribers[key].discard(conn)
                if not subscribers[key]:
                    del subscribers[key]

    # -- operations ------------------------------------------------------
    def op_write(self, conn, items):
        for table, key, value in items:
            _check_table(table)
            _check_key(key)
            if value is not None and type(value) is not bytes:
                raise BadRequest(f"values must be bytes or None, got {type(value).__name__}")
        self.storage.write(items)
        self.publish(items)
        return len(items)

    def op_get(self, conn, args):
        table, key = args
        _check_table(table)
        _check_key(key)
        return self.storage.get(table, key)

    def op_mget(self, conn, args):
        table, keys = args
        _check_table(table)
        for key in keys:
            _check_key(key)
        return self.storage.get_many(table, keys)

    def op_scan(self, conn, args):
        table, prefix, limit = args
        _check_table(table)
        _check_key(prefix, prefix=True)
        return self.storage.scan(table, prefix, limit)

    def op_sub(self, conn, args):
        table, key = args
        _check_table(table)
        if key is None:
            self.table_subscribers.setdefault(table, set()).add(conn)
            return None
        _check_key(key)
        self.key_subscribers.setdefault((table, key), set()).add(conn)
        return self.storage.get(table, key)

    def op_unsub(self, conn, args):
        table, key = args
        subscribers = self.table_subscribers if key is None else self.key_subscribers
        name = table if key is None else (table, key)
        subscribers.get(name, set()).discard(conn)
        return None

    def op_pub(self, conn, items):
        for table, key, value in items:
            _check_table(table)
            _check_key(key)
        self.publish(items)
        return len(items)

    def op_shards(self, conn, args):
        from minray.gcs.supervisor import read_shard_map
        return [list(address) for address in read_shard_map(self.session_dir)]

    def op_info(self, conn, args):
        return {"shard": self.number, "entries": self.storage.counts(),
                "map_bytes": self.storage.map_bytes, "pid": os.getpid()}


class ShardConnection(wire.FramedServerProtocol):
    """One client connection to a shard: handshake, then framed requests."""

    # Write and publish batches carry task records and exported code, and a
    # get_many can name many keys; every other request is small.
    first_max_frame = wire.LARGE_MAX_FRAME
    default_max_frame = wire.ORDINARY_MAX_FRAME
    message_max_frame = dict.fromkeys(("write", "pub", "mget"), wire.LARGE_MAX_FRAME)
    seal_tcp_frames = True        # node managers on other hosts reach shards over TCP
    kind_index = 1

    def __init__(self, shard, token):
        super().__init__(token, name=f"gcs shard {shard.number}")
        self.shard = shard

    def lost(self):
        self.shard.drop(self)

    def message_received(self, message):
        self._handle(message)

    def _handle(self, message):
        if type(message) is not tuple or len(message) != 3:
            raise wire.ProtocolError("a request must be (request_id, op, args)")
        request_id, op, args = message
        handler = getattr(self.shard, f"op_{op}", None) if type(op) is str else None
        if handler is None:
            self.send((request_id, False, f"unknown operation {op!r}"))
            return
        try:
            result = handler(self, args)
        except (BadRequest, ControlStoreFullError) as exc:
            self.send((request_id, False, str(exc)))
        except (TypeError, ValueError) as exc:
            self.send((request_id, False, f"malformed {op} request: {exc}"))
        except Exception as exc:
            # Never let a failing request escape into asyncio: it would close
            # the connection, and the client would resend the same request on
            # every reconnect.
            log.exception("shard %d: %s request failed", self.shard.number, op)
            self.send((request_id, False, f"{op} failed: {type(exc).__name__}: {exc}"))
        else:
            self.send((request_id, True, result))


def _write_address(session_dir, shard, host, port):
    path = address_file(session_dir, shard)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{host}:{port}\n")
    os.replace(tmp, path)


def read_address(session_dir, shard):
    with open(address_file(session_dir, shard)) as f:
        host, port = f.read().strip().rsplit(":", 1)
    return host, int(port)


async def _watch_parent(parent_pid, stop):
    # Exit with the process that started us (no orphans after a kill -9).
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    log.info("parent %d is gone; stopping", parent_pid)
    stop.set()


async def serve(session_dir, shards, ports, host, map_bytes, max_map_bytes, fsync,
                parent_pid=None):
    token = read_token(session_dir)
    loop = asyncio.get_running_loop()
    servers, storages = [], []
    for number, port in zip(shards, ports):
        storage = ShardStorage(shard_dir(session_dir, number), number, map_bytes,
                               max_map_bytes, fsync)
        storages.append(storage)
        shard = Shard(number, storage, session_dir)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        server = await loop.create_server(
            lambda shard=shard: ShardConnection(shard, token), sock=sock,
            backlog=wire.LISTEN_BACKLOG)
        servers.append(server)
        _write_address(session_dir, number, host, sock.getsockname()[1])
        log.info("shard %d serving on %s:%d", number, host, sock.getsockname()[1])
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.ensure_future(_watch_parent(parent_pid, stop)) if parent_pid else None
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    for server in servers:
        server.close()
    for storage in storages:
        storage.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description="minray control-store shard server")
    parser.add_argument("--session-dir", required=True)
    parser.add_argument("--shards", required=True, help="comma-separated shard numbers to serve")
    parser.add_argument("--ports", help="comma-separated ports, 0 = any (default)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--parent-pid", type=int, help="exit when this parent process is gone")
    parser.add_argument("--map-bytes", type=int, default=DEFAULT_MAP_BYTES)
    parser.add_argument("--max-map-bytes", type=int, default=DEFAULT_MAX_MAP_BYTES)
    parser.add_argument("--fsync", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    shards = [int(s) for s in args.shards.split(",")]
    ports = [int(p) for p in args.ports.split(",")] if args.ports else [0] * len(shards)
    if len(ports) != len(shards):
        parser.error("--ports needs one port per shard")
    asyncio.run(serve(args.session_dir, shards, ports, args.host, args.map_bytes,
                      args.max_map_bytes, args.fsync, args.parent_pid))


if __name__ == "__main__":
    main()
