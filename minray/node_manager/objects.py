"""The node manager's table of objects: where each value is and who wants it.

An object is either inline (small: its serialized bytes live here and travel
in messages) or in the shared-memory store (large: its writer seals it with a
primary pin, which the node manager adopts here, so this primary copy is
never evicted while referenced). Errors are
inline objects of kind ERROR: a task that depends on one fails with it.

Lifetime: an object is freed when its owner (the process that submitted the
task or put the value) has dropped every ObjectRef to it and no queued task
still needs it as an argument. A ref that was serialized into another value
"escapes": other processes may hold copies of it that we cannot count, so its
object is kept (and pinned, if in the store) until the cluster shuts down.
"""
INLINE = "v"
IN_STORE = "s"
ERROR = "e"


class ObjectEntry:
    __slots__ = ("kind", "meta", "data", "size", "pin", "owner", "owner_released",
                 "task_refs", "escaped", "subscribers", "ready")

    def __init__(self, owner=None):
        self.kind = None
        self.meta = b""
        self.data = None          # bytes for INLINE / ERROR
        self.size = 0
        self.pin = None           # PinnedBuffer of the primary copy in the store
        self.owner = owner        # connection of the owning process
        self.owner_released = False
        self.task_refs = 0        # queued tasks that take it as an argument
        self.escaped = False
        self.subscribers = None   # connections waiting to hear it is ready
        self.ready = False

    def message(self, object_id):
        """The ("obj", ...) message announcing this object to a process."""
        payload = self.data if self.kind != IN_STORE else self.size
        return ("obj", object_id, self.kind, self.meta, payload)


class ObjectTable:
    def __init__(self, store):
        self.store = store
        self.entries = {}

    def __len__(self):
        return len(self.entries)

    def get(self, object_id):
        return self.entries.get(object_id)

    def expect(self, object_id, owner):
        """Create the entry of an object that a submitted task will produce."""
        entry = self.entries.get(object_id)
        if entry is None:
            entry = self.entries[object_id] = ObjectEntry(owner)
        return entry

    def set_ready(self, object_id, kind, meta, payload, owner=None):
        """Record a value; return its entry (None if it was already freed)."""
        entry = self.entries.get(object_id)
        if entry is None:
            if owner is None:
                if kind == IN_STORE:   # nobody wants it: drop it and its primary pin
                    self._delete_from_store(object_id)
                return None            # result of a task whose owner gave up on it
            entry = self.entries[object_id] = ObjectEntry(owner)
        entry.kind = kind
        entry.meta = meta
        entry.ready = True
        if kind == IN_STORE:
            entry.size = payload
            try:   # take over the pin its writer left at seal: never evictable
                entry.pin = self.store.adopt_primary(object_id)
            except KeyError:
                entry.pin = None       # evicted already: readers will see it lost
        else:
            entry.data = payload
            entry.size = len(payload)
        return entry

    def release_owner(self, object_id):
        entry = self.entries.get(object_id)
        if entry is not None:
            entry.owner_released = True
            self._maybe_free(object_id, entry)

    def escape(self, object_id):
        entry = self.entries.get(object_id)
        if entry is not None:
            entry.escaped = True

    def add_task_ref(self, object_id):
        entry = self.entries.get(object_id)
        if entry is not None:
            entry.task_refs += 1

    def drop_task_ref(self, object_id):
        entry = self.entries.get(object_id)
        if entry is not None:
            entry.task_refs -= 1
            self._maybe_free(object_id, entry)

    def _maybe_free(self, object_id, entry):
        if not entry.owner_released or entry.task_refs > 0 or entry.subscribers:
            return
        if not entry.ready:
            return                      # freed when its value arrives
        if entry.escaped:
            return      # copies of the ref may live anywhere: keep it until shutdown
        del self.entries[object_id]
        if entry.kind == IN_STORE:
            entry.pin = None
            self._delete_from_store(object_id)

    def _delete_from_store(self, object_id):
        try:
            self.store.delete(object_id)
        except KeyError:
            pass

    def forget_connection(self, conn):
        """A process went away: it owns nothing and waits for nothing now."""
        for object_id, entry in list(self.entries.items()):
            if entry.subscribers and conn in entry.subscribers:
                entry.subscribers.discard(conn)
            if entry.owner is conn and not entry.owner_released:
                entry.owner_released = True
                self._maybe_free(object_id, entry)

    def stats(self):
        inline = sum(1 for e in self.entries.values() if e.kind in (INLINE, ERROR))
        return {"objects": len(self.entries), "inline": inline,
                "in_store": sum(1 for e in self.entries.values() if e.kind == IN_STORE)}
