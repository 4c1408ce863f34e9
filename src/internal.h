/* zkmem internals: the types shared between layers and the map of which file
 * owns which function.
 *
 * Glossary (bottom to top):
 *   os       the only code that talks to the kernel (os.h).
 *   segment  4 MiB of address space aligned to 4 MiB. Slice 0 holds the
 *            segment header and one page descriptor per slice, so any pointer
 *            finds its metadata by masking. Huge blocks get a segment of
 *            their own, sized to fit.
 *   slice    64 KiB, the unit in which segments are cut into spans.
 *   span     a run of slices: free (in a size bin, merged with free
 *            neighbours), or in use as one page.
 *   page     a span in use: blocks of one size class (small), one block
 *            (large), or objects of one pool. Its descriptor is the page_t of
 *            the span's first slice.
 *   block    what malloc returns. Free blocks link through their first word,
 *            encoded with the page's key (in a page's lists) or the heap's
 *            (in a bin).
 *   bin      a heap's stack of free blocks of one class, from any of its
 *            pages: malloc pops, the owner's free pushes (the fast paths).
 *   heap     per-thread: a bin per class in front of the pages it allocates
 *            from, one queue of pages per class.
 *   pool     zk_pool_t: exact-size objects, per-thread magazines over pages.
 *
 * Layers: alloc.c and pool.c (API) -> heap.c -> page.c -> segment.c -> os.c.
 * A layer calls only the layers below it.
 *
 * Lock order (outer first): task heaps' lock, pool registry, pool->lock,
 * abandoned_lock, heaps_lock, segment_lock, meta lock. Fast paths take no
 * lock. */
#ifndef ZKMEM_INTERNAL_H
#define ZKMEM_INTERNAL_H

#include "zkmem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define likely(x)   __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define ZK_NOINLINE __attribute__((noinline))
#define ZK_INLINE   static inline __attribute__((always_inline))
/* Statistics read other threads' counters and page queues while those
 * threads change them: by design, with relaxed loads, bounded walks and the
 * segment lock keeping every descriptor mapped (heap_collect_stats), and
 * exact only once the threads are quiet. The writers are the fast and slow
 * paths, plain stores that stay so. ThreadSanitizer does not instrument
 * these readers; every other access stays checked. */
#define ZK_STATS_READER __attribute__((no_sanitize("thread"), noinline))
/* Their loads of counters the owners write with plain stores: volatile,
 * so each is one load the compiler keeps, and plain for the sanitizer
 * (clang's still checks atomics in such functions). */
#define STATS_LOAD(lvalue) (*(const volatile __typeof__(lvalue) *)&(lvalue))

/* Memcheck annotations (build option ZKMEM_VALGRIND): blocks handed out are
 * heap blocks to valgrind, free blocks and never-used memory are
 * inaccessible, so `valgrind prog` reports the program's leaks, reads of
 * uninitialised bytes, and accesses to freed or unallocated memory. They
 * cost a few instructions when not running under valgrind, and nothing
 * without the option. */
#ifdef ZKMEM_VALGRIND
#include <valgrind/memcheck.h>
#define ZK_TRACKING 1
#define track_malloc(p, size, zeroed)                                          \
  VALGRIND_MALLOCLIKE_BLOCK((p), (size), 0, (zeroed))
#define track_free(p)            VALGRIND_FREELIKE_BLOCK((p), 0)
#define track_noaccess(p, size)  VALGRIND_MAKE_MEM_NOACCESS((p), (size))
#define track_undefined(p, size) VALGRIND_MAKE_MEM_UNDEFINED((p), (size))
#define track_defined(p, size)   VALGRIND_MAKE_MEM_DEFINED((p), (size))
/* Segment headers: inaccessible to the program and to the leak checker
 * (page descriptors point at blocks), readable by zkmem without reports. */
#define track_header(p, size)                                                  \
  do {                                                                         \
    VALGRIND_MAKE_MEM_NOACCESS((p), (size));                                   \
    VALGRIND_DISABLE_ADDR_ERROR_REPORTING_IN_RANGE((p), (size));               \
  } while (0)
#define track_header_gone(p, size)                                             \
  VALGRIND_ENABLE_ADDR_ERROR_REPORTING_IN_RANGE((p), (size))
/* Runs `statement` with memcheck's reports off for this thread. */
#define track_quietly(statement)                                               \
  do {                                                                         \
    VALGRIND_DISABLE_ERROR_REPORTING;                                          \
    statement;                                                                 \
    VALGRIND_ENABLE_ERROR_REPORTING;                                           \
  } while (0)
#else
#define ZK_TRACKING                   0
#define track_malloc(p, size, zeroed) ((void)(p), (void)(size), (void)(zeroed))
#define track_free(p)                 ((void)(p))
#define track_noaccess(p, size)       ((void)(p), (void)(size))
#define track_undefined(p, size)      ((void)(p), (void)(size))
#define track_defined(p, size)        ((void)(p), (void)(size))
#define track_header(p, size)         ((void)(p), (void)(size))
#define track_header_gone(p, size)    ((void)(p), (void)(size))
#define track_quietly(statement)      statement
#endif
#define ZK_EXPORT  __attribute__((visibility("default")))
#define ZK_COLD    __attribute__((cold, noinline))
#define CACHE_LINE 64u

#define SEGMENT_SHIFT      22
#define SEGMENT_SIZE       ((size_t)1 << SEGMENT_SHIFT)
#define SEGMENT_MASK       (SEGMENT_SIZE - 1)
#define SLICE_SHIFT        16
#define SLICE_SIZE         ((size_t)1 << SLICE_SHIFT)
#define SLICES_PER_SEGMENT (SEGMENT_SIZE / SLICE_SIZE)
/* Slice 0 is the header; spans use slices 1..63. */
#define SEGMENT_FIRST_SLICE   1
#define SEGMENT_USABLE_SLICES (SLICES_PER_SEGMENT - SEGMENT_FIRST_SLICE)

#define SMALL_MAX ((size_t)64 * 1024) /* largest size class */
/* The classes a thread's bin keeps of other threads' frees (heap.c, see
 * the comment before heap_block_freeable). */
