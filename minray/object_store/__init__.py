"""The node's shared-memory object store (Cython core in minray/_core/store.pyx).

`SharedStore` is the raw store: create / seal / get / release / delete of
byte objects with pins and LRU eviction.  `put_value` and `get_value` combine
it with minray.serialization to store Python values, numpy arrays zero-copy.
"""
import os


from minray._core.store import OBJECT_ID_SIZE, SHM_DIR, PinnedBuffer, SharedStore
from minray.serialization import deserialize, serialize

__all__ = [
    "OBJECT_ID_SIZE", "PinnedBuffer", "SharedStore", "default_capacity",
    "get_value", "put_value", "store_name", "write_serialized",
]

# The default store takes this share of RAM, never more than the free space
# of /dev/shm and never more than the cap (a bigger store only helps when a
# working set is that big; it can always be asked for explicitly).
DEFAULT_RAM_FRACTION = 0.3
DEFAULT_CAP_BYTES = 64 << 30
SHM_HEADROOM = 0.8


def default_capacity():
    """A sensible object store size for this machine, in bytes."""
    import psutil  # lazily: most processes never need it
    ram = psutil.virtual_memory().total
    st = os.statvfs(SHM_DIR)
    shm_free = st.f_bavail * st.f_frsize
    return int(min(ram * DEFAULT_RAM_FRACTION, shm_free * SHM_HEADROOM, DEFAULT_CAP_BYTES))


def store_name(session, node):
    """Arena file name: carries session and node so two stores never collide."""
    return f"minray-{session}-{node}"


def write_serialized(store, object_id, serialized):
    """Create, fill and seal an object from a SerializedObject.

    If writing fails, the half-written object is aborted: nothing is left.
    """
    buf = store.create_object(object_id, serialized.total_size, serialized.metadata)
    written = False
    try:
        serialized.write_to(buf)
        written = True
    finally:
        buf = None            # drop our view: seal and abort release the buffer
        if not written:
            store.abort(object_id)
    store.seal(object_id)


def put_value(store, object_id, value):
    """Serialize `value` straight into the store under `object_id` and seal it."""
    write_serialized(store, object_id, serialize(value))


def get_value(store, object_id):
    """Read a value from the store; numpy arrays and Arrow buffers are zero-copy views."""
    pinned = store.get(object_id)
    return deserialize(pinned.metadata, pinned)
