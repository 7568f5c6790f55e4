"""The shared-memory object store: allocator, table, pins, eviction, processes."""
import os
import signal
import subprocess

import pytest

from conftest import python_child
from minray.exceptions import (
    ObjectExistsError, ObjectNotFoundError, ObjectStoreError, ObjectStoreFullError,
    StoreAttachError,
)
from minray.object_store import SharedStore


def oid(n):
    return n.to_bytes(4, "big") * 5


def put(store, object_id, size, fill=b"x"):
    buf = store.create_object(object_id, size)
    buf[:] = (fill * size)[:size]
    del buf
    store.seal(object_id)


# ---------------------------------------------------------------- life cycle

def test_create_write_seal_get_release_delete(make_store):
    store = make_store()
    buf = store.create_object(oid(1), 11, b"meta")
    buf[:] = b"hello world"
    store.seal(oid(1))
    with pytest.raises(ValueError):        # the write buffer dies at seal
        buf[0] = 0
    pinned = store.get(oid(1))
    assert bytes(pinned) == b"hello world"
    assert pinned.metadata == b"meta"
    assert pinned.address % 64 == 0
    assert store.stats()["pinned_objects"] == 1
    pinned.release()
    assert store.stats()["pinned_objects"] == 0
    store.delete(oid(1))
    assert not store.contains(oid(1))
    assert store.stats()["num_objects"] == 0


def test_views_are_read_only_and_keep_the_pin(make_store):
    store = make_store()
    put(store, oid(1), 64)
    view = memoryview(store.get(oid(1)))
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1
    assert store.stats()["pinned_objects"] == 1
    store.delete(oid(1))                    # deferred: a view is alive
    assert store.stats()["num_objects"] == 1
    assert not store.contains(oid(1))
    assert bytes(view[:3]) == b"xxx"
    del view
    assert store.stats()["num_objects"] == 0
    assert store.stats()["pinned_objects"] == 0


def test_release_refused_while_views_alive(make_store):
    store = make_store()
    put(store, oid(1), 64)
    pinned = store.get(oid(1))
    view = memoryview(pinned)
    with pytest.raises(ObjectStoreError, match="still alive"):
        pinned.release()
    del view
    pinned.release()


def test_delete_then_recreate_same_id_while_old_is_pinned(make_store):
    store = make_store()
    put(store, oid(1), 64, b"a")
    old = store.get(oid(1))
    store.delete(oid(1))
    put(store, oid(1), 64, b"b")
    assert bytes(old)[:1] == b"a"
    assert bytes(store.get(oid(1)))[:1] == b"b"


# ---------------------------------------------------------------- bad input

def test_unknown_id(make_store):
    store = make_store()
    with pytest.raises(ObjectNotFoundError, match="not in object store"):
        store.get(oid(9))
    with pytest.raises(ObjectNotFoundError):
        store.delete(oid(9))
    with pytest.raises(ObjectNotFoundError):
        store.seal(oid(9))


def test_double_seal_and_double_create(make_store):
    store = make_store()
    put(store, oid(1), 10)
    with pytest.raises(ObjectStoreError, match="already sealed"):
        store.seal(oid(1))
    with pytest.raises(ObjectExistsError):
        store.create_object(oid(1), 10)


def test_reading_unsealed_object(make_store):
    store = make_store()
    store.create_object(oid(1), 10)
    with pytest.raises(ObjectStoreError, match="not sealed"):
        store.get(oid(1))
    assert not store.contains(oid(1))
    with pytest.raises(ObjectStoreError, match="being created"):
        store.delete(oid(1))
    store.abort(oid(1))
    assert store.stats()["num_objects"] == 0


def test_release_twice(make_store):
    store = make_store()
    put(store, oid(1), 10)
    pinned = store.get(oid(1))
    pinned.release()
    with pytest.raises(ObjectStoreError, match="already released"):
        pinned.release()
    with pytest.raises(ObjectStoreError, match="released"):
        memoryview(pinned)


