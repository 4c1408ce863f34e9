/* The malloc API: zk_malloc/zk_free are the fast paths of alloc_fast.h;
 * the rest of the family builds on them. */
#include "alloc_fast.h"

#include <errno.h>
#include <string.h>

ZK_EXPORT void *zk_malloc(size_t size) {
  return alloc_malloc(size);
}

ZK_EXPORT void zk_free(void *p) {
  alloc_free(p);
}

static void alloc_free_checked(void *p) {
  page_t *page = segment_lookup(p);
  if (page == NULL) {
    error_report("free of a pointer zkmem does not own", p, 0);
    return;
  }
  switch (page_kind(page)) {
  case PAGE_SMALL:
    heap_free_small(page, p);
    return;
  case PAGE_LARGE:
  case PAGE_HUGE:
    if (unlikely(p != page->start)) {
      error_report("free of a pointer inside a block (not its start)", p,
                   page->large_size);
      return;
    }
    large_free(heap_current, page);
    return;
  case PAGE_POOL:
    pool_free_from_malloc(page, p);
    return;
  case PAGE_ARENA:
    heap_free_arena(page, p);
    return;
  default:
    error_report("double free or free of an invalid pointer", p, 0);
    return;
  }
}

/* A free leaves errno as it was (POSIX 2024), whatever the slow path met:
 * a refused purge, no memory for metadata. */
static ZK_NOINLINE void alloc_free_other(void *p) {
  if (p == NULL)
    return;
  int saved_errno = errno;
  /* A task's arena block, the common case here (a task frees most of its
   * blocks itself): its descriptor the way the fast path finds one, without
   * the full lookup. */
  segment_t *segment = segment_of(p);
  const page_t *slice;
  if (segment_is_owned(segment) &&
      __atomic_load_n(&(slice = segment_slice_of(segment, p))->kind,
                      __ATOMIC_RELAXED) == PAGE_ARENA)
    heap_free_arena((page_t *)slice, p);
  else
    alloc_free_checked(p);
  errno = saved_errno;
}

/* A small page's block first, the common case (another thread's block:
 * half the frees of a server whose threads free each other's, all of a
 * consumer's): its page found without the full lookup, kept or freed
 * remotely without saving errno. NULL and everything else go on to
 * alloc_free_other. */
ZK_NOINLINE void alloc_free_slow(void *p) {
  if (!heap_free_small_block(p))
    alloc_free_other(p);
}

/* A foreign free (alloc_fast_free): the page found, no errno to save. */
ZK_NOINLINE void alloc_free_foreign(heap_t *heap, const page_t *slice,
                                    void *p) {
  if (!heap_free_foreign(heap, slice, p))
    alloc_free_slow(p);
}

/* A sized free's size is the program's claim about the block; only secure
 * mode pays for checking it, so the normal path stays a plain free. A size
 * below the usable size is not caught: blocks are rounded up to their
 * class. */
ZK_COLD bool alloc_sized_free_misuse(const char *what, void *p, size_t size) {
  size_t usable = zk_usable_size(p);
  if (usable == 0)
    return false; /* not zkmem's: free reports it */
  if (size > usable) {
    error_report(what, p, usable);
    return true;
  }
  return false;
}

ZK_EXPORT void zk_free_sized(void *p, size_t size) {
  alloc_free_sized(p, size, "free_sized with a size larger than the block");
}

ZK_EXPORT void *zk_calloc(size_t count, size_t size) {
  size_t total;
  if (unlikely(__builtin_mul_overflow(count, size, &total))) {
    errno = ENOMEM;
    return NULL;
  }
  /* Huge: fresh pages, zero without a memset; a task heap's block is
   * charged to it, so it comes from the heap's own path. */
  void *p = total > LARGE_MAX && heap_current->task == NULL
                ? large_alloc_huge_zeroed(total)
                : alloc_fast_malloc(total);
  bool zero = p != NULL && large_block_is_zero(p);
  track_malloc(p, total, zero);
  if (p != NULL && !zero)
    memset(p, 0, total);
  return p;
}

