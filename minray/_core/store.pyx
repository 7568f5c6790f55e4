# cython: language_level=3
"""The node's shared-memory object store: arena, object table and pins.

One file in /dev/shm per node holds a header, a fixed-size object table, a
hash index over object ids and the data area (layout.pxd).  Every process of
the node maps it once and operates on it directly under one process-shared
robust mutex, so a put or get costs no message to another process.  This
module holds the handle, the operations and the pins; the object table (hash
index, LRU list, free entries, eviction) is table.pyx and the data area's
allocator is allocator.pyx.

Pins: a process that reads an object holds a pin until every view of it is
gone.  Pins are recorded as one bit per attached process (client slot) in the
object's pin mask, with a per-process count kept locally, so the pins of a
process that dies can be dropped by clearing its bit (reap_dead_clients).
Unpinned sealed objects sit in an LRU list and are evicted when space runs out.

Primary pins: a task result or a put is sealed with primary=True, which
leaves it pinned on behalf of the node manager from the moment it is sealed,
so it can never be evicted before the node manager hears of it.  The node
manager takes that pin over with adopt_primary(); when a writer dies before
telling it, release_primaries_of(pid) drops the pins the writer left.

Every critical section below is plain C (no Python objects are created while
the lock is held), so a garbage collection or a signal handler that releases
a pin can never run inside one and deadlock on the non-recursive lock.
Values gathered under the lock become Python objects after unlocking.
"""
import os
import weakref

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport getpid

from minray._core.allocator cimport (
    alloc_block, alloc_init, block_payload_capacity, check_and_rebuild, largest_free_block,
    max_payload,
)
from minray._core.layout cimport (
    ALIGNMENT, DAMAGE_BAD_FIELD, DAMAGE_REPAIR_FAILED, DEFAULT_MAX_CLIENTS, ENTRY_CREATED,
    ENTRY_DELETING, ENTRY_FREE, ENTRY_SEALED, ID_SIZE, MAX_CLIENTS_LIMIT, MAX_METADATA,
    NO_ENTRY, PRIMARY_PIN, ClientSlot, ObjectEntry, PTHREAD_MUTEX_ROBUST,
    PTHREAD_PROCESS_SHARED, StoreHeader, pthread_mutex_consistent, pthread_mutex_init,
    pthread_mutex_lock, pthread_mutex_trylock, pthread_mutex_unlock,
    pthread_mutexattr_destroy, pthread_mutexattr_init, pthread_mutexattr_setpshared,
    pthread_mutexattr_setrobust, pthread_mutexattr_t,
)
from minray._core.table cimport (
    Table, entries_in_use_bound, entry_pinned, entry_sound, evict_one, find_entry,
    free_entry, index_insert, index_remove, lru_push, lru_unlink, pin_add, pin_mask,
    pin_remove, rebuild_table, return_entry, take_entry,
)

from minray.exceptions import (
    ObjectExistsError, ObjectNotFoundError, ObjectStoreError, ObjectStoreFullError,
    StoreAttachError,
)

cdef extern from "<errno.h>":
    enum:
        EBUSY
        EOWNERDEAD

cdef extern from *:
    """
    #include <sys/mman.h>
    #ifndef MADV_POPULATE_WRITE
    #define MADV_POPULATE_WRITE 23
    #endif
    static inline void minray_prefault(uint8_t* p, size_t n) {
        /* Map a large new object's pages in one call instead of one page
           fault per 4 KB during the copy; ignored where unsupported. */
        uintptr_t start = (uintptr_t)p & ~(uintptr_t)4095;
        uintptr_t end = ((uintptr_t)p + n + 4095) & ~(uintptr_t)4095;
        madvise((void*)start, end - start, MADV_POPULATE_WRITE);
    }
    """
    void prefault "minray_prefault"(uint8_t* p, size_t n) nogil

# New objects at least this big get their pages mapped before being written.
PREFAULT_BYTES = 1 << 22

cdef const char* DEF_MAGIC = b"MINRAYOS"
STORE_VERSION = 2
OBJECT_ID_SIZE = ID_SIZE
SHM_DIR = "/dev/shm"
_PAGE = 4096
_MIN_CAPACITY = 1 << 16

# How many processes may attach to a store at once (workers, actors, drivers
# and the node manager): set when the store is created, from the argument or
# this environment variable, rounded up to a multiple of 64.  Each 64 clients
# cost 8 bytes per object-table entry (the pin masks) and 1 KB of header.
MAX_CLIENTS_ENV = "MINRAY_OBJECT_STORE_MAX_CLIENTS"

# Result codes of the locked C operations, mapped to exceptions by _raise().
cdef enum:
    OK = 0
    ERR_NOT_FOUND = 1
    ERR_EXISTS = 2
    ERR_NOT_SEALED = 3
    ERR_ALREADY_SEALED = 4
    ERR_NOT_CREATOR = 5
    ERR_FULL_PINNED = 6
    ERR_TABLE_FULL = 7
    ERR_TOO_BIG = 8
    ERR_BEING_CREATED = 9
    ERR_DAMAGED = 10

_live_stores = weakref.WeakSet()


def _mark_forked():
    # A forked child shares the parent's mapping but not its client slot:
    # it must not release the parent's pins or act in its name.
    for store in list(_live_stores):
        (<SharedStore>store).forked = True


os.register_at_fork(after_in_child=_mark_forked)


cdef inline uint64_t round_up(uint64_t n, uint64_t to) noexcept nogil:
    return (n + to - 1) // to * to


