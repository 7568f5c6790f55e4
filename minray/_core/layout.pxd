# Shared-memory layout of a node's object store arena.
#
# Everything here lives inside one /dev/shm file that every process of the
# node maps, so it holds offsets (never pointers) and fixed-size records.
#
#   [StoreHeader | ClientSlot[max_clients] | ObjectEntry[max_objects]
#    | uint64 pin masks[max_objects][pin_words] | uint32 index[index_slots] | data area]
#
# each region starting on a page.  The object table, pin masks and hash index
# are managed by table.pyx, the data area by the TLSF allocator
# (allocator.pyx); each object is one allocated block:
# [metadata, padded to 64 bytes][data].
#
# Every field here can be overwritten by any process that maps the file, so
# code that follows an offset or index read from it checks the value against
# the bounds this process validated when it mapped the arena.
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_mutexattr_init(pthread_mutexattr_t*)
    int pthread_mutexattr_destroy(pthread_mutexattr_t*)
    int pthread_mutexattr_setpshared(pthread_mutexattr_t*, int)
    int pthread_mutexattr_setrobust(pthread_mutexattr_t*, int)
    int pthread_mutex_init(pthread_mutex_t*, const pthread_mutexattr_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_trylock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_mutex_consistent(pthread_mutex_t*)
    enum:
        PTHREAD_PROCESS_SHARED
        PTHREAD_MUTEX_ROBUST


# Object ids are fixed-length binary strings (see docs/architecture.md).
cdef enum:
    ID_SIZE = 20
    ALIGNMENT = 64               # payload alignment: cache lines and SIMD
    DEFAULT_MAX_CLIENTS = 1024   # processes attached to one store at once ...
    MAX_CLIENTS_LIMIT = 65536    # ... at most (creator_slot is 16 bits)
    FL_COUNT = 40                # TLSF first-level classes (up to 2**46 bytes)
    SL_LOG2 = 4
    SL_COUNT = 16                # TLSF second-level classes per first level
    MAX_METADATA = 65536

cdef enum:
    NO_ENTRY = -1

cdef enum EntryState:
    ENTRY_FREE = 0
    ENTRY_CREATED = 1            # allocated, being written by its creator
    ENTRY_SEALED = 2             # immutable, readable
    ENTRY_DELETING = 3           # deleted while pinned: freed at last release

cdef enum EntryFlags:
    PRIMARY_PIN = 1              # pinned for the node manager, which has not
                                 # adopted this primary copy yet

cdef enum StoreDamage:
    DAMAGE_REPAIR_FAILED = 1     # a repair after a crash inside the lock failed
    DAMAGE_BAD_FIELD = 2         # a field of the table held an out-of-range value

cdef extern from *:
    """
    #define MINRAY_NONE_OFFSET ((uint64_t)-1)
    """
    uint64_t NONE_OFFSET "MINRAY_NONE_OFFSET"


cdef struct AllocState:
    uint64_t area_size           # bytes managed, starting at the data area base
    uint64_t free_bytes          # sum of free block sizes (headers included)
    uint64_t free_blocks
    uint64_t fl_bitmap
    uint32_t sl_bitmap[FL_COUNT]
    uint64_t heads[FL_COUNT][SL_COUNT]


cdef struct ClientSlot:
    int32_t pid                  # 0: slot free
    uint32_t generation
    uint64_t start_time          # process start time, guards against pid reuse


# 64 bytes.  Its pins live in the pin-mask region: pin_words words per
# entry, bit i set while client slot i holds a view; pin_holders counts the
# bits set, so "is it pinned?" reads one word instead of the whole mask.
cdef struct ObjectEntry:
    uint8_t object_id[ID_SIZE]
    uint8_t state
    uint8_t flags                # EntryFlags
    uint16_t creator_slot
    uint32_t metadata_size
    uint32_t pin_holders         # client slots with their bit set in the mask
    int32_t lru_prev             # links in the list of evictable objects
    int32_t lru_next
    int32_t next_free_entry
    int32_t primary_pid          # process that sealed it with PRIMARY_PIN
    uint64_t block               # block offset in the data area
    uint64_t data_size


cdef struct StoreHeader:
    char magic[8]
    uint32_t version
    uint32_t header_size
    uint64_t file_size
    uint64_t entries_offset
    uint64_t index_offset
    uint64_t data_offset
    uint64_t data_size
    uint32_t max_objects
    uint32_t index_slots         # power of two, >= 2 * max_objects
    uint64_t clients_offset
    uint64_t pins_offset
    uint32_t max_clients         # multiple of 64
    uint32_t pin_words           # max_clients / 64
    char name[128]
    uint64_t layout_checksum     # over the fields above: detects damage
    # --- mutable state, guarded by lock ---
    pthread_mutex_t lock
    uint32_t damaged             # StoreDamage, 0 while sound
    int32_t damaged_entry        # the entry found damaged (DAMAGE_BAD_FIELD)
    uint32_t lock_recoveries
    int32_t lru_head             # least recently used evictable object
    int32_t lru_tail
    int32_t free_entry_head
    uint32_t entries_high_water
    uint32_t num_objects
    uint32_t num_clients
    uint64_t evictions
    uint64_t evicted_bytes
    AllocState alloc
