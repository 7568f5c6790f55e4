# Typed interface of the object table of a store: the hash index over object
# ids, the pin masks, the LRU list of evictable objects and the list of free
# entries.
from libc.stdint cimport int32_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp

from minray._core.layout cimport (
    ALIGNMENT, ENTRY_CREATED, ENTRY_DELETING, ENTRY_SEALED, MAX_METADATA, NO_ENTRY,
    ID_SIZE, PRIMARY_PIN, ObjectEntry, StoreHeader,
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


# Where the table's parts are in this process's mapping of the arena, and the
# bounds every index and offset read from shared memory is checked against.
# A store handle fills it in once, when it maps (and validates) the arena, so
# a process that scribbles over the header later cannot move these bounds.
cdef struct Table:
    StoreHeader* h               # LRU ends, free-entry head, counters, allocator
    ObjectEntry* entries         # max_objects entries
    uint64_t* pins               # pin_words words per entry
    uint32_t* index              # index_slots slots: entry + 1, or 0 when empty
    uint64_t index_mask          # index_slots - 1
    uint8_t* data                # base of the data area, where blocks are freed
    uint64_t data_size           # bytes in the data area
    uint32_t max_objects
    uint32_t max_clients
    uint32_t pin_words


cdef inline uint64_t* pin_mask(Table* t, uint32_t e) noexcept nogil:
    """The pin bits of entry e: bit i of the mask is client slot i."""
    return t.pins + <uint64_t>e * t.pin_words


cdef inline bint entry_pinned(Table* t, uint32_t e) noexcept nogil:
    """True while a client slot, or the primary pin, holds the entry."""
    return t.entries[e].pin_holders != 0 or (t.entries[e].flags & PRIMARY_PIN) != 0


cdef inline void pin_add(Table* t, uint32_t e, int slot) noexcept nogil:
    """Set client slot's bit in entry e's pin mask (if it is not set yet)."""
    cdef uint64_t* word = pin_mask(t, e) + (slot >> 6)
    cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
    if not (word[0] & bit):
        word[0] |= bit
        t.entries[e].pin_holders += 1


cdef inline bint pin_remove(Table* t, uint32_t e, int slot) noexcept nogil:
    """Clear client slot's bit in entry e's pin mask; False if it was not set."""
    cdef uint64_t* word = pin_mask(t, e) + (slot >> 6)
    cdef uint64_t bit = (<uint64_t>1) << (slot & 63)
    if not (word[0] & bit):
        return False
    word[0] &= ~bit
    t.entries[e].pin_holders -= 1
    return True


# Records that the table holds an impossible value; returns False.
cdef bint mark_damaged(Table* t, int32_t e) noexcept nogil


cdef inline bint link_ok(Table* t, int32_t e) noexcept nogil:
    return e == NO_ENTRY or (e >= 0 and <uint32_t>e < t.max_objects)


cdef inline bint entry_sound(Table* t, int32_t e) noexcept nogil:
    """True if entry e is in range and its fields are usable as they are:
    a live state, metadata and data inside the data area, links, creator
    slot and pin count in range.  Otherwise marks the store damaged and
    returns False.  (Arithmetic only: it touches no memory but the entry.)"""
    cdef ObjectEntry* ent
    cdef uint64_t end
    if e < 0 or <uint32_t>e >= t.max_objects:
        return mark_damaged(t, e)
    ent = &t.entries[e]
    if ent.state != ENTRY_CREATED and ent.state != ENTRY_SEALED and ent.state != ENTRY_DELETING:
        return mark_damaged(t, e)
    if (ent.metadata_size > MAX_METADATA or ent.data_size > t.data_size
            or ent.creator_slot >= t.max_clients or ent.pin_holders > t.max_clients
            or not link_ok(t, ent.lru_prev) or not link_ok(t, ent.lru_next)
            or ent.block % ALIGNMENT != 0 or ent.block < ALIGNMENT or ent.block > t.data_size):
        return mark_damaged(t, e)
    # Both terms are bounded above, so the sum cannot wrap.
    end = ent.block + (ent.metadata_size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT + ent.data_size
    if end > t.data_size:
        return mark_damaged(t, e)
    return True


cdef inline int32_t find_entry(Table* t, const uint8_t* oid) noexcept nogil:
    """The entry holding object id `oid`, or NO_ENTRY (also when the index
    is found damaged: the caller checks h.damaged)."""
    cdef uint64_t i = hash_id(oid) & t.index_mask
    cdef uint64_t probes
    cdef uint32_t slot
    for probes in range(t.index_mask + 1):
        slot = t.index[i]
        if slot == 0:
            return NO_ENTRY
        if slot > t.max_objects:
            mark_damaged(t, NO_ENTRY)
            return NO_ENTRY
        if memcmp(t.entries[slot - 1].object_id, oid, ID_SIZE) == 0:
            return slot - 1
        i = (i + 1) & t.index_mask
    mark_damaged(t, NO_ENTRY)           # no empty slot at all: never at most half full
    return NO_ENTRY


# Every function here runs with the store lock held and without the GIL.
# The ones that follow a link or offset read from shared memory check it
# first; on a bad value they mark the store damaged (h.damaged) and do
# nothing, and the caller reports the damage after unlocking.
cdef void index_insert(Table* t, uint32_t e) noexcept nogil
cdef void index_remove(Table* t, uint32_t e) noexcept nogil
cdef void lru_push(Table* t, int32_t e) noexcept nogil
cdef void lru_unlink(Table* t, int32_t e) noexcept nogil
cdef int32_t take_entry(Table* t) noexcept nogil
cdef void return_entry(Table* t, int32_t e) noexcept nogil
cdef void free_entry(Table* t, int32_t e) noexcept nogil
cdef bint evict_one(Table* t) noexcept nogil
cdef uint32_t entries_in_use_bound(Table* t) noexcept nogil
cdef int rebuild_table(Table* t) noexcept nogil
