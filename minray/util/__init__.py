"""Utilities on top of tasks and actors, as in ``ray.util``.

``ActorPool`` is imported here; the submodules ``minray.util.queue``
(``Queue``, ``Empty``, ``Full``) and ``minray.util.multiprocessing``
(``Pool``) load on first use, so ``import minray`` stays light.
"""
import importlib

from minray.util.actor_pool import ActorPool

__all__ = ["ActorPool", "multiprocessing", "queue"]

_SUBMODULES = ("multiprocessing", "queue")


def __getattr__(name):
    # minray.util.queue works after a plain `import minray`, as ray.util.queue does.
    if name in _SUBMODULES:
        return importlib.import_module(f"minray.util.{name}")
    raise AttributeError(f"module 'minray.util' has no attribute {name!r}")
