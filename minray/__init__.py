"""minray: tasks, actors and a shared-memory object store with Ray's API."""
from minray import exceptions
from minray.serialization import register_custom_serializer

__version__ = "0.1.0"

__all__ = ["exceptions", "register_custom_serializer", "__version__"]
