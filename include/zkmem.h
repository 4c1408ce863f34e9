/* zkmem: a memory allocator for async runtimes and servers.
 *
 * Threading rules: every call is thread-safe. Memory may be freed by any
 * thread, not only the one that allocated it. A pool may be used by any number
 * of threads at once, except zk_pool_destroy and zk_pool_visit, which need the
 * pool to be quiescent (no concurrent call on that pool).
 *
 * Errors: allocation failure returns NULL with errno = ENOMEM. A detected
 * double free or foreign pointer prints one line on stderr, then aborts
 * (ZKMEM_ON_ERROR=warn logs and leaks instead). */
#ifndef ZKMEM_H
#define ZKMEM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ZKMEM_VERSION_MAJOR 0
#define ZKMEM_VERSION_MINOR 1
#define ZKMEM_VERSION_PATCH 0

/* ---- malloc API ------------------------------------------------------ */

/* Block of at least `size` bytes, 16-byte aligned from 16 B up (8 below). */
void *zk_malloc(size_t size);
/* Zeroed n * size bytes; NULL with ENOMEM when the product overflows. */
void *zk_calloc(size_t count, size_t size);
/* Grow or shrink keeping contents. zk_realloc(p, 0) frees p and returns NULL.
 */
void *zk_realloc(void *ptr, size_t size);
/* Free a block of this allocator; NULL is a no-op. */
void zk_free(void *ptr);
/* `alignment` must be a power of two (else NULL with EINVAL). */
void *zk_aligned_alloc(size_t alignment, size_t size);
/* POSIX contract: 0, EINVAL (alignment not a power-of-two multiple of
 * sizeof(void *)) or ENOMEM; *out untouched on error. */
int zk_posix_memalign(void **out, size_t alignment, size_t size);
/* zk_free of a block allocated with `size` bytes (C23 free_sized); in
 * secure mode a size larger than the block is reported. */
void zk_free_sized(void *ptr, size_t size);
/* Bytes usable in the block (>= the size asked for); 0 for NULL. */
size_t zk_usable_size(const void *ptr);

/* ---- object pools ---------------------------------------------------- */

/* A pool hands out objects of one exact size with 100% reuse of freed ones.
 * Any thread may allocate and free; each thread caches free objects in a
 * private magazine, so both calls are a push or pop on a thread-local stack
 * in the common case.
 *
 * NULL: zk_pool_alloc(NULL) returns NULL with errno EINVAL; freeing a NULL
 * object does nothing, whatever the pool; zk_pool_destroy(NULL) and
 * zk_pool_visit(NULL, ...) do nothing; zk_pool_stats(NULL, ...) returns -1
 * (EINVAL). Misuse, reported as under Errors above: zk_pool_free(NULL,
 * object), and a pointer that is not a pool (or a destroyed pool's, until
 * its slot serves a new pool) given to alloc, free, destroy or visit; with
 * ZKMEM_ON_ERROR=warn such an alloc returns NULL with errno EINVAL.
 * zk_free() of a pool object returns it to its pool, with the checks it
 * makes for other blocks.
 *
 * Constructors and visitors run with no zkmem lock held, so they may
 * allocate from and free to any pool, their own included, and call any
 * other zkmem function. */
typedef struct zk_pool zk_pool_t;

typedef struct zk_pool_options {
  size_t alignment;   /* 0: natural (16 from 16 B up); power of two */
  size_t preallocate; /* objects carved at creation; 0 = lazy */
  const char *name;   /* for statistics; copied */
  size_t max_cached;  /* cap on cached free objects; 0 = adaptive */
  void (*constructor)(void *object, void *arg); /* once per fresh object */
  void *constructor_arg;
} zk_pool_options_t;

