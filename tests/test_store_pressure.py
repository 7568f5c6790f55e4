"""Task results in a full object store: a result that succeeded is never
evicted, and a worker that dies after sealing one leaves no pin behind.

Each test runs a driver in a fresh process with a small object store
(minray_driver.run_driver), so the store is really full and the workers,
node manager and driver are real processes sharing it.
"""
import textwrap

from minray_driver import run_driver


def test_held_results_beyond_capacity_are_never_lost():
    # 40 results of ~1 MB each into a 32 MiB store, all refs held: the oldest
    # are spilled to disk to make room, and every one reads back intact. None
    # may be evicted after it was sealed (which showed up as ObjectLostError
    # on get).
    proc = run_driver("""
        import numpy as np
        import minray
        from minray.api import _client
        from minray.exceptions import ObjectLostError
        from minray.runtime import core

        capacity = 32 << 20
        n = 40
        size = int(capacity * 1.3) // n
        minray.init(num_cpus=2, object_store_memory=capacity)

        @minray.remote
        def make(i):
            return np.full(size, i % 251, dtype=np.uint8)

        refs = [make.remote(i) for i in range(n)]
        for i, ref in enumerate(refs):
            try:
                array = minray.get(ref)
            except ObjectLostError as exc:
                raise AssertionError(f"result {i} was lost: {exc}")
            assert array.shape == (size,) and array[0] == array[-1] == i % 251, i
            del array
        stats = core.current().store.stats()
        spilled = _client().request_info("stats")["spilling"]["spilled_objects"]
        print("spilled", spilled, "evictions", stats["evictions"])
        assert spilled >= 1, "the results cannot all fit: some must be spilled"
        assert stats["evictions"] == 0
        assert stats["primary_pinned_objects"] == 0     # all adopted by the node manager
        minray.shutdown()
    """, timeout=120)
    assert "spilled " in proc.stdout


def _die_after_sealing(marker, max_retries, then):
    """A driver whose task seals its own result and kills its worker before
    the node manager hears of it (the first time: `marker` records it)."""
    return textwrap.dedent("""
        import os
        import numpy as np
        import minray
        from minray import ids
        from minray.exceptions import WorkerCrashedError
        from minray.object_store import write_serialized
        from minray.runtime import core
        from minray.serialization import serialize

        minray.init(num_cpus=1, object_store_memory=16 << 20)

        @minray.remote(max_retries=%d)
        def result_then_crash(marker):
            if not os.path.exists(marker):
                open(marker, "w").close()
                # Seal our own result as the worker does, then die.
                client = core.current()
                object_id = ids.return_object_id(client.current_task_id, 1)
                write_serialized(client.store, object_id,
                                 serialize(np.full(1 << 20, 1, np.uint8)))
                os._exit(1)
            return np.full(1 << 20, 2, np.uint8)

        ref = result_then_crash.remote(%r)
        store = core.current().store
    """) % (max_retries, str(marker)) + textwrap.dedent(then)


def test_retried_task_reuses_the_result_its_dead_worker_sealed(tmp_path):
    proc = run_driver(_die_after_sealing(tmp_path / "marker", 1, """
        array = minray.get(ref)
        # The retry found the copy its first attempt sealed and reported it,
        # instead of failing on an id that already exists.
        assert array.shape == (1 << 20,) and array.min() == array.max() == 1, array[:4]
        assert store.stats()["primary_pinned_objects"] == 0
        del array
        assert ref.binary() not in store.lru_order()      # the node manager pins it
        print("reused")
        minray.shutdown()
    """), timeout=120)
    assert "reused" in proc.stdout


def test_result_sealed_by_a_worker_that_died_is_not_pinned_forever(tmp_path):
    proc = run_driver(_die_after_sealing(tmp_path / "marker", 0, """
        try:
            minray.get(ref)
            raise AssertionError("the task has no retries: get must raise")
        except WorkerCrashedError:
            pass
        # The node manager dropped the primary pin the dead worker left: the
        # orphaned copy is an ordinary evictable object now.
        stats = store.stats()
        assert stats["primary_pinned_objects"] == 0, stats
        assert stats["pinned_objects"] == 0, stats
        assert ref.binary() in store.lru_order()
        print("released")
        minray.shutdown()
    """), timeout=120)
    assert "released" in proc.stdout
