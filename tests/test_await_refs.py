"""Awaiting ObjectRefs (`await ref`, `ref.future()`): in async actors and in an
asyncio driver, with values, task errors, and after shutdown."""
import asyncio
import concurrent.futures

import numpy as np
import pytest

import minray
from minray.exceptions import RayTaskError
from minray_driver import module_cluster, run_driver, wait_for_file


cluster = module_cluster(num_cpus=2)


@minray.remote
def wait_then_return(path, value):
    wait_for_file(path)
    return value


@minray.remote
def double(x):
    return x * 2


@minray.remote
def fail_with_key_error():
    raise KeyError("missing")


@minray.remote
class Awaiter:
    async def await_gated(self, path):
        return await wait_then_return.remote(path, "gate opened")

    async def open_gate(self, path):
        open(path, "w").close()
        return "opened"

    async def sum_doubles(self, values):
        results = await asyncio.gather(*[double.remote(v) for v in values])
        return sum(results)

    async def catch(self):
        try:
            await fail_with_key_error.remote()
        except KeyError as exc:     # the error is also a RayTaskError
            return f"caught KeyError: {exc}"
        return "no error"

    async def await_large(self, ref_list):
        array = await ref_list[0]
        return float(array.sum())


def test_an_awaiting_call_does_not_block_the_actors_other_calls(tmp_path):
    gate = str(tmp_path / "gate")
    a = Awaiter.remote()
    # If the first call's await held the event loop, the second call (which
    # opens the gate the first is waiting on) could never run.
    first = a.await_gated.remote(gate)
    second = a.open_gate.remote(gate)
    assert minray.get([first, second], timeout=60) == ["gate opened", "opened"]


def test_gather_of_refs_inside_an_async_actor():
    a = Awaiter.remote()
    assert minray.get(a.sum_doubles.remote(list(range(10))), timeout=60) == 90


def test_awaiting_a_failed_task_raises_its_error_in_the_actor():
    a = Awaiter.remote()
    assert minray.get(a.catch.remote(), timeout=60).startswith("caught KeyError: ")


def test_awaiting_a_ref_to_a_large_object_in_the_store():
    array = np.ones(1_000_000)
    a = Awaiter.remote()
    # Inside a list the ref is passed as a ref, not resolved before the call.
    assert minray.get(a.await_large.remote([minray.put(array)]), timeout=60) == 1e6


def test_an_asyncio_driver_awaits_refs():
    async def main():
        ready = minray.put("already here")
        return await ready, await asyncio.gather(*[double.remote(i) for i in range(5)])

    assert asyncio.run(main()) == ("already here", [0, 2, 4, 6, 8])


def test_future_gives_the_value_or_the_tasks_error():
    fut = double.remote(21).future()
    assert isinstance(fut, concurrent.futures.Future)
    assert fut.result(timeout=60) == 42
    with pytest.raises(KeyError) as info:
        fail_with_key_error.remote().future().result(timeout=60)
    assert isinstance(info.value, RayTaskError)


def test_many_futures_of_one_ref_all_resolve():
    ref = double.remote(5)
    futures = [ref.future() for _ in range(50)]
    assert [f.result(timeout=60) for f in futures] == [10] * 50


def test_a_pending_future_fails_clearly_at_shutdown():
    # In a driver of its own: shutting down this module's cluster would end the others' tests.
    out = run_driver("""
        import concurrent.futures, minray
        from minray.exceptions import RaySystemError
        minray.init(num_cpus=1)

        @minray.remote
        def forever():
            import time
            time.sleep(600)

        fut = forever.remote().future()
        minray.shutdown()
        try:
            fut.result(timeout=30)
        except RaySystemError as exc:
            print("failed:", exc)
        except concurrent.futures.TimeoutError:
            print("still pending")
    """, timeout=120).stdout
    assert "failed: lost the connection to the node manager" in out, out


def test_future_without_a_cluster_is_a_clear_error():
    out = run_driver("""
        import minray
        from minray.runtime.object_ref import ObjectRef
        try:
            ObjectRef(b"x" * 28).future()
        except RuntimeError as exc:
            print("error:", exc)
    """, timeout=60).stdout
    assert "call minray.init() first" in out, out

