"""ObjectRef: a future naming an object that exists now or will."""
import threading

from minray.runtime import core
from minray.serialization import _custom_serializers, serialize

# While minray serializes a value, the ids of the refs inside it (and of
# the actors whose handles it holds, minray.ids.actor_handle_id) are
# collected here: the node manager keeps those objects and actors alive as
# long as the value that contains them (see minray.node_manager.objects).
_collecting = threading.local()

# Values of these exact types hold no refs (unless a custom serializer was
# registered for the type): most task results skip the collecting set-up.
_HOLD_NO_REFS = frozenset({type(None), bool, int, float, complex, str, bytes})


def serialize_with_refs(value):
    """serialize(value), and the ids of the ObjectRefs (and counted actor
    handles) found inside it."""
    if type(value) in _HOLD_NO_REFS and type(value) not in _custom_serializers:
        return serialize(value), []
    outer = getattr(_collecting, "ids", None)
    _collecting.ids = found = []
    try:
        serialized = serialize(value)
    finally:
        _collecting.ids = outer
    return serialized, found


def note_pickled(object_id, client):
    """A ref or actor handle is being pickled. Inside serialize_with_refs the
    value being serialized will hold its object; pickled by other means (into
    a file, by another framework) its copies can't be counted, so it escapes:
    the node manager keeps it for good (an actor: until its creator exits)."""
    found = getattr(_collecting, "ids", None)
    if found is not None:
        found.append(object_id)
        return False
    if client is not None:
        client.escape(object_id)
    return True


def _unpickle_escaped(object_id, node_address):
    """A ref pickled outside minray, loaded (maybe on another node): our node
    learns where to ask for its object before we hold it."""
    client = core.current()
    if client is not None and node_address and node_address != client.node_address:
        client.send(("adopt", {object_id: node_address}))
    return ObjectRef(object_id)


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

    def future(self):
        """A concurrent.futures.Future for this ref's value (or its task's error)."""
        client = self._client or core.current()
        if client is None:
            raise RuntimeError("minray is not initialized: call minray.init() first")
        return client.ref_futures().future(self)

    def __await__(self):
        # Awaiting suspends only the coroutine: the event loop (an async
        # actor's, or the driver's) keeps running other coroutines meanwhile.
        import asyncio        # here: most processes never await, and asyncio is 5+ MB
        return asyncio.wrap_future(self.future()).__await__()

    def __eq__(self, other):
        return isinstance(other, ObjectRef) and other._id == self._id

    def __hash__(self):
        return hash(self._id)

    def __repr__(self):
        return f"ObjectRef({self._id.hex()})"

    def __reduce__(self):
        client = self._client
        if note_pickled(self._id, client) and client is not None:
            # Escaped: it may be loaded on another node, which must know
            # where it came from (the object stays pinned on this node).
            return _unpickle_escaped, (self._id, client.node_address)
        return ObjectRef, (self._id,)
