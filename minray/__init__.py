"""minray: tasks, actors and a shared-memory object store with Ray's API."""
import os as _os

from minray._core.compiled import use_fresh_sources as _use_fresh_sources

_use_fresh_sources(_os.path.dirname(_os.path.abspath(__file__)))   # before what they run

from minray import exceptions
from minray.actor import method
from minray.api import (
    available_resources, cancel, cluster_resources, error_info, get, get_actor, get_gpu_ids,
    init, is_initialized, kill, nodes, put, remote, shutdown, wait,
)
from minray.runtime.object_ref import ObjectRef
from minray.runtime_context import get_runtime_context
from minray.serialization import register_custom_serializer
from minray import util

ObjectID = ObjectRef        # the original docs' name for it

__version__ = "0.1.0"

__all__ = [
    "ObjectID", "ObjectRef", "available_resources", "cancel", "cluster_resources",
    "error_info", "exceptions", "get", "get_actor", "get_gpu_ids", "get_runtime_context",
    "init", "is_initialized", "kill", "method", "nodes", "put", "register_custom_serializer",
    "remote", "shutdown", "util", "wait", "__version__",
]
