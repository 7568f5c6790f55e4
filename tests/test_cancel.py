"""minray.cancel and minray.get_runtime_context through the public API, as a
Ray user's tests would use them.

cancel: a queued task never runs; a running one gets KeyboardInterrupt
(force=True: its worker is killed and it is not retried); recursive=True
cancels the tasks it submitted; a finished task is left alone; actor calls
follow Ray's rules (no force; a running call is not interrupted unless its
actor is async).
"""
import asyncio
import os
import time

import pytest

import minray
from minray.exceptions import RayTaskError, TaskCancelledError
from minray_driver import gone, module_cluster, poll, run_driver, wait_for_file


cluster = module_cluster(num_cpus=2)


@minray.remote
def gated(gate, marker=None):
    """Waits for `gate`; writes `marker` when it starts, and `marker`.interrupted
    if it is interrupted (then re-raises)."""
    if marker:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
    try:
        wait_for_file(gate, limit=60)
    except KeyboardInterrupt:
        if marker:
            open(marker + ".interrupted", "w").close()
        raise
    return "finished"


@minray.remote
def identity(x):
    return x


def cancelled(ref, timeout=30):
    """True if get(ref) raises TaskCancelledError (within timeout)."""
    try:
        minray.get(ref, timeout=timeout)
    except TaskCancelledError:
        return True
    return False


def both_cpus_busy(gate, tmp_path):
    refs = [gated.remote(gate, str(tmp_path / f"busy{i}")) for i in range(2)]
    poll(lambda: all(os.path.exists(tmp_path / f"busy{i}") for i in range(2)),
         what="both CPUs busy")
    return refs


# ---------------------------------------------------------------- tasks

def test_a_queued_task_is_removed_and_never_runs(gate, tmp_path):
    busy = both_cpus_busy(gate, tmp_path)
    marker = str(tmp_path / "queued")
    queued = gated.remote(gate, marker)
    minray.cancel(queued)
    assert cancelled(queued)
    open(gate, "w").close()
    assert minray.get(busy, timeout=30) == ["finished", "finished"]
    # Everything submitted after it has run, so it would have run by now.
    assert minray.get(identity.remote(1)) == 1
    assert not os.path.exists(marker)


def test_a_task_waiting_for_its_arguments_is_cancelled(gate, tmp_path):
    blocker = gated.remote(gate)
    waiting = identity.remote(blocker)
    minray.cancel(waiting)
    assert cancelled(waiting)
    open(gate, "w").close()
    assert minray.get(blocker, timeout=30) == "finished"


def test_a_running_task_gets_keyboard_interrupt_and_its_worker_lives_on(gate, tmp_path):
    marker = str(tmp_path / "running")
    ref = gated.remote(gate, marker)
    poll(lambda: os.path.exists(marker), what="the task to start")
    pid = int(open(marker).read())
    minray.cancel(ref)
    assert cancelled(ref)
    assert os.path.exists(marker + ".interrupted"), "the task saw no KeyboardInterrupt"
    assert not gone(pid), "force=False killed the worker"
    # The worker serves later tasks as before.
    assert minray.get([identity.remote(i) for i in range(4)], timeout=30) == [0, 1, 2, 3]


def test_a_task_blocked_in_get_is_interrupted(gate, tmp_path):
    @minray.remote
    def waits_for(refs, marker):
        open(marker, "w").close()
        return minray.get(refs[0])

    marker = str(tmp_path / "waiting")
    blocker = gated.remote(gate)
    waiter = waits_for.remote([blocker], marker)
    poll(lambda: os.path.exists(marker), what="the waiter to start")
    minray.cancel(waiter, recursive=False)
    assert cancelled(waiter)
    open(gate, "w").close()
    assert minray.get(blocker, timeout=30) == "finished"