#define FOREIGN_KEEP_MIN 128
#define FOREIGN_KEEP_MAX 1024
#define LARGE_MAX        ((size_t)2 * 1024 * 1024) /* above: huge, own mapping */
#define CLASS_COUNT      69
/* Classes up to 2 KiB: those whose frees by other threads are chained
 * (heap.c, "remote chains"). */
#define REMOTE_CHAIN_CLASSES 41
/* Task sub-heaps carve blocks up to ARENA_BLOCK_MAX (classes below
 * ARENA_CLASSES) from arenas (heap.c). */
#define ARENA_BLOCK_MAX     ((size_t)4096)
#define ARENA_CLASSES       49
#define POOL_SLOTS          1024
#define LARGE_CACHE_ENTRIES 8
#define ZK_ALIGN_MAX_SMALL  SLICE_SIZE /* alignment pages give for free */

typedef struct heap heap_t;
typedef struct page page_t;
typedef struct segment segment_t;
typedef struct magazine magazine_t;

/* A free block: its first word is the encoded address of the next one. */
typedef struct block {
  uintptr_t next_encoded;
} block_t;

typedef enum page_kind {
  PAGE_FREE_SPAN = 0, /* in a segment size bin (or cached, see below) */
  PAGE_SMALL,         /* blocks of one size class, owned by a heap */
  PAGE_LARGE,         /* a single block above SMALL_MAX */
  PAGE_POOL,          /* objects of one zk_pool_t */
  PAGE_HUGE,          /* the block of a huge segment */
  PAGE_HEADER,        /* slice 0 */
  /* A freed large span in a heap's cache. Any thread's purge may return
   * its memory once it has been cached for the purge delay: the purge
   * takes it with a CAS to PAGE_LARGE_PURGING, and its owner takes it back
   * with a CAS to PAGE_LARGE (large.c), so neither writes it under the
   * other. */
  PAGE_LARGE_CACHED,
  PAGE_LARGE_PURGING,
  /* A task sub-heap's arena: small blocks of any class carved one after
   * another, each block's class in a table at the span's start (heap.c,
   * "task arenas"). No owner word: every free takes the slow path. */
  PAGE_ARENA,
} page_kind_t;

/* Invariant for small pages, on the owner's side:
 *   used == capacity - |free|
 * and blocks in thread_free, or in the owner's bin, are still counted in
 * `used` until they come back. A page with used == 0 has every block in its
 * own lists. */
struct page {
  /* Hot: the free fast path reads owner, bin_offset and keep_mask from
   * this line. */
  block_t *free;        /* owner only: refills its bin from here; bin flushes
                           and secure frees push */
  uintptr_t key;        /* free-list encoding key: the owner heap's bin key */
  uint32_t used;        /* blocks handed out (owner's view) */
  uint32_t carve_first; /* first block carved: the page's colour */
  uint8_t in_full;      /* in the heap's full queue */
  uint8_t kind;         /* page_kind_t */
  uint8_t is_zero;      /* span memory is known to read as zero */
  uint8_t class_index;  /* small pages */
  /* The free fast path's part, at 28-31 mod 32 (see below), written with
   * the owner word on every slice (page_set_owner). class_index *
   * sizeof(bin_t): the bin without a shift. 0x7fff on a small page of a
   * class other threads' bins keep, owned by a thread heap (not abandoned,
   * not a task's) and not secure, else 0 (as every descriptor starts):
   * and-ed with a bin's room (bin_takes), which it turns non-negative. */
  uint16_t bin_offset;
  _Atomic uint16_t keep_mask;
  /* NULL: abandoned, pool, large or free span. Secure pages store the heap
   * with bit 0 set, so the owner's fast path never matches and every free
   * takes the checked path. */
  _Atomic(heap_t *) owner;
  union {
    uint64_t frees; /* blocks freed into this page (stats) */
    /* Arena: blocks freed by other threads than the owner (any thread). */
    _Atomic(uint64_t) arena_remote_frees;
  };

  /* Read by other threads' frees, written by the owner on slow paths. */
  uint32_t block_size;  /* small: class size; pool: stride */
  uint32_t capacity;    /* blocks carved so far, from carve_first on */
  uint32_t reserved;    /* blocks the span can hold */
  uint32_t slice_count; /* span length, on the head */

  /* The second line: other threads' frees push here with a CAS, so the
   * owner's fast path, which reads the first line, does not miss after
   * each of them. */
  _Atomic(uintptr_t) thread_free; /* a block list, and PAGE_REMOTE_FULL */
  uint32_t slice_offset; /* slices back to the span head (0 on the head) */
  uint8_t purged;        /* free span: returned to the OS */
  uint8_t huge_pages;    /* backed by huge pages */
  uint8_t secure;        /* ZKMEM_SECURE when the page was set up */
  uint8_t *start;        /* first block */
  page_t *next, *prev;   /* heap queue, pool list or free bin */
  union {
    uint64_t free_since_ms; /* free span, cached large span: freed when */
    /* Secure small and pool pages: one bit per block, set while the block
     * is free (page_free_bit_*), so every double free is caught at once. */
    _Atomic(uint64_t) *free_bits;
  };
  union {
    zk_pool_t *pool; /* pool pages */
    zk_heap_t *task; /* large and huge blocks of a task heap */
  };
  union {
    size_t large_size;  /* large/huge: usable bytes */
    heap_t *arena_heap; /* arena: the sub-heap that carves it */
  };
};
/* A power of two, so that finding a slice's descriptor is a shift. */
_Static_assert(sizeof(struct page) == 128, "page_t must stay 128 bytes");
/* 4 KiB aliasing: a load whose address agrees with a recent store's in its
 * low 12 bits waits as if it read that store. The free loads a
 * descriptor's owner, bin_offset and keep_mask just after a malloc or
 * free stored into a bin, and descriptors repeat every 128 bytes (a
 * multiple of 32): those fields sit at offsets, modulo 32, that no bin
 * write touches (see the heap's layout). With the class, which the free
 * read then, at 26 mod 32, a 128 B block allocated and freed in a loop ran
 * 7% slower than a 64 B one. */
_Static_assert(offsetof(struct page, bin_offset) % 32 == 28 &&
                   offsetof(struct page, keep_mask) % 32 == 30,
               "the free fast path's fields outside the bins' stores (mod 32)");
