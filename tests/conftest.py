import os
import subprocess
import sys
import textwrap
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def store_name():
    """A unique arena name; the file is removed afterwards even if a test fails."""
    name = f"minray-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


@pytest.fixture
def make_store(store_name):
    from minray.object_store import SharedStore

    stores = []

    def make(capacity=1 << 20, **kwargs):
        store = SharedStore.create(store_name, capacity, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def python_child(code, *args, **popen_kwargs):
    """Start a real Python process running `code` (dedented), with argv args."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=REPO, **popen_kwargs)


@pytest.fixture
def gate(tmp_path):
    """A file path that gated tasks or calls wait for; created at teardown at
    the latest, so nothing gated keeps a worker busy after its test."""
    path = str(tmp_path / "gate")
    yield path
    open(path, "w").close()