typedef struct zk_pool_stats {
  const char *name;
  size_t object_size; /* as asked */
  size_t slot_size;   /* size with alignment padding */
  uint64_t allocations;
  uint64_t frees;
  uint64_t reused;         /* allocations served by a freed object */
  double reuse_rate;       /* reused / allocations, 0..1 */
  uint64_t live;           /* allocations - frees */
  uint64_t peak_live;      /* highest live seen (sampled, see docs) */
  uint64_t predicted_live; /* EWMA of the live high-water mark */
  uint64_t cached;         /* free objects held for reuse */
  uint64_t pages;          /* spans the pool holds */
  size_t bytes_committed;  /* bytes of those spans */
  double fragmentation;    /* bytes_committed / (live * object_size) */
} zk_pool_stats_t;

/* NULL options = defaults. Returns NULL (errno EINVAL or ENOMEM) on error. */
zk_pool_t *zk_pool_create(size_t object_size, const zk_pool_options_t *options);
void *zk_pool_alloc(zk_pool_t *pool);
void zk_pool_free(zk_pool_t *pool, void *object);
/* Frees every object of the pool, live ones included, in O(pages). */
void zk_pool_destroy(zk_pool_t *pool);
/* Calls visitor(object, arg) once for each object live when the call
 * began, in no particular order. The visitor may free the object it is
 * given, allocate (objects allocated during the visit are not visited) and
 * call any zkmem function. An object freed during the visit before its turn
 * (by the visitor, or by zk_pool_destroy) is still passed to the visitor,
 * which must then not touch it: its memory may already be reused or
 * returned to the OS. Other threads must leave the pool alone meanwhile.
 * When zkmem cannot get memory to list the objects, nothing is visited and
 * errno is ENOMEM. */
void zk_pool_visit(zk_pool_t *pool, void (*visitor)(void *object, void *arg),
                   void *arg);
/* 0 on success, -1 (EINVAL) for a NULL out, or a pool that is NULL or not
 * a live pool. */
int zk_pool_stats(const zk_pool_t *pool, zk_pool_stats_t *out);

/* A pool of `type` created on first use: prefix_alloc() and
 * prefix_free(object), with the size known at compile time. prefix_pool()
 * and prefix_alloc() return NULL, with zk_pool_create's errno (ENOMEM when
 * every pool slot is taken), while the pool cannot be created; a later call
 * tries again. prefix_free(NULL) does nothing. */
#define ZK_POOL_TYPED(prefix, type)                                            \
  static zk_pool_t *prefix##_pool_instance;                                    \
  static zk_pool_t *prefix##_pool(void) {                                      \
    zk_pool_t *pool =                                                          \
        __atomic_load_n(&prefix##_pool_instance, __ATOMIC_ACQUIRE);            \
    if (__builtin_expect(pool == NULL, 0)) {                                   \
      zk_pool_options_t options = {0};                                         \
      options.alignment = _Alignof(type);                                      \
      options.name = #prefix;                                                  \
      zk_pool_t *fresh = zk_pool_create(sizeof(type), &options);               \
      if (fresh == NULL) /* another thread's may have come meanwhile */        \
        return __atomic_load_n(&prefix##_pool_instance, __ATOMIC_ACQUIRE);     \
      zk_pool_t *expected = NULL;                                              \
      if (__atomic_compare_exchange_n(&prefix##_pool_instance, &expected,      \
                                      fresh, 0, __ATOMIC_ACQ_REL,              \
                                      __ATOMIC_ACQUIRE)) {                     \
        pool = fresh;                                                          \
      } else {                                                                 \
        zk_pool_destroy(fresh);                                                \
        pool = expected;                                                       \
      }                                                                        \
    }                                                                          \
    return pool;                                                               \
  }                                                                            \
  static inline type *prefix##_alloc(void) {                                   \
    zk_pool_t *pool = prefix##_pool();                                         \
    if (__builtin_expect(pool == NULL, 0))                                     \
      return NULL; /* zk_pool_alloc(NULL) would set EINVAL over ENOMEM */      \
    return (type *)zk_pool_alloc(pool);                                        \
  }                                                                            \
  static inline void prefix##_free(type *object) {                             \
    zk_pool_free(__atomic_load_n(&prefix##_pool_instance, __ATOMIC_ACQUIRE),   \
                 object);                                                      \
  }

