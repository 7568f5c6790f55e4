# cython: language_level=3
"""The object table of a store: hash index, LRU list and free entries.

All of it lives in the shared arena (layout.pxd), so every process of the node
finds, links and frees entries directly; store.pyx calls these functions with
the store lock held.

- The hash index maps an object id to its entry: open addressing with linear
  probing over index_slots (a power of two, at least twice max_objects), one
  uint32 per slot holding entry + 1 (0: empty).  Deletion shifts later
  entries of the probe run back, so no tombstones pile up.
- The pin masks (pin_words words per entry) have one bit per client slot;
  an entry is pinned while a bit is set or it holds the primary pin.
- The LRU list links the sealed objects nobody pins, least recently used
  first; eviction takes its head.
- Entries freed are kept on a list through next_free_entry; entries never
  used yet are taken from entries_high_water.

Links, indexes and block offsets are read from shared memory, which another
process can overwrite: each is checked against the bounds in Table (private
to this process) before it is followed.  A bad one marks the store damaged
instead of reading or writing outside the arena.
"""
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memset

from minray._core.allocator cimport block_sound, free_block
from minray._core.layout cimport (
    ALIGNMENT, DAMAGE_BAD_FIELD, ENTRY_CREATED, ENTRY_DELETING, ENTRY_FREE, ENTRY_SEALED,
    ID_SIZE, MAX_METADATA, NO_ENTRY, ObjectEntry,
)

cdef extern from *:
    int popcount64 "__builtin_popcountll"(unsigned long long x) nogil


# ---------------------------------------------------------------- damage
cdef bint mark_damaged(Table* t, int32_t e) noexcept nogil:
    """Record that the table holds an impossible value; returns False."""
    if t.h.damaged == 0:
        t.h.damaged = DAMAGE_BAD_FIELD
        t.h.damaged_entry = e
    return False


# ---------------------------------------------------------------- hash index
cdef void index_insert(Table* t, uint32_t e) noexcept nogil:
    cdef uint64_t i = hash_id(t.entries[e].object_id) & t.index_mask
    cdef uint64_t probes
    for probes in range(t.index_mask + 1):
        if t.index[i] == 0:
            t.index[i] = e + 1
            return
        i = (i + 1) & t.index_mask
    mark_damaged(t, e)


cdef void index_remove(Table* t, uint32_t e) noexcept nogil:
    # Linear probing with backward-shift deletion: no tombstones pile up.
    cdef uint64_t i = hash_id(t.entries[e].object_id) & t.index_mask
    cdef uint64_t j, home, probes
    cdef uint32_t slot
    for probes in range(t.index_mask + 1):
        if t.index[i] == e + 1:
            break
        i = (i + 1) & t.index_mask
    else:
        mark_damaged(t, e)              # the entry is not in the index
        return
    j = i
    for probes in range(t.index_mask + 1):
        j = (j + 1) & t.index_mask
        slot = t.index[j]
        if slot == 0:
            break
        if slot > t.max_objects:
            mark_damaged(t, NO_ENTRY)
            return
        home = hash_id(t.entries[slot - 1].object_id) & t.index_mask
        if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
            t.index[i] = slot
            i = j
    t.index[i] = 0


# ---------------------------------------------------------------- LRU list
cdef void lru_push(Table* t, int32_t e) noexcept nogil:
    """Append an entry as the most recently used evictable object."""
    cdef ObjectEntry* ent = &t.entries[e]
    cdef int32_t tail = t.h.lru_tail
    if not link_ok(t, tail):
        mark_damaged(t, tail)
        return
    ent.lru_next = NO_ENTRY
    ent.lru_prev = tail
    if tail != NO_ENTRY:
        t.entries[tail].lru_next = e
    else:
        t.h.lru_head = e
    t.h.lru_tail = e


cdef void lru_unlink(Table* t, int32_t e) noexcept nogil:
    cdef ObjectEntry* ent = &t.entries[e]
    cdef int32_t prev = ent.lru_prev
    cdef int32_t nxt = ent.lru_next
    if not link_ok(t, prev) or not link_ok(t, nxt):
        mark_damaged(t, e)
        return
    if prev != NO_ENTRY:
        t.entries[prev].lru_next = nxt
    else:
        t.h.lru_head = nxt
    if nxt != NO_ENTRY:
        t.entries[nxt].lru_prev = prev
    else:
        t.h.lru_tail = prev
    ent.lru_prev = NO_ENTRY
    ent.lru_next = NO_ENTRY


