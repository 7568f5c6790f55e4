"""Plain-Python modules that setup.py also compiles with Cython.

These carry every task's path through the driver, the node manager, the
worker and the control store. Compiled unchanged, they take about a tenth
off the node manager's CPU per task and add about a tenth to task throughput
(docs/benchmarks.md). Their .py files stay the source of truth and run as
they are where no compiled module was built (or with MINRAY_PURE_PYTHON=1
set when building, e.g. to profile them line by line).

A compiled module older than its source is stale (a checkout or an edit
since the last build): `use_fresh_sources` makes Python import that source
instead, with a warning, so an edit is never silently ignored.

setup.py reads COMPILED_MODULES from this file without importing minray:
keep this module free of minray imports.
"""
import importlib.machinery
import importlib.util
import os
import sys
import warnings

COMPILED_MODULES = (
    "minray.ids",
    "minray.resources",
    "minray.wire",
    "minray.gcs.client",
    "minray.gcs.server",
    "minray.node_manager.actors",
    "minray.node_manager.connection",
    "minray.node_manager.dispatch",
    "minray.node_manager.lineage",
    "minray.node_manager.objects",
    "minray.node_manager.recovery",
    "minray.node_manager.server",
    "minray.node_manager.tasks",
    "minray.runtime.client_objects",
    "minray.runtime.core",
)
# Not the worker's executor: it finds its own frames (to cut them from remote
# tracebacks, and to interrupt only the task's code on cancel), and compiled
# code has none. Nor the modules a task's code calls straight into (remote
# functions, actor handles, ObjectRef): a cancel's KeyboardInterrupt lands
# only where the innermost Python frame is not minray's, and below one of
# their frames minray's compiled code is never mistaken for the task's.

# A compiled module may be this much older than its source: installers write
# both in one go, in any order.
STALE_AFTER_S = 2.0
_WARNED = "MINRAY_STALE_SOURCES_WARNED"


def stale_modules(package_root):
    """Compiled modules whose source changed after they were built."""
    stale = []
    for name in COMPILED_MODULES:
        base = os.path.join(package_root, *name.split(".")[1:])
        try:
            source_mtime = os.stat(base + ".py").st_mtime
        except OSError:
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            try:
                built_mtime = os.stat(base + suffix).st_mtime
            except OSError:
                continue
            if source_mtime > built_mtime + STALE_AFTER_S:
                stale.append((name, base + ".py"))
            break
    return stale


class _SourceFirst:
    """A meta-path finder that imports given modules from their .py files."""

    def __init__(self, sources):
        self.sources = dict(sources)

    def find_spec(self, name, path=None, target=None):
        source = self.sources.get(name)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(name, source)


def use_fresh_sources(package_root):
    """Import stale compiled modules from their source instead (warning once)."""
    stale = stale_modules(package_root)
    if not stale:
        return []
    sys.meta_path.insert(0, _SourceFirst(stale))
    if not os.environ.get(_WARNED):
        os.environ[_WARNED] = "1"          # (processes minray starts say it no more)
        warnings.warn(
            f"minray: {', '.join(path for _, path in stale)} changed since minray was built; "
            "running the source (slower). Rebuild to compile it again: pip install -e . "
            "(or python setup.py build_ext --inplace)", RuntimeWarning, stacklevel=3)
    return [name for name, _ in stale]