_Static_assert(offsetof(struct page, owner) % 32 == 0,
               "owner outside the bins' stores (mod 32)");
_Static_assert(offsetof(struct page, thread_free) == 64,
               "remote frees' CAS off the line the owner's fast path reads");

/* Read atomically wherever the reader does not hold the span alone: any
 * thread's purge may try its CAS on a large span's kind (it saw
 * PAGE_LARGE_CACHED a moment ago; its owner has since taken the span back),
 * and a failed CAS still counts as a write that races a plain read. */
ZK_INLINE page_kind_t page_kind(const page_t *page) {
  return (page_kind_t)__atomic_load_n(&page->kind, __ATOMIC_RELAXED);
}

/* A thread heap's small page of blocks no larger than an OS page: each of
 * its OS pages is touched once its blocks have all been handed out, so the
 * blocks it carves count as dense memory (segment.c, "dense halves"). */
ZK_INLINE bool page_dense(const page_t *page) {
  return page->task == NULL && !page->secure &&
         page->block_size <= 4096 /* OS_PAGE_SIZE */ &&
         page_kind(page) == PAGE_SMALL;
}

typedef enum segment_kind { SEGMENT_NORMAL = 1, SEGMENT_HUGE } segment_kind_t;

struct segment {
  uintptr_t cookie; /* address ^ process secret: masking found a header */
  uint8_t kind;     /* segment_kind_t */
  uint8_t huge_pages;
  /* Secure mode: the header's last OS page and the last slice are
   * inaccessible, so no block borders a neighbouring segment. */
  uint8_t guarded;
  /* HUGE: the block starts one segment on (alignment >= SEGMENT_SIZE), its
   * descriptor is segment_pages(segment)[SEGMENT_FIRST_SLICE]. */
  uint8_t block_after_header;
  /* HUGE: the block was assembled from several freed mappings, moved side
   * by side, and is as many kernel mappings. */
  uint8_t several_mappings;
  /* NORMAL: whether each 2 MiB half is advised for transparent huge pages,
   * and when its advice was last withdrawn (segment.c, "dense halves"). */
  uint8_t half_advised[2];
  uint64_t half_split_ms[2];
  uint32_t used_slices;
  size_t mapped_size;
  uint64_t free_since_ms; /* all slices free since (NORMAL) */
  segment_t *next, *prev; /* list of NORMAL segments */
  /* NORMAL: bytes of dense pages carved in each half, added to by any heap
   * carving in the segment: on the header's second line, off the first,
   * which span allocations write. */
  _Atomic uint32_t half_carved[2];
};
/* A segment's slice descriptors (segment_pages): 64 of 128 bytes, in its
 * header slice after the fields above, at one of four 8 KiB offsets picked
 * by bits 22-23 of the segment's address. Headers are 4 MiB aligned, so
 * without the offset descriptor i of every segment falls in the same cache
 * sets, and a free of a block of an older segment missed on its
 * descriptor: in a cache simulation of the `mixed` scenario (an L2 of
 * 512 KiB, 8 ways), 4.5x tcmalloc's L2 read misses in free. The fast paths
 * find the descriptor with the same two instructions as before: the shift
 * that gives slice * 128 also brings those address bits down (see
 * segment_slice_offset). */
#define SEGMENT_PAGES_OFFSET 128
#define SEGMENT_COLOUR_SHIFT 13 /* 8 KiB: the descriptors' size */
#define SEGMENT_COLOURS      4
#define SEGMENT_HEADER_BYTES                                                   \
  (SEGMENT_PAGES_OFFSET +                                                      \
   (SEGMENT_COLOURS << SEGMENT_COLOUR_SHIFT)) /* 32 KiB + 128 */
_Static_assert(offsetof(struct segment, half_carved) >= 64,
               "carving counts off the line span allocations write");
_Static_assert(sizeof(struct segment) <= SEGMENT_PAGES_OFFSET,
               "segment fields before the descriptors");
_Static_assert(SLICES_PER_SEGMENT * 128 == (1 << SEGMENT_COLOUR_SHIFT),
               "a colour step is the descriptors' size");
_Static_assert(SEGMENT_HEADER_BYTES <= SLICE_SIZE - 4096,
               "descriptors below a guarded header's last OS page");
/* The byte offset of p's slice descriptor from its segment's first
 * descriptor slot: slice * 128 plus the colour, both from one shift of p. */
ZK_INLINE uintptr_t segment_slice_offset(const void *p) {
  return ((uintptr_t)p >> (SLICE_SHIFT - 7)) &
         (((SLICES_PER_SEGMENT - 1) << 7) |
          ((uintptr_t)(SEGMENT_COLOURS - 1) << SEGMENT_COLOUR_SHIFT));
}
ZK_INLINE page_t *segment_pages(const segment_t *segment) {
  return (page_t *)((uintptr_t)segment + SEGMENT_PAGES_OFFSET +
                    segment_slice_offset(segment));
}

typedef struct page_queue {
  page_t *first;
  page_t *last;
} page_queue_t;

/* Per-thread counters, merged on read (stats.c). */
typedef struct heap_stats {
  uint64_t class_frees_retired[CLASS_COUNT]; /* from pages no longer held */
  uint64_t class_allocs_retired[CLASS_COUNT];
  /* Arena blocks a task heap's release freed, each an allocation and a
   * free: one array for both, so the release adds once per class. */
  uint64_t class_arena_retired[ARENA_CLASSES];
} heap_stats_t;

