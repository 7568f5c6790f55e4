"""A store full of referenced objects spills the oldest to disk and brings
them back when they are wanted."""
import numpy as np
import pytest

import minray
from minray.api import _client
from minray.exceptions import ObjectStoreFullError
from test_multinode import add_worker_node, cluster  # noqa: F401  (fixture)

STORE = 64 << 20
ARRAY = 1 << 20                       # float64: 8 MB each


@pytest.fixture
def small_store():
    minray.init(num_cpus=1, object_store_memory=STORE)
    try:
        yield
    finally:
        minray.shutdown()


def spill_stats():
    return _client().request_info("stats")["spilling"]


def test_puts_of_three_times_the_store_are_all_read_back(small_store):
    refs = [minray.put(np.full(ARRAY, i, dtype=np.float64)) for i in range(24)]   # 192 MB
    stats = spill_stats()
    assert stats["spilled_objects"] >= 16 and stats["on_disk"] >= 16
    for i, ref in enumerate(refs):
        array = minray.get(ref)
        assert array.shape == (ARRAY,) and array[0] == i and array[-1] == i
        del array
    assert spill_stats()["restored_objects"] >= 16


def test_results_spill_and_come_back_as_arguments(small_store):
    @minray.remote
    def make(i):
        return np.full(ARRAY, i, dtype=np.float64)

    @minray.remote
    def first_and_last(array):
        return float(array[0]), float(array[-1])

    made = [make.remote(i) for i in range(20)]               # 160 MB of results
    assert minray.get([first_and_last.remote(ref) for ref in made]) == \
        [(float(i), float(i)) for i in range(20)]
    assert spill_stats()["spilled_objects"] > 0


def test_freed_spilled_objects_leave_no_files(small_store):
    refs = [minray.put(np.zeros(ARRAY)) for _ in range(16)]
    assert spill_stats()["on_disk"] > 0
    del refs
    # The frees reach the node manager ahead of the next message: this one.
    assert spill_stats()["on_disk"] == 0


def test_objects_in_use_are_not_spilled_and_a_full_store_says_so(small_store):
    held = [minray.get(minray.put(np.zeros(ARRAY))) for _ in range(7)]   # pinned by us
    with pytest.raises(ObjectStoreFullError, match="in use|pinned"):
        minray.put(np.zeros(ARRAY))
    assert spill_stats()["spilled_objects"] == 0
    assert all(array.sum() == 0 for array in held)
    with pytest.raises(ObjectStoreFullError, match="can never fit"):
        minray.put(np.zeros(STORE))


def test_another_node_pulls_a_spilled_object_from_its_file(cluster):  # noqa: F811
    add_worker_node(cluster, 2)
    minray.init(address=cluster.address)

    @minray.remote(resources={"node2": 1})
    def make_many():
        refs = [minray.put(np.full(ARRAY * 4, i, dtype=np.float64)) for i in range(12)]
        return refs                                           # 384 MB on a 256 MB store

    @minray.remote(resources={"node2": 1})
    def spilled_there():
        from minray.api import _client
        return _client().request_info("stats")["spilling"]["spilled_objects"]

    refs = minray.get(make_many.remote())
    assert minray.get(spilled_there.remote()) >= 4
    assert [float(minray.get(ref)[7]) for ref in refs] == [float(i) for i in range(12)]