# ---------------------------------------------------------------- entries
cdef int32_t take_entry(Table* t) noexcept nogil:
    """An unused entry, or NO_ENTRY when all max_objects are in use."""
    cdef int32_t e = t.h.free_entry_head
    cdef uint32_t high = t.h.entries_high_water
    if e != NO_ENTRY:
        if not link_ok(t, e) or t.entries[e].state != ENTRY_FREE \
                or not link_ok(t, t.entries[e].next_free_entry):
            mark_damaged(t, e)
            return NO_ENTRY
        t.h.free_entry_head = t.entries[e].next_free_entry
        return e
    if high > t.max_objects:
        mark_damaged(t, NO_ENTRY)
        return NO_ENTRY
    if high < t.max_objects:
        t.h.entries_high_water = high + 1
        return high
    return NO_ENTRY


cdef void return_entry(Table* t, int32_t e) noexcept nogil:
    """Put an entry that holds no object back on the free list."""
    t.entries[e].next_free_entry = t.h.free_entry_head
    t.h.free_entry_head = e


cdef void free_entry(Table* t, int32_t e) noexcept nogil:
    """Free the block and the entry (already out of the index and LRU)."""
    cdef ObjectEntry* ent = &t.entries[e]
    if not entry_sound(t, e):
        return                          # leak it rather than free a bad block
    # The allocator follows the block's header to its neighbours: check it.
    if not block_sound(t.data, t.data_size, ent.block,
                       (ent.metadata_size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
                       + ent.data_size):
        mark_damaged(t, e)
        return
    ent.state = ENTRY_FREE
    ent.flags = 0
    free_block(&t.h.alloc, t.data, ent.block)
    return_entry(t, e)
    t.h.num_objects -= 1


cdef bint evict_one(Table* t) noexcept nogil:
    """Delete the least recently used evictable object; False if there is none."""
    cdef int32_t e = t.h.lru_head
    if e == NO_ENTRY:
        return False
    if not link_ok(t, e):
        return mark_damaged(t, e)
    if t.entries[e].state != ENTRY_SEALED or entry_pinned(t, e):
        return mark_damaged(t, e)       # only unpinned sealed objects are listed
    lru_unlink(t, e)
    index_remove(t, e)
    if t.h.damaged:
        return False
    t.h.evictions += 1
    t.h.evicted_bytes += t.entries[e].data_size
    free_entry(t, e)
    return True


cdef uint32_t entries_in_use_bound(Table* t) noexcept nogil:
    """How many entries to scan: the high-water mark, within bounds."""
    cdef uint32_t high = t.h.entries_high_water
    return high if high <= t.max_objects else t.max_objects


# ---------------------------------------------------------------- repair
cdef int rebuild_table(Table* t) noexcept nogil:
    """Rebuild the hash index, LRU list and free entries from the entries.

    Returns -1 if an entry is damaged beyond repair.
    """
    cdef uint32_t e, w
    cdef ObjectEntry* ent
    if t.h.entries_high_water > t.max_objects:
        return -1
    memset(t.index, 0, (t.index_mask + 1) * sizeof(uint32_t))
    t.h.lru_head = NO_ENTRY
    t.h.lru_tail = NO_ENTRY
    t.h.free_entry_head = NO_ENTRY
    t.h.num_objects = 0
    for e in range(t.h.entries_high_water):
        ent = &t.entries[e]
        if ent.state == ENTRY_FREE:
            return_entry(t, e)
            continue
        ent.lru_prev = NO_ENTRY
        ent.lru_next = NO_ENTRY
        ent.pin_holders = 0
        for w in range(t.pin_words):
            ent.pin_holders += popcount64(pin_mask(t, e)[w])
        if not entry_sound(t, e):
            return -1
        t.h.num_objects += 1
        if ent.state != ENTRY_DELETING:
            index_insert(t, e)
        if ent.state == ENTRY_SEALED and not entry_pinned(t, e):
            lru_push(t, e)
    return 0