@pytest.mark.parametrize("size, error", [
    (-1, ValueError), (2 ** 70, ObjectStoreFullError), (1.5, TypeError), (True, TypeError),
])
def test_bad_sizes(make_store, size, error):
    store = make_store()
    with pytest.raises(error):
        store.create_object(oid(1), size)
    assert store.stats()["num_objects"] == 0


def test_bad_ids(make_store):
    store = make_store()
    with pytest.raises(ValueError, match="20 bytes"):
        store.create_object(b"short", 1)
    with pytest.raises(TypeError, match="bytes"):
        store.get("a string id")


def test_bad_store_arguments(store_name):
    with pytest.raises(ValueError, match="too small"):
        SharedStore.create(store_name, 100)
    with pytest.raises(ValueError, match="invalid"):
        SharedStore.create("../etc/passwd", 1 << 20)
    with pytest.raises(ObjectStoreFullError, match="free"):
        SharedStore.create(store_name, 1 << 50)
    assert not os.path.exists(f"/dev/shm/{store_name}")


def test_object_bigger_than_store_names_both_sizes(make_store):
    store = make_store(1 << 20)
    with pytest.raises(ObjectStoreFullError) as info:
        store.create_object(oid(1), 5 << 20)
    assert str(5 << 20) in str(info.value)
    assert str(store.capacity) in str(info.value)
    assert "never fit" in str(info.value)


def test_attach_missing_foreign_and_damaged(store_name, make_store):
    with pytest.raises(StoreAttachError, match="no object store"):
        SharedStore.attach(store_name)
    path = f"/dev/shm/{store_name}"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 16))
    with pytest.raises(StoreAttachError, match="not a minray object store"):
        SharedStore.attach(store_name)
    with open(path, "wb") as f:
        f.write(b"tiny")
    with pytest.raises(StoreAttachError, match="bytes long"):
        SharedStore.attach(store_name)
    os.unlink(path)
    store = make_store()
    with open(path, "r+b") as f:       # flip a byte inside the layout fields
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreAttachError, match="damaged"):
        SharedStore.attach(store_name)
    with open(path, "r+b") as f:       # restore, then truncate the file
        f.seek(40)
        f.write(byte)
        f.truncate(store.layout()["file_size"] - 4096)
    with pytest.raises(StoreAttachError, match="damaged"):
        SharedStore.attach(store_name)


def test_closed_store_refuses_operations(make_store):
    store = make_store()
    store.close()
    with pytest.raises(ObjectStoreError, match="closed"):
        store.get(oid(1))
    assert not os.path.exists(store.path)


# ---------------------------------------------------------------- allocator

def test_exact_fit_of_whole_store(make_store):
    store = make_store(1 << 20)
    put(store, oid(1), store.capacity)
    stats = store.stats()
    assert stats["largest_free"] == 0 and stats["free"] == 0
    with pytest.raises(ObjectStoreFullError):
        pinned = store.get(oid(1))
        store.create_object(oid(2), 1)
    del pinned
    store.delete(oid(1))
    assert store.stats()["largest_free"] == store.capacity


def test_blocks_are_aligned_and_sized_to_64(make_store):
    store = make_store()
    for i, size in enumerate([1, 63, 64, 65, 1000, 4097]):
        put(store, oid(i), size)
        assert store.get(oid(i)).address % 64 == 0
        assert store.block_capacity(oid(i)) >= size
        assert store.block_capacity(oid(i)) - size < 64 + 32


def test_coalescing_restores_one_block(make_store):
    store = make_store(1 << 20)
    sizes = [1000, 20000, 300, 70000, 5000]
    for i, size in enumerate(sizes):
        put(store, oid(i), size)
    for i in (1, 3, 0, 4, 2):            # free in an order that needs both merges
        store.delete(oid(i))
    stats = store.stats()
    assert stats["free_blocks"] == 1
    assert stats["largest_free"] == store.capacity