def test_force_kills_the_worker_and_the_task_is_not_retried(tmp_path):
    starts = tmp_path / "starts"

    @minray.remote(max_retries=3)
    def stubborn(path):
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(120)            # not interruptible by KeyboardInterrupt alone
        return "finished"

    ref = stubborn.remote(str(starts))
    poll(lambda: starts.exists() and starts.read_text(), what="the task to start")
    pid = int(starts.read_text().split()[0])
    minray.cancel(ref, force=True)
    assert cancelled(ref)              # a retry would sleep: GetTimeoutError instead
    poll(lambda: gone(pid), what="the forced task's worker to be killed")
    assert minray.get(identity.remote("after")) == "after"
    assert len(starts.read_text().split()) == 1, "the cancelled task was retried"


def test_recursive_cancel_reaches_the_tasks_it_submitted(gate, tmp_path):
    @minray.remote
    def parent(gate, directory):
        children = [gated.remote(gate, os.path.join(directory, f"child{i}"))
                    for i in range(3)]
        return minray.get(children)

    ref = parent.remote(gate, str(tmp_path))
    # The parent lends its CPU while it waits: two children run, one queued.
    poll(lambda: len([p for p in os.listdir(tmp_path) if p.startswith("child")]) >= 2,
         what="children to start")
    minray.cancel(ref)
    assert cancelled(ref)
    started = [p for p in os.listdir(tmp_path)
               if p.startswith("child") and not p.endswith(".interrupted")]
    poll(lambda: all(os.path.exists(tmp_path / (p + ".interrupted")) for p in started),
         what="every running child to be interrupted")
    open(gate, "w").close()
    assert minray.get(identity.remote(1)) == 1
    # The queued child never started.
    assert len([p for p in os.listdir(tmp_path) if p.startswith("child")
                and not p.endswith(".interrupted")]) == len(started)


def test_non_recursive_cancel_leaves_the_children_running(gate, tmp_path):
    @minray.remote
    def parent(gate, marker):
        child = gated.remote(gate, marker)
        minray.get(child)

    marker = str(tmp_path / "child")
    ref = parent.remote(gate, marker)
    poll(lambda: os.path.exists(marker), what="the child to start")
    minray.cancel(ref, recursive=False)
    assert cancelled(ref)
    assert not os.path.exists(marker + ".interrupted")
    open(gate, "w").close()
    poll(lambda: minray.available_resources().get("CPU") == 2.0,
         what="the child to finish")
    assert not os.path.exists(marker + ".interrupted")


def test_cancelling_a_finished_task_does_nothing():
    ref = identity.remote("done")
    assert minray.get(ref) == "done"
    minray.cancel(ref)
    minray.cancel(ref, force=True)
    assert minray.get(ref) == "done"


def test_cancel_while_many_short_tasks_are_pipelined():
    # Tiny tasks are queued several deep on busy workers: each cancelled one
    # ends as TaskCancelledError (or its result, if it finished first).
    refs = [identity.remote(i) for i in range(300)]
    for ref in refs[::3]:
        minray.cancel(ref)
    outcomes = []
    for i, ref in enumerate(refs):
        try:
            outcomes.append(minray.get(ref, timeout=60) == i)
        except TaskCancelledError:
            outcomes.append(i % 3 == 0)
    assert all(outcomes)


def test_a_parent_sees_its_cancelled_child_as_task_cancelled_error(gate):
    @minray.remote
    def parent(gate):
        child = gated.remote(gate)
        minray.cancel(child)
        try:
            minray.get(child)
        except TaskCancelledError:
            return "saw it"

    assert minray.get(parent.remote(gate), timeout=30) == "saw it"


def test_bad_cancel_calls_are_clear_errors():
    with pytest.raises(TypeError, match="ObjectRef"):
        minray.cancel("not a ref")
    with pytest.raises(ValueError, match="put"):
        minray.cancel(minray.put(1))
    with pytest.raises(TypeError):
        minray.cancel(identity.remote(1), True)          # force is keyword-only, as in Ray


