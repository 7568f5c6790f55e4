"""Resources and GPUs through the public API, as a Ray user's tests would use
them: GPU ids from CUDA_VISIBLE_DEVICES, GPU and CPU workers kept apart,
where default actors may be placed, the memory resource and max_calls.

No GPU is touched: GPUs are declared (num_gpus, CUDA_VISIBLE_DEVICES) and
only their ids are checked. Tests that need their own init arguments or
environment run a driver in a fresh process (minray_driver.run_driver).
"""
import collections
import os
import time

import pytest

import minray
from minray.exceptions import RayActorError, TaskUnschedulableError
from minray_driver import gone, module_cluster, poll, run_driver


cluster = module_cluster(num_cpus=2, _memory=10 ** 9)


def results_of(proc):
    """The driver's `KEY value` lines as a dict (values are Python literals)."""
    results = {}
    for line in proc.stdout.splitlines():
        key, _, rest = line.partition(" ")
        if key.isupper():
            results[key] = eval(rest)
    return results


# ---------------------------------------------------------------- GPU ids

def test_gpu_ids_come_from_the_drivers_cuda_visible_devices(tmp_path):
    proc = run_driver(f"""
        import os, time
        import minray

        minray.init(num_cpus=3)
        print("TOTAL", minray.cluster_resources().get("GPU"))

        @minray.remote(num_gpus=1)
        def together(directory, name):
            # All three run at once, so each holds a different GPU.
            open(os.path.join(directory, name), "w").close()
            deadline = time.monotonic() + 30
            while len(os.listdir(directory)) < 3 and time.monotonic() < deadline:
                time.sleep(0.005)
            return minray.get_gpu_ids(), os.environ["CUDA_VISIBLE_DEVICES"]

        @minray.remote(num_gpus=2)
        def two():
            return minray.get_gpu_ids(), os.environ["CUDA_VISIBLE_DEVICES"]

        @minray.remote
        def cpu():
            return minray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

        @minray.remote(num_gpus=1)
        class Trainer:
            def __init__(self):
                self.at_init = os.environ["CUDA_VISIBLE_DEVICES"]

            def ids(self):
                return minray.get_gpu_ids(), self.at_init

        print("TOGETHER", minray.get([together.remote({str(tmp_path)!r}, str(i))
                                      for i in range(3)], timeout=60))
        print("TWO", minray.get(two.remote(), timeout=60))
        print("CPU", minray.get(cpu.remote(), timeout=60))
        print("ACTOR", minray.get(Trainer.remote().ids.remote(), timeout=60))
    """, env={"CUDA_VISIBLE_DEVICES": "4,5,6"})
    results = results_of(proc)
    assert results["TOTAL"] == 3.0
    together = results["TOGETHER"]
    assert sorted(ids[0] for ids, _ in together) == [4, 5, 6], together
    assert all(env == str(ids[0]) for ids, env in together), together
    ids, env = results["TWO"]
    assert len(ids) == 2 and set(ids) <= {4, 5, 6} and env == ",".join(map(str, ids))
    # A task without GPUs sees none, not the node's list.
    assert results["CPU"] == ([], "")
    ids, at_init = results["ACTOR"]
    assert len(ids) == 1 and ids[0] in (4, 5, 6) and at_init == str(ids[0])


def test_num_gpus_takes_the_first_visible_devices_and_cannot_exceed_them():
    proc = run_driver("""
        import minray

        try:
            minray.init(num_cpus=1, num_gpus=4)
        except ValueError as exc:
            print("TOO_MANY", repr(str(exc)))
        minray.init(num_cpus=2, num_gpus=2)

        @minray.remote(num_gpus=1)
        def ids(_):
            return minray.get_gpu_ids()

        print("IDS", sorted(g for i in range(4) for g in minray.get(ids.remote(i))))
        print("GPU", minray.cluster_resources()["GPU"])
    """, env={"CUDA_VISIBLE_DEVICES": "7,3,9"})
    results = results_of(proc)
    assert "CUDA_VISIBLE_DEVICES" in results["TOO_MANY"] and "7,3,9" in results["TOO_MANY"]
    assert results["GPU"] == 2.0
    assert set(results["IDS"]) <= {7, 3}, results["IDS"]


def test_fractional_gpus_share_a_device_and_leave_whole_ones_free(tmp_path):
    proc = run_driver(f"""
        import os, time
        import minray
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        minray.init(num_cpus=3, num_gpus=2)

        @minray.remote
        def hold(directory, name, wanted):
            ids = minray.get_gpu_ids()
            open(os.path.join(directory, name), "w").close()
            deadline = time.monotonic() + 30
            while len(os.listdir(directory)) < wanted and time.monotonic() < deadline:
                time.sleep(0.005)
            return ids

        halves = [hold.options(num_gpus=0.5).remote({str(tmp_path)!r}, str(i), 3)
                  for i in range(2)]
        whole = hold.options(num_gpus=1).remote({str(tmp_path)!r}, "whole", 3)
        print("HALVES", minray.get(halves, timeout=60))
        print("WHOLE", minray.get(whole, timeout=60))
    """)
    results = results_of(proc)
    (a,), (b,) = results["HALVES"]
    (whole,) = results["WHOLE"]
    assert a == b, "two halves of a GPU were spread over two GPUs"
    assert whole != a and {a, whole} == {0, 1}


