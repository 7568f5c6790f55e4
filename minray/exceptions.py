"""Exceptions raised by minray, with the names Ray users know."""


class RayError(Exception):
    """Base class of every error minray raises on its own behalf."""


class ObjectStoreFullError(RayError, MemoryError):
    """An object does not fit in the node's shared-memory object store.

    Raised either because the object is larger than the whole store (it can
    never fit: make the store bigger with ``object_store_memory``) or because
    every object that could be evicted is still in use (pinned) right now.
    """


class ObjectStoreError(RayError):
    """Misuse of the object store: unknown id, double seal, bad release..."""


class ObjectNotFoundError(ObjectStoreError, KeyError):
    """The object id is not in this node's object store."""

    def __str__(self):  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class ObjectExistsError(ObjectStoreError):
    """An object with this id was already created in the store."""


class StoreAttachError(ObjectStoreError):
    """The shared-memory arena file is missing, damaged or not a minray store."""


class SerializationError(RayError, TypeError):
    """A value could not be serialized (or deserialized)."""
