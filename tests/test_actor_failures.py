"""Actor failures through the public API: methods and constructors that
raise, an actor process killed with SIGKILL (calls in flight, queued and
later), restarts with max_restarts, and what happens to calls in flight when
an actor dies:

- calls already sent to the actor's process when it dies (running or queued
  behind the running one) fail with RayActorError, restart or not;
- calls sent after the node manager saw the death wait for the restart and
  run on the new instance (constructor re-run, state reset), or, when no
  restarts are left, fail with RayActorError at once.
"""
import os
import signal

import pytest

import minray
from minray.exceptions import ActorDiedError, RayActorError, RayTaskError
from minray_driver import module_cluster, poll, wait_for_file


cluster = module_cluster(num_cpus=2)


@minray.remote
class Account:
    """State, a raising method, a gated method and its pid."""

    def __init__(self, balance=0, note=None):
        self.balance = balance
        self.constructed_in = os.getpid()

    def deposit(self, amount):
        if amount < 0:
            raise ValueError(f"cannot deposit {amount}")
        self.balance += amount
        return self.balance

    def read(self):
        return self.balance

    def pid(self):
        return os.getpid()

    def hold(self, started, gate):
        open(started, "w").close()
        wait_for_file(gate)
        return "held"


def test_a_method_that_raises_raises_in_get_and_the_actor_lives_on():
    account = Account.remote(10)
    pid = minray.get(account.pid.remote())
    bad = account.deposit.remote(-5)
    good = account.deposit.remote(5)
    with pytest.raises(ValueError, match="cannot deposit -5") as info:
        minray.get(bad)
    assert isinstance(info.value, RayTaskError)          # and the original type
    assert "deposit" in str(info.value)
    assert minray.get(good) == 15                        # state kept, calls go on
    assert minray.get(account.pid.remote()) == pid


def test_a_constructor_that_raises_fails_every_call():
    @minray.remote
    class Broken:
        def __init__(self, divisor):
            self.value = 1 / divisor

        def value(self):
            return self.value

    broken = Broken.remote(0)
    early = broken.value.remote()           # sent before the constructor failed
    # As in Ray: the actor died, and its error carries the constructor's.
    with pytest.raises(ActorDiedError, match="division by zero") as info:
        minray.get(early, timeout=30)
    assert isinstance(info.value, RayActorError) and "__init__" in str(info.value)
    assert isinstance(info.value.cause, RayTaskError)
    assert isinstance(info.value.cause.cause, ZeroDivisionError)
    for _ in range(3):                      # and every later call too
        with pytest.raises(ActorDiedError, match="division by zero"):
            minray.get(broken.value.remote(), timeout=30)


def test_a_constructor_that_raises_is_not_restarted(tmp_path):
    @minray.remote(max_restarts=3)
    class Broken:
        def __init__(self, path):
            with open(path, "a") as f:
                f.write("x")
            raise RuntimeError("no")

        def hello(self):
            return "hello"

    path = str(tmp_path / "constructed")
    broken = Broken.remote(path)
    with pytest.raises(ActorDiedError, match="RuntimeError: no"):
        minray.get(broken.hello.remote(), timeout=30)
    with pytest.raises(ActorDiedError, match="RuntimeError: no"):
        minray.get(broken.hello.remote(), timeout=30)
    with open(path) as f:
        assert f.read() == "x"


def test_sigkill_fails_calls_in_flight_queued_and_later_without_hanging(gate, tmp_path):
    started = str(tmp_path / "started")
    account = Account.remote(1)
    pid = minray.get(account.pid.remote())
    in_flight = account.hold.remote(started, gate)
    queued = [account.deposit.remote(1) for _ in range(5)]
    poll(lambda: os.path.exists(started), what="the call to start")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RayActorError, match="died"):
        minray.get(in_flight, timeout=30)
    for ref in queued:
        with pytest.raises(RayActorError):
            minray.get(ref, timeout=30)
    later = account.read.remote()
    with pytest.raises(RayActorError, match="died"):
        minray.get(later, timeout=30)
    ready, not_ready = minray.wait([account.read.remote()], timeout=30)
    assert ready and not not_ready
    with pytest.raises(RayActorError):
        minray.get(ready[0])


def test_sigkill_with_max_restarts_reruns_the_constructor(gate, tmp_path):
    started = str(tmp_path / "started")
    account = Account.options(max_restarts=1).remote(100)
    assert minray.get(account.deposit.remote(5)) == 105
    pid = minray.get(account.pid.remote())
    in_flight = account.hold.remote(started, gate)
    queued = account.deposit.remote(1)
    poll(lambda: os.path.exists(started), what="the call to start")
    os.kill(pid, signal.SIGKILL)
    # The calls that were in the dead process fail, even though it restarts.
    with pytest.raises(RayActorError, match="died while running"):
        minray.get(in_flight, timeout=30)
    with pytest.raises(RayActorError):
        minray.get(queued, timeout=30)
    # Later calls run on the restarted actor, whose constructor ran again.
    assert minray.get(account.read.remote(), timeout=30) == 100
    new_pid = minray.get(account.pid.remote())
    assert new_pid != pid
    assert minray.get(account.deposit.remote(1)) == 101
    # The one restart is used up: the next death is final.
    os.kill(new_pid, signal.SIGKILL)
    with pytest.raises(RayActorError):     # may reach the dying process, or not
        minray.get(account.read.remote(), timeout=30)
    with pytest.raises(RayActorError, match="max_restarts"):
        minray.get(account.read.remote(), timeout=30)


