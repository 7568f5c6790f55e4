"""The node's shared-memory object store (Cython core in minray/_core/store.pyx).

`SharedStore` is the raw store: create / seal / get / release / delete of
byte objects with pins and LRU eviction, and the primary pins that keep task
results and puts from being evicted before the node manager adopts them.
`write_serialized`, `put_value` and `get_value` combine it with
minray.serialization to store Python values, numpy arrays zero-copy.
"""
import os


from minray._core.store import OBJECT_ID_SIZE, SHM_DIR, PinnedBuffer, SharedStore
from minray.exceptions import ObjectExistsError
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


def write_serialized(store, object_id, serialized, primary=True):
    """Create, fill and seal an object from a SerializedObject.

    primary=True (task results and puts): the object is sealed holding the
    primary pin, so it cannot be evicted before the node manager adopts it
    (SharedStore.adopt_primary).  If a sealed object with this id is already
    there (a retried task writing the same result again), that copy stands
    in for this one: it takes the primary pin and nothing is written.
    Returns True if this call wrote the object, False if it reused one.

    If writing fails, the half-written object is aborted: nothing is left.
    """
    try:
        buf = store.create_object(object_id, serialized.total_size, serialized.metadata)
    except ObjectExistsError:
        if primary and store.hold_primary(object_id):
            return False
        raise
    written = False
    try:
        serialized.write_to(buf)
        written = True
    finally:
        buf = None            # drop our view: seal and abort release the buffer
        if not written:
            store.abort(object_id)
    store.seal(object_id, primary)
    return True


def put_value(store, object_id, value, primary=False):
    """Serialize `value` straight into the store under `object_id` and seal it.

    Without primary the object is evictable as soon as nobody pins it.
    """
    write_serialized(store, object_id, serialize(value), primary)


def get_value(store, object_id):
    """Read a value from the store; numpy arrays and Arrow buffers are zero-copy views."""
    pinned = store.get(object_id)
    return deserialize(pinned.metadata, pinned)
