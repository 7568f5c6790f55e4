"""Actors seen from several driver processes: named actors reached from
another driver (init(address="auto")), detached actors outliving the driver
that made them, a driver's actors stopped when it exits or is killed, and
GPU actors (init(num_gpus=2)) with the original docs' GPU patterns.

One head driver (its own process, with a private MINRAY_SESSION_ROOT so
"auto" finds this cluster) keeps a cluster up for the module; the tests run
joining drivers against it and watch their actors' processes from outside.
"""
import json
import shutil
import signal
import subprocess
import tempfile

import pytest

from minray_driver import gone, poll, run_driver, start_driver




def output_line(stdout, tag):
    for line in stdout.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise AssertionError(f"no {tag} line in:\n{stdout}")


@pytest.fixture(scope="module")
def session_env():
    # Short: the node manager's Unix socket path lives inside it.
    root = tempfile.mkdtemp(prefix="mr-", dir="/tmp")
    yield {"MINRAY_SESSION_ROOT": root}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def own_root():
    """For drivers with their own cluster: a root of their own, so they never
    become the "latest" session that the head's joiners find."""
    root = tempfile.mkdtemp(prefix="mr-", dir="/tmp")
    yield {"MINRAY_SESSION_ROOT": root}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def head(session_env):
    """A driver that starts the cluster and keeps it up until told to go."""
    proc = start_driver("""
import sys
import minray
context = minray.init(num_cpus=2)
print("SESSION", context["session_dir"], flush=True)
sys.stdin.readline()
minray.shutdown()
""", env=session_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        tag, session_dir = proc.stdout.readline().split()
        assert tag == "SESSION"
        yield session_dir
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()


COUNTER = """
import json, os, sys
import minray

@minray.remote
class Counter:
    def __init__(self, start=0):
        self.value = start
    def increment(self, by=1):
        self.value += by
        return self.value
    def read(self):
        return self.value
    def pid(self):
        return os.getpid()

# One namespace for the joiners, so they find each other's named actors.
context = minray.init(address="auto", namespace="actor-driver-tests")
assert context["session_dir"] == SESSION_DIR, (context, SESSION_DIR)
"""


def joiner(head, body):
    return COUNTER.replace("SESSION_DIR", repr(head)) + body


def test_get_actor_from_another_driver(head, session_env):
    owner = start_driver(joiner(head, """
c = Counter.options(name="shared").remote(100)
print("PID", json.dumps(minray.get(c.pid.remote())), flush=True)
sys.stdin.readline()                 # the other driver has used the actor
print("VALUE", json.dumps(minray.get(c.read.remote())), flush=True)
sys.stdin.readline()
"""), env=session_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        tag, pid = owner.stdout.readline().split()
        assert tag == "PID"
        pid = int(pid)
        proc = run_driver(joiner(head, """
from minray.exceptions import RayActorError
shared = minray.get_actor("shared")
assert minray.get(shared.pid.remote()) == PID
print("SEEN", json.dumps([minray.get(shared.increment.remote()) for _ in range(3)]))
try:
    Counter.options(name="shared").remote()
except ValueError as exc:
    print("CLASH", json.dumps(str(exc)))
""".replace("PID", str(pid))), env=session_env)
        assert output_line(proc.stdout, "SEEN") == [101, 102, 103]
        assert "shared" in output_line(proc.stdout, "CLASH")
        owner.stdin.write("next\n")
        owner.stdin.flush()
        tag, value = owner.stdout.readline().split()
        assert (tag, int(value)) == ("VALUE", 103)      # the owner sees the other's calls
        assert not gone(pid)
        owner.stdin.write("exit\n")
        owner.stdin.flush()
        assert owner.wait(30) == 0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        owner.stdin.close()
        owner.stdout.close()
    # Not detached: it went with the driver that made it, and so did its name.
    poll(lambda: gone(pid), what="the exited driver's named actor to stop")
    proc = run_driver(joiner(head, """
try:
    minray.get_actor("shared")
except ValueError as exc:
    print("GONE", json.dumps(str(exc)))
"""), env=session_env)
    assert "shared" in output_line(proc.stdout, "GONE")


def test_detached_actor_outlives_the_driver_that_created_it(head, session_env):
    proc = run_driver(joiner(head, """
keeper = Counter.options(name="keeper", lifetime="detached").remote(1)
plain = Counter.remote()
minray.get(keeper.increment.remote(41))
print("PIDS", json.dumps([minray.get(keeper.pid.remote()), minray.get(plain.pid.remote())]))
"""), env=session_env)
    keeper_pid, plain_pid = output_line(proc.stdout, "PIDS")
    poll(lambda: gone(plain_pid), what="the exited driver's non-detached actor to stop")
    assert not gone(keeper_pid)
    proc = run_driver(joiner(head, """
from minray.exceptions import RayActorError
keeper = minray.get_actor("keeper")
print("STATE", json.dumps([minray.get(keeper.read.remote()), minray.get(keeper.pid.remote())]))
minray.kill(keeper)
try:
    minray.get(keeper.read.remote(), timeout=30)
except RayActorError:
    print("KILLED")
try:
    minray.get_actor("keeper")
except ValueError:
    print("NAME FREED")
"""), env=session_env)
    assert output_line(proc.stdout, "STATE") == [42, keeper_pid]
    assert "KILLED" in proc.stdout and "NAME FREED" in proc.stdout
    poll(lambda: gone(keeper_pid), what="the killed detached actor to stop")


def test_a_driver_that_exits_takes_its_actors_with_it(head, session_env, tmp_path):
    # Exits normally with actors of every kind alive, one call still running.
    started = str(tmp_path / "started")
    proc = run_driver(joiner(head, """
import threading, time

@minray.remote(max_concurrency=2)
class Threaded:
    def pid(self):
        return os.getpid()

@minray.remote
class Hanger:
    def pid(self):
        return os.getpid()
    def hang(self, path):
        open(path, "w").close()
        while True:
            time.sleep(0.01)

actors = [Counter.remote(), Counter.options(max_restarts=3).remote(),
          Counter.options(name="leaves-with-driver").remote(), Threaded.remote(), Hanger.remote()]
pids = minray.get([a.pid.remote() for a in actors])
actors[-1].hang.remote(STARTED)
while not os.path.exists(STARTED):
    time.sleep(0.005)
print("PIDS", json.dumps(pids))
""".replace("STARTED", repr(started))), env=session_env)
    pids = output_line(proc.stdout, "PIDS")
    assert len(set(pids)) == 5
    poll(lambda: all(gone(p) for p in pids), what=f"actors {pids} to stop with their driver")
    # The cluster itself is still fine.
    proc = run_driver(joiner(head, """
c = Counter.remote(5)
print("OK", json.dumps(minray.get(c.increment.remote())))
"""), env=session_env)
    assert output_line(proc.stdout, "OK") == 6


def test_a_driver_killed_with_sigkill_takes_its_actors_with_it(head, session_env):
    driver = start_driver(joiner(head, """
actors = [Counter.remote(), Counter.options(max_restarts=-1).remote()]
print("PIDS", json.dumps(minray.get([a.pid.remote() for a in actors])), flush=True)
sys.stdin.readline()
"""), env=session_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        pids = output_line(driver.stdout.readline(), "PIDS")
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdin.close()
        driver.stdout.close()
    poll(lambda: all(gone(p) for p in pids), what=f"actors {pids} of the killed driver to stop")


def test_an_embedded_cluster_exit_leaves_no_actor_behind(own_root):
    proc = run_driver(COUNTER.split("context = ")[0] + """
minray.init(num_cpus=1)
actors = [Counter.options(lifetime="detached", name="d").remote(), Counter.remote()]
print("PIDS", json.dumps(minray.get([a.pid.remote() for a in actors])))
""", env=own_root)
    pids = output_line(proc.stdout, "PIDS")
    poll(lambda: all(gone(p) for p in pids), what=f"actors {pids} to stop with the cluster")


# ---------------------------------------------------------------- GPUs

def test_gpu_actors(own_root):
    proc = run_driver("""
import json, os
import numpy as np
import minray

minray.init(num_cpus=2, num_gpus=2)

@minray.remote(num_gpus=1)
class GpuActor:
    def __init__(self):
        self.at_init = (os.environ.get("CUDA_VISIBLE_DEVICES"), minray.get_gpu_ids())
    def report(self):
        return {"init": self.at_init, "now": minray.get_gpu_ids(),
                "env": os.environ.get("CUDA_VISIBLE_DEVICES")}

a, b = GpuActor.remote(), GpuActor.remote()
ra, rb = minray.get([a.report.remote(), b.report.remote()])
for r in (ra, rb):
    (env, ids) = r["init"]
    assert len(ids) == 1, r
    assert env == str(ids[0]), r
    assert r["now"] == ids and r["env"] == env, r
assert sorted(ra["now"] + rb["now"]) == [0, 1], (ra, rb)
assert "GPU" not in minray.available_resources()

@minray.remote
def cpu_task():
    return minray.get_gpu_ids()
assert minray.get(cpu_task.remote()) == []          # tasks without GPUs see none

# A third GPU actor waits until a GPU is free, then gets the freed id.
c = GpuActor.remote()
ref = c.report.remote()
ready, _ = minray.wait([ref], timeout=0.3)
assert not ready
minray.kill(a)
rc = minray.get(ref, timeout=30)
assert rc["now"] == ra["now"] and rc["init"][0] == str(ra["now"][0]), (rc, ra)
minray.kill(b)
minray.kill(c)

# The docs' GPU network pattern (TensorFlow swapped for numpy).
class Dataset:
    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        self.images = rng.normal(size=(2000, 20))
        w = rng.normal(size=20)
        self.labels = (self.images @ w > 0).astype(float)
        self.position = 0
    def next_batch(self, size):
        start, self.position = self.position, (self.position + size) % len(self.images)
        return self.images[start:start + size], self.labels[start:start + size]

class Mnist:
    def __init__(self):
        self.train, self.test = Dataset(0), Dataset(0)

def construct_network():
    return np.zeros(20)

@minray.remote(num_gpus=1)
class NeuralNetOnGPU(object):
    def __init__(self, mnist_data):
        self.mnist = mnist_data
        # Set an environment variable to tell TensorFlow which GPUs to use. Note
        # that this must be done before the call to tf.Session.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join([str(i) for i in minray.get_gpu_ids()])
        self.w = construct_network()

    def train(self, num_steps):
        for _ in range(num_steps):
            batch_xs, batch_ys = self.mnist.train.next_batch(100)
            p = 1 / (1 + np.exp(-batch_xs @ self.w))
            self.w += 0.5 * batch_xs.T @ (batch_ys - p) / len(batch_ys)

    def get_accuracy(self):
        predicted = (self.mnist.test.images @ self.w > 0).astype(float)
        return float((predicted == self.mnist.test.labels).mean())

mnist = Mnist()
# Create the actor.
nn = NeuralNetOnGPU.remote(mnist)
# Run a few steps of training and print the accuracy.
nn.train.remote(100)
accuracy = minray.get(nn.get_accuracy.remote())
print("Accuracy is {}.".format(accuracy))
assert accuracy > 0.9, accuracy
minray.kill(nn)

# The docs' data-parallel pattern: one training actor per GPU, averaged weights.
@minray.remote(num_gpus=1)
class ResNetTrainActor(object):
    def __init__(self, data, dataset, num_gpus):
        self.data = data
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join([str(i) for i in minray.get_gpu_ids()])
        self.gpu = minray.get_gpu_ids()
    def compute_steps(self, weights):
        return {k: v + self.data for k, v in weights.items()}
    def gpus(self):
        return self.gpu

num_gpus = 2
train_actors = [ResNetTrainActor.remote(1.0, "cifar", num_gpus) for _ in range(num_gpus)]
weights = {"w": np.zeros(4), "b": np.ones(2)}
weight_id = minray.put(weights)
all_weights = minray.get([actor.compute_steps.remote(weight_id) for actor in train_actors])
mean_weights = {k: sum([weights[k] for weights in all_weights]) / num_gpus for k in all_weights[0]}
assert np.all(mean_weights["w"] == 1.0) and np.all(mean_weights["b"] == 2.0), mean_weights
gpus = minray.get([actor.gpus.remote() for actor in train_actors])
assert sorted(g for ids in gpus for g in ids) == [0, 1], gpus
for actor in train_actors:
    minray.kill(actor)

# A restarted GPU actor gets a GPU again, set before its constructor re-runs.
import signal
from minray.exceptions import RayActorError

@minray.remote(num_gpus=1, max_restarts=1)
class Restartable:
    def __init__(self):
        self.at_init = os.environ.get("CUDA_VISIBLE_DEVICES")
    def report(self):
        return os.getpid(), self.at_init, minray.get_gpu_ids()
r = Restartable.remote()
pid, at_init, ids = minray.get(r.report.remote())
assert len(ids) == 1 and at_init == str(ids[0])
os.kill(pid, signal.SIGKILL)
import time
deadline = time.monotonic() + 30
while True:
    try:
        new_pid, at_init, ids = minray.get(r.report.remote(), timeout=30)
        break
    except RayActorError:   # a call that reached the dying process
        assert time.monotonic() < deadline, "the GPU actor never came back"
assert new_pid != pid and len(ids) == 1 and at_init == str(ids[0]), (new_pid, at_init, ids)
minray.kill(r)
print("GPU OK")
""", env=own_root)
    assert "GPU OK" in proc.stdout
    assert "Accuracy is" in proc.stdout


def test_a_gpu_actor_on_a_cluster_without_gpus_is_a_clear_error(own_root):
    proc = run_driver("""
import minray
from minray.exceptions import TaskUnschedulableError
minray.init(num_cpus=1)

@minray.remote(num_gpus=1)
class NeedsGpu:
    def hello(self):
        return "hello"

try:
    minray.get(NeedsGpu.remote().hello.remote(), timeout=30)
except TaskUnschedulableError as exc:
    assert "GPU" in str(exc), exc
    print("UNSCHEDULABLE")
""", env=own_root)
    assert "UNSCHEDULABLE" in proc.stdout
