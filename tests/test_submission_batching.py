"""Submissions made in a quick run travel together (minray.runtime.core:
one write for many), and the node manager collects reference cycles itself.

Gathering must change nothing a program can see: every submission arrives,
in the order it was made relative to everything else the process sends
(frees of the refs it passed, actor calls, puts), whether or not the program
ever waits for a result.
"""
import os

import minray
from minray_driver import module_cluster, poll

cluster = module_cluster(num_cpus=2)


def test_a_run_of_submissions_runs_though_nothing_waits_for_it(tmp_path):
    @minray.remote
    def touch(path):
        with open(path, "w") as f:
            f.write("ran")

    paths = [str(tmp_path / f"{i}") for i in range(50)]
    for path in paths:
        touch.remote(path)
    # No get, wait or other call: the held-back ones must go by themselves.
    poll(lambda: all(os.path.exists(p) for p in paths), timeout=30,
         what="every task of the run to have run")


def test_refs_dropped_right_after_a_run_reach_the_node_manager_after_it():
    @minray.remote
    def first_of(values):
        return minray.get(values[0]) * 2

    @minray.remote
    def double(value):
        return value * 2

    puts = [minray.put(i) for i in range(300)]
    # The frees of `puts` (dropped below) must not overtake the submissions
    # that hold them, inside lists (escaped refs) or as arguments.
    nested = [first_of.remote([ref]) for ref in puts]
    direct = [double.remote(ref) for ref in puts]
    del puts
    assert minray.get(nested, timeout=60) == [2 * i for i in range(300)]
    assert minray.get(direct, timeout=60) == [2 * i for i in range(300)]


@minray.remote
class Log:
    """Keeps what its calls were given, in the order they ran."""

    def __init__(self):
        self.items = []

    def add(self, item):
        self.items.append(item)

    def items_(self):
        return self.items


def test_actor_calls_in_a_run_keep_their_order_with_puts_between_them():
    log = Log.remote()
    expected = []
    for i in range(1000):
        if i % 100 == 0:
            ref = minray.put(i)           # a message that is not gathered
            log.add.remote(ref)
            expected.append(i)
        log.add.remote(-i)
        expected.append(-i)
    assert minray.get(log.items_.remote(), timeout=60) == expected


def test_calls_whose_refs_are_dropped_still_go_in_bounded_batches():
    tally = Log.remote()
    minray.get(tally.items_.remote(), timeout=60)
    client = minray.runtime.core.current()
    most_held = 0
    for i in range(2000):
        tally.add.remote(i)        # its ref dropped at once: a free waits each time
        most_held = max(most_held, client.held_count)
    # The frees wait behind the held calls instead of cutting each run into
    # batches of one, and what is held stays within a batch's limit.
    assert 1 < most_held <= minray.runtime.core.GATHER_MAX_MESSAGES
    assert minray.get(tally.items_.remote(), timeout=60) == list(range(2000))


def test_a_task_returns_refs_of_a_run_it_submitted_without_waiting():
    @minray.remote
    def square(x):
        return x * x

    @minray.remote
    def fan_out(n):
        return [square.remote(i) for i in range(n)]

    refs = minray.get(fan_out.remote(200), timeout=60)
    assert minray.get(refs, timeout=60) == [i * i for i in range(200)]


def test_the_node_manager_collects_cycles_itself_once_idle():
    @minray.remote
    def noop():
        return None

    client = minray.runtime.core.current()
    before = client.request_info("stats")["cycle_collector"]
    # Python's automatic collector is off there (it went through every task's
    # objects again and again); the node manager collects when idle instead.
    assert before["automatic"] is False
    minray.get([noop.remote() for _ in range(5000)], timeout=120)
    after = poll(lambda: (lambda s: s if s["runs"] > before["runs"] else None)(
        client.request_info("stats")["cycle_collector"]), timeout=60,
        what="a collection once the tasks were done")
    assert after["seconds"] >= 0 and after["collected"] >= before["collected"]