# ---------------------------------------------------------------- worker kinds

def test_gpu_and_cpu_tasks_never_share_a_worker_process():
    proc = run_driver("""
        import os
        import minray
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        minray.init(num_cpus=1, num_gpus=1)

        @minray.remote
        def cpu_pid():
            return os.getpid()

        @minray.remote(num_gpus=1, max_calls=0)      # keep its worker for more GPU work
        def gpu_pid():
            return os.getpid()

        @minray.remote(num_gpus=1)                   # Ray's default: max_calls=1
        def gpu_pid_default():
            return os.getpid()

        cpu_before = {minray.get(cpu_pid.remote()) for _ in range(3)}
        gpu = [minray.get(gpu_pid.remote()) for _ in range(3)]
        cpu_after = {minray.get(cpu_pid.remote()) for _ in range(3)}
        fresh = [minray.get(gpu_pid_default.remote()) for _ in range(2)]
        print("CPU", sorted(cpu_before | cpu_after))
        print("GPU", gpu)
        print("FRESH", fresh)
    """)
    results = results_of(proc)
    cpu, gpu, fresh = set(results["CPU"]), results["GPU"], results["FRESH"]
    assert len(set(gpu)) == 1, "a GPU worker was not kept for the next GPU task"
    assert not cpu & set(gpu), "a CPU task ran in a process that ran a GPU task (or the reverse)"
    assert not cpu & set(fresh)
    assert fresh[0] != fresh[1], "a GPU task's worker (default max_calls=1) ran it twice"


# ---------------------------------------------------------------- max_calls

def test_max_calls_one_runs_each_call_in_a_new_process_that_then_exits():
    @minray.remote(max_calls=1)
    def pid():
        return os.getpid()

    pids = [minray.get(pid.remote(), timeout=30) for _ in range(3)]
    assert len(set(pids)) == 3, pids
    poll(lambda: all(gone(p) for p in pids), what="max_calls workers to exit")
    poll(lambda: minray.available_resources().get("CPU") == 2.0,
         what="their CPUs to be free again")


def test_max_calls_limits_each_worker_even_when_calls_are_queued_at_once():
    @minray.remote(max_calls=2)
    def pid():
        return os.getpid()

    counts = collections.Counter(minray.get([pid.remote() for _ in range(12)], timeout=60))
    assert sum(counts.values()) == 12
    assert max(counts.values()) <= 2, counts


def test_max_calls_is_counted_per_function():
    @minray.remote(max_calls=1)
    def limited():
        return os.getpid()

    @minray.remote
    def unlimited():
        return os.getpid()

    # One call after another goes to the worker that just finished: without
    # a limit, the same process every time.
    assert len({minray.get(unlimited.remote()) for _ in range(3)}) == 1
    first = minray.get(limited.remote())
    poll(lambda: gone(first), what="the worker that ran limited() to exit")
    assert minray.get(limited.remote()) != first


def test_max_calls_is_checked():
    with pytest.raises(ValueError, match="max_calls"):
        minray.remote(max_calls=-1)(lambda: 1)
    with pytest.raises(TypeError, match="max_calls"):        # a wrong type, as in Ray
        minray.remote(max_calls=1.5)(lambda: 1)

    @minray.remote
    def f():
        return 1

    with pytest.raises(ValueError, match=r"max_calls.*options"):
        f.options(max_calls=2)
    with pytest.raises(ValueError, match="max_calls"):
        @minray.remote(max_calls=1)
        class NoMaxCallsForActors:
            pass


# ---------------------------------------------------------------- actor placement

@minray.remote
class SlowToBuild:
    def __init__(self, seconds):
        start = time.monotonic()
        time.sleep(seconds)
        self.interval = (start, time.monotonic())

    def built(self):
        return self.interval