cdef uint64_t layout_checksum(StoreHeader* h) noexcept nogil:
    # FNV-1a over the immutable layout fields that precede the checksum.
    cdef uint8_t* p = <uint8_t*>h
    cdef uint64_t n = <uint8_t*>&h.layout_checksum - p
    cdef uint64_t acc = 1469598103934665603ULL
    cdef uint64_t i
    for i in range(n):
        acc = (acc ^ p[i]) * 1099511628211ULL
    return acc


def _process_start_time(int pid):
    """Start time of a process (clock ticks since boot), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):     # zombie or dead: no longer holds pins
        return None
    return int(fields[19])


def _requested_max_clients(max_clients):
    """The client-table size to create a store with, checked and rounded up."""
    source = "max_clients"
    if max_clients is None:
        value = os.environ.get(MAX_CLIENTS_ENV)
        if value is None:
            return DEFAULT_MAX_CLIENTS
        source = MAX_CLIENTS_ENV
        try:
            max_clients = int(value)
        except ValueError:
            raise ValueError(
                f"{MAX_CLIENTS_ENV}={value!r} is not a number: set it to how many processes "
                f"may attach to a node's object store (default {DEFAULT_MAX_CLIENTS})") from None
    if not isinstance(max_clients, int) or isinstance(max_clients, bool) \
            or not 1 <= max_clients <= MAX_CLIENTS_LIMIT:
        raise ValueError(
            f"{source} must be an int in [1, {MAX_CLIENTS_LIMIT}], got {max_clients!r}")
    return round_up(max_clients, 64)


cdef class _Mapping:
    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL


cdef class ArenaView:
    def __getbuffer__(self, Py_buffer* view, int flags):
        if self.readonly and (flags & PyBUF_WRITABLE):
            raise BufferError("this buffer is read-only")
        PyBuffer_FillInfo(view, self, self.ptr, self.size, self.readonly, flags)

    def __len__(self):
        return self.size


cdef class PinnedBuffer:
    """Read-only, zero-copy buffer of a sealed object, holding a pin on it.

    The pin is released when this object is collected; numpy arrays, Arrow
    buffers and memoryviews made from it keep it alive through their base
    references, so the object cannot be evicted or freed while any view of it
    exists.  release() drops the pin early when no view is left.
    """

    def __getbuffer__(self, Py_buffer* view, int flags):
        if self.released:
            raise ObjectStoreError(
                f"the pin on object {self.object_id.hex()} was released; get it again")
        if flags & PyBUF_WRITABLE:
            raise BufferError("objects in the store are immutable after seal")
        PyBuffer_FillInfo(view, self, self.ptr, self.size, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* view):
        self.exports -= 1

    def __len__(self):
        return self.size

    @property
    def address(self):
        """Address of the first data byte in this process (for tests/tools)."""
        return <size_t>self.ptr

    def release(self):
        """Release the pin now instead of at garbage collection."""
        if self.released:
            raise ObjectStoreError(f"object {self.object_id.hex()} was already released")
        if self.exports:
            raise ObjectStoreError(
                f"cannot release object {self.object_id.hex()}: {self.exports} view(s) "
                "of it are still alive; delete them first")
        self.released = True
        self.store._unpin(self.index)

    def __dealloc__(self):
        if not self.released and self.store is not None:
            self.released = True
            self.store._unpin(self.index)


cdef class SharedStore:
    """A process's handle on the node's shared-memory object store."""

    def __init__(self):
        raise TypeError("use SharedStore.create(name, capacity) or SharedStore.attach(name)")

    # ------------------------------------------------------------ lifecycle
    @staticmethod
    def path_for(str name):
        if not name or len(name) > 120 or any(not (c.isalnum() or c in "-_.") for c in name):
            raise ValueError(
                f"store name {name!r} is invalid: use 1-120 letters, digits, '-', '_' or '.'")
        return os.path.join(SHM_DIR, name)

    @staticmethod
    def create(str name, capacity, max_objects=None, max_clients=None):
        """Create the arena file /dev/shm/<name> with `capacity` data bytes.

        max_clients: how many processes may attach at once (default
        MINRAY_OBJECT_STORE_MAX_CLIENTS from the environment, else 1024;
        rounded up to a multiple of 64).  The creating handle owns the file
        and unlinks it at close().
        """
        path = SharedStore.path_for(name)
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int number of bytes, got {type(capacity).__name__}")
        if capacity < _MIN_CAPACITY:
            raise ValueError(f"capacity {capacity} is too small: the store needs at least {_MIN_CAPACITY} bytes")
        clients = _requested_max_clients(max_clients)
        st = os.statvfs(SHM_DIR)
        shm_free = st.f_bavail * st.f_frsize
        if max_objects is None:
            max_objects = min(max(capacity // 8192, 1024), 1 << 20)
        if not isinstance(max_objects, int) or not 1 <= max_objects <= (1 << 24):
            raise ValueError(f"max_objects must be an int in [1, 2**24], got {max_objects!r}")
        index_slots = 1
        while index_slots < 2 * max_objects:
            index_slots <<= 1
        header_size = round_up(sizeof(StoreHeader), _PAGE)
        clients_offset = header_size
        entries_offset = round_up(clients_offset + clients * sizeof(ClientSlot), _PAGE)
        pins_offset = round_up(entries_offset + max_objects * sizeof(ObjectEntry), _PAGE)
        index_offset = round_up(pins_offset + max_objects * (clients // 8), _PAGE)
        data_offset = round_up(index_offset + index_slots * 4, _PAGE)
        data_size = round_up(capacity, _PAGE)
        file_size = data_offset + data_size
        if file_size > shm_free:
            raise ObjectStoreFullError(
                f"cannot create an object store of {capacity} bytes: {SHM_DIR} has only "
                f"{shm_free} bytes free; pass a smaller object_store_memory")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, file_size)
            store = SharedStore._map(name, fd, file_size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        store.owner = True
        store._init_layout(name, header_size, clients_offset, entries_offset, pins_offset,
                           index_offset, data_offset, data_size, max_objects, index_slots,
                           clients)
        store._attach_client()
        return store

    @staticmethod
    def attach(str name):
        """Attach to an existing arena (created by this node's manager)."""
        path = SharedStore.path_for(name)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise StoreAttachError(f"no object store at {path}: is the node running?") from None
        try:
            file_size = os.fstat(fd).st_size
            if file_size < round_up(sizeof(StoreHeader), _PAGE):
                raise StoreAttachError(
                    f"{path} is not a minray object store: only {file_size} bytes long")
            store = SharedStore._map(name, fd, file_size)
        finally:
            os.close(fd)
        store._validate(path, file_size)
        store._attach_client()
        return store

    @staticmethod
    cdef SharedStore _map(str name, int fd, size_t size):
        cdef void* p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(f"mmap of object store {name} ({size} bytes) failed")
        cdef SharedStore store = SharedStore.__new__(SharedStore)
        store.mapping = _Mapping.__new__(_Mapping)
        store.mapping.base = <uint8_t*>p
        store.mapping.size = size
        store.h = <StoreHeader*>p
        store.name = name
        store.slot = -1
        store.pid = getpid()
        store.writers = {}
        return store

    cdef _set_views(self):
        # Called once the layout is known to be sound: from here on, bounds
        # come from these private copies, never again from the shared header.
        cdef uint8_t* base = self.mapping.base
        self.clients = <ClientSlot*>(base + self.h.clients_offset)
        self.entries = <ObjectEntry*>(base + self.h.entries_offset)
        self.data = base + self.h.data_offset
        self.table.h = self.h
        self.table.entries = self.entries
        self.table.pins = <uint64_t*>(base + self.h.pins_offset)
        self.table.index = <uint32_t*>(base + self.h.index_offset)
        self.table.index_mask = self.h.index_slots - 1
        self.table.data = self.data
        self.table.data_size = self.h.data_size
        self.table.max_objects = self.h.max_objects
        self.table.max_clients = self.h.max_clients
        self.table.pin_words = self.h.pin_words
        self.local_pins = <uint32_t*>calloc(self.h.max_objects, sizeof(uint32_t))
        if self.local_pins == NULL:
            raise MemoryError()

    cdef _init_layout(self, str name, uint64_t header_size, uint64_t clients_offset,
                      uint64_t entries_offset, uint64_t pins_offset, uint64_t index_offset,
                      uint64_t data_offset, uint64_t data_size, uint32_t max_objects,
                      uint32_t index_slots, uint32_t max_clients):
        cdef StoreHeader* h = self.h
        cdef pthread_mutexattr_t attr
        cdef bytes bname = name.encode()
        memcpy(h.magic, DEF_MAGIC, 8)
        h.version = STORE_VERSION
        h.header_size = header_size
        h.file_size = self.mapping.size
        h.clients_offset = clients_offset
        h.entries_offset = entries_offset
        h.pins_offset = pins_offset
        h.index_offset = index_offset
        h.data_offset = data_offset
        h.data_size = data_size
        h.max_objects = max_objects
        h.index_slots = index_slots
        h.max_clients = max_clients
        h.pin_words = max_clients // 64
        memcpy(h.name, <char*>bname, len(bname))
        h.layout_checksum = layout_checksum(h)
        pthread_mutexattr_init(&attr)
        pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)
        pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)
        pthread_mutex_init(&h.lock, &attr)
        pthread_mutexattr_destroy(&attr)
        h.lru_head = NO_ENTRY
        h.lru_tail = NO_ENTRY
        h.free_entry_head = NO_ENTRY
        h.damaged_entry = NO_ENTRY
        self._set_views()
        alloc_init(&h.alloc, self.data, data_size)

    cdef _validate(self, str path, uint64_t file_size):
        cdef StoreHeader* h = self.h
        if memcmp(h.magic, DEF_MAGIC, 8) != 0:
            raise StoreAttachError(f"{path} is not a minray object store (bad magic)")
        if h.version != STORE_VERSION:
            raise StoreAttachError(
                f"{path} has store format {h.version}, this minray reads {STORE_VERSION}: "
                "restart the node with the same minray version")
        if h.layout_checksum != layout_checksum(h):
            raise StoreAttachError(f"{path} is damaged: its header checksum does not match")
        # Regions in order and inside the file first, so no sum below can wrap.
        if (h.file_size != file_size or h.header_size < sizeof(StoreHeader)
                or h.clients_offset < h.header_size or h.entries_offset < h.clients_offset
                or h.pins_offset < h.entries_offset or h.index_offset < h.pins_offset
                or h.data_offset < h.index_offset or h.data_offset > file_size
                or h.data_size != file_size - h.data_offset
                or h.max_clients == 0 or h.max_clients > MAX_CLIENTS_LIMIT
                or h.max_clients % 64 != 0 or h.pin_words != h.max_clients // 64
                or h.max_objects == 0
                or h.clients_offset + <uint64_t>h.max_clients * sizeof(ClientSlot) > h.entries_offset
                or h.entries_offset + <uint64_t>h.max_objects * sizeof(ObjectEntry) > h.pins_offset
                or h.pins_offset + <uint64_t>h.max_objects * h.pin_words * 8 > h.index_offset
                or h.index_offset + <uint64_t>h.index_slots * 4 > h.data_offset
                or h.index_slots < 2 * <uint64_t>h.max_objects
                or (h.index_slots & (h.index_slots - 1)) != 0
                or h.alloc.area_size != h.data_size):
            raise StoreAttachError(
                f"{path} is damaged: its layout does not match its size ({file_size} bytes)")
        self._set_views()

    cdef _attach_client(self):
        cdef int attempt
        cdef uint32_t max_clients = self.table.max_clients
        cdef int32_t pid = self.pid
        cdef uint64_t start = _process_start_time(pid) or 0
        for attempt in range(2):
            self._lock()
            self.slot = self._claim_slot_locked(pid, start)
            self._unlock()
            if self.slot >= 0:
                _live_stores.add(self)
                return
            self.reap_dead_clients()
        raise StoreAttachError(
            f"object store {self.name} already has {max_clients} processes attached, the "
            f"most it was created for (processes that died were released first): too many "
            f"workers, actors and drivers on this node at once.  Restart the node with more "
            f"client slots, e.g. {MAX_CLIENTS_ENV}={2 * max_clients} in the environment of "
            "the process that starts it (minray.init or the node manager), or run fewer "
            "actors per node")

    cdef int _claim_slot_locked(self, int32_t pid, uint64_t start) noexcept nogil:
        """Take a free client slot for this process; -1 when all are taken."""
        cdef uint32_t i
        for i in range(self.table.max_clients):
            if self.clients[i].pid == 0:
                self.clients[i].pid = pid
                self.clients[i].start_time = start
                self.clients[i].generation += 1
                self.h.num_clients += 1
                return i
        return -1

    def close(self):
        """Detach from the store; the owner also removes the arena file.

        Views still alive keep the mapping (and their pins) until collected.
        """
        if self.closed:
            return
        self.closed = True
        for mv in self.writers.values():
            try:
                mv.release()
            except BufferError:
                pass    # a view of an unsealed write buffer outlives the store
        self.writers.clear()
        if self.owner:
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
        if self.live_pins == 0:
            try:
                self._detach()
            except StoreAttachError:
                pass    # a damaged store has no slot table worth updating

    cdef _detach(self):
        if self.detached or self.slot < 0 or self.forked:
            return
        self.detached = True
        self._lock()
        self._clear_slot(self.slot)
        self._unlock()

    def __dealloc__(self):
        if self.local_pins != NULL:
            free(self.local_pins)
            self.local_pins = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ locking
    cdef inline int _lock(self) except -1:
        cdef int rc = pthread_mutex_trylock(&self.h.lock)
        if rc == 0 and self.h.damaged == 0:
            return 0                        # the common case, kept inline
        return self._lock_contended(rc)

    cdef int _lock_contended(self, int rc) except -1:
        cdef uint32_t damage
        cdef int32_t entry
        if rc == EBUSY:
            with nogil:
                rc = pthread_mutex_lock(&self.h.lock)
        if rc == EOWNERDEAD:
            # A process died inside a critical section: make the lock usable
            # and rebuild what it may have left half-updated.
            pthread_mutex_consistent(&self.h.lock)
            self.h.lock_recoveries += 1
            if self._repair() != 0 and self.h.damaged == 0:
                self.h.damaged = DAMAGE_REPAIR_FAILED
        elif rc != 0:
            raise OSError(rc, "locking the object store failed")
        if self.h.damaged:
            damage = self.h.damaged
            entry = self.h.damaged_entry
            pthread_mutex_unlock(&self.h.lock)
            self._raise_damaged(damage, entry)
        return 0

    cdef inline void _unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.h.lock)

    cdef inline int _unlock_checked(self) except -1:
        cdef uint32_t damage = self.h.damaged
        cdef int32_t entry = self.h.damaged_entry
        pthread_mutex_unlock(&self.h.lock)
        if damage:
            self._raise_damaged(damage, entry)
        return 0

    cdef int _raise_damaged(self, uint32_t damage, int32_t entry) except -1:
        if damage == DAMAGE_BAD_FIELD:
            where = f"entry {entry} of its object table" if entry != NO_ENTRY else "its hash index"
            why = (f"{where} holds an out-of-range value (an offset, size, index or link): "
                   "a process wrote over shared memory it does not own")
        else:
            why = "a process died while updating it and the repair afterwards failed"
        raise StoreAttachError(
            f"object store {self.name} is damaged: {why}; nothing more is read from it. "
            "Restart the node")

    cdef int _check_usable(self) except -1:
        if self.closed:
            raise ObjectStoreError(f"object store {self.name} is closed")
        if self.forked:
            raise ObjectStoreError(
                "this store handle was inherited through fork(); attach again in the child")
        return 0

    cdef int _repair(self) noexcept nogil:
        """Rebuild the free lists, hash index and LRU list from the entries."""
        if check_and_rebuild(&self.h.alloc, self.data) != 0:
            return -1
        return rebuild_table(&self.table)

    # ------------------------------------------------------------ pins
    cdef inline void _drop_pin_bit(self, int32_t e, int slot) noexcept nogil:
        cdef ObjectEntry* ent = &self.entries[e]
        pin_remove(&self.table, e, slot)
        if entry_pinned(&self.table, e):
            return
        if ent.state == ENTRY_DELETING:
            free_entry(&self.table, e)
        elif ent.state == ENTRY_SEALED:
            lru_push(&self.table, e)

    cdef void _clear_slot(self, int slot) noexcept nogil:
        """Drop every pin and unsealed object of a client slot, then free it."""
        cdef uint32_t e
        cdef uint32_t bound = entries_in_use_bound(&self.table)
        cdef ObjectEntry* ent
        cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
        cdef int word = slot >> 6
        for e in range(bound):
            ent = &self.entries[e]
            if ent.state == ENTRY_FREE:
                continue
            if ent.pin_holders and pin_mask(&self.table, e)[word] & bit:
                self._drop_pin_bit(e, slot)
            elif ent.state == ENTRY_CREATED and ent.creator_slot == slot:
                index_remove(&self.table, e)
                free_entry(&self.table, e)
        self.clients[slot].pid = 0
        self.h.num_clients -= 1

    # ------------------------------------------------------------ operations
    cdef inline int _create_locked(self, const uint8_t* oid, uint64_t data_size,
                            uint32_t meta_size, int32_t* out) noexcept nogil:
        cdef uint64_t payload = round_up(meta_size, ALIGNMENT) + data_size
        cdef uint64_t block
        cdef int32_t e
        cdef ObjectEntry* ent
        if payload > max_payload(self.table.data_size):
            return ERR_TOO_BIG
        e = find_entry(&self.table, oid)
        if e != NO_ENTRY:
            return ERR_BEING_CREATED if self.entries[e].state == ENTRY_CREATED else ERR_EXISTS
        if self.h.damaged:
            return ERR_DAMAGED
        e = take_entry(&self.table)
        while e == NO_ENTRY:
            if not evict_one(&self.table):
                return ERR_DAMAGED if self.h.damaged else ERR_TABLE_FULL
            e = take_entry(&self.table)
        block = alloc_block(&self.h.alloc, self.data, payload)
        while block == <uint64_t>-1:
            if not evict_one(&self.table):
                return_entry(&self.table, e)
                return ERR_DAMAGED if self.h.damaged else ERR_FULL_PINNED
            block = alloc_block(&self.h.alloc, self.data, payload)
        ent = &self.entries[e]
        memcpy(ent.object_id, oid, ID_SIZE)
        memset(pin_mask(&self.table, e), 0, self.table.pin_words * sizeof(uint64_t))
        ent.flags = 0
        ent.pin_holders = 0
        ent.primary_pid = 0
        ent.creator_slot = self.slot
        ent.metadata_size = meta_size
        ent.block = block
        ent.data_size = data_size
        ent.lru_prev = NO_ENTRY
        ent.lru_next = NO_ENTRY
        ent.state = ENTRY_CREATED
        index_insert(&self.table, e)
        self.h.num_objects += 1
        out[0] = e
        return OK

    cdef object _raise(self, int code, bytes oid, object size=0):
        hid = oid.hex()
        if code == ERR_NOT_FOUND:
            raise ObjectNotFoundError(f"object {hid} is not in object store {self.name}")
        if code == ERR_EXISTS:
            raise ObjectExistsError(f"object {hid} already exists in object store {self.name}")
        if code == ERR_BEING_CREATED:
            raise ObjectExistsError(
                f"object {hid} is already being created by another live process in object "
                f"store {self.name}; only one process may create an id")
        if code == ERR_NOT_SEALED:
            raise ObjectStoreError(f"object {hid} is not sealed yet: it cannot be read until its creator seals it")
        if code == ERR_ALREADY_SEALED:
            raise ObjectStoreError(f"object {hid} is already sealed: objects are immutable after seal")
        if code == ERR_NOT_CREATOR:
            raise ObjectStoreError(f"object {hid} is being created by another process; only its creator may seal or abort it")
        if code == ERR_TOO_BIG:
            raise ObjectStoreFullError(
                f"object {hid} needs {size} bytes but the object store's capacity is "
                f"{max_payload(self.table.data_size)} bytes: it can never fit; start minray "
                "with a larger object_store_memory")
        if code == ERR_TABLE_FULL:
            raise ObjectStoreFullError(
                f"object store {self.name} holds its maximum of {self.table.max_objects} "
                "objects and all of them are in use (pinned); release references or raise "
                "max_objects")
        if code == ERR_FULL_PINNED:
            stats = self.stats()
            raise ObjectStoreFullError(
                f"object {hid} needs {size} bytes but the object store (capacity "
                f"{stats['capacity']} bytes) has only {stats['largest_free']} contiguous bytes "
                f"free and every other object is in use (pinned: {stats['pinned_bytes']} bytes "
                f"in {stats['pinned_objects']} objects); release references to objects "
                "(delete arrays obtained with get) or use a larger object store")
        if code == ERR_DAMAGED:
            self._lock()            # raises: the store is marked damaged
            self._unlock()
        raise ObjectStoreError(f"object store error {code} on {hid}")

    cdef const uint8_t* _id_ptr(self, object oid) except NULL:
        if type(oid) is not bytes or len(<bytes>oid) != ID_SIZE:
            if isinstance(oid, bytes):
                raise ValueError(f"object id must be {ID_SIZE} bytes, got {len(oid)}")
            raise TypeError(f"object id must be bytes, got {type(oid).__name__}")
        return <const uint8_t*><char*>oid

    def create_object(self, bytes object_id, data_size, bytes metadata=b"", bint map_now=True):
        """Allocate an object and return a writable buffer for its data.

        Evicts unpinned objects (least recently used first) when needed. A
        large object's pages are mapped at once (prefault) unless asked not
        to: a writer fed by a socket lets the copy fault them in as the
        bytes arrive, instead of making the sender wait for all of them.
        """
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef int32_t e = NO_ENTRY
        cdef int code
        cdef int attempt
        cdef uint32_t meta_size = len(metadata)
        self._check_usable()
        if not isinstance(data_size, int) or isinstance(data_size, bool):
            raise TypeError(f"data_size must be an int, got {type(data_size).__name__}")
        if data_size < 0:
            raise ValueError(f"data_size must be >= 0, got {data_size}")
        if meta_size > MAX_METADATA:
            raise ValueError(f"metadata is {meta_size} bytes; at most {MAX_METADATA} are allowed")
        if data_size > self.table.data_size:
            self._raise(ERR_TOO_BIG, object_id, data_size)
        for attempt in range(2):
            self._lock()
            code = self._create_locked(oid, data_size, meta_size, &e)
            self._unlock_checked()
            # Out of space, or the id is held by an unfinished object: either
            # may be left by a process that died; release those and retry.
            if attempt or (code != ERR_FULL_PINNED and code != ERR_BEING_CREATED) \
                    or not self.reap_dead_clients():
                break
        if code != OK:
            self._raise(code, object_id, data_size)
        cdef ObjectEntry* ent = &self.entries[e]
        cdef uint8_t* start = self.data + ent.block
        if meta_size:
            memcpy(start, <char*>metadata, meta_size)
        cdef ArenaView view = ArenaView.__new__(ArenaView)
        view.mapping = self.mapping
        view.ptr = start + round_up(meta_size, ALIGNMENT)
        view.size = data_size
        view.readonly = False
        if map_now and data_size >= PREFAULT_BYTES:
            with nogil:
                prefault(view.ptr, view.size)
        mv = memoryview(view)
        self.writers[object_id] = mv
        return mv

    def seal(self, bytes object_id, bint primary=False):
        """Make a created object immutable and readable by every process.

        primary=True (task results and puts) leaves the object pinned on
        behalf of the node manager, so it can never be evicted, until the
        node manager takes that pin over with adopt_primary(), drops it with
        release_primaries_of() or deletes the object.
        """
        cdef const uint8_t* oid = self._id_ptr(object_id)
        self._check_usable()
        mv = self.writers.pop(object_id, None)
        if mv is not None:
            try:
                mv.release()
            except BufferError:
                self.writers[object_id] = mv
                raise ObjectStoreError(
                    f"object {object_id.hex()} cannot be sealed while views of its write "
                    "buffer are alive; delete them first") from None
        self._end_creation(object_id, oid, True, primary)

    def abort(self, bytes object_id):
        """Discard an object that was created but not sealed."""
        cdef const uint8_t* oid = self._id_ptr(object_id)
        self._check_usable()
        mv = self.writers.pop(object_id, None)
        if mv is not None:
            mv.release()
        self._end_creation(object_id, oid, False, False)

    cdef int _end_creation(self, bytes object_id, const uint8_t* oid, bint seal,
                           bint primary) except -1:
        """Seal (or, with seal false, discard) an object this process is creating."""
        cdef int code
        self._lock()
        code = self._end_creation_locked(oid, seal, primary)
        self._unlock_checked()
        if code != OK:
            self._raise(code, object_id)
        return 0

    cdef inline int _end_creation_locked(self, const uint8_t* oid, bint seal,
                                  bint primary) noexcept nogil:
        cdef int32_t e = find_entry(&self.table, oid)
        cdef ObjectEntry* ent
        if e == NO_ENTRY:
            return ERR_NOT_FOUND
        ent = &self.entries[e]
        if ent.state != ENTRY_CREATED:
            return ERR_ALREADY_SEALED
        if ent.creator_slot != self.slot:
            return ERR_NOT_CREATOR
        if seal:
            ent.state = ENTRY_SEALED
            if primary:
                ent.flags |= PRIMARY_PIN
                ent.primary_pid = self.pid
            elif not entry_pinned(&self.table, e):
                lru_push(&self.table, e)
        else:
            index_remove(&self.table, e)
            free_entry(&self.table, e)
        return OK

    def put(self, bytes object_id, data, bytes metadata=b"", bint primary=False):
        """Create, fill and seal an object from a bytes-like value in one call."""
        cdef const unsigned char[::1] src = memoryview(data).cast("B")
        mv = self.create_object(object_id, src.shape[0], metadata)
        if src.shape[0]:
            mv[:] = src
        self.seal(object_id, primary)

    def get(self, bytes object_id):
        """Pin a sealed object and return a read-only zero-copy PinnedBuffer.

        Raises ObjectNotFoundError if the object is not here (never waits).
        """
        return self._pin(object_id, False)

    def adopt_primary(self, bytes object_id):
        """Pin a sealed object like get(), taking over its primary pin.

        The node manager calls this when it learns of a task result or put:
        the pin left at seal (primary=True) becomes this process's own pin,
        held by the returned PinnedBuffer, so the object stays unevictable
        without a gap.  Without a primary pin it is the same as get().
        """
        return self._pin(object_id, True)

    cdef inline PinnedBuffer _pin(self, bytes object_id, bint adopt):
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef Pinned pinned
        cdef int code
        self._check_usable()
        self._lock()
        code = self._pin_locked(oid, adopt, &pinned)
        self._unlock_checked()
        if code != OK:
            self._raise(code, object_id)
        cdef uint8_t* start = self.data + pinned.block
        cdef PinnedBuffer buf = PinnedBuffer.__new__(PinnedBuffer)
        buf.store = self
        buf.index = pinned.entry
        buf.object_id = object_id
        buf.metadata = (<char*>start)[:pinned.metadata_size]
        buf.ptr = start + round_up(pinned.metadata_size, ALIGNMENT)
        buf.size = pinned.data_size
        return buf

    cdef inline int _pin_locked(self, const uint8_t* oid, bint adopt, Pinned* out) noexcept nogil:
        cdef int32_t e = find_entry(&self.table, oid)
        cdef ObjectEntry* ent
        if e == NO_ENTRY:
            return ERR_NOT_FOUND
        if not entry_sound(&self.table, e):
            return ERR_DAMAGED
        ent = &self.entries[e]
        if ent.state != ENTRY_SEALED:
            return ERR_NOT_SEALED
        if self.local_pins[e] == 0:
            if not entry_pinned(&self.table, e):
                lru_unlink(&self.table, e)
                if self.h.damaged:
                    return ERR_DAMAGED
            pin_add(&self.table, e, self.slot)
        self.local_pins[e] += 1
        self.live_pins += 1
        if adopt:
            ent.flags &= ~PRIMARY_PIN
        # Copied under the lock, where entry_sound checked them.
        out.entry = e
        out.block = ent.block
        out.metadata_size = ent.metadata_size
        out.data_size = ent.data_size
        return OK

    cdef int _unpin(self, int32_t e) except -1:
        if self.forked or self.detached:
            return 0
        self._lock()
        self._unpin_locked(e)
        self._unlock()
        self.live_pins -= 1
        if self.closed and self.live_pins == 0:
            self._detach()
        return 0

    cdef inline void _unpin_locked(self, int32_t e) noexcept nogil:
        self.local_pins[e] -= 1
        if self.local_pins[e] == 0:
            self._drop_pin_bit(e, self.slot)

    def hold_primary(self, bytes object_id):
        """Pin an already sealed object for the node manager, as seal(primary=True) does.

        For a writer that finds its object id already sealed (a retried task
        writing the same result again): the existing copy stands in for the
        new one.  Returns False, changing nothing, if no sealed object has
        this id.
        """
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef bint held
        self._check_usable()
        self._lock()
        held = self._hold_primary_locked(oid)
        self._unlock_checked()
        return held

    cdef inline bint _hold_primary_locked(self, const uint8_t* oid) noexcept nogil:
        cdef int32_t e = find_entry(&self.table, oid)
        cdef ObjectEntry* ent
        if e == NO_ENTRY:
            return False
        ent = &self.entries[e]
        if ent.state != ENTRY_SEALED:
            return False
        if not entry_pinned(&self.table, e):
            lru_unlink(&self.table, e)
        ent.flags |= PRIMARY_PIN
        ent.primary_pid = self.pid
        return True

    def release_primaries_of(self, int pid):
        """Drop the primary pins that process `pid` left and nobody adopted.

        The node manager calls this when a worker died: results and puts it
        sealed but never reported become ordinary, evictable objects (a
        retried task finds and reuses them).  Returns how many were dropped
        (0 once this handle is closed: a node shutting down has nothing left
        to release).
        """
        cdef uint64_t dropped
        if self.closed:
            return 0
        self._check_usable()
        self._lock()
        dropped = self._release_primaries_locked(pid)
        self._unlock_checked()
        return dropped

    cdef uint64_t _release_primaries_locked(self, int32_t pid) noexcept nogil:
        cdef uint32_t e
        cdef uint64_t dropped = 0
        cdef ObjectEntry* ent
        for e in range(entries_in_use_bound(&self.table)):
            ent = &self.entries[e]
            if ent.state == ENTRY_SEALED and (ent.flags & PRIMARY_PIN) and ent.primary_pid == pid:
                ent.flags &= ~PRIMARY_PIN
                dropped += 1
                if not entry_pinned(&self.table, e):
                    lru_push(&self.table, e)
        return dropped

    def pinned_only_here(self, bytes object_id):
        """True if this process holds the object's only pin, and only once:
        no other process reads it (what a node manager may spill to disk)."""
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef int32_t e
        cdef bint only
        self._check_usable()
        self._lock()
        e = find_entry(&self.table, oid)
        only = (e != NO_ENTRY and self.entries[e].state == ENTRY_SEALED
                and self.entries[e].pin_holders == 1 and self.local_pins[e] == 1
                and not (self.entries[e].flags & PRIMARY_PIN))
        self._unlock_checked()
        return only

    def contains(self, bytes object_id):
        """True if a sealed object with this id is in the store."""
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef bint found
        self._check_usable()
        self._lock()
        found = self._contains_locked(oid)
        self._unlock_checked()
        return found

    cdef inline bint _contains_locked(self, const uint8_t* oid) noexcept nogil:
        cdef int32_t e = find_entry(&self.table, oid)
        return e != NO_ENTRY and self.entries[e].state == ENTRY_SEALED

    def delete(self, bytes object_id):
        """Delete a sealed object (dropping its primary pin, if it has one);
        its memory is freed once no process pins it."""
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef int code
        self._check_usable()
        self._lock()
        code = self._delete_locked(oid)
        self._unlock_checked()
        if code == ERR_NOT_SEALED:
            raise ObjectStoreError(
                f"object {object_id.hex()} is still being created; its creator aborts it with abort()")
        if code != OK:
            self._raise(code, object_id)

    cdef inline int _delete_locked(self, const uint8_t* oid) noexcept nogil:
        cdef int32_t e = find_entry(&self.table, oid)
        cdef bint listed
        cdef ObjectEntry* ent
        if e == NO_ENTRY:
            return ERR_NOT_FOUND
        if not entry_sound(&self.table, e):
            return ERR_DAMAGED
        ent = &self.entries[e]
        if ent.state == ENTRY_CREATED:
            return ERR_NOT_SEALED
        listed = not entry_pinned(&self.table, e)     # in the LRU list
        ent.flags &= ~PRIMARY_PIN
        index_remove(&self.table, e)
        if entry_pinned(&self.table, e):
            ent.state = ENTRY_DELETING
            return OK
        if listed:
            lru_unlink(&self.table, e)
        free_entry(&self.table, e)
        return OK

    # ------------------------------------------------------------ maintenance
    def reap_dead_clients(self):
        """Release the pins and unsealed objects of processes that died.

        Returns how many dead processes were cleaned up.  Primary pins are
        not released here (release_primaries_of does that): a worker may exit
        right after reporting a result the node manager has not adopted yet.
        """
        cdef uint32_t i, n
        cdef ClientSeen* seen
        cdef ClientSeen* c
        cdef int reaped = 0
        self._check_usable()
        seen = <ClientSeen*>malloc(self.table.max_clients * sizeof(ClientSeen))
        if seen == NULL:
            raise MemoryError()
        try:
            self._lock()
            n = self._list_clients_locked(seen)
            self._unlock()
            for i in range(n):
                c = &seen[i]
                now = _process_start_time(c.pid)
                if now is not None and not (c.start_time and now != c.start_time):
                    continue                        # alive
                self._lock()
                reaped += self._reap_slot_locked(c)
                self._unlock_checked()
        finally:
            free(seen)
        return reaped

    cdef uint32_t _list_clients_locked(self, ClientSeen* seen) noexcept nogil:
        """Copy every other attached client's slot into seen; return how many."""
        cdef uint32_t i, n = 0
        for i in range(self.table.max_clients):
            if self.clients[i].pid != 0 and <int>i != self.slot:
                seen[n].slot = i
                seen[n].pid = self.clients[i].pid
                seen[n].generation = self.clients[i].generation
                seen[n].start_time = self.clients[i].start_time
                n += 1
        return n

    cdef int _reap_slot_locked(self, ClientSeen* c) noexcept nogil:
        """Clear a dead client's slot unless it was reused meanwhile; 1 if cleared."""
        if self.clients[c.slot].pid == 0 or self.clients[c.slot].generation != c.generation:
            return 0
        self._clear_slot(c.slot)
        return 1

    def stats(self):
        """Counters of the whole store (all processes), as a dict."""
        cdef StoreCounts counts
        self._check_usable()
        self._lock()
        self._count_locked(&counts)
        self._unlock_checked()
        return {
            "capacity": max_payload(self.table.data_size),
            "free": counts.free_bytes,
            "used": self.table.data_size - counts.free_bytes,
            "largest_free": counts.largest_free,
            "free_blocks": counts.free_blocks,
            "num_objects": counts.num_objects,
            "max_objects": self.table.max_objects,
            "pinned_objects": counts.pinned_objects,
            "pinned_bytes": counts.pinned_bytes,
            "primary_pinned_objects": counts.primary_objects,
            "evictions": counts.evictions,
            "evicted_bytes": counts.evicted_bytes,
            "num_clients": counts.num_clients,
            "max_clients": self.table.max_clients,
            "lock_recoveries": counts.lock_recoveries,
        }

    cdef void _count_locked(self, StoreCounts* out) noexcept nogil:
        cdef uint32_t e
        cdef ObjectEntry* ent
        memset(out, 0, sizeof(StoreCounts))
        for e in range(entries_in_use_bound(&self.table)):
            ent = &self.entries[e]
            if ent.state != ENTRY_FREE and entry_pinned(&self.table, e):
                out.pinned_objects += 1
                out.pinned_bytes += ent.data_size
                if ent.flags & PRIMARY_PIN:
                    out.primary_objects += 1
        out.largest_free = largest_free_block(&self.h.alloc, self.data)
        out.free_bytes = self.h.alloc.free_bytes
        out.free_blocks = self.h.alloc.free_blocks
        out.num_objects = self.h.num_objects
        out.num_clients = self.h.num_clients
        out.evictions = self.h.evictions
        out.evicted_bytes = self.h.evicted_bytes
        out.lock_recoveries = self.h.lock_recoveries

    def lru_order(self):
        """Ids of evictable objects, least recently used first (for tests)."""
        cdef uint32_t n
        cdef uint8_t* ids = <uint8_t*>malloc(<size_t>self.table.max_objects * ID_SIZE)
        if ids == NULL:
            raise MemoryError()
        try:
            self._check_usable()
            self._lock()
            n = self._lru_ids_locked(ids)
            self._unlock()
            return [(<char*>ids)[i * ID_SIZE:(i + 1) * ID_SIZE] for i in range(n)]
        finally:
            free(ids)

    cdef uint32_t _lru_ids_locked(self, uint8_t* ids) noexcept nogil:
        cdef int32_t e = self.h.lru_head
        cdef uint32_t n = 0, limit = self.table.max_objects
        while e != NO_ENTRY and n < limit and e >= 0 and <uint32_t>e < limit:
            memcpy(ids + <size_t>n * ID_SIZE, self.entries[e].object_id, ID_SIZE)
            n += 1
            e = self.entries[e].lru_next
        return n

    def layout(self):
        """Offsets of the arena's regions within the file (for tools and tests)."""
        return {
            "file_size": self.h.file_size, "clients_offset": self.h.clients_offset,
            "entries_offset": self.h.entries_offset, "pins_offset": self.h.pins_offset,
            "index_offset": self.h.index_offset, "data_offset": self.h.data_offset,
            "data_size": self.h.data_size, "max_objects": self.h.max_objects,
            "max_clients": self.h.max_clients, "entry_size": sizeof(ObjectEntry),
        }

    def _lock_and_abandon(self):
        """Take the store lock and never release it (tests of crash recovery)."""
        self._lock()

    @property
    def capacity(self):
        return max_payload(self.table.data_size)

    @property
    def max_clients(self):
        return self.table.max_clients

    @property
    def path(self):
        return os.path.join(SHM_DIR, self.name)

    def block_capacity(self, bytes object_id):
        """Bytes reserved for an object's block (metadata padding included)."""
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef uint64_t cap = 0
        cdef int code
        self._lock()
        code = self._block_capacity_locked(oid, &cap)
        self._unlock_checked()
        if code != OK:
            self._raise(code, object_id)
        return cap

    cdef int _block_capacity_locked(self, const uint8_t* oid, uint64_t* out) noexcept nogil:
        cdef int32_t e = find_entry(&self.table, oid)
        if e == NO_ENTRY:
            return ERR_NOT_FOUND
        if not entry_sound(&self.table, e):
            return ERR_DAMAGED
        out[0] = block_payload_capacity(self.data, self.entries[e].block)
        return OK
