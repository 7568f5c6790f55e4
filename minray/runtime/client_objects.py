"""The client runtime's objects: putting values, waiting for and reading
them, and asking for those spilled to disk since they arrived.

A mixin of minray.runtime.core.CoreClient, whose state (the values known
here, refs, subscriptions, the socket) it uses.
"""
from minray import ids
from minray.exceptions import (
    GetTimeoutError, ObjectLostError, ObjectNotFoundError, ObjectStoreFullError, RayTaskError,
)
from minray.object_store import write_serialized
from minray.protocol import ERROR, IN_STORE, INLINE
from minray.serialization import deserialize

INLINE_MAX_BYTES = 100 * 1024      # values up to this size travel in messages
MAKE_ROOM_TIMEOUT_S = 300.0        # spilling to disk to make room for a put or result
RESTORE_TRIES = 3                  # asking again for an object spilled before we pinned it


class ClientObjects:
    def put_serialized(self, object_id, serialized, contained):
        """Store a serialized value under an id this process owns (see own());
        `contained`: ids of the refs serialized inside it."""
        meta = serialized.metadata
        if serialized.total_size <= INLINE_MAX_BYTES:
            payload = serialized.to_bytes()
            self.objects[object_id] = (INLINE, meta, payload)
            self.send(("put", object_id, INLINE, meta, payload, contained))
            return
        self.write_to_store(object_id, serialized)
        self.objects[object_id] = (IN_STORE, meta, serialized.total_size)
        self.send(("put", object_id, IN_STORE, meta, serialized.total_size, contained))

    def write_to_store(self, object_id, serialized):
        """Write a put or result into the store; if the store is full of
        objects in use, the node manager spills some to disk to make room."""
        try:
            write_serialized(self.store, object_id, serialized)
        except ObjectStoreFullError:
            size = serialized.total_size
            if size > self.store.capacity:
                raise                                  # it can never fit
            request_id = next(self.request_ids)
            self.send(("make_room", request_id, size))
            if not self._reply(request_id, MAKE_ROOM_TIMEOUT_S):
                raise
            write_serialized(self.store, object_id, serialized)

    def next_put_id(self):
        if self.concurrent:
            return ids.put_object_id(self.actor_id, next(self.shared_counter))
        return ids.put_object_id(self.current_task_id, next(self.put_counter))

    def _missing(self, object_ids, fetch=True):
        """The ids whose values are not here yet; subscribes to those that
        will not come unasked (and, with fetch, to ours stored elsewhere)."""
        missing = [o for o in object_ids if o not in self.objects]
        if missing:
            owned = self.owned
            if fetch:   # ours, still coming: subscribed to when they arrive located
                self.wanted.update(o for o in missing if o in owned)
            located = self.located if fetch else ()
            ask = [o for o in missing if (o not in owned or o in located)
                   and o not in self.subscribed]
            if ask:
                self.subscribed.update(ask)
                self.send(("sub", ask))
        return missing

    def _blocking(self):
        """A worker about to block gives back queued tasks and lends its CPU."""
        if self.role != "worker" or not self.executing:
            return False
        if self.actor_id is not None:
            not_started = []          # an actor's calls must run on it, in order
        else:
            not_started = [t[0] for t in self.tasks]
            self.tasks.clear()
        self.send(("blocked", not_started))
        self.lending += 1
        return True

    def _unblocked(self):
        self.lending -= 1
        self.send(("unblocked",))

    def get(self, object_ids, timeout=None):
        """The values of object_ids, in order. As in Ray, an error among them
        is raised as soon as it has arrived, without waiting for the others
        (they may never come: a task waiting on what the failed one should
        have done); with several, the first in list order that has arrived."""
        missing = self._missing(object_ids)
        if missing:
            self._raise_first_error(object_ids)
            blocked = self._blocking()
            try:
                done = self.wait_until(self._all_or_an_error(missing), timeout)
            finally:
                if blocked:
                    self._unblocked()
            if not done:
                pending = sum(1 for o in missing if o not in self.objects)
                raise GetTimeoutError(
                    f"get timed out after {timeout} s: {pending} of {len(object_ids)} "
                    "objects are not ready")
            self._raise_first_error(object_ids)
        return [self.value(o) for o in object_ids]

    def _raise_first_error(self, object_ids):
        objects = self.objects
        for object_id in object_ids:
            value = objects.get(object_id)
            if value is not None and value[0] == ERROR:
                self.value(object_id)           # raises it

    def _all_or_an_error(self, missing):
        """A wait_until predicate: every id in missing has arrived, or one of
        them is an error. It runs after every batch of messages, so it stays
        cheap: the arrived prefix of missing is not looked at again (results
        mostly come in order), and kinds only when a new error has arrived."""
        objects = self.objects
        start = 0                       # missing[:start] have all arrived
        errors_seen = None              # the first call looks at every kind

        def ready():
            nonlocal start, errors_seen
            if self.errors_arrived != errors_seen:
                errors_seen = self.errors_arrived
                if any(objects[o][0] == ERROR for o in missing if o in objects):
                    return True
            while start < len(missing):
                if missing[start] not in objects:
                    return False
                start += 1
            return True

        return ready

    def wait(self, object_ids, num_returns, timeout, fetch_local=True):
        self._missing(object_ids, fetch_local)
        objects = self.objects
        located = () if fetch_local else self.located

        def arrived(object_id):
            return object_id in objects or object_id in located

        def enough():
            return sum(1 for o in object_ids if arrived(o)) >= num_returns

        if timeout == 0:
            self.wait_until(enough, 0)          # read what has arrived, never block
        elif not enough():
            blocked = self._blocking()
            try:
                self.wait_until(enough, timeout)
            finally:
                if blocked:
                    self._unblocked()
        ready = [o for o in object_ids if arrived(o)][:num_returns]
        return ready

    def value(self, object_id):
        kind, meta, payload = self.objects[object_id]
        if kind == INLINE:
            return deserialize(meta, payload)
        if kind == IN_STORE:
            try:
                pinned = self.store.get(object_id)
            except ObjectNotFoundError:
                pinned = self._restored(object_id)
            return deserialize(pinned.metadata, pinned)
        error = deserialize(meta, payload)
        self.errors_raised.add(object_id)
        if isinstance(error, RayTaskError):
            raise error.as_instanceof_cause()
        raise error

    def restored_argument(self, object_id):
        """A task's argument spilled to disk after the task was sent here."""
        try:
            return self._restored(object_id)
        finally:
            if object_id not in self.ref_counts:
                self.objects.pop(object_id, None)
                self.subscribed.discard(object_id)

    def _restored(self, object_id):
        """An object no longer in the store since we heard of it: spilled to
        disk. Asking for it again has the node manager bring it back (and if
        it is spilled again before we pin it, once more)."""
        for _ in range(RESTORE_TRIES):
            self.objects.pop(object_id, None)
            self.subscribed.add(object_id)
            self.send(("sub", [object_id]))
            if not self.wait_until(lambda: object_id in self.objects, MAKE_ROOM_TIMEOUT_S):
                raise GetTimeoutError(f"object {object_id.hex()} was spilled to disk and not "
                                      f"restored within {MAKE_ROOM_TIMEOUT_S:.0f} s")
            kind, _, _ = self.objects[object_id]
            if kind == ERROR:
                self.value(object_id)                   # raises it
            if kind != IN_STORE:
                break
            try:
                return self.store.get(object_id)
            except ObjectNotFoundError:
                continue
        raise ObjectLostError(f"object {object_id.hex()} is no longer in the object store "
                              "and could not be brought back")
