"""Getting lost objects back: lineage reconstruction, on the owner's node.

An object is lost when the node holding its only copy dies (or a fetch of it
finds no live copy). Its owner's node manager (the node whose process
submitted the task) keeps, for every task it owns, the task's spec: its
lineage. A lost result is made again by running that task once more on a
live node, with the same ids; an argument of it that was freed meanwhile is
made again the same way, recursively. Each task may be re-run for this at
most `max_retries` times (its own budget, apart from retries after crashes).

What cannot come back raises ObjectLostError saying why: values made by
`minray.put` (nothing describes how to make them again), results of actor
calls (the actor's state has moved on), objects whose lineage was released,
and arguments that were freed on a node that does not own them.

A node that borrows an object and finds its copy gone asks the owner
("lost"): the owner drops the dead copy, makes the object again if no copy
is left, and answers with its new location like any subscription.

Lineage is kept in memory as long as something may need it, and no longer:
a task's record lives while one of its results is referenced here, or while
the record of a task that took one of those results as an argument lives
(values are not kept, only how to make them). Past `MINRAY_MAX_LINEAGE_BYTES`
(default 256 MB, inline arguments counted) the oldest records are released:
their objects can no longer be made again.
"""
import logging
import os

from minray import ids
from minray.exceptions import ObjectLostError, OwnerDiedError
from minray.node_manager.objects import ObjectEntry, error_object
from minray.protocol import ERROR, LOCATED

log = logging.getLogger("minray.node_manager")

RECORD_OVERHEAD = 300             # bytes a record costs besides its inline arguments
UNLIMITED = 1 << 30


def max_lineage_bytes():
    return int(os.environ.get("MINRAY_MAX_LINEAGE_BYTES", 256 << 20))


class LineageRecord:
    """How to make a task's results again, and who still needs that."""
    __slots__ = ("spec", "refs", "attempts_left", "parents", "size", "released")

    def __init__(self, spec, refs, attempts, parents, size):
        self.spec = spec
        self.refs = refs                # live result entries + records of tasks using them
        self.attempts_left = attempts   # re-runs left to make lost results again
        self.parents = parents          # records of the tasks whose results it takes
        self.size = size
        self.released = False


