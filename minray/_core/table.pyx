# cython: language_level=3
"""The object table of a store: hash index, LRU list and free entries.

All of it lives in the shared arena (layout.pxd), so every process of the node
finds, links and frees entries directly; store.pyx calls these functions with
the store lock held.

- The hash index maps an object id to its entry: open addressing with linear
  probing over index_slots (a power of two, at least twice max_objects), one
  uint32 per slot holding entry + 1 (0: empty).  Deletion shifts later
  entries of the probe run back, so no tombstones pile up.
- The LRU list links the sealed objects nobody pins, least recently used
  first; eviction takes its head.
- Entries freed are kept on a list through next_free_entry; entries never
  used yet are taken from entries_high_water.
"""
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memset

from minray._core.allocator cimport free_block
from minray._core.layout cimport (
    ENTRY_DELETING, ENTRY_FREE, ENTRY_SEALED, ID_SIZE, NO_ENTRY, ObjectEntry,
)

cdef extern from *:
    """
    static inline uint64_t minray_hash_id(const uint8_t* p) {
        uint64_t a, b; uint32_t c;
        memcpy(&a, p, 8); memcpy(&b, p + 8, 8); memcpy(&c, p + 16, 4);
        uint64_t h = a * 0x9E3779B97F4A7C15ULL;
        h ^= (b + 0x632BE59BD9B4E019ULL) * 0xC2B2AE3D27D4EB4FULL;
        h ^= c;
        h ^= h >> 29; h *= 0xBF58476D1CE4E5B9ULL; h ^= h >> 32;
        return h;
    }
    """
    uint64_t hash_id "minray_hash_id"(const uint8_t* p) nogil


# ---------------------------------------------------------------- hash index
cdef int32_t find_entry(Table* t, const uint8_t* oid) noexcept nogil:
    """The entry holding object id `oid`, or NO_ENTRY."""
    cdef uint64_t i = hash_id(oid) & t.index_mask
    cdef uint32_t slot
    while True:
        slot = t.index[i]
        if slot == 0:
            return NO_ENTRY
        if memcmp(t.entries[slot - 1].object_id, oid, ID_SIZE) == 0:
            return slot - 1
        i = (i + 1) & t.index_mask


cdef void index_insert(Table* t, uint32_t e) noexcept nogil:
    cdef uint64_t i = hash_id(t.entries[e].object_id) & t.index_mask
    while t.index[i] != 0:
        i = (i + 1) & t.index_mask
    t.index[i] = e + 1


cdef void index_remove(Table* t, uint32_t e) noexcept nogil:
    # Linear probing with backward-shift deletion: no tombstones pile up.
    cdef uint64_t i = hash_id(t.entries[e].object_id) & t.index_mask
    cdef uint64_t j, home
    while t.index[i] != e + 1:
        i = (i + 1) & t.index_mask
    j = i
    while True:
        j = (j + 1) & t.index_mask
        if t.index[j] == 0:
            break
        home = hash_id(t.entries[t.index[j] - 1].object_id) & t.index_mask
        if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            t.index[i] = t.index[j]
            i = j
    t.index[i] = 0


# ---------------------------------------------------------------- LRU list
cdef void lru_push(Table* t, int32_t e) noexcept nogil:
    """Append an entry as the most recently used evictable object."""
    cdef ObjectEntry* ent = &t.entries[e]
    ent.lru_next = NO_ENTRY
    ent.lru_prev = t.h.lru_tail
    if t.h.lru_tail != NO_ENTRY:
        t.entries[t.h.lru_tail].lru_next = e
    else:
        t.h.lru_head = e
    t.h.lru_tail = e


cdef void lru_unlink(Table* t, int32_t e) noexcept nogil:
    cdef ObjectEntry* ent = &t.entries[e]
    if ent.lru_prev != NO_ENTRY:
        t.entries[ent.lru_prev].lru_next = ent.lru_next
    else:
        t.h.lru_head = ent.lru_next
    if ent.lru_next != NO_ENTRY:
        t.entries[ent.lru_next].lru_prev = ent.lru_prev
    else:
        t.h.lru_tail = ent.lru_prev
    ent.lru_prev = NO_ENTRY
    ent.lru_next = NO_ENTRY


# ---------------------------------------------------------------- entries
cdef int32_t take_entry(Table* t) noexcept nogil:
    """An unused entry, or NO_ENTRY when all max_objects are in use."""
    cdef int32_t e = t.h.free_entry_head
    if e != NO_ENTRY:
        t.h.free_entry_head = t.entries[e].next_free_entry
        return e
    if t.h.entries_high_water < t.h.max_objects:
        e = t.h.entries_high_water
        t.h.entries_high_water += 1
        return e
    return NO_ENTRY


cdef void return_entry(Table* t, int32_t e) noexcept nogil:
    """Put an entry that holds no object back on the free list."""
    t.entries[e].next_free_entry = t.h.free_entry_head
    t.h.free_entry_head = e


cdef void free_entry(Table* t, int32_t e) noexcept nogil:
    """Free the block and the entry (already out of the index and LRU)."""
    cdef ObjectEntry* ent = &t.entries[e]
    ent.state = ENTRY_FREE
    free_block(&t.h.alloc, t.data, ent.block)
    ent.generation += 1
    return_entry(t, e)
    t.h.num_objects -= 1


cdef bint evict_one(Table* t) noexcept nogil:
    """Delete the least recently used evictable object; False if there is none."""
    cdef int32_t e = t.h.lru_head
    if e == NO_ENTRY:
        return False
    lru_unlink(t, e)
    index_remove(t, e)
    t.h.evictions += 1
    t.h.evicted_bytes += t.entries[e].data_size
    free_entry(t, e)
    return True


# ---------------------------------------------------------------- repair
cdef int rebuild_table(Table* t) noexcept nogil:
    """Rebuild the hash index, LRU list and free entries from the entries.

    Returns -1 if an entry is damaged beyond repair.
    """
    cdef uint32_t e
    cdef ObjectEntry* ent
    memset(t.index, 0, t.h.index_slots * sizeof(uint32_t))
    t.h.lru_head = NO_ENTRY
    t.h.lru_tail = NO_ENTRY
    t.h.free_entry_head = NO_ENTRY
    t.h.num_objects = 0
    for e in range(t.h.entries_high_water):
        ent = &t.entries[e]
        if ent.state == ENTRY_FREE:
            return_entry(t, e)
            continue
        if ent.block >= t.h.data_size:
            return -1
        t.h.num_objects += 1
        if ent.state != ENTRY_DELETING:
            index_insert(t, e)
        if ent.state == ENTRY_SEALED and not entry_pinned(ent):
            lru_push(t, e)
    return 0