/* A heap's free blocks of one class (see heap.c). */
typedef struct bin {
  block_t *head;  /* links encoded with the heap's bin_key */
  uint64_t frees; /* by this thread into this bin (statistics) */
  union {
    struct {
      /* How many more blocks the bin takes, limit - count: malloc adds one
       * and free takes one, each a single read-modify-write, and the free
       * that takes it below zero flushes. */
      int32_t room;
      uint32_t limit; /* blocks the bin holds at most (see bin_grow) */
    };
    /* Both: a limit changes with its room in one store, and a statistics
     * reader loads them in one (bin_count_racy), so that it never takes a
     * room for another limit's. */
    uint64_t room_and_limit;
  };
  uint8_t flags; /* BIN_REFILLED, BIN_CYCLED */
  /* Task sub-heaps' arena carves (heap_malloc_bin_empty), beside the head
   * the malloc just read: the class's entry in an arena's table (the class
   * carved, plus one), and the bytes a carve takes, ARENA_CARVE_NEVER for
   * a class that pages serve (above the arena classes, or hot). */
  uint8_t arena_code;
  /* Another heap's block is kept here while its page's keep mask and-ed
   * with room is at least keep_floor (bin_takes): the limit less half the
   * class's base limit, plus one (the bin holds under half the base
   * limit), while the bin is refilled and keeps its class, else
   * BIN_KEEPS_NONE.
   * A refill may take a bin past its limit (a page's remote list is taken
   * whole), and its room stays negative until the next free flushes it:
   * the mask makes such a room a large positive one, never BIN_KEEPS_NONE,
   * so a bin that keeps nothing (a task heap's) still keeps nothing, and
   * one that keeps takes the block and flushes. Never 0 (which would keep
   * every block): heap_empty's and every new heap's bins start at
   * BIN_KEEPS_NONE. */
  uint16_t keep_floor;
  uint32_t arena_carve;
} bin_t;
#define BIN_REFILLED   1 /* ran empty since the last decay pass */
#define BIN_CYCLED     2 /* ran empty since its last flush */
#define BIN_KEEP_MASK  0x7fff
#define BIN_KEEPS_NONE 0xffff /* above any room and-ed with the mask */
/* The first refill of a bin in a new heap, a sub-heap adopted for a task,
 * or after a decay pass, takes a few blocks from a page's list (a page's
 * remote list, spliced whole, may give more); one that runs empty again
 * takes half its limit. A thread that allocates once and exits walked half
 * a bin of its page's list for one block, and gave the rest back at its
 * exit: 3.4% of the time of a program that starts 5,000 threads each
 * allocating one 128 B block (mleak), 0.4% with this, which ran 1.02x
 * faster (41 alternating rounds, ahead in 27). */
#define BIN_FIRST_REFILL 16

/* Whether a free goes onto `bin`: the owner's (foreign, the owner word
 * xor the heap, is 0) always; another thread heap's block where its page's
 * keep mask and-ed with the bin's room reaches the bin's keep floor. One branch
 * for both tests: on x86-64 the keep test becomes a mask (cmp, sbb) and-ed with
 * the owner test. As two branches, whichever came first was data-dependent
 * where programs differ: the owner test mispredicted on every second free of a
 * server whose threads free each other's blocks (1.03 M of 2.1 M frees,
 * simulated), the keep test on a single thread's random sizes, some classes
 * kept and some not (stress ran 0.61x). */
ZK_INLINE bool bin_takes(const bin_t *bin, uint16_t keep_mask,
                         uintptr_t foreign) {
  uint16_t room_to_keep = (uint16_t)bin->room & keep_mask;
#if defined(__x86_64__)
  uintptr_t short_of_keep; /* all ones where room_to_keep < keep_floor */
  __asm__("cmpw %w2, %w1\n\tsbb %q0, %q0"
          : "=r"(short_of_keep)
          : "r"(room_to_keep), "rm"(bin->keep_floor)
          : "cc");
  return (foreign & short_of_keep) == 0;
#else
  return foreign == 0 || room_to_keep >= bin->keep_floor;
#endif
}

ZK_INLINE uint32_t bin_count(const bin_t *bin) {
  return (uint32_t)((int64_t)bin->limit - bin->room);
}
/* bin_count of another thread's bin (statistics). */
ZK_INLINE uint32_t bin_count_racy(const bin_t *bin) {
  bin_t seen;
  seen.room_and_limit = STATS_LOAD(bin->room_and_limit);
  return bin_count(&seen);
}

struct heap {
  /* Fast paths: bins[class], and pool_magazines[] mapping a pool slot to
   * this thread's magazine. */
  uintptr_t bin_key;
  bin_t bins[CLASS_COUNT];
  /* Task heaps (taskheap.c): NULL for a thread's own heap. Read on every
   * refill and flush, so on the line of bin_slow_events: at the end of the
   * heap it cost a cache miss per refill (cross-thread scenarios 4-8%
   * slower side by side). */
  zk_heap_t *_Atomic task;
  uint32_t bin_slow_events; /* refills and flushes, to pace decay */
  uint64_t bin_decay_ms;    /* the last decay pass */
  bool bin_decaying;        /* a pass is running (pages it frees purge) */
  magazine_t *pool_magazines[POOL_SLOTS];
  page_queue_t queues[CLASS_COUNT]; /* pages that may have free blocks */
  page_queue_t full;                /* pages found without free blocks */
  /* Hint: scan `full`. Other threads load it on every free into a full
   * page of this heap: on a line of its own, which the owner writes only
   * to clear it, not beside the queues it updates on every page move. */
  _Alignas(CACHE_LINE) atomic_int remote_frees_to_full;
  _Alignas(CACHE_LINE) uint64_t random_state;
  uint32_t page_colour;    /* the colour the next small page starts at */
  segment_t *home_segment; /* where this heap's spans come from first */
  page_t *large_cache[LARGE_CACHE_ENTRIES];
  unsigned large_cache_count;
  heap_stats_t stats;
  heap_t *next_heap, *prev_heap; /* heaps_lock: live heaps / free heaps */
  /* Task heaps: a sub-heap is a thread's heap for one task heap (`task`);
   * its pages are its own, as a thread's heap's are. */
  heap_t *home; /* sub-heap: its thread's own heap (NULL: exited) */
  /* Sub-heap: its thread is in it (heap_current), read by a destroy on
   * another thread. Per sub-heap, so entering a task heap that several
   * workers run writes no shared line. */
  atomic_bool entered;
  heap_t *task_next; /* sub-heap: the task's list (task lock) */
  heap_t *subheaps;  /* own heap: its thread's sub-heaps (owner only) */
  heap_t *subheap_next, *subheap_prev; /* sub-heap: in its home's list */
  /* Own heap: sub-heaps whose task heap another thread destroyed, pushed
   * by that thread (dead_next), and the ones this thread keeps to serve
   * its next task heaps (subheap_next, owner only). */
  heap_t *_Atomic dead_subheaps;
  heap_t *dead_next;
  heap_t *spare_subheaps;      /* with their arena, taken first */
  heap_t *spare_subheaps_bare; /* without */
  unsigned spare_count, spare_arena_count;
  /* Sub-heap statistics, kept on slow paths: blocks into and out of each
   * bin from its pages (a bin's pops are taken + frees - returned - held),
   * and secure pages' blocks handed out and freed by this thread. */
  uint64_t bin_taken, bin_returned;
  uint64_t secure_allocs, secure_frees;
  /* Sub-heap arenas (heap.c): the current one first; blocks of each class
   * out of them (owner) and freed back by other threads (any thread). */
  page_t *arenas;
  uint32_t arena_count;
  uint32_t page_count; /* pages in its queues: bounds a release's walk */
  /* Bytes charged to the task ahead of arena carves (ARENA_CHARGE_CHUNK at
   * a time), so that a carve seldom touches the task's shared counters;
   * given back with the bins. */
  size_t task_credit;
  bool arena_charged;      /* since its last release: it may have carved */
  bool has_pool_magazines; /* a pool_magazines slot is not the empty one */
  /* Owner frees of arena blocks by class: a class freed this often is
   * served by pages, whose frees take the fast path. */
  uint16_t arena_owner_frees[ARENA_CLASSES];
  uint64_t arena_hot; /* bit c: class c turned hot (pages serve it) */
  /* Sub-heaps: classes whose bins or queues were used since the sub-heap
   * last served a new task, so that a release and the reset after it walk
   * those and not all CLASS_COUNT. */
  uint64_t classes_used[(CLASS_COUNT + 63) / 64];
  uint64_t arena_out[ARENA_CLASSES];
  _Atomic(uint64_t) arena_remote[ARENA_CLASSES];
  /* A thread heap's frees of other heaps' blocks, linked per class and
   * pushed to their page with one CAS (heap.c, "remote chains"). */
  uint64_t remote_chains_open; /* bit c: remote_chains[c] holds blocks */
  struct remote_chain {
    page_t *page; /* the blocks' page, while count != 0 */
    block_t *head, *tail;
    uint32_t count, limit;
  } remote_chains[REMOTE_CHAIN_CLASSES];
};
/* Heaps are page-aligned (os_meta_alloc aligns blocks of a page or more to
 * a page). The fast paths write a bin's head, frees and room: offsets 8 to
 * 27 modulo 32, clear of the key (0 to 7) and of the descriptor fields the
 * free reads (see page_t). */