/* ---- task heaps ------------------------------------------------------ */

/* Memory per task or request, usable from any thread at once. Blocks are
 * freed with zk_free/free (or zk_realloc) from any thread and stay counted
 * in their own heap wherever they are freed. While a thread has entered a
 * heap, its plain malloc, calloc, realloc, aligned_alloc and C++ new (and
 * so every library it calls) allocate from that heap: a runtime enters a
 * task's heap around each poll of the task, and the accounting follows the
 * task across workers. A NULL heap is the default heap. */
typedef struct zk_heap zk_heap_t;

typedef struct zk_heap_options {
  const char *name;   /* for statistics; copied */
  size_t limit_bytes; /* 0: no limit; allocations beyond it fail (ENOMEM) */
  zk_heap_t *parent;  /* accounting and limits nest: a request in a tenant */
  /* Called, with no zkmem lock held, when an allocation would pass a limit
   * of this heap or a parent; true: retry once. */
  bool (*on_limit)(zk_heap_t *heap, size_t size, void *arg);
  void *on_limit_arg;
} zk_heap_options_t;

typedef struct zk_heap_stats {
  /* Usable bytes of live blocks: exact once the threads that used the heap
   * are quiet. */
  size_t live_bytes;
  /* High-water mark of the bytes charged to the heap: live blocks and the
   * free ones waiting in its threads' caches; at least live's peak. */
  size_t peak_bytes;
  size_t limit_bytes;
  /* limit_refusals: allocations from this heap refused by a limit, and
   * allocations from its children refused by this heap's limit. */
  uint64_t allocations, frees, limit_refusals;
  const char *name;
} zk_heap_stats_t;

/* NULL options: defaults. NULL (errno ENOMEM) when out of memory. */
zk_heap_t *zk_heap_create(const zk_heap_options_t *options);
void *zk_heap_malloc(zk_heap_t *heap, size_t size);
void *zk_heap_calloc(zk_heap_t *heap, size_t count, size_t size);
/* A block that moves comes from `heap`; one that fits stays where it is. */
void *zk_heap_realloc(zk_heap_t *heap, void *ptr, size_t size);
void *zk_heap_aligned_alloc(zk_heap_t *heap, size_t alignment, size_t size);
/* Makes `heap` this thread's current heap; returns the one entered before
 * (NULL: the default heap). zk_heap_enter(NULL) leaves. */
zk_heap_t *zk_heap_enter(zk_heap_t *heap);
/* Frees every block still live in the heap at once, in time proportional
 * to its pages, and returns the memory. Frees of its blocks by any thread
 * must have happened before (one after it is caught in secure mode): a
 * live_bytes of 0 from zk_heap_stats, read once no thread can allocate
 * from the heap any more, says they have, every one complete. Destroying
 * a heap entered on some thread, a heap with child heaps, the default heap
 * (NULL) or a heap twice is reported. */
void zk_heap_destroy(zk_heap_t *heap);
/* 0, or -1 (EINVAL) for a NULL or destroyed heap or a NULL out. */
int zk_heap_stats(const zk_heap_t *heap, zk_heap_stats_t *out);
/* The calling thread gives its cached free blocks back to their pages (of
 * the default heap and of every task heap it used): a worker about to
 * idle, so that limits and statistics see only live blocks. */
void zk_thread_idle(void);

/* ---- memory returned to the OS, statistics, options ------------------ */

/* Returns free memory: force = true purges everything free now, false only
 * what has been free longer than the purge delay. */
void zk_collect(bool force);

#define ZK_STATS_CLASSES 96

