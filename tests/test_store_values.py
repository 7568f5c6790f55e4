"""Python values through the store: zero-copy, read-only, pinned by their views."""
import gc
import subprocess

import numpy as np
import pyarrow as pa
import pytest

from conftest import python_child
from minray.exceptions import SerializationError
from minray.object_store import get_value, put_value


def oid(n):
    return n.to_bytes(4, "big") * 5


def inside(store, oid_, address):
    pinned = store.get(oid_)
    return pinned.address <= address < pinned.address + len(pinned)


def test_numpy_array_is_zero_copy_read_only_and_pins(make_store):
    store = make_store(8 << 20)
    array = np.arange(100_000, dtype=np.float64).reshape(100, 1000)
    put_value(store, oid(1), array)
    out = get_value(store, oid(1))
    assert np.array_equal(out, array)
    assert not out.flags.writeable
    with pytest.raises(ValueError):
        out[0, 0] = 1
    assert inside(store, oid(1), out.ctypes.data)
    assert store.stats()["pinned_objects"] == 1
    row = out[3]                 # a view of the view still pins the object
    del out
    gc.collect()
    assert store.stats()["pinned_objects"] == 1
    del row
    gc.collect()
    assert store.stats()["pinned_objects"] == 0


def test_values_in_containers_round_trip(make_store):
    store = make_store(8 << 20)
    value = {"w": np.ones((3, 4), dtype=np.float32), "names": ["a", "b"],
             "big": 2 ** 200, "t": (1, 2.5, None), "s": {1, 2}, "b": b"\x00" * 100}
    put_value(store, oid(1), value)
    out = get_value(store, oid(1))
    assert out.keys() == value.keys()
    assert np.array_equal(out["w"], value["w"]) and not out["w"].flags.writeable
    assert inside(store, oid(1), out["w"].ctypes.data)
    assert [out[k] for k in ("names", "big", "t", "s", "b")] == \
        [value[k] for k in ("names", "big", "t", "s", "b")]


def test_arrow_table_is_zero_copy(make_store):
    store = make_store(8 << 20)
    table = pa.table({"x": np.arange(10_000), "y": np.random.rand(10_000)})
    put_value(store, oid(1), table)
    out = get_value(store, oid(1))
    assert out.equals(table)
    address = out.column("y").chunk(0).buffers()[1].address
    assert inside(store, oid(1), address)


def test_unserializable_value_leaves_nothing_behind(make_store):
    import threading
    store = make_store()
    with pytest.raises(SerializationError, match="lock"):
        put_value(store, oid(1), {"a": threading.Lock()})
    assert store.stats()["num_objects"] == 0
    assert not store.contains(oid(1))


def test_array_read_zero_copy_in_another_process(make_store, store_name):
    store = make_store(64 << 20)
    array = np.random.rand(1000, 1000)
    put_value(store, oid(1), array)
    child = python_child("""
        import sys
        import numpy as np
        from minray.object_store import SharedStore, get_value
        store = SharedStore.attach(sys.argv[1])
        object_id = bytes.fromhex(sys.argv[2])
        out = get_value(store, object_id)
        pinned = store.get(object_id)
        assert pinned.address <= out.ctypes.data < pinned.address + len(pinned)
        assert not out.flags.writeable
        print(repr(float(out.sum())))
    """, store_name, oid(1).hex(), stdout=subprocess.PIPE, text=True)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    assert float(out) == float(array.sum())
