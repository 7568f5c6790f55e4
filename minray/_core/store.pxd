# Typed interface of the node's shared-memory object store (store.pyx).
cimport cython
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t

from minray._core.layout cimport ClientSlot, ObjectEntry, StoreHeader
from minray._core.table cimport Table


cdef struct Pinned:
    # What a get copies out of an entry under the lock.
    int32_t entry
    uint64_t block
    uint32_t metadata_size
    uint64_t data_size


cdef struct ClientSeen:
    # A client slot as seen under the lock, checked for life after unlocking.
    int slot
    int32_t pid
    uint32_t generation
    uint64_t start_time


cdef struct StoreCounts:
    # stats(), gathered under the lock.
    uint64_t pinned_bytes
    uint64_t pinned_objects
    uint64_t primary_objects
    uint64_t largest_free
    uint64_t free_bytes
    uint64_t free_blocks
    uint64_t evictions
    uint64_t evicted_bytes
    uint32_t num_objects
    uint32_t num_clients
    uint32_t lock_recoveries


cdef class _Mapping:
    """Owns the mmap of an arena; views keep it alive until they are gone."""
    cdef uint8_t* base
    cdef size_t size


cdef class ArenaView:
    """A buffer over part of the arena (the writable buffer of a new object)."""
    cdef _Mapping mapping
    cdef uint8_t* ptr
    cdef Py_ssize_t size
    cdef bint readonly


@cython.final
cdef class PinnedBuffer:
    """Read-only, zero-copy buffer of a sealed object, holding a pin on it."""
    cdef SharedStore store
    cdef int32_t index
    cdef uint8_t* ptr
    cdef Py_ssize_t size
    cdef int exports
    cdef bint released
    cdef readonly bytes metadata
    cdef readonly bytes object_id


@cython.final
cdef class SharedStore:
    """A process's handle on the node's shared-memory object store."""
    cdef StoreHeader* h
    cdef ClientSlot* clients      # max_clients slots
    cdef ObjectEntry* entries
    cdef uint8_t* data
    cdef Table table              # entries and data again, pins, index, bounds
    cdef _Mapping mapping
    cdef uint32_t* local_pins     # this process's pin count per entry
    cdef readonly int slot
    cdef readonly str name
    cdef readonly bint owner
    cdef public bint forked
    cdef bint closed
    cdef bint detached
    cdef int32_t pid              # this process, as recorded on primary pins
    cdef uint64_t live_pins
    cdef dict writers
    cdef object __weakref__

    @staticmethod
    cdef SharedStore _map(str name, int fd, size_t size)
    cdef _set_views(self)
    cdef _init_layout(self, str name, uint64_t header_size, uint64_t clients_offset,
                      uint64_t entries_offset, uint64_t pins_offset, uint64_t index_offset,
                      uint64_t data_offset, uint64_t data_size, uint32_t max_objects,
                      uint32_t index_slots, uint32_t max_clients)
    cdef _validate(self, str path, uint64_t file_size)
    cdef _attach_client(self)
    cdef _detach(self)

    # Locking: _lock raises if the store is damaged; _unlock_checked unlocks
    # and raises if the critical section found damage.
    cdef inline int _lock(self) except -1
    cdef int _lock_contended(self, int rc) except -1
    cdef inline void _unlock(self) noexcept nogil
    cdef inline int _unlock_checked(self) except -1
    cdef int _raise_damaged(self, uint32_t damage, int32_t entry) except -1
    cdef int _check_usable(self) except -1
    cdef int _repair(self) noexcept nogil

    # Critical sections: C functions without the GIL, called with the lock
    # held, so the compiler guarantees no Python object is made inside one.
    cdef int _claim_slot_locked(self, int32_t pid, uint64_t start) noexcept nogil
    cdef inline void _drop_pin_bit(self, int32_t e, int slot) noexcept nogil
    cdef void _clear_slot(self, int slot) noexcept nogil
    cdef inline int _create_locked(self, const uint8_t* oid, uint64_t data_size,
                            uint32_t meta_size, int32_t* out) noexcept nogil
    cdef inline int _end_creation_locked(self, const uint8_t* oid, bint seal,
                                  bint primary) noexcept nogil
    cdef inline int _pin_locked(self, const uint8_t* oid, bint adopt, Pinned* out) noexcept nogil
    cdef inline void _unpin_locked(self, int32_t e) noexcept nogil
    cdef inline bint _hold_primary_locked(self, const uint8_t* oid) noexcept nogil
    cdef uint64_t _release_primaries_locked(self, int32_t pid) noexcept nogil
    cdef inline bint _contains_locked(self, const uint8_t* oid) noexcept nogil
    cdef inline int _delete_locked(self, const uint8_t* oid) noexcept nogil
    cdef uint32_t _list_clients_locked(self, ClientSeen* seen) noexcept nogil
    cdef int _reap_slot_locked(self, ClientSeen* c) noexcept nogil
    cdef void _count_locked(self, StoreCounts* out) noexcept nogil
    cdef uint32_t _lru_ids_locked(self, uint8_t* ids) noexcept nogil
    cdef int _block_capacity_locked(self, const uint8_t* oid, uint64_t* out) noexcept nogil

    # The Python-facing halves: lock, call the C half, unlock, then raise
    # or build Python objects.
    cdef int _end_creation(self, bytes object_id, const uint8_t* oid, bint seal,
                           bint primary) except -1
    cdef inline PinnedBuffer _pin(self, bytes object_id, bint adopt)
    cdef int _unpin(self, int32_t e) except -1
    cdef object _raise(self, int code, bytes oid, object size=*)
    cdef const uint8_t* _id_ptr(self, object oid) except NULL