/* The bytes from p to the end of its block; 0 for a descriptor that holds
 * no block. */
static size_t alloc_usable_in(const page_t *page, const void *p) {
  switch (page_kind(page)) {
  case PAGE_SMALL:
  case PAGE_POOL:
    /* 32 bits: a span is under 4 GiB, and the division is the cheaper. */
    return page->block_size -
           (uint32_t)((uint8_t *)p - page->start) % page->block_size;
  case PAGE_LARGE:
  case PAGE_HUGE: {
    /* Before the block or past it: the rest of a guarded block's segment,
     * or a mapping that is not zkmem's beside it. */
    size_t into = (size_t)((uint8_t *)p - page->start);
    return into < page->large_size ? page->large_size - into : 0;
  }
  case PAGE_ARENA:
    return heap_arena_usable_size(page, p);
  default:
    return 0;
  }
}

ZK_EXPORT size_t zk_usable_size(const void *p) {
  if (p == NULL)
    return 0;
  page_t *page = segment_lookup(p);
  return page != NULL ? alloc_usable_in(page, p) : 0;
}

/* realloc, a block that moves coming from `heap` (NULL: the current
 * heap); zk_heap_realloc shares it. */
void *alloc_realloc(zk_heap_t *heap, void *p, size_t size) {
  if (p == NULL)
    return heap != NULL ? zk_heap_malloc(heap, size) : zk_malloc(size);
  if (size == 0) {
    zk_free(p);
    return NULL;
  }
  /* One lookup serves the whole call, and the move takes the inlined fast
   * paths: a growing Vec in a Tokio pipeline spent more instructions in
   * realloc's own calls than in its malloc and free. */
  page_t *page = segment_lookup(p);
  size_t usable = page != NULL ? alloc_usable_in(page, p) : 0;
  if (usable == 0) {
    alloc_free_slow(p); /* reports the foreign pointer */
    errno = EINVAL;
    return NULL;
  }
  /* Shrinking by less than half keeps the block. Under memcheck every
   * realloc moves, as valgrind's own does: the block's recorded size is
   * the size asked for, which zkmem does not keep. */
  if (!ZK_TRACKING) {
    if (size <= usable && size >= usable / 2)
      return p;
    if (size > LARGE_MAX && page_kind(page) == PAGE_HUGE) {
      void *resized = large_try_resize(p, size);
      if (resized != NULL)
        return resized;
    }
  }
  void *fresh = heap != NULL ? zk_heap_malloc(heap, size) : alloc_malloc(size);
  if (fresh == NULL)
    return NULL; /* p is untouched, as C requires */
  /* Copies the usable size, past what the program asked for. */
  track_quietly(memcpy(fresh, p, size < usable ? size : usable));
  alloc_free(p);
  return fresh;
}

ZK_EXPORT void *zk_realloc(void *p, size_t size) {
  return alloc_realloc(NULL, p, size);
}

ZK_EXPORT void *zk_aligned_alloc(size_t alignment, size_t size) {
  if (unlikely(alignment == 0 || (alignment & (alignment - 1)) != 0)) {
    errno = EINVAL;
    return NULL;
  }
  if (alignment <= 16) /* 16-byte classes start at 16 B */
    return zk_malloc(size < alignment ? alignment : size);
  if (unlikely(size > PTRDIFF_MAX)) {
    errno = ENOMEM;
    return NULL;
  }
  void *p = heap_malloc_generic(heap_current, size, alignment);
  track_malloc(p, size, 0);
  return p;
}

ZK_EXPORT int zk_posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1)) != 0)
    return EINVAL;
  int saved_errno = errno;
  void *p = zk_aligned_alloc(alignment, size);
  if (p == NULL) {
    int error = errno;
    errno = saved_errno;
    return error == EINVAL ? EINVAL : ENOMEM;
  }
  *out = p;
  return 0;
}
