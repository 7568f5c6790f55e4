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
object's entry, with a per-process count kept locally, so the pins of a
process that dies can be dropped by clearing its bit (reap_dead_clients).
Unpinned sealed objects sit in an LRU list and are evicted when space runs out.

Every critical section below is plain C (no Python objects are created while
the lock is held), so a garbage collection that releases a pin can never run
inside one and deadlock on the non-recursive lock.
"""
import os
import weakref

from cpython.buffer cimport PyBUF_WRITABLE, PyBuffer_FillInfo
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap

from minray._core.allocator cimport (
    alloc_block, alloc_init, block_payload_capacity, check_and_rebuild, largest_free_block,
    max_payload,
)
from minray._core.layout cimport (
    ALIGNMENT, ENTRY_CREATED, ENTRY_DELETING, ENTRY_FREE, ENTRY_SEALED, ID_SIZE,
    MAX_CLIENTS, MAX_METADATA, NO_ENTRY, ClientSlot, ObjectEntry,
    PTHREAD_MUTEX_ROBUST, PTHREAD_PROCESS_SHARED, StoreHeader, pthread_mutex_consistent,
    pthread_mutex_init, pthread_mutex_lock, pthread_mutex_trylock, pthread_mutex_unlock,
    pthread_mutexattr_destroy, pthread_mutexattr_init, pthread_mutexattr_setpshared,
    pthread_mutexattr_setrobust, pthread_mutexattr_t,
)
from minray._core.table cimport (
    Table, entry_pinned, evict_one, find_entry, free_entry, index_insert, index_remove,
    lru_push, lru_unlink, rebuild_table, return_entry, take_entry,
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
STORE_VERSION = 1
OBJECT_ID_SIZE = ID_SIZE
SHM_DIR = "/dev/shm"
_PAGE = 4096
_MIN_CAPACITY = 1 << 16

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


cdef class _Mapping:
    """Owns the mmap of an arena; views keep it alive until they are gone."""
    cdef uint8_t* base
    cdef size_t size

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL


cdef class ArenaView:
    """A buffer over part of the arena (the writable buffer of a new object)."""
    cdef _Mapping mapping
    cdef uint8_t* ptr
    cdef Py_ssize_t size
    cdef bint readonly

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
    cdef SharedStore store
    cdef int32_t index
    cdef uint8_t* ptr
    cdef Py_ssize_t size
    cdef int exports
    cdef bint released
    cdef readonly bytes metadata
    cdef readonly bytes object_id

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
    cdef StoreHeader* h
    cdef ObjectEntry* entries
    cdef uint8_t* data
    cdef Table table              # h, entries and data again, plus the hash index
    cdef _Mapping mapping
    cdef uint32_t* local_pins
    cdef readonly int slot
    cdef readonly str name
    cdef readonly bint owner
    cdef public bint forked
    cdef bint closed
    cdef bint detached
    cdef uint64_t live_pins
    cdef dict writers
    cdef object __weakref__

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
    def create(str name, capacity, max_objects=None):
        """Create the arena file /dev/shm/<name> with `capacity` data bytes.

        The creating handle owns the file and unlinks it at close().
        """
        path = SharedStore.path_for(name)
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int number of bytes, got {type(capacity).__name__}")
        if capacity < _MIN_CAPACITY:
            raise ValueError(f"capacity {capacity} is too small: the store needs at least {_MIN_CAPACITY} bytes")
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
        entries_offset = header_size
        index_offset = round_up(entries_offset + max_objects * sizeof(ObjectEntry), _PAGE)
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
        store._init_layout(name, header_size, entries_offset, index_offset, data_offset,
                           data_size, max_objects, index_slots)
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
        store.writers = {}
        return store

    cdef _set_views(self):
        cdef uint8_t* base = self.mapping.base
        self.entries = <ObjectEntry*>(base + self.h.entries_offset)
        self.data = base + self.h.data_offset
        self.table.h = self.h
        self.table.entries = self.entries
        self.table.index = <uint32_t*>(base + self.h.index_offset)
        self.table.index_mask = self.h.index_slots - 1
        self.table.data = self.data
        self.local_pins = <uint32_t*>calloc(self.h.max_objects, sizeof(uint32_t))
        if self.local_pins == NULL:
            raise MemoryError()

    cdef _init_layout(self, str name, uint64_t header_size, uint64_t entries_offset,
                      uint64_t index_offset, uint64_t data_offset, uint64_t data_size,
                      uint32_t max_objects, uint32_t index_slots):
        cdef StoreHeader* h = self.h
        cdef pthread_mutexattr_t attr
        cdef bytes bname = name.encode()
        memcpy(h.magic, DEF_MAGIC, 8)
        h.version = STORE_VERSION
        h.header_size = header_size
        h.file_size = self.mapping.size
        h.entries_offset = entries_offset
        h.index_offset = index_offset
        h.data_offset = data_offset
        h.data_size = data_size
        h.max_objects = max_objects
        h.index_slots = index_slots
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
        if (h.file_size != file_size or h.data_offset + h.data_size != file_size
                or h.entries_offset + <uint64_t>h.max_objects * sizeof(ObjectEntry) > h.index_offset
                or h.index_offset + <uint64_t>h.index_slots * 4 > h.data_offset
                or h.index_slots < 2 * <uint64_t>h.max_objects
                or (h.index_slots & (h.index_slots - 1)) != 0):
            raise StoreAttachError(
                f"{path} is damaged: its layout does not match its size ({file_size} bytes)")
        self._set_views()

    cdef _attach_client(self):
        start = _process_start_time(os.getpid())
        for attempt in range(2):
            self._lock()
            for i in range(MAX_CLIENTS):
                if self.h.clients[i].pid == 0:
                    self.h.clients[i].pid = os.getpid()
                    self.h.clients[i].start_time = start or 0
                    self.h.clients[i].generation += 1
                    self.h.num_clients += 1
                    self.slot = i
                    break
            self._unlock()
            if self.slot >= 0:
                _live_stores.add(self)
                return
            self.reap_dead_clients()
        raise StoreAttachError(
            f"object store {self.name} already has {MAX_CLIENTS} attached processes")

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
    cdef int _lock(self) except -1:
        cdef int rc = pthread_mutex_trylock(&self.h.lock)
        if rc == EBUSY:
            with nogil:
                rc = pthread_mutex_lock(&self.h.lock)
        if rc == EOWNERDEAD:
            # A process died inside a critical section: make the lock usable
            # and rebuild what it may have left half-updated.
            pthread_mutex_consistent(&self.h.lock)
            self.h.lock_recoveries += 1
            if self._repair() != 0:
                self.h.damaged = 1
        elif rc != 0:
            raise OSError(rc, "locking the object store failed")
        if self.h.damaged:
            pthread_mutex_unlock(&self.h.lock)
            raise StoreAttachError(
                f"object store {self.name} was damaged by a process that died while "
                "updating it; restart the node")
        return 0

    cdef inline void _unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.h.lock)

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
    cdef void _drop_pin_bit(self, int32_t e, int slot) noexcept nogil:
        cdef ObjectEntry* ent = &self.entries[e]
        ent.pins[slot >> 6] &= ~((<uint64_t>1) << (slot & 63))
        if entry_pinned(ent):
            return
        if ent.state == ENTRY_DELETING:
            free_entry(&self.table, e)
        elif ent.state == ENTRY_SEALED:
            lru_push(&self.table, e)

    cdef void _clear_slot(self, int slot) noexcept nogil:
        """Drop every pin and unsealed object of a client slot, then free it."""
        cdef uint32_t e
        cdef ObjectEntry* ent
        for e in range(self.h.entries_high_water):
            ent = &self.entries[e]
            if ent.state == ENTRY_FREE:
                continue
            if ent.pins[slot >> 6] & ((<uint64_t>1) << (slot & 63)):
                self._drop_pin_bit(e, slot)
            elif ent.state == ENTRY_CREATED and ent.creator_slot == slot:
                index_remove(&self.table, e)
                free_entry(&self.table, e)
        self.h.clients[slot].pid = 0
        self.h.num_clients -= 1

    # ------------------------------------------------------------ operations
    cdef int _create_locked(self, const uint8_t* oid, uint64_t data_size,
                            uint32_t meta_size, int32_t* out) noexcept nogil:
        cdef uint64_t payload = round_up(meta_size, ALIGNMENT) + data_size
        cdef uint64_t block
        cdef int32_t e
        cdef ObjectEntry* ent
        if payload > max_payload(self.h.data_size):
            return ERR_TOO_BIG
        if find_entry(&self.table, oid) != NO_ENTRY:
            return ERR_EXISTS
        e = take_entry(&self.table)
        while e == NO_ENTRY:
            if not evict_one(&self.table):
                return ERR_TABLE_FULL
            e = take_entry(&self.table)
        block = alloc_block(&self.h.alloc, self.data, payload)
        while block == <uint64_t>-1:
            if not evict_one(&self.table):
                return_entry(&self.table, e)
                return ERR_FULL_PINNED
            block = alloc_block(&self.h.alloc, self.data, payload)
        ent = &self.entries[e]
        memcpy(ent.object_id, oid, ID_SIZE)
        memset(ent.pins, 0, sizeof(ent.pins))
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
        if code == ERR_NOT_SEALED:
            raise ObjectStoreError(f"object {hid} is not sealed yet: it cannot be read until its creator seals it")
        if code == ERR_ALREADY_SEALED:
            raise ObjectStoreError(f"object {hid} is already sealed: objects are immutable after seal")
        if code == ERR_NOT_CREATOR:
            raise ObjectStoreError(f"object {hid} is being created by another process; only its creator may seal or abort it")
        if code == ERR_TOO_BIG:
            raise ObjectStoreFullError(
                f"object {hid} needs {size} bytes but the object store's capacity is "
                f"{max_payload(self.h.data_size)} bytes: it can never fit; start minray with a "
                "larger object_store_memory")
        if code == ERR_TABLE_FULL:
            raise ObjectStoreFullError(
                f"object store {self.name} holds its maximum of {self.h.max_objects} objects and "
                "all of them are in use (pinned); release references or raise max_objects")
        if code == ERR_FULL_PINNED:
            stats = self.stats()
            raise ObjectStoreFullError(
                f"object {hid} needs {size} bytes but the object store (capacity "
                f"{stats['capacity']} bytes) has only {stats['largest_free']} contiguous bytes "
                f"free and every other object is in use (pinned: {stats['pinned_bytes']} bytes "
                f"in {stats['pinned_objects']} objects); release references to objects "
                "(delete arrays obtained with get) or use a larger object store")
        raise ObjectStoreError(f"object store error {code} on {hid}")

    cdef inline const uint8_t* _id_ptr(self, object oid) except NULL:
        if type(oid) is not bytes or len(<bytes>oid) != ID_SIZE:
            if isinstance(oid, bytes):
                raise ValueError(f"object id must be {ID_SIZE} bytes, got {len(oid)}")
            raise TypeError(f"object id must be bytes, got {type(oid).__name__}")
        return <const uint8_t*><char*>oid

    def create_object(self, bytes object_id, data_size, bytes metadata=b""):
        """Allocate an object and return a writable buffer for its data.

        Evicts unpinned objects (least recently used first) when needed.
        """
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef int32_t e = NO_ENTRY
        cdef int code
        cdef uint32_t meta_size = len(metadata)
        self._check_usable()
        if not isinstance(data_size, int) or isinstance(data_size, bool):
            raise TypeError(f"data_size must be an int, got {type(data_size).__name__}")
        if data_size < 0:
            raise ValueError(f"data_size must be >= 0, got {data_size}")
        if meta_size > MAX_METADATA:
            raise ValueError(f"metadata is {meta_size} bytes; at most {MAX_METADATA} are allowed")
        if data_size > self.h.data_size:
            self._raise(ERR_TOO_BIG, object_id, data_size)
        for attempt in range(2):
            self._lock()
            code = self._create_locked(oid, data_size, meta_size, &e)
            self._unlock()
            if code != ERR_FULL_PINNED or attempt or not self.reap_dead_clients():
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
        if data_size >= PREFAULT_BYTES:
            with nogil:
                prefault(view.ptr, view.size)
        mv = memoryview(view)
        self.writers[object_id] = mv
        return mv

    def seal(self, bytes object_id):
        """Make a created object immutable and readable by every process."""
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
        self._end_creation(object_id, oid, True)

    def abort(self, bytes object_id):
        """Discard an object that was created but not sealed."""
        cdef const uint8_t* oid = self._id_ptr(object_id)
        self._check_usable()
        mv = self.writers.pop(object_id, None)
        if mv is not None:
            mv.release()
        self._end_creation(object_id, oid, False)

    cdef int _end_creation(self, bytes object_id, const uint8_t* oid, bint seal) except -1:
        """Seal (or, with seal false, discard) an object this process is creating."""
        cdef int32_t e
        cdef int code = OK
        self._lock()
        e = find_entry(&self.table, oid)
        if e == NO_ENTRY:
            code = ERR_NOT_FOUND
        elif self.entries[e].state != ENTRY_CREATED:
            code = ERR_ALREADY_SEALED
        elif self.entries[e].creator_slot != self.slot:
            code = ERR_NOT_CREATOR
        elif seal:
            self.entries[e].state = ENTRY_SEALED
            if not entry_pinned(&self.entries[e]):
                lru_push(&self.table, e)
        else:
            index_remove(&self.table, e)
            free_entry(&self.table, e)
        self._unlock()
        if code != OK:
            self._raise(code, object_id)
        return 0

    def put(self, bytes object_id, data, bytes metadata=b""):
        """Create, fill and seal an object from a bytes-like value in one call."""
        cdef const unsigned char[::1] src = memoryview(data).cast("B")
        mv = self.create_object(object_id, src.shape[0], metadata)
        if src.shape[0]:
            mv[:] = src
        self.seal(object_id)

    def get(self, bytes object_id):
        """Pin a sealed object and return a read-only zero-copy PinnedBuffer.

        Raises ObjectNotFoundError if the object is not here (never waits).
        """
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef int32_t e
        cdef int code = OK
        cdef ObjectEntry* ent
        cdef uint8_t* start
        cdef uint32_t meta_size = 0
        cdef uint64_t data_size = 0
        self._check_usable()
        self._lock()
        e = find_entry(&self.table, oid)
        if e == NO_ENTRY:
            code = ERR_NOT_FOUND
        else:
            ent = &self.entries[e]
            if ent.state != ENTRY_SEALED:
                code = ERR_NOT_SEALED
            else:
                if self.local_pins[e] == 0:
                    if not entry_pinned(ent):
                        lru_unlink(&self.table, e)
                    ent.pins[self.slot >> 6] |= (<uint64_t>1) << (self.slot & 63)
                self.local_pins[e] += 1
                self.live_pins += 1
                start = self.data + ent.block
                meta_size = ent.metadata_size
                data_size = ent.data_size
        self._unlock()
        if code != OK:
            self._raise(code, object_id)
        cdef PinnedBuffer buf = PinnedBuffer.__new__(PinnedBuffer)
        buf.store = self
        buf.index = e
        buf.object_id = object_id
        buf.metadata = (<char*>start)[:meta_size]
        buf.ptr = start + round_up(meta_size, ALIGNMENT)
        buf.size = data_size
        return buf

    cdef int _unpin(self, int32_t e) except -1:
        if self.forked or self.detached:
            return 0
        self._lock()
        self.local_pins[e] -= 1
        if self.local_pins[e] == 0:
            self._drop_pin_bit(e, self.slot)
        self._unlock()
        self.live_pins -= 1
        if self.closed and self.live_pins == 0:
            self._detach()
        return 0

    def contains(self, bytes object_id):
        """True if a sealed object with this id is in the store."""
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef int32_t e
        cdef bint found
        self._check_usable()
        self._lock()
        e = find_entry(&self.table, oid)
        found = e != NO_ENTRY and self.entries[e].state == ENTRY_SEALED
        self._unlock()
        return found

    def delete(self, bytes object_id):
        """Delete a sealed object; its memory is freed once nobody pins it."""
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef int32_t e
        cdef int code = OK
        cdef ObjectEntry* ent
        self._check_usable()
        self._lock()
        e = find_entry(&self.table, oid)
        if e == NO_ENTRY:
            code = ERR_NOT_FOUND
        else:
            ent = &self.entries[e]
            if ent.state == ENTRY_CREATED:
                code = ERR_NOT_SEALED
            else:
                index_remove(&self.table, e)
                if entry_pinned(ent):
                    ent.state = ENTRY_DELETING
                else:
                    lru_unlink(&self.table, e)
                    free_entry(&self.table, e)
        self._unlock()
        if code == ERR_NOT_SEALED:
            raise ObjectStoreError(
                f"object {object_id.hex()} is still being created; its creator aborts it with abort()")
        if code != OK:
            self._raise(code, object_id)

    # ------------------------------------------------------------ maintenance
    def reap_dead_clients(self):
        """Release the pins and unsealed objects of processes that died.

        Returns how many dead processes were cleaned up.
        """
        cdef int i
        cdef list candidates = []
        self._check_usable()
        self._lock()
        for i in range(MAX_CLIENTS):
            if self.h.clients[i].pid != 0 and i != self.slot:
                candidates.append((i, self.h.clients[i].pid, self.h.clients[i].generation,
                                   self.h.clients[i].start_time))
        self._unlock()
        dead = []
        for i, pid, gen, started in candidates:
            now = _process_start_time(pid)
            if now is None or (started and now != started):
                dead.append((i, gen))
        reaped = 0
        for i, gen in dead:
            self._lock()
            if self.h.clients[i].pid != 0 and self.h.clients[i].generation == gen:
                self._clear_slot(i)
                reaped += 1
            self._unlock()
        return reaped

    def stats(self):
        """Counters of the whole store (all processes), as a dict."""
        cdef uint32_t e
        cdef uint64_t pinned_bytes = 0, pinned_objects = 0, largest
        cdef ObjectEntry* ent
        self._check_usable()
        self._lock()
        for e in range(self.h.entries_high_water):
            ent = &self.entries[e]
            if ent.state != ENTRY_FREE and entry_pinned(ent):
                pinned_objects += 1
                pinned_bytes += ent.data_size
        largest = largest_free_block(&self.h.alloc, self.data)
        result = {
            "capacity": max_payload(self.h.data_size),
            "free": self.h.alloc.free_bytes,
            "used": self.h.data_size - self.h.alloc.free_bytes,
            "largest_free": largest,
            "free_blocks": self.h.alloc.free_blocks,
            "num_objects": self.h.num_objects,
            "max_objects": self.h.max_objects,
            "pinned_objects": pinned_objects,
            "pinned_bytes": pinned_bytes,
            "evictions": self.h.evictions,
            "evicted_bytes": self.h.evicted_bytes,
            "num_clients": self.h.num_clients,
            "lock_recoveries": self.h.lock_recoveries,
        }
        self._unlock()
        return result

    def lru_order(self):
        """Ids of evictable objects, least recently used first (for tests)."""
        cdef int32_t e
        cdef list ids = []
        self._check_usable()
        self._lock()
        e = self.h.lru_head
        while e != NO_ENTRY:
            ids.append((<char*>self.entries[e].object_id)[:ID_SIZE])
            e = self.entries[e].lru_next
        self._unlock()
        return ids

    def layout(self):
        """Offsets of the arena's regions within the file (for tools and tests)."""
        return {
            "file_size": self.h.file_size, "entries_offset": self.h.entries_offset,
            "index_offset": self.h.index_offset, "data_offset": self.h.data_offset,
            "data_size": self.h.data_size, "max_objects": self.h.max_objects,
        }

    def _lock_and_abandon(self):
        """Take the store lock and never release it (tests of crash recovery)."""
        self._lock()

    @property
    def capacity(self):
        return max_payload(self.h.data_size)

    @property
    def path(self):
        return os.path.join(SHM_DIR, self.name)

    def block_capacity(self, bytes object_id):
        """Bytes reserved for an object's block (metadata padding included)."""
        cdef const uint8_t* oid = self._id_ptr(object_id)
        cdef int32_t e
        cdef uint64_t cap = 0
        self._lock()
        e = find_entry(&self.table, oid)
        if e != NO_ENTRY:
            cap = block_payload_capacity(self.data, self.entries[e].block)
        self._unlock()
        if e == NO_ENTRY:
            self._raise(ERR_NOT_FOUND, object_id)
        return cap
