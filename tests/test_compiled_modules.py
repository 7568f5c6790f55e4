"""The plain-Python modules setup.py compiles: built, used, and never stale."""
import importlib.machinery
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import minray
from minray._core.compiled import COMPILED_MODULES, STALE_AFTER_S, stale_modules

PACKAGE_ROOT = os.path.dirname(os.path.abspath(minray.__file__))


def compiled_path(name, root=PACKAGE_ROOT):
    base = os.path.join(root, *name.split(".")[1:])
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if os.path.exists(base + suffix):
            return base + suffix
    return None


def require_compiled():
    if os.environ.get("MINRAY_PURE_PYTHON") or compiled_path(COMPILED_MODULES[0]) is None:
        pytest.skip("minray was built without its compiled modules (MINRAY_PURE_PYTHON)")


def test_every_listed_module_is_compiled_and_imported_compiled():
    require_compiled()
    missing = [name for name in COMPILED_MODULES if compiled_path(name) is None]
    assert not missing, f"built without: {missing}"
    for name in COMPILED_MODULES:
        module = importlib.import_module(name)
        assert module.__file__ == compiled_path(name), name


def test_stale_modules_names_sources_newer_than_their_build(tmp_path):
    root = tmp_path / "minray"
    (root / "node_manager").mkdir(parents=True)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    fresh, edited, source_only = "minray.wire", "minray.node_manager.tasks", "minray.gcs.client"
    for name in (fresh, edited, source_only):
        (root / (os.path.join(*name.split(".")[1:]) + ".py")).parent.mkdir(exist_ok=True)
    now = 1_700_000_000
    for name, source_time, built_time in ((fresh, now, now + 1), (edited, now + 10, now)):
        base = os.path.join(root, *name.split(".")[1:])
        for path, when in ((base + ".py", source_time), (base + suffix, built_time)):
            open(path, "w").close()
            os.utime(path, (when, when))
    open(os.path.join(root, "gcs", "client.py"), "w").close()
    assert stale_modules(str(root)) == [(edited, os.path.join(root, "node_manager", "tasks.py"))]
    # Written by an installer a moment apart, in either order: not stale.
    base = os.path.join(root, "node_manager", "tasks")
    os.utime(base + ".py", (now + STALE_AFTER_S / 2, now + STALE_AFTER_S / 2))
    assert stale_modules(str(root)) == []


def test_an_edited_source_runs_instead_of_its_stale_build_with_one_warning(tmp_path):
    """An edit after the build is never silently ignored: that module's
    source runs (in the driver and in the processes minray starts), and the
    driver is told once how to compile it again."""
    require_compiled()
    copy = tmp_path / "pkg"
    shutil.copytree(PACKAGE_ROOT, copy / "minray",
                    ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    source = copy / "minray" / "node_manager" / "tasks.py"
    with open(source, "a") as f:
        f.write("\nEDITED_AFTER_THE_BUILD = True\n")
    later = os.stat(compiled_path("minray.node_manager.tasks", str(copy / "minray"))).st_mtime + 60
    os.utime(source, (later, later))
    driver = textwrap.dedent("""
        import minray
        from minray.node_manager import tasks
        from minray import wire
        assert tasks.EDITED_AFTER_THE_BUILD and tasks.__file__.endswith("tasks.py")
        assert not wire.__file__.endswith(".py")        # fresh ones stay compiled
        minray.init(num_cpus=1)

        @minray.remote
        def square(x):
            return x * x

        print("result", minray.get([square.remote(i) for i in range(5)]))
        minray.shutdown()
    """)
    env = dict(os.environ, PYTHONPATH=str(copy))
    env.pop("MINRAY_STALE_SOURCES_WARNED", None)
    proc = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "result [0, 1, 4, 9, 16]" in proc.stdout
    assert proc.stderr.count("changed since minray was built") == 1, proc.stderr
    assert "node_manager/tasks.py" in proc.stderr and "pip install -e ." in proc.stderr
