"""Lost objects made again from lineage, with real node managers killed -9."""
import time

import numpy as np
import pytest

import minray
from minray.api import _client
from minray.exceptions import ObjectLostError
from test_multinode import add_worker_node, cluster  # noqa: F401  (fixture)


def chain_functions():
    """(make, step), defined here so that they travel by value: the worker
    nodes cannot import this test module."""
    @minray.remote(resources={"shared": 1})
    def make(n):
        return np.full(1 << 18, float(n)), minray.get_runtime_context().get_node_id()

    @minray.remote(resources={"shared": 1})
    def step(previous):
        array, _ = previous
        return array + 1, minray.get_runtime_context().get_node_id()

    return make, step


def wait_until_located(refs, timeout=30):
    """Until the head knows where each result is (without fetching it: a
    copy here would not be lost)."""
    wanted = {ref.hex() for ref in refs}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kinds = {row["id"]: row["kind"] for row in _client().request_info("objects")}
        if all(kinds.get(object_id) == "remote" for object_id in wanted):
            return
        assert "error" not in {kinds.get(object_id) for object_id in wanted}
        time.sleep(0.02)
    raise AssertionError(f"results not reported within {timeout} s: {kinds}")


def test_a_chain_whose_results_were_all_on_a_dead_node_is_made_again(cluster):
    node3 = add_worker_node(cluster, 3, shared=1)
    minray.init(address=cluster.address)
    make, step = chain_functions()
    first = make.remote(1)
    middle = step.remote(first)
    last = step.remote(middle)
    wait_until_located([last])
    del first, middle              # freed: only the lineage of `last` remembers them
    node2 = add_worker_node(cluster, 2, shared=1)
    cluster.remove_node(node3, allow_graceful=False)

    array, where = minray.get(last, timeout=120)
    assert where == node2.node_id
    assert array.shape == (1 << 18,) and np.all(array == 3.0)
    stats = _client().request_info("stats")
    assert stats["reconstruction"]["reconstructions"] == 3      # last, middle, first


def test_a_borrower_holding_a_dead_copy_gets_the_made_again_value(cluster, tmp_path):
    node3 = add_worker_node(cluster, 3, shared=1)
    add_worker_node(cluster, 2, consumer=2)
    minray.init(address=cluster.address)
    make, _ = chain_functions()
    made = make.remote(7)
    wait_until_located([made])
    go = tmp_path / "go"

    @minray.remote(resources={"consumer": 1})
    def read_later(boxed, path):
        import os
        while not os.path.exists(path):      # node 3 dies meanwhile
            time.sleep(0.01)
        array, _ = minray.get(boxed[0])
        return float(array.sum())

    @minray.remote(resources={"consumer": 1}, num_cpus=0)
    def kind_on_this_node(object_hex):
        from minray.api import _client
        rows = _client().request_info("objects")
        return next((row["kind"] for row in rows if row["id"] == object_hex), None)

    result = read_later.remote([made], str(go))
    deadline = time.monotonic() + 30
    while minray.get(kind_on_this_node.remote(made.hex())) != "remote":   # heard where it is
        assert time.monotonic() < deadline, "node 2 never heard where the object is"
        time.sleep(0.02)
    add_worker_node(cluster, 4, shared=1)
    cluster.remove_node(node3, allow_graceful=False)
    go.touch()
    assert minray.get(result, timeout=120) == 7.0 * (1 << 18)


def test_a_lost_result_whose_freed_input_was_a_put_names_the_put(cluster):
    node3 = add_worker_node(cluster, 3, shared=1)
    minray.init(address=cluster.address)
    data = minray.put(np.ones(1 << 16))
    put_hex = data.hex()

    @minray.remote(resources={"shared": 1})
    def total(array):
        return array * 2

    doubled = total.remote(data)
    wait_until_located([doubled])
    del data                              # the put is freed once the task is done
    add_worker_node(cluster, 2, shared=1)
    cluster.remove_node(node3, allow_graceful=False)
    with pytest.raises(ObjectLostError, match=put_hex) as caught:
        minray.get(doubled, timeout=120)
    assert "minray.put" in str(caught.value)


def test_reconstruction_is_bounded_by_max_retries(cluster):
    node3 = add_worker_node(cluster, 3, shared=1)
    minray.init(address=cluster.address)
    make, _ = chain_functions()
    made = make.options(max_retries=0).remote(5)
    wait_until_located([made])
    add_worker_node(cluster, 2, shared=1)
    cluster.remove_node(node3, allow_graceful=False)
    with pytest.raises(ObjectLostError, match="max_retries"):
        minray.get(made, timeout=120)


def lineage_stats():
    return _client().request_info("stats")["reconstruction"]


def test_lineage_is_released_with_the_objects_that_need_it():
    minray.init(num_cpus=1)
    try:
        @minray.remote
        def add_one(x):
            return x + 1

        values = [add_one.remote(0)]
        for _ in range(50):
            values.append(add_one.remote(values[-1]))
        last = values[-1]
        del values[:-1]                    # the chain's specs stay: `last` may need them
        assert minray.get(last) == 51
        assert lineage_stats()["lineage_records"] == 51
        del values, last
        # (the frees reach the node manager ahead of this request)
        assert lineage_stats()["lineage_records"] == 0
        assert lineage_stats()["lineage_bytes"] == 0
    finally:
        minray.shutdown()


def test_lineage_past_its_byte_bound_releases_the_oldest(monkeypatch):
    monkeypatch.setenv("MINRAY_MAX_LINEAGE_BYTES", str(64 << 10))
    minray.init(num_cpus=1)
    try:
        @minray.remote
        def echo(blob):
            return len(blob)

        refs = [echo.remote(b"x" * 4096) for _ in range(100)]     # ~430 KB of specs
        assert sum(minray.get(refs)) == 409600
        stats = lineage_stats()
        assert stats["lineage_bytes"] <= 64 << 10
        assert 0 < stats["lineage_records"] < 100
    finally:
        minray.shutdown()