_Static_assert(sizeof(struct heap) >= 4096, "heaps are page-aligned");
_Static_assert(sizeof(bin_t) == 32 && offsetof(struct heap, bins) % 32 == 8,
               "bins at 8 mod 32");
_Static_assert(offsetof(bin_t, head) == 0 && offsetof(bin_t, frees) == 8 &&
                   offsetof(bin_t, room) == 16,
               "the fields the fast paths write: the first 20 bytes");

/* A heap's bin at a byte offset in its bins (bin_offset_by_8, a slice's
 * bin_offset), in one register: without the barrier GCC computes it again
 * after a store into the block, three instructions. */
ZK_INLINE bin_t *heap_bin_at(heap_t *heap, unsigned bin_offset) {
  bin_t *bin = (bin_t *)((uint8_t *)heap->bins + bin_offset);
  __asm__("" : "+r"(bin));
  return bin;
}

/* Pool magazine: a thread's stack of free objects of one pool. */
struct magazine {
  /* Objects held (low MAGAZINE_COUNT_BITS) and allocations since the last
   * fold (the rest): one word, so the allocation fast path counts with the
   * same store that pops. Slow paths fold the high part into allocations;
   * 40 bits leave 10^12 allocations between two slow paths. */
  uint64_t state;
  uint32_t capacity;
  uint64_t allocations; /* by this thread, folded */
  zk_pool_t *pool;      /* NULL once the pool is destroyed */
  uint64_t pool_uid;
  int64_t taken;  /* objects moved in from the pool (fresh or reused) */
  uint64_t fresh; /* of those, carved from never-used memory */
  uint8_t *carve_next, *carve_end; /* fresh objects reserved to this thread */
  page_t *carve_page;
  heap_t *heap;
  /* Snapshot for other threads' statistics, taken under the pool lock at
   * every exchange: the fields above are the owner's alone. */
  int64_t published_live;
  uint64_t published_allocations;
  uint64_t published_fresh;
  magazine_t *next_in_pool, *prev_in_pool;
  void *items[];
};

#define MAGAZINE_COUNT_BITS 24
#define MAGAZINE_COUNT_MASK ((UINT64_C(1) << MAGAZINE_COUNT_BITS) - 1)
ZK_INLINE uint32_t magazine_count(const magazine_t *magazine) {
  return (uint32_t)(magazine->state & MAGAZINE_COUNT_MASK);
}
ZK_INLINE void magazine_set_count(magazine_t *magazine, uint32_t count) {
  magazine->state = (magazine->state & ~MAGAZINE_COUNT_MASK) | count;
}
ZK_INLINE uint64_t magazine_allocations(const magazine_t *magazine) {
  return magazine->allocations + (magazine->state >> MAGAZINE_COUNT_BITS);
}

/* ---- os.c: see os.h ---- */

/* ---- segment.c ---- */
#define SEGMENT_MAP_ENTRIES ((size_t)1 << (48 - SEGMENT_SHIFT))
/* What the owned-segment map says of a 4 MiB-aligned address. */
enum {
  SEGMENT_MAP_NONE = 0,
  SEGMENT_MAP_HEADER = 1, /* a segment header is here */
  /* A huge block aligned to 4 MiB or more starts here; its header is the
   * segment just before (segment_lookup). */
  SEGMENT_MAP_AFTER_HEADER = 2,
};
extern uint8_t segment_owned_map[SEGMENT_MAP_ENTRIES];
ZK_INLINE segment_t *segment_of(const void *p) {
  return (segment_t *)((uintptr_t)p & ~(uintptr_t)SEGMENT_MASK);
}
ZK_INLINE uint8_t segment_map_state(const segment_t *segment) {
  uintptr_t index =
      ((uintptr_t)segment >> SEGMENT_SHIFT) & (SEGMENT_MAP_ENTRIES - 1);
  return __atomic_load_n(&segment_owned_map[index], __ATOMIC_RELAXED);
}
/* A header is here: segment_page_of(segment, p) is p's descriptor. */
ZK_INLINE bool segment_is_owned(const segment_t *segment) {
  return segment_map_state(segment) == SEGMENT_MAP_HEADER;
}
/* Slow paths: the descriptor of the span or huge block holding p, also for
 * huge blocks aligned beyond a segment; NULL where zkmem owns nothing. */