def most_at_once(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_default_actors_construct_at_most_num_cpus_at_a_time_then_hold_no_cpu():
    actors = [SlowToBuild.remote(0.3) for _ in range(5)]
    intervals = minray.get([a.built.remote() for a in actors], timeout=60)
    assert most_at_once(intervals) <= 2, intervals          # 2 CPUs
    # Built, all five live together: each holds no CPU.
    poll(lambda: minray.available_resources().get("CPU") == 2.0,
         what="the constructors' CPUs to be free")
    assert minray.get([a.built.remote() for a in actors]) == intervals


def test_actors_with_resource_options_are_placed_without_the_extra_cpu(tmp_path):
    @minray.remote(num_cpus=0)
    class Meeting:
        def __init__(self, directory, name, size):
            # Returns once `size` constructors are inside at the same time.
            open(os.path.join(directory, name), "w").close()
            deadline = time.monotonic() + 30
            while len(os.listdir(directory)) < size and time.monotonic() < deadline:
                time.sleep(0.005)
            self.met = len(os.listdir(directory)) >= size

        def met_all(self):
            return self.met

    # Four constructors at once on 2 CPUs: num_cpus=0 asks for no CPU at all.
    actors = [Meeting.remote(str(tmp_path), str(i), 4) for i in range(4)]
    assert minray.get([a.met_all.remote() for a in actors], timeout=60) == [True] * 4


def test_a_default_actor_waits_for_a_free_cpu(gate):
    @minray.remote
    def hold(path):
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.005)
        return True

    holders = [hold.remote(gate) for _ in range(2)]
    poll(lambda: "CPU" not in minray.available_resources(), what="both CPUs busy")
    actor = SlowToBuild.remote(0)
    ready, _ = minray.wait([actor.built.remote()], timeout=1.0)
    assert ready == [], "a default actor was built while no CPU was free"
    open(gate, "w").close()
    assert minray.get(holders, timeout=30) == [True, True]
    assert minray.get(actor.built.remote(), timeout=30)


def test_a_constructor_waiting_for_tasks_lends_its_cpu():
    @minray.remote
    def square(x):
        return x * x

    @minray.remote
    class UsesTasks:
        def __init__(self, x):
            self.value = minray.get(square.remote(x))   # both CPUs held by constructors

        def get(self):
            return self.value

    actors = [UsesTasks.remote(i) for i in range(2)]
    assert minray.get([a.get.remote() for a in actors], timeout=60) == [0, 1]


def test_a_default_actor_on_a_node_without_cpus_is_a_clear_error():
    proc = run_driver("""
        import minray
        minray.init(num_cpus=0)

        @minray.remote
        class NeedsACpuToStart:
            def ping(self):
                return 1

        try:
            minray.get(NeedsACpuToStart.remote().ping.remote(), timeout=30)
        except Exception as exc:
            print("ERROR", repr((type(exc).__name__, str(exc))))
        print("ZERO", minray.get(NeedsACpuToStart.options(num_cpus=0).remote()
                                 .ping.remote(), timeout=30))
    """)
    results = results_of(proc)
    name, message = results["ERROR"]
    assert name == "TaskUnschedulableError" and "CPU" in message, message
    assert results["ZERO"] == 1


# ---------------------------------------------------------------- memory

def test_memory_is_a_node_resource_tasks_and_actors_reserve(gate):
    assert minray.cluster_resources()["memory"] == 1e9           # init(_memory=10**9)

    @minray.remote(memory=600 * 10 ** 6)
    def big(path, tag):
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.005)
        return tag

    first = big.remote(gate, 1)
    poll(lambda: minray.available_resources().get("memory") == 4e8,
         what="the first task to hold 600 MB")
    second = big.remote(gate, 2)          # does not fit beside the first
    ready, _ = minray.wait([second], timeout=1.0)
    assert ready == [] and minray.available_resources().get("memory") == 4e8
    open(gate, "w").close()
    assert minray.get([first, second], timeout=30) == [1, 2]
    poll(lambda: minray.available_resources().get("memory") == 1e9, what="memory back")

    with pytest.raises(TaskUnschedulableError, match="memory"):
        minray.get(big.options(memory=2 * 10 ** 9).remote(gate, 3), timeout=30)

    @minray.remote(memory=300 * 10 ** 6)
    class Cache:
        def ping(self):
            return "pong"

    cache = Cache.remote()
    assert minray.get(cache.ping.remote()) == "pong"
    assert minray.available_resources().get("memory") == 7e8
    minray.kill(cache)
    poll(lambda: minray.available_resources().get("memory") == 1e9,
         what="the killed actor's memory back")


def test_memory_options_are_checked():
    with pytest.raises(ValueError, match="memory"):
        minray.remote(memory=-1)(lambda: 1)
    with pytest.raises(ValueError, match="memory"):
        minray.remote(resources={"memory": 10})(lambda: 1)


def test_memory_of_a_node_by_default_and_by_init():
    proc = run_driver("""
        import minray
        minray.init(num_cpus=1)
        print("DEFAULT", minray.cluster_resources()["memory"])
        minray.shutdown()
        minray.init(num_cpus=1, resources={"memory": 12345})
        print("RESOURCES", minray.cluster_resources()["memory"])
        minray.shutdown()
        try:
            minray.init(num_cpus=1, _memory=1, resources={"memory": 2})
        except ValueError as exc:
            print("TWICE", repr(str(exc)))
    """)
    results = results_of(proc)
    assert results["DEFAULT"] > 0
    assert results["RESOURCES"] == 12345.0
    assert "twice" in results["TWICE"]


def test_unschedulable_actor_calls_fail_clearly():
    @minray.remote(memory=5 * 10 ** 9)
    class TooBig:
        def ping(self):
            return 1

    with pytest.raises((TaskUnschedulableError, RayActorError), match="memory"):
        minray.get(TooBig.remote().ping.remote(), timeout=30)
