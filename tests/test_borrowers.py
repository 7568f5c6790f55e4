"""Refs passed inside values (lists, dicts, actor state): their objects live
exactly as long as somebody can still reach them, as in Ray, instead of
being pinned until the cluster stops."""
import gc

import numpy as np

import minray
from minray_driver import module_cluster, poll

STORE_BYTES = 64 << 20
ARRAY = 8 << 20            # eight of these fill the store

cluster = module_cluster(num_cpus=2, object_store_memory=STORE_BYTES)


def node_objects():
    return minray.runtime.core.current().request_info("stats")["objects"]["objects"]


@minray.remote
def total(refs):
    return float(sum(minray.get(ref).sum() for ref in refs))


def test_refs_passed_in_lists_in_a_loop_are_freed():
    # 40 arrays of 8 MB through a 64 MB store: each is passed to a task
    # inside a list, then dropped; if escaped refs were kept, the store would
    # fill by the eighth.
    baseline = node_objects()
    for i in range(40):
        ref = minray.put(np.full(ARRAY // 8, float(i)))
        assert minray.get(total.remote([ref]), timeout=60) == i * (ARRAY // 8)
        del ref
    gc.collect()
    poll(lambda: node_objects() <= baseline, what="the passed-on objects to be freed")


def test_a_ref_inside_a_put_value_lives_as_long_as_the_value():
    inner = minray.put(np.ones(ARRAY // 8))
    inner_id = inner.binary()
    outer = minray.put({"weights": inner})
    del inner
    gc.collect()
    # The dict still holds the ref: the array is readable through it.
    assert minray.get(minray.get(outer)["weights"]).sum() == ARRAY // 8
    del outer
    gc.collect()
    poll(lambda: _gone(inner_id), what="the inner object to be freed with its container")


@minray.remote
class Keeper:
    def keep(self, refs):
        self.refs = refs

    def read(self):
        return float(minray.get(self.refs[0]).sum())

    def drop(self):
        self.refs = None


def test_an_actor_keeps_a_borrowed_ref_alive_after_its_owner_dropped_it():
    keeper = Keeper.remote()
    ref = minray.put(np.full(ARRAY // 8, 2.0))
    ref_id = ref.binary()
    minray.get(keeper.keep.remote([ref]), timeout=30)
    del ref
    gc.collect()
    # The driver (the owner) has no ref left; the actor borrowed one.
    assert minray.get(keeper.read.remote(), timeout=30) == 2.0 * (ARRAY // 8)
    assert not _gone(ref_id)
    minray.get(keeper.drop.remote(), timeout=30)
    poll(lambda: _gone(ref_id), what="the object to be freed once the borrower dropped it")


@minray.remote
def wrap(x):
    return [minray.put(x)]


def test_a_ref_returned_inside_a_list_outlives_the_task_that_made_it():
    (inner,) = minray.get(wrap.remote(np.arange(10)), timeout=30)
    assert list(minray.get(inner, timeout=30)) == list(range(10))


def _gone(object_id):
    rows = minray.runtime.core.current().request_info("objects")
    return all(row["id"] != object_id.hex() for row in rows)