page_t *segment_lookup(const void *p);
/* The descriptor of p's slice: the span head's, or an interior one. */
ZK_INLINE const page_t *segment_slice_of(const segment_t *segment,
                                         const void *p) {
  /* Offset and header address as one pointer, the fields' size as the
   * loads' displacement (an add of it of its own cost the free an
   * instruction). */
  const page_t *slot0 =
      (const page_t *)((uintptr_t)segment + segment_slice_offset(p));
  return slot0 + SEGMENT_PAGES_OFFSET / sizeof(page_t);
}
ZK_INLINE page_t *segment_page_of(segment_t *segment, const void *p) {
  /* In byte arithmetic: the compiler then needs one shift per step. */
  uintptr_t address =
      (uintptr_t)segment + SEGMENT_PAGES_OFFSET + segment_slice_offset(p);
  uintptr_t back = (uintptr_t)((const page_t *)address)->slice_offset;
  return (page_t *)(address - back * sizeof(page_t));
}
/* home: the caller's preferred segment (a heap's), updated; or NULL. */
page_t *segment_span_alloc(size_t slices, page_kind_t kind, segment_t **home);
/* `bytes` from `start` carved into blocks of a dense page (page_dense):
 * counted in their segment's halves, which may collapse into huge pages
 * (segment.c, "dense halves"). Called by the page's owner, no lock held. */
void segment_carved(page_t *page, uint8_t *start, size_t bytes);
/* The longest span a segment can give (secure segments keep a guard
 * slice). */
size_t segment_span_max_slices(void);
void segment_span_free(page_t *span);
void segment_span_free_since(page_t *span, uint64_t free_since_ms);
/* zeroed: the caller wants zeros, so fresh pages rather than reused. */
page_t *segment_huge_alloc(size_t size, size_t alignment, bool zeroed);
void segment_huge_free(page_t *page);
page_t *segment_huge_resize(page_t *page, size_t new_size);
size_t segment_purge(uint64_t now_ms, bool force);
size_t segment_slices_mapped(void); /* segment_lock held */
void segment_lock_all(void);
void segment_unlock_all(void);
void segment_collect_stats(zk_stats_t *out);
extern pthread_mutex_t segment_lock;

/* ---- page.c ---- */
/* False when secure mode's free bits cannot be had (no memory). */
bool page_init_small(page_t *page, heap_t *heap, unsigned class_index);
bool page_extend(page_t *page);
/* Whether block `index` of the page has been carved (can have been handed
 * out): the `capacity` blocks from carve_first on, wrapping at the end.
 * Inline: every free of another thread's block checks it. */
ZK_INLINE bool page_block_is_carved(const page_t *page, size_t index) {
  uint32_t capacity = __atomic_load_n(&page->capacity, __ATOMIC_RELAXED);
  if (index >= page->reserved)
    return false;
  size_t carved_before = index >= page->carve_first
                             ? index - page->carve_first
                             : index + page->reserved - page->carve_first;
  return carved_before < capacity;
}
void page_secure_fill(const page_t *page, block_t *block);
bool page_secure_intact(const page_t *page, const block_t *block);
block_t *page_take_remote(page_t *page, block_t **tail, uint32_t *count);
/* The same list without the walk: its first block and the count its
 * pushes left, checked against the page (the block lies in it, the count
 * is at most the blocks out of it); the caller gives it a tail-less home
 * (an empty bin), or walks it (page_take_remote). */
block_t *page_take_remote_unwalked(page_t *page, uint32_t *count);
/* A list taken from the page's remote frees goes into its `free`. */
void page_splice_free(page_t *page, block_t *remote, block_t *tail,
                      uint32_t count);
void page_collect(page_t *page);
/* thread_free's low bit (blocks are 8-byte aligned): set by the owner
 * while the page is in its full queue (heap_queue_full). A remote free
 * reads it in the word its CAS replaces, and so learns that the owner
 * needs a hint without touching the page after its push: from then on the
 * owner may collect the block, release the page, and the segment may be
 * unmapped. Pushes and collects keep it; only the owner clears it, when
 * the page leaves `full`. So every push into a full page hints the owner
 * it read, and one whose owner read was stale (the page abandoned and
 * reclaimed meanwhile) is made good by the next push, or by the owner's
 * rescan of `full` in each bin decay pass. */
#define PAGE_REMOTE_FULL ((uintptr_t)1)
/* The rest of the word: the list's first block (bits 3-47) and how many
 * blocks it holds (bits 48-63; a page holds at most 8,192), so that the
 * owner can take the list without walking it. */
#define PAGE_REMOTE_COUNT_SHIFT 48
#define PAGE_REMOTE_ONE         ((uintptr_t)1 << PAGE_REMOTE_COUNT_SHIFT)
#define PAGE_REMOTE_LIST        ((PAGE_REMOTE_ONE - 1) & ~PAGE_REMOTE_FULL)
ZK_INLINE bool page_has_remote(page_t *page) {
  return (atomic_load_explicit(&page->thread_free, memory_order_relaxed) &
          ~PAGE_REMOTE_FULL) != 0;
}
/* The owner takes its page out of `full`: the flag goes. */
ZK_INLINE void page_leave_full(page_t *page) {
  if (atomic_load_explicit(&page->thread_free, memory_order_relaxed) &
      PAGE_REMOTE_FULL)
    atomic_fetch_and_explicit(&page->thread_free, ~PAGE_REMOTE_FULL,
                              memory_order_relaxed);
}
/* Pushes the block (one sequentially consistent CAS). Touches nothing of
 * the page after the push. */
typedef enum remote_push {
  REMOTE_PUSHED,
  REMOTE_PUSHED_TO_FULL, /* the owner must be hinted */
  REMOTE_REFUSED,        /* a double free, reported: nothing pushed */
} remote_push_t;
/* Reports a remote list or chain that another thread's double free (or a
 * write after free) broke. */