class ObjectRecovery:
    """Lineage records of the tasks this node owns, and what is done when an
    object is lost: make it again, ask its owner, or fail it clearly."""

    def __init__(self, objects, tasks, max_bytes=None):
        self.objects = objects
        self.tasks = tasks
        self.records = {}          # task id -> LineageRecord, oldest first
        self.bytes = 0
        self.max_bytes = max_lineage_bytes() if max_bytes is None else max_bytes
        self.reconstructions = 0   # tasks re-run to make lost objects again
        self.cluster = None        # set with the cluster view
        self.peers = None
        objects.lineage_released = self.release
        objects.pull_failed = self.pull_failed
        tasks.keep_lineage = self.keep

    # ------------------------------------------------------------ records
    def keep(self, spec, entries):
        """Remember how a task just submitted here makes its results."""
        if not entries:
            return                      # (nothing to make again, nothing to release it)
        records = self.records
        parents = None
        size = RECORD_OVERHEAD
        for arg in spec.args:
            if arg[0] == "r":
                parent = records.get(arg[1][:ids.TASK_ID_SIZE])
                if parent is not None and not ids.is_put(arg[1]):
                    parent.refs += 1
                    if parents is None:
                        parents = [parent]
                    else:
                        parents.append(parent)
            else:
                size += len(arg[2])
        attempts = UNLIMITED if spec.max_retries == -1 else spec.max_retries
        record = LineageRecord(spec, len(entries), attempts, parents, size)
        old = records.pop(spec.task_id, None)
        if old is not None:             # (an id submitted again: the new spec stands)
            for parent in self._drop(old):
                self.release(parent)
        records[spec.task_id] = record
        self.bytes += size
        for entry in entries:
            entry.lineage = record
        if self.bytes > self.max_bytes:
            self._release_oldest()

    def release(self, record):
        """A result entry or a dependent record no longer needs `record`."""
        pending = [record]
        while pending:
            record = pending.pop()
            record.refs -= 1
            if record.refs <= 0 and not record.released:
                pending.extend(self._drop(record))

    def _drop(self, record):
        """Forget a record; return the parents it held."""
        record.released = True
        if self.records.get(record.spec.task_id) is record:
            del self.records[record.spec.task_id]
        self.bytes -= record.size
        parents, record.parents = record.parents or (), None
        return parents

    def _release_oldest(self):
        """Over the byte bound: release the oldest records (their results can
        no longer be made again) until a tenth of the bound is free."""
        target = self.max_bytes * 0.9
        released = 0
        while self.bytes > target and self.records:
            oldest = next(iter(self.records.values()))
            for parent in self._drop(oldest):
                self.release(parent)
            released += 1
        log.warning("lineage over MINRAY_MAX_LINEAGE_BYTES (%d): released the %d oldest "
                    "records; their objects can no longer be reconstructed", self.max_bytes,
                    released)

    def stats(self):
        return {"lineage_records": len(self.records), "lineage_bytes": self.bytes,
                "reconstructions": self.reconstructions}

    # ------------------------------------------------------------ losses
    def node_died(self, address):
        """Objects whose only copy was on the dead node: made again here (we
        own them), asked of their owner (we borrow them), or failed (their
        owner was that node)."""
        lost = list(self.objects.located_on(address))
        for object_id, entry in lost:
            if self.objects.entries.get(object_id) is not entry or \
                    (entry.ready and entry.kind != LOCATED):
                continue                   # handled meanwhile (a sibling's re-run)
            owner_peer = entry.owner_peer
            if owner_peer is not None and owner_peer.address == address:
                self._fail(object_id, entry, OwnerDiedError(
                    f"object {object_id.hex()} is lost: the node that owns it ({address}) "
                    "died, and only the owner can make it again"))
            elif owner_peer is not None:
                self._ask_owner(object_id, entry, [address])
            else:
                self.lose(object_id, entry, f"its only copy was on node {address}, which died")
        for object_id, entry in list(self.objects.entries.items()):
            if entry.primary_peer is not None and entry.primary_peer.address == address:
                entry.primary_peer = None  # (nobody to tell when we free it)

    def pull_failed(self, object_id, entry, why):
        """A fetch found no live copy of a LOCATED object."""
        if entry.owner_peer is not None:
            owner = entry.owner_peer
            if self.cluster is not None and not self.cluster.is_alive(owner.address):
                self._fail(object_id, entry, OwnerDiedError(
                    f"object {object_id.hex()} could not be fetched ({why}) and the node "
                    f"that owns it ({owner.address}) died"))
            else:
                self._ask_owner(object_id, entry, list(entry.data or ()))
        else:
            self.lose(object_id, entry, f"it could not be fetched from another node: {why}")

    def on_lost(self, peer, object_id, addresses):
        """A borrower found the copies we told it of gone: drop them, make the
        object again if none is left, and answer like a subscription."""
        entry = self.objects.get(object_id)
        if entry is not None and entry.ready and entry.kind == LOCATED \
                and entry.owner_peer is None:
            gone = set(addresses) if isinstance(addresses, list) else set()
            entry.data = [a for a in entry.data if a not in gone and self._alive(a)]
            if not entry.data:
                self.lose(object_id, entry, "its only copy was on node "
                          f"{', '.join(sorted(gone)) or '?'}, which is gone")
        self.objects.subscribe(peer, object_id)

    def _alive(self, address):
        return self.cluster is None or self.cluster.is_alive(address)

    def _ask_owner(self, object_id, entry, addresses):
        owner = entry.owner_peer
        if owner.closed or not self._alive(owner.address):
            self._fail(object_id, entry, OwnerDiedError(
                f"object {object_id.hex()} is lost: its only copy was on "
                f"{', '.join(addresses) or 'a node'} and the node that owns it "
                f"({owner.address}) died, and only the owner can make it again"))
            return
        self._reset(object_id, entry)
        owner.send(("lost", object_id, addresses))

    def lose(self, object_id, entry, why):
        """An object we own is lost: start making it again, or fail it."""
        reason = self._reconstruct(object_id, entry)
        if reason is not None:
            self._fail(object_id, entry, ObjectLostError(
                f"object {object_id.hex()} is lost: {why}; {reason}"))

    def _fail(self, object_id, entry, exc):
        meta, data = error_object(exc)
        self.objects.set_ready(object_id, ERROR, meta, data)
        self.objects.announce(object_id)

    @staticmethod
    def _reset(object_id, entry):
        """Not ready again: whoever waits for it goes on waiting. A live node
        that kept its copy for us may drop it."""
        entry.ready = False
        entry.kind = None
        entry.data = None
        entry.pin = None
        primary, entry.primary_peer = entry.primary_peer, None
        if primary is not None and not primary.closed:
            primary.send(("free", [object_id]))

    def _reconstruct(self, object_id, entry):
        """Re-run the task that made an object; None once under way, else why not."""
        record = entry.lineage
        if record is None:
            if ids.is_put(object_id):
                return "it was made by minray.put, and a put cannot be made again"
            return "it is not a task result this node can make again (actor calls' " \
                   "results are not reconstructed)"
        if record.released:
            return ("its lineage was released (past MINRAY_MAX_LINEAGE_BYTES, "
                    f"{self.max_bytes} bytes)")
        spec = record.spec
        if spec.task_id in self.tasks.tasks:
            self._reset(object_id, entry)             # being made again already
            return None
        if record.attempts_left <= 0:
            return (f"its task {spec.name} was already re-run {spec.max_retries} times to "
                    "make lost objects again (max_retries)")
        reason = self._recover_args(spec)
        if reason is not None:
            return reason
        record.attempts_left -= 1
        self.reconstructions += 1
        log.warning("reconstructing %s: re-running its task %s (%d re-runs left)",
                    object_id.hex(), spec.name, record.attempts_left)
        self._reset(object_id, entry)
        owner = entry.owner if entry.owner is not None and not entry.owner.closed else None
        self.tasks.resubmit(spec, owner)
        return None

    def _recover_args(self, spec):
        """Arguments of a task about to be re-run that were freed: make them
        again first (their entries wait for the new values). Why not, if one
        cannot be."""
        entries = self.objects.entries
        for arg in spec.args:
            if arg[0] != "r" or arg[1] in entries:
                continue
            object_id = arg[1]
            record = None if ids.is_put(object_id) else \
                self.records.get(object_id[:ids.TASK_ID_SIZE])
            if record is None:
                what = "made by minray.put" if ids.is_put(object_id) else \
                    "not owned here or its lineage was released"
                return (f"its task {spec.name} needs argument {object_id.hex()}, which was "
                        f"freed and cannot be made again ({what})")
            entry = entries[object_id] = ObjectEntry()
            entry.owner_released = True        # held by the task that takes it
            entry.lineage = record
            record.refs += 1
            reason = self._reconstruct(object_id, entry)
            if reason is not None:
                del entries[object_id]
                self.release(record)
                return f"argument {object_id.hex()} cannot be made again: {reason}"
        return None
