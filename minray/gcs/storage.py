"""One control-store shard's durable storage: an LMDB environment.

Each table is a named LMDB database inside the shard's environment. Values
are opaque bytes to the server (clients encode them, minray.gcs.tables), so
the server never unpickles user data.

Durability: writes go through LMDB without fsync (sync=False), so a committed
write is in the kernel's page cache the moment the transaction ends and
survives a kill -9 of the shard process; a power loss may lose the last
moments (pass fsync=True to trade speed for that). When the map fills, the
environment doubles its map size, up to max_map_bytes; past that, the write
fails with ControlStoreFullError and nothing of that batch is applied.
"""
import os

import lmdb

from minray.gcs.tables import TABLES

DEFAULT_MAP_BYTES = 256 << 20
DEFAULT_MAX_MAP_BYTES = 64 << 30


class ControlStoreFullError(Exception):
    pass


class ShardStorage:
    def __init__(self, path, shard, map_bytes=DEFAULT_MAP_BYTES,
                 max_map_bytes=DEFAULT_MAX_MAP_BYTES, fsync=False):
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.path = path
        self.shard = shard
        self.max_map_bytes = max(max_map_bytes, map_bytes)
        self.env = lmdb.open(path, map_size=map_bytes, max_dbs=len(TABLES) + 2,
                             sync=fsync, metasync=fsync, readahead=False,
                             max_readers=16)
        # A restarted shard keeps the size its map had grown to.
        self.map_bytes = max(map_bytes, self.env.info()["map_size"])
        self.dbs = {name: self.env.open_db(name.encode()) for name in TABLES}

    def close(self):
        self.env.close()

    def write(self, items):
        """Apply [(table, key, value)] in order, in one transaction.

        A value of None deletes the key.
        """
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for table, key, value in items:
                        if value is None:
                            txn.delete(key, db=self.dbs[table])
                        else:
                            txn.put(key, value, db=self.dbs[table])
                return
            except lmdb.MapFullError:
                self._grow()

    def _grow(self):
        if self.map_bytes >= self.max_map_bytes:
            raise ControlStoreFullError(
                f"control store shard {self.shard} is full: its LMDB map reached "
                f"max_map_bytes={self.max_map_bytes}; raise max_map_bytes "
                "(GcsProcesses(max_map_bytes=...), or the server's --max-map-bytes) or delete old entries")
        self.map_bytes = min(self.map_bytes * 2, self.max_map_bytes)
        self.env.set_mapsize(self.map_bytes)

    def get(self, table, key):
        with self.env.begin(db=self.dbs[table], buffers=False) as txn:
            return txn.get(key)

    def get_many(self, table, keys):
        with self.env.begin(db=self.dbs[table]) as txn:
            return [txn.get(key) for key in keys]

    def scan(self, table, prefix=b"", limit=None):
        """(key, value) pairs of a table whose key starts with prefix, in key order."""
        out = []
        with self.env.begin(db=self.dbs[table]) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix):
                return out
            for key, value in cursor:
                if not key.startswith(prefix) or (limit is not None and len(out) >= limit):
                    break
                out.append((key, value))
        return out

    def counts(self):
        with self.env.begin() as txn:
            return {name: txn.stat(db)["entries"] for name, db in self.dbs.items()}
