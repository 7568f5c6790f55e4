"""The node manager's directory of objects: where each value is, who holds a
reference to it, and who waits for it.

An object is inline (small: its serialized bytes live here and travel in
messages), in the shared-memory store (large: its writer seals it with a
primary pin, which the node manager adopts here, so this primary copy is
never evicted while referenced), or an error
(inline bytes of an exception: a task that depends on one fails with it).

Lifetime, as in Ray's reference counting. An object lives while any of these
holds it:
- its owner (the process that submitted the task or put the value) has a ref;
- a borrower (a process that was handed a ref inside a value and rebuilt it)
  has a ref; borrowers say so with "borrow" before they can drop anything
  that kept the object alive for them, so no gap opens between the two;
- a queued or running task takes it as an argument, or carries a ref to it
  inside an inline argument (task_refs);
- a live object contains a ref to it (a list of refs that was put or
  returned: containers);
- a process waits for it (subscribers).
A ref serialized outside minray's own serialization (a user pickling it into
a file) "escapes": nobody can count such copies, so the object is kept until
the cluster stops.

Across nodes (minray.node_manager.peers), a remote node manager is one more
process in these roles: it owns the results of tasks it sent here, borrows
and waits for objects owned here. An object whose value is in another
node's store is LOCATED here (its data: the addresses holding a copy) until
something on this node needs it; then it is pulled into the local store
(minray.node_manager.transfer) and becomes IN_STORE. An object owned
elsewhere has an entry with `owner_peer` (we borrow it from that node);
one whose primary copy another node keeps for us has `primary_peer` (told
when we free it).

Actor handles are counted by the same rules: each actor has an entry of kind
ACTOR_HANDLES (minray.ids.actor_handle_id) that every handle refers to, and
the actor manager hears (freed_listeners) when nothing holds it any more.
"""
import asyncio
import logging

from minray.exceptions import FailedArgument, ObjectLostError
from minray.protocol import ACTOR_HANDLES, ERROR, IN_STORE, INLINE, KIND_NAMES, LOCATED, SPILLED
from minray.serialization import serialize

log = logging.getLogger("minray.node_manager")

PULL_RETRIES = 10                # a fetch that failed (not for lack of a copy) is tried
PULL_RETRY_S = 0.5               # again this often, this long apart


def error_object(exc):
    """Serialize an exception into (meta, bytes) of an ERROR object."""
    ser = serialize(exc)
    return ser.metadata, ser.to_bytes()


def failed_argument_object(function_name, meta, data, actor_class=None):
    """The ERROR object of a task or call (or, with actor_class, an actor's
    creation) whose argument is the ERROR object (meta, data): a RayTaskError
    of its own wrapping the argument's error, as in Ray. The argument's error
    is carried as bytes, never unpickled here (minray.exceptions.FailedArgument)."""
    return error_object(FailedArgument(function_name, meta, data, actor_class))


class ObjectEntry:
    __slots__ = ("kind", "meta", "data", "size", "pin", "owner", "owner_released",
                 "task_refs", "borrowers", "contains", "containers", "escaped",
                 "subscribers", "ready", "owner_peer", "primary_peer", "lineage")

    def __init__(self, owner=None):
        self.kind = None
        self.meta = b""
        self.data = None          # bytes for INLINE / ERROR
        self.size = 0
        self.pin = None           # PinnedBuffer of the primary copy in the store
        self.owner = owner        # connection of the owning process
        self.owner_released = False
        self.task_refs = 0        # queued tasks that take it as an argument
        self.borrowers = None     # connections that hold refs they were handed
        self.contains = None      # ids of refs serialized inside this value
        self.containers = 0       # live objects whose value contains a ref to it
        self.escaped = False
        self.subscribers = None   # connections waiting to hear it is ready
        self.ready = False
        self.owner_peer = None    # the node that owns it, if not this one
        self.primary_peer = None  # the node keeping its primary copy for us
        self.lineage = None       # how to make it again (recovery.LineageRecord), if we can

    def message(self, object_id):
        """The ("obj", ...) message announcing this object to a process."""
        payload = self.data if self.kind != IN_STORE else self.size
        return ("obj", object_id, self.kind, self.meta, payload)

    @property
    def held(self):
        return (not self.owner_released or self.task_refs > 0 or self.containers > 0
                or bool(self.borrowers) or bool(self.subscribers) or self.escaped)