typedef struct zk_class_stats {
  size_t block_size;
  uint64_t allocations;
  uint64_t frees;
  uint64_t live;
  uint64_t pages;
} zk_class_stats_t;

typedef struct zk_stats {
  size_t class_count;
  zk_class_stats_t classes[ZK_STATS_CLASSES];
  uint64_t large_allocations; /* blocks above the size classes (own span) */
  uint64_t large_live;
  uint64_t huge_allocations; /* direct mappings */
  uint64_t huge_live;
  size_t bytes_live;       /* block bytes handed out and not freed */
  size_t bytes_committed;  /* bytes of spans in use or cached, unpurged */
  size_t bytes_purged;     /* cumulative bytes returned to the OS */
  size_t bytes_huge_pages; /* bytes asked to be huge-page backed */
  size_t segments_mapped;
  size_t bytes_mapped;
  size_t rss; /* resident set size of the process */
  size_t peak_rss;
  double fragmentation; /* bytes_committed / bytes_live */
  /* Of segments_mapped and bytes_mapped: the mappings of live huge blocks
   * (one each). Freed huge mappings kept for reuse count in bytes_mapped
   * only, with the segments small and large blocks are carved from. */
  size_t huge_segments_mapped;
  size_t bytes_mapped_huge;
} zk_stats_t;

/* Read while threads allocate, an estimate of the moment, never below zero.
 * A block another thread freed counts as live until its owner's heap
 * collects it (zk_thread_idle on the freeing thread, then zk_collect). */
void zk_stats_get(zk_stats_t *out);
void zk_stats_print(FILE *out);
void zk_stats_json(FILE *out);

/* Options, also read once at start-up from ZKMEM_<NAME> variables. */
typedef enum zk_option {
  ZK_OPTION_PURGE_DELAY_MS, /* default 1000; free spans purged after */
  ZK_OPTION_PURGE_DECOMMIT, /* default 1: MADV_DONTNEED; 0: MADV_FREE */
  ZK_OPTION_HUGE_PAGES,     /* zk_huge_pages_t, default ZK_HUGE_PAGES_OFF */
  ZK_OPTION_SECURE,         /* default 0; 1 = full checks, guard pages */
  ZK_OPTION_ON_ERROR,       /* default 0 = abort; 1 = warn and leak */
  ZK_OPTION_SHOW_STATS,     /* default 0; 1 = print stats at exit */
  ZK_OPTION_VERBOSE,        /* default 0; 1 = print options and warnings */
  /* default 0 (none); bytes, K/M/G/T suffixes in ZKMEM_LIMIT: the memory
   * zkmem maps may not pass it; free memory is returned first, then
   * allocations fail with NULL + ENOMEM */
  ZK_OPTION_LIMIT,
  ZK_OPTION_COUNT
} zk_option_t;

/* ZK_OPTION_HUGE_PAGES (ZKMEM_HUGE_PAGES: a number or the word). */
typedef enum zk_huge_pages {
  ZK_HUGE_PAGES_OFF = 0, /* 4 KiB pages only */
  /* "transparent": every segment and huge block advised for transparent
   * huge pages (MADV_HUGEPAGE) */
  ZK_HUGE_PAGES_TRANSPARENT = 1,
  /* "reserved": MAP_HUGETLB from the system's reserved pages, falling back
   * to transparent */
  ZK_HUGE_PAGES_RESERVED = 2,
  /* "dense": advised only for the 2 MiB halves of segments at least 7/8
   * carved into small blocks (up to 4 KiB), the advice withdrawn before a
   * purge in the half */
  ZK_HUGE_PAGES_DENSE = 3,
} zk_huge_pages_t;

long zk_option_get(zk_option_t option);
/* Returns 0, or -1 (EINVAL) for an unknown option. */
int zk_option_set(zk_option_t option, long value);

#ifdef __cplusplus
}
#endif

#endif /* ZKMEM_H */