void page_remote_list_corrupted(const page_t *page, const block_t *block);
/* Any thread but the owner: pushes head..tail, `count` blocks of the page
 * linked with its key, with one CAS. */
remote_push_t page_free_remote_chain(page_t *page, block_t *head, block_t *tail,
                                     uint32_t count);
ZK_INLINE remote_push_t page_free_remote(page_t *page, block_t *block) {
  return page_free_remote_chain(page, block, block, 1);
}
/* Secure free bits (see page_t): false when no memory for them. */
bool page_free_bits_init(page_t *page);
/* Marks block `index` free; false if it already was (a double free). */
bool page_free_bit_set(page_t *page, size_t index);
void page_free_bit_clear(page_t *page, size_t index);
/* A small or pool page's span back to the segment layer, its free bits
 * (which share a word with a free span's timestamp) released first; free
 * since `free_since_ms` (0: now). */
void page_span_free(page_t *page, uint64_t free_since_ms);
ZK_INLINE block_t *page_decode(const page_t *page, uintptr_t encoded) {
  return (block_t *)(encoded ^ page->key);
}
ZK_INLINE uintptr_t page_encode(const page_t *page, const block_t *next) {
  return (uintptr_t)next ^ page->key;
}
/* A decoded link that leaves its block's segment was overwritten (use after
 * free or overflow): the key makes a forged link land anywhere. The end of
 * the list (NULL) passes by arithmetic, not by a branch: that branch
 * mispredicted at the end of every short list. */
ZK_INLINE bool link_is_forged(const block_t *block, const block_t *next) {
  uintptr_t leaves_segment =
      ((uintptr_t)next ^ (uintptr_t)block) >> SEGMENT_SHIFT;
  uintptr_t is_link = next != NULL;
  __asm__("" : "+r"(is_link)); /* keep the compiler from branching on it */
  return (leaves_segment & -is_link) != 0;
}
/* A bin's links cross pages and segments, so link_is_forged's test does
 * not apply; the key's top bits do it instead (BIN_KEY_TOP): a link word
 * overwritten with a pointer, a small integer or a negative one decodes to
 * an address above user space, and other data does with odds 1 - 2^-17.
 * The end of a list (NULL) passes. */
#define BIN_KEY_TOP     (UINT64_C(1) << 63)
#define BIN_KEY_TOPMASK (UINT64_C(3) << 62)
ZK_INLINE bool bin_link_is_forged(const block_t *next) {
  return ((uintptr_t)next >> 47) != 0;
}
/* A free block's link word: the only place zkmem reads or writes a block it
 * does not hand out, so the only place the memcheck annotations open. */
ZK_INLINE block_t *block_next(const page_t *page, block_t *block) {
  track_defined(block, sizeof(block_t));
  block_t *next = page_decode(page, block->next_encoded);
  track_noaccess(block, sizeof(block_t));
  return next;
}
ZK_INLINE void block_set_next(const page_t *page, block_t *block,
                              const block_t *next) {
  track_undefined(block, sizeof(block_t));
  block->next_encoded = page_encode(page, next);
  track_noaccess(block, sizeof(block_t));
}
ZK_INLINE block_t *bin_next(const heap_t *heap, block_t *block) {
  track_defined(block, sizeof(block_t));
  block_t *next = (block_t *)(block->next_encoded ^ heap->bin_key);
  track_noaccess(block, sizeof(block_t));
  return next;
}
ZK_INLINE void bin_set_next(const heap_t *heap, block_t *block,
                            const block_t *next) {
  track_undefined(block, sizeof(block_t));
  block->next_encoded = (uintptr_t)next ^ heap->bin_key;
  track_noaccess(block, sizeof(block_t));
}
/* The owner word a heap stores in its page, and the heap it names. */
ZK_INLINE heap_t *page_owner_word(const page_t *page, heap_t *heap) {
  return page->secure ? (heap_t *)((uintptr_t)heap | 1) : heap;
}
ZK_INLINE heap_t *page_owner(page_t *page) {
  return (heap_t *)((uintptr_t)atomic_load_explicit(&page->owner,
                                                    memory_order_relaxed) &
                    ~(uintptr_t)1);
}
void page_set_owner(page_t *page, heap_t *owner_word, memory_order order);
/* Pages listed by next/prev from a head, with no tail: a sub-heap's
 * arenas, a task heap's large blocks. (A heap's page queues keep a tail:
 * heap.c.) */
ZK_INLINE void page_list_push(page_t **head, page_t *page) {
  page->prev = NULL;
  page->next = *head;
  if (*head != NULL)
    (*head)->prev = page;
  *head = page;
}
ZK_INLINE void page_list_unlink(page_t **head, page_t *page) {
  if (page->prev != NULL)
    page->prev->next = page->next;
  else
    *head = page->next;
  if (page->next != NULL)
    page->next->prev = page->prev;
  page->next = page->prev = NULL;
}
ZK_INLINE size_t page_block_index(const page_t *page, const void *block) {
  return (size_t)((const uint8_t *)block - page->start) / page->block_size;
}
uint64_t random_next(uint64_t *state);
uint64_t random_seed(void);

/* ---- heap.c ---- */
extern __thread heap_t *heap_current;
extern heap_t heap_empty;
void *heap_malloc_generic(heap_t *heap, size_t size, size_t alignment);
/* malloc's path when the size's bin is empty: a sub-heap's arena carve,
 * else heap_malloc_generic. */
void *heap_malloc_bin_empty(heap_t *heap, bin_t *bin, size_t size);
void heap_free_small(page_t *page, void *p);
/* Free's slow path for a block of a small page, found without the full
 * lookup: another heap's valid block goes onto the bin of the thread's own
 * heap inside a task heap, or to its page's remote list at once;
 * anything else goes through heap_free_small's checks, errno kept. False
 * when p is not in a small page. */
bool heap_free_small_block(void *p);
/* heap_free_small_block for a block whose slice descriptor the free fast
 * path has found, and whose page is another heap's that this thread's bin
 * does not keep (the caller has seen another owner: a block of this
 * heap's own would be pushed onto its page's remote list): freed to its
 * page's remote list, with the same checks. False (nothing done) sends
 * the free on to alloc_free_slow: a block of the thread's heap freed
 * inside a task heap, a secure or multi-slice page, a failed check. */
