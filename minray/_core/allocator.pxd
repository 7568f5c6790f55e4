# Typed interface of the TLSF allocator that manages a store's data area.
from libc.stdint cimport uint8_t, uint64_t

from minray._core.layout cimport AllocState

# All offsets are relative to `base`, the start of the data area; a block's
# payload offset is what callers hold.  Every function here runs with the
# store lock held and without the GIL.
cdef void alloc_init(AllocState* st, uint8_t* base, uint64_t area_size) noexcept nogil
cdef uint64_t alloc_block(AllocState* st, uint8_t* base, uint64_t payload_size) noexcept nogil
cdef void free_block(AllocState* st, uint8_t* base, uint64_t payload) noexcept nogil
cdef bint block_sound(uint8_t* base, uint64_t area_size, uint64_t payload,
                      uint64_t payload_size) noexcept nogil
cdef uint64_t block_payload_capacity(uint8_t* base, uint64_t payload) noexcept nogil
cdef uint64_t largest_free_block(AllocState* st, uint8_t* base) noexcept nogil
cdef uint64_t max_payload(uint64_t area_size) noexcept nogil
cdef int check_and_rebuild(AllocState* st, uint8_t* base) noexcept nogil