class ObjectDirectory:
    """Object entries, their references, and telling processes they are ready.

    `ready_listeners` are called as listener(object_id, entry) when an object
    becomes ready (tasks and actor calls waiting on it), `freed_listeners`
    the same way when an actor's handles entry is freed because nothing holds it.
    """

    def __init__(self, store, address=None):
        self.store = store
        self.address = address     # this node's "ip:port"
        self.entries = {}
        self.ready_listeners = []
        self.freed_listeners = []
        # Set by the node manager: pull(object_id, entry) fetches a LOCATED
        # object into the local store (then set_ready(IN_STORE) + announce).
        self.pull = None
        # Set by lineage recovery (minray.node_manager.recovery): an entry
        # holding a lineage record is deleted; a fetch found no live copy.
        self.lineage_released = None
        self.pull_failed = None
        # Set by the node manager: whether a task or actor queued on this
        # node waits for an object (what tasks sent elsewhere hold is not
        # fetched here).
        self.wanted_here = lambda object_id: True
        # Set by spilling (minray.node_manager.spilling): bring a SPILLED
        # object back into the store (announced then); a SPILLED one is freed.
        self.restore = None
        self.spill_deleted = None
        self.pull_retries = {}       # object id -> fetches tried again after a failure

    def __len__(self):
        return len(self.entries)

    def get(self, object_id):
        return self.entries.get(object_id)

    # ------------------------------------------------------------ values
    def expect(self, object_id, owner):
        """The entry of an object a submitted task will produce, owned by
        `owner`. An id submitted again (a retried parent, a restarted actor
        re-creating its children's ids) is taken over by the new submitter:
        it gets the value, whether it is still coming or already here."""
        entry = self.entries.get(object_id)
        if entry is None:
            entry = self.entries[object_id] = ObjectEntry(owner)
            return entry
        if entry.owner is not owner:
            entry.owner = owner
            entry.owner_released = False
            if entry.ready and not owner.closed:
                self.send_value(owner, object_id, entry)
        return entry

    def set_ready(self, object_id, kind, meta, payload, owner=None, contained=()):
        """Record a value; return its entry (None if it was already freed)."""
        entry = self.entries.get(object_id)
        if entry is None:
            if owner is None:
                if kind == IN_STORE:   # nobody wants it: drop it and its primary pin
                    self._delete_from_store(object_id)
                return None            # result of a task whose owner gave up on it
            entry = self.entries[object_id] = ObjectEntry(owner)
        elif owner is not None and entry.owner is not owner:
            entry.owner = owner        # a put re-made by a retried task
            entry.owner_released = False
        if entry.contains:
            self._release_contents(entry)     # a value made again replaces the old
        if entry.kind == SPILLED:
            self.spill_deleted(object_id)     # (its file is stale now)
        entry.kind = kind
        entry.meta = meta
        entry.ready = True
        if kind == IN_STORE:
            entry.size = payload
            entry.data = None
            try:   # take over the pin its writer left at seal: never evictable
                entry.pin = self.store.adopt_primary(object_id)
            except KeyError:
                entry.pin = None       # evicted already: readers will see it lost
        elif kind == LOCATED:
            entry.size, entry.data = payload[0], list(payload[1])
            entry.pin = None
        else:
            entry.data = payload
            entry.size = len(payload)
            entry.pin = None
        if contained:
            entry.contains = list(contained)
            for inner_id in contained:
                inner = self.entries.get(inner_id)
                if inner is not None:
                    inner.containers += 1
        return entry

    def add_actor_handles(self, object_id, owner):
        """The entry standing for an actor's handles, held by its creator."""
        entry = self.entries[object_id] = ObjectEntry(owner)
        entry.kind = ACTOR_HANDLES
        entry.data = b""
        entry.ready = True
        return entry

    def discard(self, object_id):
        """Forget an entry whatever holds it (the actor it stood for is dead)."""
        entry = self.entries.pop(object_id, None)
        if entry is not None:
            self.maybe_free_all(self._release_contents(entry))

    def announce(self, object_id):
        """Tell the owner and whoever waits that an object is ready."""
        entry = self.entries.get(object_id)
        if entry is None:
            return
        if entry.kind == LOCATED:
            self._announce_located(object_id, entry)
            return
        message = None
        owner = entry.owner
        told_owner = owner is not None and not entry.owner_released and not owner.closed
        if told_owner:
            if owner.role == "node":
                self.send_value(owner, object_id, entry)
            else:
                message = entry.message(object_id)
                owner.send(message)
        if entry.subscribers:
            for conn in entry.subscribers:
                if conn is owner and told_owner:
                    continue
                if conn.role == "node":
                    self.send_value(conn, object_id, entry)
                else:
                    message = message or entry.message(object_id)
                    conn.send(message)
            entry.subscribers = None
        for listener in self.ready_listeners:
            listener(object_id, entry)
        self.maybe_free(object_id)

    def _announce_located(self, object_id, entry):
        """A value in other nodes' stores: peers and its owner here hear where
        it is; if anything on this node wants it (a waiting process or task),
        it is pulled here and announced again once it is local."""
        local_interest = entry.task_refs > 0 and self.wanted_here(object_id)
        owner = entry.owner
        if owner is not None and not entry.owner_released and not owner.closed:
            if owner.role == "node":
                self.send_value(owner, object_id, entry)
            else:   # ready elsewhere: it subscribes when it wants the value here
                owner.send(("obj", object_id, LOCATED, entry.meta, entry.size))
        if entry.subscribers:
            for conn in list(entry.subscribers):
                if conn.role == "node":
                    self.send_value(conn, object_id, entry)
                    entry.subscribers.discard(conn)
                else:
                    local_interest = True
            if not entry.subscribers:
                entry.subscribers = None
        if local_interest and self.pull is not None:
            self.pull(object_id, entry)
        self.maybe_free(object_id)

    def send_value(self, peer, object_id, entry):
        """Tell another node an object's value: inline bytes, an error, or
        where it is stored (this node, or the nodes it is located on)."""
        if entry.kind == IN_STORE or entry.kind == SPILLED:   # (served from its file)
            kind, payload = LOCATED, (entry.size, [self.address])
        else:
            kind, payload = entry.kind, entry.data
            if kind == LOCATED:
                payload = (entry.size, entry.data)
        contained = [(inner, self.owner_address(inner)) for inner in entry.contains or ()]
        peer.send(("value", object_id, kind, entry.meta, payload, contained))

    def owner_address(self, object_id):
        """The address of the node that owns an object (this one if we own
        it or do not know it)."""
        entry = self.entries.get(object_id)
        if entry is None:
            return self.address
        if entry.owner_peer is not None:
            return entry.owner_peer.address
        owner = entry.owner
        if owner is not None and owner.role == "node":
            return owner.address
        return self.address

    def adopt_foreign(self, owners, peers):
        """Entries for the refs a message from another node carries that this
        node does not know: {object_id: owner address}."""
        for object_id, address in owners.items():
            if address != self.address and object_id not in self.entries:
                self.add_foreign(object_id, peers.get(address))

    def add_foreign(self, object_id, owner_peer):
        """An entry for an object another node owns, which something here
        needs: we borrow it from its owner and wait for its value."""
        entry = self.entries.get(object_id)
        if entry is not None:
            return entry
        entry = self.entries[object_id] = ObjectEntry()
        entry.owner_released = True          # not ours: held only by what uses it here
        entry.owner_peer = owner_peer
        owner_peer.send(("borrow", [object_id]))
        owner_peer.send(("sub", [object_id]))
        return entry

    def on_peer_value(self, peer, object_id, kind, meta, payload, contained_owners, peers):
        """A node told us an object's value (one we wait for, own or borrow)."""
        entry = self.entries.get(object_id)
        if entry is None:
            if kind == LOCATED and payload[1] and peer.address in payload[1]:
                peer.send(("free", [object_id]))     # nobody here wants it any more
            return
        if entry.ready and entry.kind != LOCATED and kind == LOCATED:
            return                            # we have it already (pulled before)
        self.adopt_foreign(dict(contained_owners), peers)
        ours = entry.owner_peer is None
        self.set_ready(object_id, kind, meta, payload,
                       contained=[inner for inner, _ in contained_owners])
        if ours:
            # It made (or passed on) this value for us and keeps an entry
            # for it until we free it: a stored value's copy now, an inline
            # one as soon as the refs inside it are borrowed (just sent).
            if kind == LOCATED:
                entry.primary_peer = peer
            else:
                peer.send(("free", [object_id]))
        self.announce(object_id)

    def pulled(self, object_id, error=None, gone=False):
        """A pull of a LOCATED object ended: it is in the local store now
        (sealed with a primary pin, adopted here), or `error` says why not;
        `gone`: every node said to hold it is dead or answered it has not."""
        entry = self.entries.get(object_id)
        if entry is None or entry.kind != LOCATED:
            if error is None and (entry is None or entry.kind != IN_STORE):
                self._delete_from_store(object_id)      # nobody wants it any more
            return
        # (the empty case, every successful pull, skips the pop)
        tries = self.pull_retries.pop(object_id, 0) if self.pull_retries else 0
        if error is not None:
            if gone and self.pull_failed is not None:
                self.pull_failed(object_id, entry, error)     # made again, or failed
                return
            if tries < PULL_RETRIES:
                # A holder dying mid-transfer resets the connection before its
                # death is heard of: try again; by then its copy counts as gone.
                self.pull_retries[object_id] = tries + 1
                asyncio.get_running_loop().call_later(PULL_RETRY_S, self._pull_again, object_id)
                return
            entry.kind = ERROR
            entry.meta, entry.data = error_object(ObjectLostError(
                f"object {object_id.hex()} could not be fetched from another node: {error}"))
            entry.size = len(entry.data)
        else:
            entry.kind = IN_STORE
            entry.data = None
            try:
                entry.pin = self.store.adopt_primary(object_id)
            except KeyError:
                entry.pin = None
        self.announce(object_id)

    def _pull_again(self, object_id):
        entry = self.entries.get(object_id)
        if entry is not None and entry.kind == LOCATED and self.pull is not None:
            self.pull(object_id, entry)
        else:
            self.pull_retries.pop(object_id, None)

    def located_on(self, address):
        """Entries whose only known copy is on the node at `address`, or
        owned by it: what its death loses. (Copies it held besides others
        are forgotten on the way.)"""
        for object_id, entry in self.entries.items():
            if entry.owner_peer is not None and entry.owner_peer.address == address \
                    and not entry.ready:
                yield object_id, entry
            elif entry.kind == LOCATED and address in entry.data:
                if len(entry.data) == 1:
                    yield object_id, entry
                else:
                    entry.data.remove(address)     # copies elsewhere remain
            elif entry.primary_peer is not None and entry.primary_peer.address == address \
                    and entry.kind == LOCATED:
                yield object_id, entry

    def subscribe(self, conn, object_id):
        entry = self.entries.get(object_id)
        if entry is None or entry.kind == ACTOR_HANDLES:
            meta, data = error_object(ObjectLostError(
                f"object {object_id.hex()} is not known to this node: it was freed "
                "(all its references were dropped) or never existed"))
            if conn.role == "node":
                conn.send(("value", object_id, ERROR, meta, data, []))
            else:
                conn.send(("obj", object_id, ERROR, meta, data))
        elif entry.ready and (entry.kind not in (LOCATED, SPILLED) or conn.role == "node"):
            if conn.role == "node":
                self.send_value(conn, object_id, entry)
            else:
                conn.send(entry.message(object_id))
        else:
            if entry.subscribers is None:
                entry.subscribers = set()
            entry.subscribers.add(conn)
            if entry.kind == LOCATED and self.pull is not None:
                self.pull(object_id, entry)    # a local process wants it: fetch it here
            elif entry.kind == SPILLED:
                self.restore(object_id, entry)

    # ------------------------------------------------------------ references
    def borrow(self, conn, object_id):
        entry = self.entries.get(object_id)
        if entry is None:
            return
        if entry.owner is conn:
            # The owner dropped its refs, then rebuilt one from a value that
            # kept the object alive: it holds the object again.
            entry.owner_released = False
            return
        if entry.borrowers is None:
            entry.borrowers = set()
        entry.borrowers.add(conn)

    def release(self, conn, object_id):
        """A process dropped its last ref: as the owner or as a borrower."""
        entry = self.entries.get(object_id)
        if entry is None:
            return
        if entry.owner is conn:
            entry.owner_released = True
        elif entry.borrowers:
            entry.borrowers.discard(conn)
        if entry.ready and not entry.held:
            self._free(object_id, entry)

    def escape(self, object_id):
        entry = self.entries.get(object_id)
        if entry is not None:
            entry.escaped = True

    def add_task_ref(self, object_id):
        entry = self.entries.get(object_id)
        if entry is not None:
            entry.task_refs += 1
        return entry

    def drop_task_ref(self, object_id):
        entry = self.entries.get(object_id)
        if entry is not None:
            entry.task_refs -= 1
            self.maybe_free(object_id)

    def maybe_free(self, object_id):
        """Delete an object nobody holds; then whatever only it contained."""
        entry = self.entries.get(object_id)
        if entry is not None and entry.ready and not entry.held:
            self._free(object_id, entry)

    def maybe_free_all(self, object_ids):
        pending = list(object_ids)
        while pending:
            object_id = pending.pop()
            entry = self.entries.get(object_id)
            if entry is None or not entry.ready or entry.held:
                continue                    # (not ready: freed when its value arrives)
            pending.extend(self._delete_entry(object_id, entry))

    def _free(self, object_id, entry):
        """Delete a ready entry nobody holds, then what only it contained
        (a worklist, not recursion: refs can nest deeply)."""
        inner_ids = self._delete_entry(object_id, entry)
        if inner_ids:
            self.maybe_free_all(inner_ids)

    def _delete_entry(self, object_id, entry):
        """Delete an entry; return the ids of the refs its value contained."""
        del self.entries[object_id]
        if entry.kind == IN_STORE:
            entry.pin = None
            self._delete_from_store(object_id)
        elif entry.kind == SPILLED:
            self.spill_deleted(object_id)
        # Another node keeps its primary copy for us, or lends it to us.
        for peer in (entry.primary_peer, entry.owner_peer):
            if peer is not None and not peer.closed:
                peer.send(("free", [object_id]))
        inner_ids = self._release_contents(entry) if entry.contains else ()
        if entry.lineage is not None and self.lineage_released is not None:
            self.lineage_released(entry.lineage)
        if entry.kind == ACTOR_HANDLES:     # (what the listeners are for)
            for listener in self.freed_listeners:
                listener(object_id, entry)
        return inner_ids

    def _delete_from_store(self, object_id):
        try:
            self.store.delete(object_id)
        except KeyError:
            pass

    def _release_contents(self, entry):
        inner_ids, entry.contains = entry.contains or (), None
        for inner_id in inner_ids:
            inner = self.entries.get(inner_id)
            if inner is not None:
                inner.containers -= 1
        return inner_ids

    def forget_connection(self, conn):
        """A process went away: it owns, borrows and waits for nothing now."""
        for object_id, entry in list(self.entries.items()):
            if entry.subscribers and conn in entry.subscribers:
                entry.subscribers.discard(conn)
            if entry.borrowers and conn in entry.borrowers:
                entry.borrowers.discard(conn)
            if entry.owner is conn:
                entry.owner_released = True
            self.maybe_free(object_id)

    # ------------------------------------------------------------ reporting
    def stats(self):
        kinds = [e.kind for e in self.entries.values() if e.kind != ACTOR_HANDLES]
        return {"objects": len(kinds), "inline": sum(1 for k in kinds if k in (INLINE, ERROR)),
                "in_store": kinds.count(IN_STORE)}

    def rows(self, node_hex, limit=10000):
        objects = [(object_id, entry) for object_id, entry in list(self.entries.items())
                   if entry.kind != ACTOR_HANDLES]
        return [{"id": object_id.hex(), "kind": KIND_NAMES[entry.kind], "size": entry.size,
                 "node": node_hex}
                for object_id, entry in objects[:limit]]