def test_task_cancelled_error_is_a_ray_error():
    assert issubclass(TaskCancelledError, minray.exceptions.RayError)
    assert not issubclass(TaskCancelledError, RayTaskError)


# ---------------------------------------------------------------- actor calls

@minray.remote
class Worker:
    def __init__(self):
        self.log = []

    def work(self, gate, tag, marker=None):
        if marker:
            open(marker, "w").close()
        saw_cancel = False
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            if not saw_cancel and minray.get_runtime_context().is_canceled():
                saw_cancel = True
                if marker:
                    open(marker + ".cancel-seen", "w").close()
            time.sleep(0.01)
        self.log.append((tag, saw_cancel))
        return tag

    def history(self):
        return self.log


def test_actor_calls_queued_are_dropped_and_running_ones_finish(gate, tmp_path):
    worker = Worker.remote()
    marker = str(tmp_path / "started")
    running = worker.work.remote(gate, "running", marker)
    queued = worker.work.remote(gate, "queued")
    poll(lambda: os.path.exists(marker), what="the first call to start")
    with pytest.raises(ValueError, match="force=True is not supported"):
        minray.cancel(running, force=True)
    minray.cancel(queued)
    assert cancelled(queued)
    minray.cancel(running)
    # Not interrupted (the actor's state would be left half changed): it
    # sees is_canceled(), runs to its end, and its result is the cancel.
    poll(lambda: os.path.exists(marker + ".cancel-seen"), what="is_canceled() to be True")
    open(gate, "w").close()
    assert cancelled(running)
    assert minray.get(worker.history.remote(), timeout=30) == [("running", True)]


def test_an_async_actor_call_is_cancelled_inside_its_coroutine():
    @minray.remote
    class Sleeper:
        def __init__(self):
            self.seen = []

        async def nap(self):
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.seen.append("CancelledError")
                raise

        async def seen_so_far(self):
            return self.seen

    sleeper = Sleeper.remote()
    ref = sleeper.nap.remote()
    assert minray.get(sleeper.seen_so_far.remote()) == []     # nap is running
    minray.cancel(ref)
    assert cancelled(ref)
    assert minray.get(sleeper.seen_so_far.remote()) == ["CancelledError"]


# ---------------------------------------------------------------- runtime context

def test_runtime_context_in_the_driver_tasks_and_actors():
    context = minray.get_runtime_context()
    job_id, node_id = context.get_job_id(), context.get_node_id()
    assert len(job_id) == 8 and int(job_id, 16) >= 0
    assert node_id == minray.nodes()[0]["NodeID"]
    assert context.get_task_id() is None and context.get_actor_id() is None
    with pytest.raises(RuntimeError):
        context.is_canceled()

    @minray.remote
    def where():
        c = minray.get_runtime_context()
        return c.get_job_id(), c.get_node_id(), c.get_task_id(), c.get_actor_id()

    ref = where.remote()
    task_job, task_node, task_id, actor_id = minray.get(ref)
    assert (task_job, task_node, actor_id) == (job_id, node_id, None)
    assert task_id == ref.task_id().hex()

    @minray.remote
    class Where:
        def __init__(self):
            self.at_init = minray.get_runtime_context().get_task_id()

        def ids(self):
            c = minray.get_runtime_context()
            return c.get_actor_id(), c.get_task_id(), self.at_init, c.get_job_id()

    actor = Where.remote()
    call = actor.ids.remote()
    actor_id, call_task, init_task, actor_job = minray.get(call)
    assert actor_id and init_task == actor_id          # the constructor is the creation task
    assert call_task == call.task_id().hex() and call_task != actor_id
    assert actor_job == job_id


def test_runtime_context_needs_init():
    proc = run_driver("""
        import minray
        try:
            minray.get_runtime_context()
        except RuntimeError as exc:
            print("ERROR", exc)
    """)
    assert "ERROR" in proc.stdout and "init()" in proc.stdout
