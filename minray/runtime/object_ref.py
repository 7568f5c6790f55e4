"""ObjectRef: a future naming an object that exists now or will."""
from minray.runtime import core


class ObjectRef:
    __slots__ = ("_id", "_client", "__weakref__")

    def __init__(self, object_id):
        self._id = object_id
        self._client = core.current()
        if self._client is not None:
            self._client.add_ref(object_id)

    def __del__(self):
        client = self._client
        if client is not None and not client.closed:
            client.remove_ref(self._id)

    def binary(self):
        return self._id

    def hex(self):
        return self._id.hex()

    def task_id(self):
        return self._id[:16]

    def __eq__(self, other):
        return isinstance(other, ObjectRef) and other._id == self._id

    def __hash__(self):
        return hash(self._id)

    def __repr__(self):
        return f"ObjectRef({self._id.hex()})"

    def __reduce__(self):
        # A ref inside a serialized value may outlive our own refs to it.
        if self._client is not None:
            self._client.escape(self._id)
        return ObjectRef, (self._id,)
