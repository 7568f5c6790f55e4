"""Spilling: when the store is full of referenced objects, the oldest go to
disk files and come back when they are wanted.

A process whose put or result does not fit asks its node manager to make
room (`make_room`); the node manager writes the oldest objects that only it
pins (no process is reading them; those no queued task takes go first) to
files under the session directory's spill/ folder, frees them from the
store, and answers; the process tries again. Only an object that cannot fit
even with everything spillable gone fails, with ObjectStoreFullError.

A spilled object's entry is SPILLED. Something that wants it here (a process
subscribing, a task taking it as an argument) has it restored first: room is
made the same way, the file read straight into the store, and then it is
announced as any stored value. A worker whose argument was spilled after
its task was sent asks for it back the same way. Another node pulling it is served from the
file (minray.node_manager.transfer asks `file_of`). File writes and reads run
in a thread, so the node manager's loop never waits for the disk.
"""
import asyncio
import logging
import os
import shutil

from minray.exceptions import ObjectExistsError, ObjectStoreFullError
from minray.node_manager.objects import error_object
from minray.protocol import ERROR, IN_STORE, SPILLED

log = logging.getLogger("minray.node_manager")

MIN_SPILL_BYTES = 100 << 20      # free at least this much (or a tenth of the store) per pass
RESTORE_ATTEMPTS = 60            # a restore waits this many times for room ...
RESTORE_RETRY_S = 0.5            # ... this long each (objects in use may be released)


