# Typed interface of the object table of a store: the hash index over object
# ids, the LRU list of evictable objects and the list of free entries.
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t

from minray._core.layout cimport PIN_WORDS, ObjectEntry, StoreHeader


# Where the table's parts are in this process's mapping of the arena; a store
# handle fills it in once, when it maps the arena.
cdef struct Table:
    StoreHeader* h               # LRU ends, free-entry head, counters, allocator
    ObjectEntry* entries         # max_objects entries
    uint32_t* index              # index_slots slots: entry + 1, or 0 when empty
    uint64_t index_mask          # index_slots - 1
    uint8_t* data                # base of the data area, where blocks are freed


cdef inline bint entry_pinned(ObjectEntry* ent) noexcept nogil:
    """True while some client slot holds a pin on the entry."""
    cdef int w
    for w in range(PIN_WORDS):
        if ent.pins[w] != 0:
            return True
    return False


# Every function here runs with the store lock held and without the GIL.
cdef int32_t find_entry(Table* t, const uint8_t* oid) noexcept nogil
cdef void index_insert(Table* t, uint32_t e) noexcept nogil
cdef void index_remove(Table* t, uint32_t e) noexcept nogil
cdef void lru_push(Table* t, int32_t e) noexcept nogil
cdef void lru_unlink(Table* t, int32_t e) noexcept nogil
cdef int32_t take_entry(Table* t) noexcept nogil
cdef void return_entry(Table* t, int32_t e) noexcept nogil
cdef void free_entry(Table* t, int32_t e) noexcept nogil
cdef bint evict_one(Table* t) noexcept nogil
cdef int rebuild_table(Table* t) noexcept nogil
