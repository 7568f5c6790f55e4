"""Share a large numpy array between processes through minray's object store.

One process writes a 200 MB array into the node's shared-memory store; another
process maps the same memory and reads it without copying a byte.  Run:

    python docs/examples/store_demo.py
"""
import multiprocessing as mp
import os
import time
import uuid

import numpy as np

from minray.object_store import SharedStore, get_value, put_value

OBJECT_ID = b"demo-array".ljust(20, b"\0")


def reader(store_name, expected_sum, results):
    store = SharedStore.attach(store_name)
    start = time.perf_counter()
    array = get_value(store, OBJECT_ID)          # zero-copy: a view of shared memory
    elapsed_us = (time.perf_counter() - start) * 1e6
    results.put((array.nbytes, elapsed_us, float(array.sum()) == expected_sum,
                 array.flags.writeable))
    del array
    store.close()


def main():
    name = f"minray-demo-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with SharedStore.create(name, 512 << 20) as store:
        array = np.random.default_rng(0).random(25_000_000)     # 200 MB
        start = time.perf_counter()
        put_value(store, OBJECT_ID, array)
        put_s = time.perf_counter() - start
        print(f"put   {array.nbytes / 1e6:.0f} MB in {put_s * 1e3:.1f} ms "
              f"({array.nbytes / put_s / 1e9:.1f} GB/s, first touch of fresh shared memory)")
        results = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(
            target=reader, args=(name, float(array.sum()), results))
        proc.start()
        nbytes, get_us, same, writeable = results.get(timeout=120)
        proc.join(timeout=60)
        print(f"get   {nbytes / 1e6:.0f} MB in another process in {get_us:.0f} us "
              f"(zero-copy), contents equal: {same}, writeable: {writeable}")
        print("store", {k: v for k, v in store.stats().items()
                        if k in ("capacity", "used", "num_objects", "pinned_objects")})
        if not same or writeable or proc.exitcode != 0:
            raise SystemExit("demo failed")


if __name__ == "__main__":
    main()