def test_fragmentation_is_resolved_by_eviction(make_store):
    store = make_store(1 << 20)
    n = 0
    while store.stats()["evictions"] == 0:     # fill with 8 KB objects
        put(store, oid(n), 8 << 10)
        n += 1
    pins = [store.get(oid(i)) for i in range(n) if i % 2 == 0 and store.contains(oid(i))]
    # Every other object pinned: free space is fragmented into 8 KB holes.
    big = 64 << 10
    with pytest.raises(ObjectStoreFullError, match="pinned"):
        store.create_object(oid(10 ** 6), store.capacity // 2 + 1)
    del pins
    put(store, oid(10 ** 6), big)
    assert store.contains(oid(10 ** 6))


def test_everything_pinned_raises_instead_of_hanging(make_store):
    store = make_store(1 << 20)
    put(store, oid(1), 600 << 10)
    pinned = store.get(oid(1))
    with pytest.raises(ObjectStoreFullError, match="pinned") as info:
        store.create_object(oid(2), 600 << 10)
    assert str(600 << 10) in str(info.value)
    del pinned
    put(store, oid(2), 600 << 10)          # now oid(1) is evicted instead
    assert not store.contains(oid(1))


def test_object_table_full(make_store):
    store = make_store(1 << 20, max_objects=4)
    pins = []
    for i in range(4):
        put(store, oid(i), 10)
        pins.append(store.get(oid(i)))
    with pytest.raises(ObjectStoreFullError, match="maximum of 4 objects"):
        store.create_object(oid(9), 10)
    pins.pop(0)
    put(store, oid(9), 10)                 # the unpinned one is evicted
    assert not store.contains(oid(0))


# ---------------------------------------------------------------- eviction

def test_eviction_is_least_recently_used(make_store):
    store = make_store(1 << 20)
    size = 250 << 10
    for i in range(4):
        put(store, oid(i), size)
    store.get(oid(0)).release()            # touch 0: now most recent
    assert store.lru_order() == [oid(1), oid(2), oid(3), oid(0)]
    put(store, oid(4), size)               # needs one eviction: oid(1)
    assert not store.contains(oid(1))
    assert all(store.contains(oid(i)) for i in (0, 2, 3, 4))
    put(store, oid(5), 2 * size)           # next: oid(2), oid(3)
    assert [store.contains(oid(i)) for i in range(6)] == [True, False, False, False, True, True]
    assert store.stats()["evictions"] == 3


def test_pinned_objects_are_never_evicted(make_store):
    store = make_store(1 << 20)
    put(store, oid(0), 300 << 10)
    keep = store.get(oid(0))
    for i in range(1, 20):
        put(store, oid(i), 300 << 10)
    assert store.contains(oid(0))
    assert bytes(keep)[:3] == b"xxx"


# ---------------------------------------------------------------- processes

def test_many_processes_create_and_read_at_once(make_store, store_name):
    store = make_store(64 << 20)
    code = """
        import hashlib, os, sys
        from minray.object_store import SharedStore
        name, me, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        store = SharedStore.attach(name)
        def oid(p, i): return bytes([p]) * 4 + i.to_bytes(16, "big")
        for i in range(n):
            data = hashlib.sha256(bytes([me]) + i.to_bytes(4, "big")).digest() * (1 + i % 50)
            store.put(oid(me, i), data)
        # read everybody's objects, spinning until they exist
        seen = 0
        for other in range(4):
            for i in range(n):
                while not store.contains(oid(other, i)):
                    pass
                want = hashlib.sha256(bytes([other]) + i.to_bytes(4, "big")).digest() * (1 + i % 50)
                assert bytes(store.get(oid(other, i))) == want, (other, i)
                seen += 1
        print(seen)
        store.close()
    """
    procs = [python_child(code, store_name, p, 300, stdout=subprocess.PIPE) for p in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert [int(o) for o in outs] == [1200] * 4
    stats = store.stats()
    assert stats["num_objects"] == 1200
    assert stats["pinned_objects"] == 0
    assert stats["num_clients"] == 1


def test_pin_held_in_another_process(make_store, store_name):
    store = make_store()
    put(store, oid(1), 1000)
    child = python_child("""
        import sys
        from minray.object_store import SharedStore
        store = SharedStore.attach(sys.argv[1])
        view = store.get(bytes.fromhex(sys.argv[2]))
        print("pinned", flush=True)
        sys.stdin.readline()
        del view
        print("released", flush=True)
        sys.stdin.readline()
    """, store_name, oid(1).hex(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "pinned"
    assert store.stats()["pinned_objects"] == 1
    store.delete(oid(1))
    assert store.stats()["num_objects"] == 1     # kept for the reader
    child.stdin.write("\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "released"
    assert store.stats()["num_objects"] == 0
    child.stdin.write("\n")
    child.stdin.close()
    assert child.wait(timeout=30) == 0


def test_reader_killed_while_holding_a_pin(make_store, store_name):
    store = make_store(1 << 20)
    put(store, oid(1), 700 << 10)
    child = python_child("""
        import sys, time
        from minray.object_store import SharedStore
        store = SharedStore.attach(sys.argv[1])
        view = store.get(bytes.fromhex(sys.argv[2]))
        store.create_object(bytes(20), 1000)      # unsealed, never finished
        print("pinned", flush=True)
        time.sleep(600)
    """, store_name, oid(1).hex(), stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "pinned"
    assert store.stats()["pinned_objects"] == 1
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    # Space pressure reaps the dead reader: its pin and unsealed object go.
    put(store, oid(2), 700 << 10)
    stats = store.stats()
    assert stats["pinned_objects"] == 0
    assert stats["num_clients"] == 1
    assert not store.contains(oid(1))
    assert stats["num_objects"] == 1


def test_reap_dead_clients_explicitly(make_store, store_name):
    store = make_store()
    put(store, oid(1), 10)
    child = python_child("""
        import os, sys
        from minray.object_store import SharedStore
        store = SharedStore.attach(sys.argv[1])
        view = store.get(bytes.fromhex(sys.argv[2]))
        os._exit(0)                                # no cleanup at all
    """, store_name, oid(1).hex())
    assert child.wait(timeout=30) == 0
    assert store.stats()["pinned_objects"] == 1
    assert store.reap_dead_clients() == 1
    assert store.stats()["pinned_objects"] == 0
    assert store.reap_dead_clients() == 0


def test_process_dying_inside_the_lock_is_recovered(make_store, store_name):
    store = make_store()
    put(store, oid(1), 10)
    child = python_child("""
        import os, sys
        from minray.object_store import SharedStore
        store = SharedStore.attach(sys.argv[1])   # stays mapped until exit,
        store._lock_and_abandon()                 # as in a real crash
        os._exit(0)
    """, store_name)
    assert child.wait(timeout=30) == 0
    assert bytes(store.get(oid(1))) == b"x" * 10     # does not hang
    put(store, oid(2), 10)
    assert store.stats()["lock_recoveries"] == 1


def test_damage_left_by_a_dying_process_is_reported(make_store, store_name):
    store = make_store()
    put(store, oid(1), 10)
    layout = store.layout()
    child = python_child("""
        import os, sys
        from minray.object_store import SharedStore
        s = SharedStore.attach(sys.argv[1])
        s._lock_and_abandon()
        with open(s.path, "r+b") as f:           # wreck the first block header
            f.seek(int(sys.argv[2]) + 32)
            f.write(b"\\x01" * 8)
        os._exit(0)
    """, store_name, layout["data_offset"])
    assert child.wait(timeout=30) == 0
    with pytest.raises(StoreAttachError, match="damaged"):
        store.get(oid(1))


def test_forked_child_cannot_use_parent_handle(make_store):
    store = make_store()
    put(store, oid(1), 10)
    view = store.get(oid(1))
    pid = os.fork()
    if pid == 0:
        try:
            store.get(oid(1))
            code = 1
        except ObjectStoreError:
            code = 0
        del view                    # must not drop the parent's pin
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.stats()["pinned_objects"] == 1
    del view
    assert store.stats()["pinned_objects"] == 0


def test_close_with_live_views_keeps_them_valid(store_name):
    store = SharedStore.create(store_name, 1 << 20)
    put(store, oid(1), 100, b"z")
    view = memoryview(store.get(oid(1)))
    reader = SharedStore.attach(store_name)
    store.close()
    assert bytes(view[:2]) == b"zz"
    assert reader.stats()["num_clients"] == 2    # owner still holds a pin
    del view
    assert reader.stats()["num_clients"] == 1
    reader.close()


@pytest.mark.parametrize("power", [20, 22])
def test_object_of_a_class_boundary_fits_an_empty_store(store_name, power):
    # Capacity 2**k + 2**(k-4): the request rounds up to a size class above
    # the only free block, which still fits it (regression test).
    store = SharedStore.create(store_name, (1 << power) + (1 << (power - 4)))
    try:
        put(store, oid(1), 1 << power)
        assert store.contains(oid(1))
    finally:
        store.close()


# ---------------------------------------------------------------- primary pins

def test_primary_copy_is_never_evicted_until_adopted_and_released(make_store):
    store = make_store(1 << 20)
    buf = store.create_object(oid(1), 300 << 10)
    del buf
    store.seal(oid(1), primary=True)
    put(store, oid(2), 300 << 10)
    assert store.lru_order() == [oid(2)]     # the primary copy is not evictable
    stats = store.stats()
    assert stats["primary_pinned_objects"] == 1 and stats["pinned_objects"] == 1
    put(store, oid(3), 600 << 10)            # evicts the ordinary copy only
    assert not store.contains(oid(2)) and store.contains(oid(1))
    reader = store.get(oid(3))
    with pytest.raises(ObjectStoreFullError, match="pinned"):
        put(store, oid(4), 200 << 10)        # fails rather than evict oid(1)
    assert store.contains(oid(1))
    pin = store.adopt_primary(oid(1))       # the node manager takes the pin over
    assert store.stats()["primary_pinned_objects"] == 0
    assert store.stats()["pinned_objects"] == 2
    assert store.lru_order() == []
    del pin                                  # its last reference is dropped
    assert store.lru_order() == [oid(1)]
    put(store, oid(4), 200 << 10)            # now it may be evicted
    assert not store.contains(oid(1))
    del reader


def test_adopt_primary_without_a_primary_pin_is_a_get(make_store):
    store = make_store()
    put(store, oid(1), 100, b"a")
    pin = store.adopt_primary(oid(1))
    assert bytes(pin) == b"a" * 100 and store.lru_order() == []
    del pin
    assert store.lru_order() == [oid(1)]
    with pytest.raises(ObjectNotFoundError):
        store.adopt_primary(oid(2))


def test_delete_drops_the_primary_pin(make_store):
    store = make_store()
    store.put(oid(1), b"x" * 1000, primary=True)
    reader = store.get(oid(1))
    store.delete(oid(1))
    assert store.stats()["num_objects"] == 1        # kept for the reader
    del reader
    stats = store.stats()
    assert stats["num_objects"] == 0 and stats["primary_pinned_objects"] == 0


def test_writing_an_existing_sealed_id_reuses_it_as_the_primary_copy(make_store):
    from minray.object_store import write_serialized
    from minray.serialization import serialize
    store = make_store()
    assert write_serialized(store, oid(1), serialize(b"first" * 100)) is True
    store.adopt_primary(oid(1)).release()
    assert store.lru_order() == [oid(1)]            # evictable again
    # A retried task writes the same result id again: the sealed copy is
    # reused and pinned as the primary copy again; nothing is rewritten.
    assert write_serialized(store, oid(1), serialize(b"second" * 100)) is False
    assert store.lru_order() == []
    assert store.stats()["primary_pinned_objects"] == 1
    assert bytes(store.get(oid(1))) == b"first" * 100
    # Only a primary write reuses: a plain one still refuses an existing id.
    with pytest.raises(ObjectExistsError):
        write_serialized(store, oid(1), serialize(b"third"), primary=False)


def test_primary_pins_of_a_dead_writer_are_released_for_its_pid(make_store, store_name):
    store = make_store()
    put(store, oid(3), 10)
    child = python_child("""
        import os, sys
        from minray.object_store import SharedStore
        store = SharedStore.attach(sys.argv[1])
        store.put(bytes.fromhex(sys.argv[2]), b"r" * 1000, primary=True)
        store.put(bytes.fromhex(sys.argv[3]), b"p" * 1000, primary=True)
        os._exit(0)                       # died before reporting them
    """, store_name, oid(1).hex(), oid(2).hex())
    assert child.wait(timeout=30) == 0
    # Reaping the dead process releases its client slot, not the primary
    # pins: it may have reported them to the node manager just before exiting.
    assert store.reap_dead_clients() == 1
    assert store.stats()["primary_pinned_objects"] == 2
    assert store.release_primaries_of(os.getpid()) == 0      # not ours
    assert store.release_primaries_of(child.pid) == 2
    assert store.lru_order() == [oid(3), oid(1), oid(2)]     # ordinary copies now
    assert bytes(store.get(oid(1))) == b"r" * 1000
    assert store.release_primaries_of(child.pid) == 0
    store.close()
    assert store.release_primaries_of(child.pid) == 0      # a node shutting down


def test_pins_and_primary_pins_survive_the_repair_after_a_crash(make_store, store_name):
    store = make_store()
    store.put(oid(1), b"p" * 100, primary=True)
    put(store, oid(2), 100)
    reader = store.get(oid(2))
    child = python_child("""
        import os, sys
        from minray.object_store import SharedStore
        store = SharedStore.attach(sys.argv[1])
        store._lock_and_abandon()
        os._exit(0)
    """, store_name)
    assert child.wait(timeout=30) == 0
    assert store.contains(oid(1))                    # takes the lock: repairs
    assert store.stats()["lock_recoveries"] == 1
    assert store.lru_order() == []                   # both still pinned
    del reader
    assert store.lru_order() == [oid(2)]             # pin count rebuilt from the mask
    assert store.stats()["primary_pinned_objects"] == 1


def test_creating_over_an_unfinished_object_of_a_dead_process(make_store, store_name):
    store = make_store()
    child = python_child("""
        import os, sys
        from minray.object_store import SharedStore
        store = SharedStore.attach(sys.argv[1])
        store.create_object(bytes.fromhex(sys.argv[2]), 1000)   # never sealed
        os._exit(0)
    """, store_name, oid(1).hex())
    assert child.wait(timeout=30) == 0
    put(store, oid(1), 1000, b"n")         # reaps the dead creator, then creates
    assert bytes(store.get(oid(1))) == b"n" * 1000
    buf = store.create_object(oid(2), 10)  # a live creator's id stays taken
    other = SharedStore.attach(store_name)
    try:
        with pytest.raises(ObjectExistsError, match="being created"):
            other.create_object(oid(2), 10)
    finally:
        other.close()
    del buf
    store.abort(oid(2))


# ---------------------------------------------------------------- client slots

def test_client_table_size_is_set_at_create_and_full_table_says_how_to_grow(make_store):
    store = make_store(max_clients=70)                  # rounded up to 128
    assert store.max_clients == 128 and store.stats()["max_clients"] == 128
    handles = [SharedStore.attach(store.name) for _ in range(127)]
    try:
        with pytest.raises(StoreAttachError) as info:
            SharedStore.attach(store.name)
        message = str(info.value)
        assert "128 processes attached" in message
        assert "MINRAY_OBJECT_STORE_MAX_CLIENTS=256" in message
        handles.pop().close()                           # a slot frees up
        handles.append(SharedStore.attach(store.name))
        assert store.stats()["num_clients"] == 128
    finally:
        for handle in handles:
            handle.close()
    assert store.stats()["num_clients"] == 1


def test_full_client_table_reaps_dead_processes_first(make_store, store_name):
    store = make_store(max_clients=64)
    handles = [SharedStore.attach(store_name) for _ in range(62)]
    try:
        child = python_child("""
            import os, sys
            from minray.object_store import SharedStore
            SharedStore.attach(sys.argv[1])
            os._exit(0)                               # leaves its slot taken
        """, store_name)
        assert child.wait(timeout=30) == 0
        assert store.stats()["num_clients"] == 64
        handles.append(SharedStore.attach(store_name))  # took the dead one's slot
        assert store.stats()["num_clients"] == 64
    finally:
        for handle in handles:
            handle.close()


def test_default_client_table_and_environment_override(store_name, monkeypatch):
    store = SharedStore.create(store_name, 1 << 20)
    try:
        assert store.max_clients >= 1024
        layout = store.layout()
        assert layout["entry_size"] == 64
        # What the bigger table costs: pin masks of max_clients bits per entry.
        assert layout["index_offset"] - layout["pins_offset"] >= layout["max_objects"] * 1024 // 8
    finally:
        store.close()
    monkeypatch.setenv("MINRAY_OBJECT_STORE_MAX_CLIENTS", "3000")
    store = SharedStore.create(store_name, 1 << 20)
    try:
        assert store.max_clients == 3008
        assert SharedStore.attach(store_name).max_clients == 3008
    finally:
        store.close()
    monkeypatch.setenv("MINRAY_OBJECT_STORE_MAX_CLIENTS", "lots")
    with pytest.raises(ValueError, match="MINRAY_OBJECT_STORE_MAX_CLIENTS"):
        SharedStore.create(store_name, 1 << 20)


@pytest.mark.parametrize("max_clients", [0, -1, 70000, 1.5, True])
def test_bad_max_clients(store_name, max_clients):
    with pytest.raises(ValueError, match="max_clients"):
        SharedStore.create(store_name, 1 << 20, max_clients=max_clients)


# ---------------------------------------------------------------- damaged fields

# Byte offsets of ObjectEntry fields (layout.pxd).
ENTRY_FIELDS = {"state": (20, 1), "creator_slot": (22, 2), "metadata_size": (24, 4),
                "pin_holders": (28, 4),
                "lru_prev": (32, 4), "lru_next": (36, 4), "block": (48, 8), "data_size": (56, 8)}


def overwrite(store, offset, value, size):
    """Write into the arena file as a stray process would."""
    with open(store.path, "r+b") as f:
        f.seek(offset)
        f.write(value.to_bytes(size, "little", signed=value < 0))


def overwrite_entry(store, entry, field, value):
    offset, size = ENTRY_FIELDS[field]
    overwrite(store, store.layout()["entries_offset"] + 64 * entry + offset, value, size)


@pytest.mark.parametrize("field, value", [
    ("block", 1 << 40), ("block", 100), ("block", (1 << 20) - 64), ("data_size", 1 << 40),
    ("metadata_size", 1 << 30), ("state", 9), ("creator_slot", 60000),
    ("lru_next", 1 << 30), ("pin_holders", 1 << 30),
])
@pytest.mark.parametrize("operation", ["get", "delete", "adopt_primary"])
def test_out_of_range_entry_field_is_reported_not_followed(make_store, field, value, operation):
    store = make_store()
    put(store, oid(1), 1000)
    overwrite_entry(store, 0, field, value)
    with pytest.raises(StoreAttachError, match="damaged: entry 0 of its object table"):
        getattr(store, operation)(oid(1))
    with pytest.raises(StoreAttachError, match="damaged"):
        store.contains(oid(1))            # every later operation refuses too


def test_freeing_a_block_with_a_wrong_header_is_refused(make_store):
    # In range and aligned, but not the start of a block: freeing it would
    # make the allocator follow whatever bytes are there.
    store = make_store()
    put(store, oid(1), 1000)
    overwrite_entry(store, 0, "block", 64 * 3)
    with pytest.raises(StoreAttachError, match="damaged: entry 0"):
        store.delete(oid(1))


def test_out_of_range_index_slot_is_reported(make_store):
    store = make_store()
    put(store, oid(1), 10)
    layout = store.layout()
    slots = (layout["data_offset"] - layout["index_offset"]) // 4
    with open(store.path, "r+b") as f:
        f.seek(layout["index_offset"])
        index = f.read(slots * 4)
    used = next(i for i in range(slots) if index[4 * i:4 * i + 4] != bytes(4))
    overwrite(store, layout["index_offset"] + 4 * used, layout["max_objects"] + 7, 4)
    with pytest.raises(StoreAttachError, match="damaged: its hash index"):
        store.get(oid(1))


def test_damaged_lru_link_is_caught_by_eviction(make_store):
    store = make_store(1 << 20)
    put(store, oid(1), 600 << 10)
    overwrite_entry(store, 0, "lru_prev", 1 << 30)
    with pytest.raises(StoreAttachError, match="damaged"):
        put(store, oid(2), 600 << 10)     # must evict oid(1): follows its links


def test_damage_found_while_releasing_a_pin_is_reported_next(make_store):
    store = make_store()
    put(store, oid(1), 1000)
    pin = store.get(oid(1))
    store.delete(oid(1))                  # freed when the pin goes
    overwrite_entry(store, 0, "block", 1 << 40)
    pin.release()                         # must not free a block at that offset
    with pytest.raises(StoreAttachError, match="damaged"):
        store.stats()


def test_garbage_collection_during_any_call_never_reenters_the_lock(make_store, store_name):
    # A collection can start at any allocation and release pins (take the
    # lock) from there. With a callback that takes the lock on every
    # collection and a threshold of 1, any allocation made while holding the
    # lock would deadlock this child; none may happen.
    store = make_store(1 << 20, max_clients=64)
    put(store, oid(1), 100)
    child = python_child("""
        import gc, os, sys
        from minray.object_store import SharedStore
        store = SharedStore.attach(sys.argv[1])
        others = [SharedStore.attach(sys.argv[1]) for _ in range(5)]   # for reaping
        one = bytes.fromhex(sys.argv[2])
        reentered = [0]

        def take_the_lock(phase, info):
            if phase == "start":
                store.get(one).release()
                reentered[0] += 1

        gc.callbacks.append(take_the_lock)
        gc.set_threshold(1)
        for i in range(50):
            store.stats()
            store.reap_dead_clients()
            store.lru_order()
            SharedStore.attach(sys.argv[1]).close()
            two = os.urandom(20)
            store.put(two, b"y" * 100, primary=True)
            store.hold_primary(two)
            store.adopt_primary(two).release()
            store.release_primaries_of(os.getpid())
            store.contains(two)
            store.delete(two)
        gc.callbacks.remove(take_the_lock)
        gc.set_threshold(700)
        print(reentered[0], flush=True)
    """, store_name, oid(1).hex(), stdout=subprocess.PIPE, text=True)
    try:
        out, _ = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise AssertionError("a store call deadlocked: it made an object while holding the lock")
    assert child.returncode == 0
    assert int(out) > 50          # collections really ran inside the calls