bool heap_free_foreign(heap_t *heap, const page_t *slice, void *p);
/* An arena block's free, from any thread; its usable size (0: not a
 * block's start or interior). */
void heap_free_arena(page_t *page, void *p);
size_t heap_arena_usable_size(const page_t *page, const void *p);
void heap_bin_flush(heap_t *heap, bin_t *bin);
void *heap_bin_corrupted(heap_t *heap, bin_t *bin, block_t *block);
/* A non-empty bin's head, popped: the end of malloc's fast path and of its
 * slow path after a refill. */
ZK_INLINE void *bin_pop(heap_t *heap, bin_t *bin) {
  block_t *block = bin->head;
  block_t *next = bin_next(heap, block);
  if (unlikely(bin_link_is_forged(next)))
    return heap_bin_corrupted(heap, bin, block);
  bin->head = next;
  bin->room++;
  return block;
}
heap_t *heap_get_initialized(void);
heap_t *heap_create(void);
/* Heaps made so far: no list of distinct heaps is longer. */
size_t heap_count_made(void);
/* A heap that leaves the live list for good (its pages gone): reused. */
void heap_recycle(heap_t *heap);
/* A sub-heap, fresh or left by a destroyed task heap in its thread's list,
 * now serves `task`: its per-task counters start from zero. */
void heap_adopt_task(heap_t *heap, zk_heap_t *task);
/* A released sub-heap's arenas (all blocks back) go to the span layer. */
void heap_release_arenas(heap_t *heap);
/* A sub-heap's bins, for its task's statistics (any thread, the task lock
 * held): the blocks pushed, less those held, plus those carved from arenas
 * and not back (bin_taken counts only pages' blocks); the blocks pushed;
 * and the bytes held. */
void heap_bin_counts(const heap_t *heap, uint64_t *pushed_less_held,
                     uint64_t *pushed, uint64_t *held_bytes);
void heap_flush_bins(heap_t *heap);
/* Every page and cached span of a sub-heap back to the segment layer. */
void heap_release_all(heap_t *heap, bool keep_arena);
/* A heap that may be torn (another thread's, in a fork child): bins and
 * large cache dropped without walking or waiting. */
void heap_drop_caches(heap_t *heap);
void heap_collect_orphan(heap_t *heap);
/* The thread's own heap, whichever heap is current. */
heap_t *heap_home(void);
/* Where a heap's spans come from first: a task sub-heap shares its
 * thread's segment (a segment each would map 4 MiB per task heap and
 * thread); an orphan keeps its own. */
ZK_INLINE segment_t **heap_home_segment(heap_t *heap) {
  return heap->home != NULL ? &heap->home->home_segment : &heap->home_segment;
}
void heap_collect(heap_t *heap, bool force);
void heap_bins_decay(heap_t *heap, uint64_t now);
void heap_reclaim_abandoned(void);
void heap_lock_all(void);
void heap_unlock_all(void);
void heap_collect_stats(zk_stats_t *out);
void process_init(void);

/* ---- alloc.c ---- */
/* Every free the fast path does not take, dispatched by the kind
 * of the block's page: NULL, foreign pointers, remote and secure frees,
 * large, huge and pool blocks. Leaves errno alone. */
void alloc_free_slow(void *p);
/* Free's path for a block of another heap's page: heap_free_foreign, else
 * alloc_free_slow. */
void alloc_free_foreign(heap_t *heap, const page_t *slice, void *p);
/* Secure mode: a sized free whose size exceeds the block (reported). */
bool alloc_sized_free_misuse(const char *what, void *p, size_t size);
void *alloc_realloc(zk_heap_t *heap, void *p, size_t size);

/* ---- large.c ---- */
void *large_alloc(heap_t *heap, size_t size, size_t alignment);
/* A huge block for calloc: fresh pages, zero without clearing. */
void *large_alloc_huge_zeroed(size_t size);
void large_free(heap_t *heap, page_t *page);
void large_cache_flush(heap_t *heap);
void large_cache_orphan(heap_t *heap);
bool large_block_is_zero(const void *p);
void *large_try_resize(void *p, size_t size);
void large_collect_stats(zk_stats_t *out);

/* ---- pool.c ---- */
void pool_heap_exit(heap_t *heap);
void pool_free_from_malloc(page_t *page, void *object);
void pool_lock_all(void);
void pool_unlock_all(void);

/* ---- taskheap.c ---- */
/* Charges are bytes of blocks live or waiting in a sub-heap's bin, on the
 * task heap and every parent. false (nothing charged): over a limit. */
bool task_charge(zk_heap_t *task, size_t bytes);
void task_uncharge(zk_heap_t *task, size_t bytes);
/* A block of the task freed by a thread that does not own its page. */
void task_remote_free(zk_heap_t *task, size_t bytes);
/* Large and huge blocks: charged and listed for zk_heap_destroy. */
bool task_large_add(zk_heap_t *task, page_t *page);
void task_large_remove(page_t *page);
/* A sub-heap's allocation refused by a limit: flush, ask on_limit, retry. */
void *task_limit_reached(heap_t *heap, size_t size, size_t alignment);
/* Thread exit: the thread's sub-heaps are orphaned or recycled. */
void task_thread_exit(heap_t *home, heap_t *current);
void task_lock_all(void);
/* Remote frees into orphaned sub-heaps collected, empty pages returned
 * (from the purge; skipped when the task heaps' lock is busy). */
void task_collect_orphans(void);
void task_fork_child(heap_t *self_home);
void task_unlock_all(void);

/* ---- purge.c ---- */
uint64_t clock_now_ms(void);
void purge_maybe(void);

/* ---- options.c ---- */
extern long option_values[ZK_OPTION_COUNT];
ZK_INLINE long option(zk_option_t which) {
  return option_values[which];
}
void options_init(void);

/* ---- error.c ---- */
/* Reports misuse on stderr (one line) and aborts, or warns when
 * ZKMEM_ON_ERROR=warn. The caller then leaks the block. */
ZK_COLD void error_report(const char *what, const void *pointer, size_t size);
ZK_COLD void error_warning(const char *format, ...);

/* ---- stats.c ---- */
size_t stats_rss(size_t *peak);

#endif /* ZKMEM_INTERNAL_H */
