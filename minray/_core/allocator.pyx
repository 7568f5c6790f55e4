# cython: language_level=3
"""Two-level segregated fit (TLSF) allocator over a store's data area.

Why TLSF: allocation and free are O(1) (two bitmap scans, no list walks),
free neighbours coalesce immediately through boundary links, and a request
is served from a size class at least as large as it, which bounds
fragmentation.  All state lives in shared memory (AllocState in the store
header plus a 32-byte header before each block), so every process of the node
can allocate directly.

Block layout: a 32-byte header at an offset that is 32 (mod 64), so the
payload right after it is 64-byte aligned; block sizes are multiples of 64.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t

from minray._core.layout cimport (
    ALIGNMENT, FL_COUNT, NONE_OFFSET, SL_COUNT, SL_LOG2, AllocState,
)

cdef extern from *:
    """
    static inline int minray_ctz64(unsigned long long x) { return __builtin_ctzll(x); }
    static inline int minray_log2_64(unsigned long long x) { return 63 - __builtin_clzll(x); }
    """
    int ctz64 "minray_ctz64"(unsigned long long x) nogil
    int log2_64 "minray_log2_64"(unsigned long long x) nogil


cdef struct BlockHeader:
    uint64_t size_flags        # block size in bytes (multiple of 64) | FREE_BIT
    uint64_t prev_phys         # header offset of the block before, or NONE
    uint64_t next_free         # free-list links, valid while free
    uint64_t prev_free

cdef enum:
    HEADER_SIZE = 32
    FIRST_BLOCK = 32           # header offset of the first block
    MIN_BLOCK = 64
    FREE_BIT = 1


cdef inline BlockHeader* hdr(uint8_t* base, uint64_t off) noexcept nogil:
    return <BlockHeader*>(base + off)

cdef inline uint64_t bsize(BlockHeader* b) noexcept nogil:
    return b.size_flags & ~(<uint64_t>(ALIGNMENT - 1))

cdef inline bint is_free(BlockHeader* b) noexcept nogil:
    return (b.size_flags & FREE_BIT) != 0

cdef inline uint64_t area_end(AllocState* st) noexcept nogil:
    return FIRST_BLOCK + ((st.area_size - FIRST_BLOCK) // ALIGNMENT) * ALIGNMENT


cdef inline void mapping(uint64_t size, int* fl, int* sl) noexcept nogil:
    cdef uint64_t units = size // ALIGNMENT
    cdef int t
    if units < SL_COUNT:
        fl[0] = 0
        sl[0] = <int>units
    else:
        t = log2_64(units)
        fl[0] = t - SL_LOG2 + 1
        sl[0] = <int>((units >> (t - SL_LOG2)) - SL_COUNT)


cdef void insert_free(AllocState* st, uint8_t* base, uint64_t off) noexcept nogil:
    cdef BlockHeader* b = hdr(base, off)
    cdef int fl, sl
    cdef uint64_t size = bsize(b)
    mapping(size, &fl, &sl)
    b.size_flags = size | FREE_BIT
    b.prev_free = NONE_OFFSET
    b.next_free = st.heads[fl][sl]
    if b.next_free != NONE_OFFSET:
        hdr(base, b.next_free).prev_free = off
    st.heads[fl][sl] = off
    st.fl_bitmap |= (<uint64_t>1) << fl
    st.sl_bitmap[fl] |= (<uint32_t>1) << sl
    st.free_bytes += size
    st.free_blocks += 1


cdef void remove_free(AllocState* st, uint8_t* base, uint64_t off) noexcept nogil:
    cdef BlockHeader* b = hdr(base, off)
    cdef int fl, sl
    cdef uint64_t size = bsize(b)
    mapping(size, &fl, &sl)
    if b.prev_free != NONE_OFFSET:
        hdr(base, b.prev_free).next_free = b.next_free
    else:
        st.heads[fl][sl] = b.next_free
    if b.next_free != NONE_OFFSET:
        hdr(base, b.next_free).prev_free = b.prev_free
    if st.heads[fl][sl] == NONE_OFFSET:
        st.sl_bitmap[fl] &= ~((<uint32_t>1) << sl)
        if st.sl_bitmap[fl] == 0:
            st.fl_bitmap &= ~((<uint64_t>1) << fl)
    b.size_flags = size
    st.free_bytes -= size
    st.free_blocks -= 1


cdef void reset_lists(AllocState* st) noexcept nogil:
    cdef int fl, sl
    st.fl_bitmap = 0
    st.free_bytes = 0
    st.free_blocks = 0
    for fl in range(FL_COUNT):
        st.sl_bitmap[fl] = 0
        for sl in range(SL_COUNT):
            st.heads[fl][sl] = NONE_OFFSET


cdef void alloc_init(AllocState* st, uint8_t* base, uint64_t area_size) noexcept nogil:
    st.area_size = area_size
    reset_lists(st)
    cdef uint64_t end = area_end(st)
    if end < FIRST_BLOCK + MIN_BLOCK:
        return
    cdef BlockHeader* first = hdr(base, FIRST_BLOCK)
    first.size_flags = end - FIRST_BLOCK
    first.prev_phys = NONE_OFFSET
    insert_free(st, base, FIRST_BLOCK)


cdef uint64_t max_payload(uint64_t area_size) noexcept nogil:
    """Largest payload the area could ever hold (when it is empty)."""
    if area_size < FIRST_BLOCK + MIN_BLOCK:
        return 0
    return ((area_size - FIRST_BLOCK) // ALIGNMENT) * ALIGNMENT - HEADER_SIZE


cdef uint64_t alloc_block(AllocState* st, uint8_t* base, uint64_t payload_size) noexcept nogil:
    cdef uint64_t need, off, rest, after, units
    cdef uint32_t sl_map
    cdef uint64_t fl_map
    cdef int fl, sl
    cdef BlockHeader* b
    cdef BlockHeader* r
    if payload_size > st.area_size:
        return NONE_OFFSET
    need = (payload_size + HEADER_SIZE + ALIGNMENT - 1) & ~(<uint64_t>(ALIGNMENT - 1))
    if need < MIN_BLOCK:
        need = MIN_BLOCK
    # Round the request up to the next class boundary so that any block in
    # the class found is large enough (no list walk).
    units = need // ALIGNMENT
    if units >= SL_COUNT:
        units += ((<uint64_t>1) << (log2_64(units) - SL_LOG2)) - 1
    mapping(units * ALIGNMENT, &fl, &sl)
    off = NONE_OFFSET
    if fl < FL_COUNT:
        sl_map = st.sl_bitmap[fl] & (~(<uint32_t>0) << sl)
        if sl_map == 0 and fl + 1 < FL_COUNT:
            fl_map = st.fl_bitmap & (~(<uint64_t>0) << (fl + 1))
            if fl_map != 0:
                fl = ctz64(fl_map)
                sl_map = st.sl_bitmap[fl]
        if sl_map != 0:
            off = st.heads[fl][ctz64(sl_map)]
    if off == NONE_OFFSET:
        # Nothing in the classes that surely fit: a block of the request's
        # own class may still be big enough (e.g. filling the whole store).
        mapping(need, &fl, &sl)
        off = st.heads[fl][sl]
        while off != NONE_OFFSET and bsize(hdr(base, off)) < need:
            off = hdr(base, off).next_free
        if off == NONE_OFFSET:
            return NONE_OFFSET
    remove_free(st, base, off)
    b = hdr(base, off)
    rest = bsize(b) - need
    if rest >= MIN_BLOCK:
        # Split: the tail goes back to the free lists.
        b.size_flags = need
        r = hdr(base, off + need)
        r.size_flags = rest
        r.prev_phys = off
        after = off + need + rest
        if after < area_end(st):
            hdr(base, after).prev_phys = off + need
        insert_free(st, base, off + need)
    return off + HEADER_SIZE


cdef void free_block(AllocState* st, uint8_t* base, uint64_t payload) noexcept nogil:
    cdef uint64_t off = payload - HEADER_SIZE
    cdef BlockHeader* b = hdr(base, off)
    cdef uint64_t size = bsize(b)
    cdef uint64_t end = area_end(st)
    cdef uint64_t nxt = off + size
    cdef uint64_t prev = b.prev_phys
    # Coalesce with the next block, then with the previous one.
    if nxt < end and is_free(hdr(base, nxt)):
        remove_free(st, base, nxt)
        size += bsize(hdr(base, nxt))
    if prev != NONE_OFFSET and is_free(hdr(base, prev)):
        remove_free(st, base, prev)
        size += bsize(hdr(base, prev))
        off = prev
    b = hdr(base, off)
    b.size_flags = size
    if off + size < end:
        hdr(base, off + size).prev_phys = off
    insert_free(st, base, off)


cdef bint block_sound(uint8_t* base, uint64_t area_size, uint64_t payload,
                      uint64_t payload_size) noexcept nogil:
    """True if `payload` is the payload offset of an allocated block that
    holds payload_size bytes and lies inside an area of area_size bytes.

    Checked before an entry's block is read or freed: the offset and the
    block header are in shared memory, where any process can overwrite them.
    """
    cdef uint64_t end, off, size
    cdef BlockHeader* b
    if area_size < FIRST_BLOCK + MIN_BLOCK:
        return False
    end = FIRST_BLOCK + ((area_size - FIRST_BLOCK) // ALIGNMENT) * ALIGNMENT
    if payload % ALIGNMENT != 0 or payload < FIRST_BLOCK + HEADER_SIZE or payload >= end:
        return False
    off = payload - HEADER_SIZE
    b = hdr(base, off)
    size = bsize(b)
    if is_free(b) or size < MIN_BLOCK or size > end - off:
        return False
    if size - HEADER_SIZE < payload_size:
        return False
    return b.prev_phys == NONE_OFFSET or (b.prev_phys < off and b.prev_phys >= FIRST_BLOCK)


cdef uint64_t block_payload_capacity(uint8_t* base, uint64_t payload) noexcept nogil:
    return bsize(hdr(base, payload - HEADER_SIZE)) - HEADER_SIZE


cdef uint64_t largest_free_block(AllocState* st, uint8_t* base) noexcept nogil:
    """Payload bytes of the largest free block (walks only the top class)."""
    cdef int fl, sl
    cdef uint64_t off, best = 0
    if st.fl_bitmap == 0:
        return 0
    fl = log2_64(st.fl_bitmap)
    sl = log2_64(st.sl_bitmap[fl])
    off = st.heads[fl][sl]
    while off != NONE_OFFSET:
        if bsize(hdr(base, off)) > best:
            best = bsize(hdr(base, off))
        off = hdr(base, off).next_free
    return best - HEADER_SIZE


cdef int check_and_rebuild(AllocState* st, uint8_t* base) noexcept nogil:
    """Walk the physical block chain, verify it and rebuild the free lists.

    Used after a process died holding the store lock, when the lists may be
    half-updated.  Returns 0 when the chain is sound, -1 when it is damaged
    (the caller then marks the store unusable rather than risk corruption).
    """
    cdef uint64_t end = area_end(st)
    cdef uint64_t off = FIRST_BLOCK
    cdef uint64_t prev = NONE_OFFSET
    cdef uint64_t size
    cdef BlockHeader* b
    cdef bint prev_was_free = False
    reset_lists(st)
    while off < end:
        b = hdr(base, off)
        size = bsize(b)
        if size < MIN_BLOCK or off + size > end:
            return -1
        b.prev_phys = prev
        if is_free(b):
            if prev_was_free:
                # Two free neighbours: a free that died before coalescing.
                remove_free(st, base, prev)
                hdr(base, prev).size_flags = bsize(hdr(base, prev)) + size
                insert_free(st, base, prev)
                off += size
                continue
            insert_free(st, base, off)
            prev_was_free = True
        else:
            prev_was_free = False
        prev = off
        off += size
    return 0 if off == end else -1