def _write_file(path, data):
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def _read_file(path, into):
    with open(path, "rb") as f:
        read = f.readinto(into)
    if read != len(into):
        raise OSError(f"spill file {path} has {read} bytes, expected {len(into)}")


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Spiller:
    def __init__(self, store, objects, session_dir):
        self.store = store
        self.objects = objects
        self.directory = os.path.join(session_dir, "spill")
        self.files = {}            # object id -> (path, meta, size) of spilled objects
        self.restoring = {}        # object id -> Future of its restore
        self.lock = None           # one spilling pass at a time (made in the loop)
        self.spilled_bytes = self.restored_bytes = 0
        self.spilled_objects = self.restored_objects = 0
        objects.restore = self.restore
        objects.spill_deleted = self.deleted

    def file_of(self, object_id):
        """(path, meta, size) of a spilled object, or None (any thread)."""
        return self.files.get(object_id)

    def stats(self):
        return {"spilled_objects": self.spilled_objects, "spilled_bytes": self.spilled_bytes,
                "restored_objects": self.restored_objects,
                "restored_bytes": self.restored_bytes, "on_disk": len(self.files)}

    # ------------------------------------------------------------ spilling
    async def make_room(self, needed, keep=()):
        """Spill the oldest spillable objects until `needed` contiguous bytes
        are free; whether they are."""
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            # Spilling a batch at once spares the next puts a pass each.
            target = max(needed, min(self.store.capacity // 10, MIN_SPILL_BYTES))
            for object_id, entry in self._candidates(keep):
                if self._free_enough(target):
                    break
                await self._spill(object_id, entry)
            return self._free_enough(needed)

    def _free_enough(self, needed):
        return self.store.stats().get("largest_free", 0) >= needed

    def _candidates(self, keep):
        """Oldest first (entries are kept in the order they were made), those
        no queued task takes first."""
        entries = list(self.objects.entries.items())
        for with_tasks in (False, True):
            for object_id, entry in entries:
                if (entry.task_refs > 0) == with_tasks and object_id not in keep \
                        and self._spillable(object_id, entry):
                    yield object_id, entry

    def _spillable(self, object_id, entry):
        """Stored here, and no process reads it (a task sent to a worker
        whose argument is spilled meanwhile asks for it back)."""
        return (entry.kind == IN_STORE and entry.pin is not None
                and object_id not in self.restoring and self.objects.entries.get(object_id)
                is entry and self.store.pinned_only_here(object_id))

    async def _spill(self, object_id, entry):
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = os.path.join(self.directory, object_id.hex())
        pin = entry.pin
        loop = asyncio.get_running_loop()
        view = memoryview(pin)
        try:
            await loop.run_in_executor(None, _write_file, path, view)
        except OSError as exc:
            log.error("spilling %s to %s failed: %s", object_id.hex(), path, exc)
            _remove(path + ".tmp")
            return
        finally:
            view.release()
        if not self._spillable(object_id, entry):
            _remove(path)                # freed, or read meanwhile: it stays
            return
        self.files[object_id] = (path, entry.meta, entry.size)
        entry.kind = SPILLED
        entry.pin = None
        pin.release()
        try:
            self.store.delete(object_id)
        except KeyError:
            pass
        self.spilled_objects += 1
        self.spilled_bytes += entry.size

    def deleted(self, object_id):
        """A spilled object was freed: its file goes too."""
        found = self.files.pop(object_id, None)
        if found is not None:
            _remove(found[0])

    # ------------------------------------------------------------ restoring
    def restore(self, object_id, entry):
        """Bring a spilled object back into the store, then announce it (once,
        however many want it meanwhile)."""
        if object_id not in self.restoring:
            self.restoring[object_id] = asyncio.ensure_future(self._restore(object_id, entry))

    async def _restore(self, object_id, entry):
        try:
            for attempt in range(RESTORE_ATTEMPTS):
                if not self._current(object_id, entry):
                    return                        # freed, or made again, meanwhile
                outcome = await self._read_back(object_id, entry)
                if outcome != "no room":
                    break
                # The store is full of objects in use right now: they may be
                # released soon (a task ends); the file stays meanwhile.
                await asyncio.sleep(RESTORE_RETRY_S)
            else:
                self._give_up(object_id, entry, ObjectStoreFullError(
                    f"spilled object {object_id.hex()} ({entry.size} bytes) could not be "
                    f"brought back for {RESTORE_ATTEMPTS * RESTORE_RETRY_S:.0f} s: the object "
                    "store is full of objects in use; release references to objects (delete "
                    "arrays obtained with get) or use a larger object store"))
        except Exception as exc:
            log.error("restoring spilled object %s failed: %s", object_id.hex(), exc)
            self._give_up(object_id, entry, exc)
        finally:
            self.restoring.pop(object_id, None)

    def _current(self, object_id, entry):
        return self.objects.entries.get(object_id) is entry and entry.kind == SPILLED

    async def _read_back(self, object_id, entry):
        """One try: "no room", "superseded" (a copy came in some other way:
        its own set_ready announces it), or "restored"."""
        path, meta, size = self.files[object_id]
        if not await self.make_room(size, keep=(object_id,)):
            return "no room"
        if not self._current(object_id, entry):
            return "superseded"
        try:
            buffer = self.store.create_object(object_id, size, meta)
        except ObjectExistsError:
            return "superseded"               # being written by a re-run or a pull
        try:
            await asyncio.get_running_loop().run_in_executor(None, _read_file, path, buffer)
        except BaseException:
            buffer = None
            self.store.abort(object_id)
            raise
        buffer = None
        self.store.seal(object_id, True)
        if not self._current(object_id, entry):
            self.store.delete(object_id)      # freed meanwhile: ours to drop
            return "superseded"
        self.files.pop(object_id, None)
        _remove(path)
        entry.kind = IN_STORE
        entry.pin = self.store.adopt_primary(object_id)
        # Newest now: the last to be spilled again before its reader pins it.
        self.objects.entries[object_id] = self.objects.entries.pop(object_id)
        self.restored_objects += 1
        self.restored_bytes += size
        self.objects.announce(object_id)
        return "restored"

    def _give_up(self, object_id, entry, exc):
        """Whoever waits gets the error, never a hang."""
        if self._current(object_id, entry):
            self.deleted(object_id)
            self.objects.set_ready(object_id, ERROR, *error_object(exc))
            self.objects.announce(object_id)

    def close(self):
        shutil.rmtree(self.directory, ignore_errors=True)