def test_unlimited_restarts():
    account = Account.options(max_restarts=-1).remote(7)
    for _ in range(3):
        pid = minray.get(account.pid.remote())
        os.kill(pid, signal.SIGKILL)
        # Poll: the first call after the kill may reach the dying process.
        def restarted():
            try:
                return minray.get(account.pid.remote(), timeout=30) != pid
            except RayActorError:
                return False
        poll(restarted, what="the actor to come back")
        assert minray.get(account.read.remote()) == 7


def test_calls_sent_during_a_slow_restart_wait_and_keep_their_order(tmp_path, gate):
    ctor_gate = str(tmp_path / "ctor-gate")

    @minray.remote(max_restarts=1)
    class SlowStart:
        def __init__(self, gate, count_path):
            with open(count_path, "a") as f:
                f.write("x")
            with open(count_path) as f:
                if len(f.read()) > 1:       # the restart waits for the gate
                    wait_for_file(gate)
            self.items = []

        def append(self, item):
            self.items.append(item)
            return list(self.items)

        def pid(self):
            return os.getpid()

    actor = SlowStart.remote(ctor_gate, str(tmp_path / "count"))
    pid = minray.get(actor.pid.remote())
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(RayActorError):       # the node manager has seen the death
        minray.get(actor.append.remote("lost"), timeout=30)
    refs = [actor.append.remote(i) for i in range(5)]
    ready, _ = minray.wait(refs, timeout=0.3)
    assert not ready                          # waiting for the constructor
    open(ctor_gate, "w").close()
    assert minray.get(refs, timeout=30)[-1] == [0, 1, 2, 3, 4]


def test_an_actor_dying_does_not_affect_another_actor_or_tasks():
    a, b = Account.remote(1), Account.remote(2)
    os.kill(minray.get(a.pid.remote()), signal.SIGKILL)
    with pytest.raises(RayActorError):
        minray.get(a.read.remote(), timeout=30)
    assert minray.get(b.deposit.remote(1)) == 3

    @minray.remote
    def square(x):
        return x * x

    assert minray.get([square.remote(i) for i in range(10)]) == [i * i for i in range(10)]


def test_a_task_calling_a_dead_actor_gets_ray_actor_error():
    account = Account.remote()
    minray.kill(account)

    @minray.remote
    def use(actor):
        try:
            minray.get(actor.read.remote())
        except RayActorError as exc:
            return f"RayActorError: {exc}"

    assert minray.get(use.remote(account), timeout=30).startswith("RayActorError")


def test_a_call_failed_by_its_argument_releases_its_other_arguments_evenly(gate):
    # The first argument is an error, so the call fails without running; the
    # second, a large put, must still be held exactly as before: a task that
    # waits for it keeps it alive after the driver drops its own ref.
    import numpy as np

    @minray.remote
    def broken():
        raise KeyError("broken")

    @minray.remote
    def gated(path):
        wait_for_file(path)
        return 1

    @minray.remote
    def total(one, x):
        return float(x.sum()) + one

    account = Account.remote()
    err = broken.remote()
    with pytest.raises(KeyError):
        minray.get(err)
    big = minray.put(np.ones(1_000_000))
    with pytest.raises(KeyError):
        minray.get(account.hold.remote(err, big))
    with pytest.raises(ActorDiedError, match="broken"):    # the same through a constructor
        minray.get(Account.remote(err, big).read.remote())
    result = total.remote(gated.remote(gate), big)
    del big
    assert minray.get(account.read.remote()) == 0  # the free has reached the node manager
    open(gate, "w").close()
    assert minray.get(result, timeout=30) == 1_000_001.0



class _Fragile:
    def __init__(self):
        self.pid = os.getpid()

    def get_pid(self):
        return self.pid

    def crash_once(self, flag, tag):
        if not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(1)               # the process dies while running this call
        return tag, self.pid


def test_max_task_retries_sends_calls_in_flight_to_the_restarted_actor(tmp_path):
    retrying = minray.remote(max_restarts=1, max_task_retries=1)(_Fragile).remote()
    first_pid = minray.get(retrying.get_pid.remote())
    refs = [retrying.crash_once.remote(str(tmp_path / "flag"), i) for i in range(3)]
    results = minray.get(refs, timeout=60)
    assert [tag for tag, _ in results] == [0, 1, 2]           # in order, none lost
    assert first_pid not in {pid for _, pid in results}       # the restarted process

    # Without retries (the default), calls in flight fail; later ones run.
    plain = minray.remote(max_restarts=1)(_Fragile).remote()
    with pytest.raises(ActorDiedError):
        minray.get(plain.crash_once.remote(str(tmp_path / "flag2"), 0), timeout=60)
    assert minray.get(plain.crash_once.remote(str(tmp_path / "flag2"), 1), timeout=60)[0] == 1
