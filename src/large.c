/* Blocks above the size classes.
 *
 * Large (SMALL_MAX < size <= LARGE_MAX): a span of whole slices of its own,
 * taken from the segment layer, which splits and merges spans. Only the
 * bytes a program touches become resident. Each heap caches a few freed
 * spans so that a free/malloc pattern of similar sizes takes no lock.
 *
 * Huge (above LARGE_MAX, or alignment above a slice): a mapping of its own,
 * resized with mremap; at free the segment layer keeps it for later huge
 * blocks until the purge delay. */
#include "internal.h"

#include "os.h"

#include <errno.h>
#include <sched.h>

#define LARGE_CACHE_MAX_SLICES 64 /* 4 MiB per heap */

atomic_ullong large_allocations, large_live, huge_allocations, huge_live;
/* Bytes of live large and huge blocks, as asked for rounded to OS pages
 * (kept in page->reserved, in OS pages): counted as live and as committed,
 * since only what a program touches becomes resident. */
static atomic_ullong large_bytes_live;

static void large_account(page_t *page, size_t size) {
  size_t pages = (size + OS_PAGE_SIZE - 1) / OS_PAGE_SIZE;
  page->reserved = (uint32_t)pages;
  atomic_fetch_add_explicit(&large_bytes_live, pages * OS_PAGE_SIZE,
                            memory_order_relaxed);
}

static void large_unaccount(const page_t *page) {
  atomic_fetch_sub_explicit(&large_bytes_live,
                            (size_t)page->reserved * OS_PAGE_SIZE,
                            memory_order_relaxed);
}

static void *huge_alloc(size_t size, size_t alignment, bool zeroed) {
  page_t *page = segment_huge_alloc(size, alignment, zeroed);
  if (page == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  atomic_fetch_add_explicit(&huge_allocations, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&huge_live, 1, memory_order_relaxed);
  large_account(page, size);
  return page->start;
}

/* Takes a cached span back from the purge (see PAGE_LARGE_CACHED); false
 * while a purge is returning its memory. */
static bool large_cache_claim(page_t *span) {
  uint8_t expected = PAGE_LARGE_CACHED;
  return __atomic_compare_exchange_n(&span->kind, &expected, PAGE_LARGE, false,
                                     __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

static void large_cache_remove(heap_t *heap, unsigned i) {
  heap->large_cache[i] = heap->large_cache[--heap->large_cache_count];
}

void *large_alloc_huge_zeroed(size_t size) {
  if (unlikely(size > PTRDIFF_MAX)) {
    errno = ENOMEM;
    return NULL;
  }
  return huge_alloc(size, 0, true);
}

static page_t *large_cache_take(heap_t *heap, size_t slices) {
  for (unsigned i = heap->large_cache_count; i-- > 0;) {
    page_t *span = heap->large_cache[i];
    if (span->slice_count == slices && large_cache_claim(span)) {
      large_cache_remove(heap, i);
      span->purged = 0; /* a used span; is_zero says what a purge left */
      return span;
    }
  }
  return NULL;
}

/* A cached span back to the segment layer; waits out a purge in progress
 * (one madvise). The span's free time is when it was cached. */
static void large_cache_release(page_t *span) {
  while (!large_cache_claim(span))
    sched_yield();
  segment_span_free_since(span, span->free_since_ms);
}

/* Secure mode: the block ends where an inaccessible page begins, so an
 * overflow off its end faults at once. Guarded spans skip the cache. */
static void *large_alloc_guarded(heap_t *heap, size_t size) {
  size_t rounded = (size + 15) & ~(size_t)15;
  size_t slices = (rounded + OS_PAGE_SIZE + SLICE_SIZE - 1) >> SLICE_SHIFT;
  page_t *span = segment_span_alloc(
      slices, PAGE_LARGE, heap == &heap_empty ? NULL : heap_home_segment(heap));
  if (span == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  uint8_t *guard = span->start + (slices << SLICE_SHIFT) - OS_PAGE_SIZE;
  if (!os_protect(guard, OS_PAGE_SIZE, false)) {
    segment_span_free(span);
    errno = ENOMEM;
    return NULL;
  }
  span->secure = 1;
  span->start = guard - rounded;
  track_noaccess(span->start, rounded);
  span->large_size = rounded;
  atomic_fetch_add_explicit(&large_allocations, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&large_live, 1, memory_order_relaxed);
  large_account(span, size);
  return span->start;
}

static void *large_alloc_any(heap_t *heap, size_t size, size_t alignment) {
  if (unlikely(size > PTRDIFF_MAX)) {
    errno = ENOMEM;
    return NULL;
  }
  if (size > LARGE_MAX || alignment > SLICE_SIZE)
    return huge_alloc(size, alignment, false);
  if (option(ZK_OPTION_SECURE) && alignment <= 16)
    return large_alloc_guarded(heap, size);
  size_t slices = (size + SLICE_SIZE - 1) >> SLICE_SHIFT;
  page_t *span = large_cache_take(heap, slices);
  if (span == NULL) {
    purge_maybe();
    span = segment_span_alloc(slices, PAGE_LARGE,
                              heap == &heap_empty ? NULL
                                                  : heap_home_segment(heap));
    if (span == NULL) {
      errno = ENOMEM;
      return NULL;
    }
  }
  span->large_size = slices << SLICE_SHIFT;
  track_noaccess(span->start, span->large_size);
  atomic_fetch_add_explicit(&large_allocations, 1, memory_order_relaxed);
  atomic_fetch_add_explicit(&large_live, 1, memory_order_relaxed);
  large_account(span, size);
  return span->start;
}

static size_t large_cache_slices(const heap_t *heap) {
  size_t total = 0;
  for (unsigned i = 0; i < heap->large_cache_count; i++)
    total += heap->large_cache[i]->slice_count;
  return total;
}

/* A block of a task sub-heap is charged to its task and listed there; one
 * over a limit goes back, and the task's limit handling decides. */
void *large_alloc(heap_t *heap, size_t size, size_t alignment) {
  void *p = large_alloc_any(heap, size, alignment);
  zk_heap_t *task = heap->task;
  if (likely(task == NULL) || p == NULL)
    return p;
  page_t *page = segment_lookup(p);
  if (task_large_add(task, page))
    return p;
  large_free(&heap_empty, page);
  return task_limit_reached(heap, size, alignment);
}

void large_free(heap_t *heap, page_t *page) {
  if (unlikely(page->task != NULL))
    task_large_remove(page);
  large_unaccount(page);
  /* Atomic: another thread's purge reads the kinds of spans with a CAS. */
  if (page_kind(page) == PAGE_HUGE) {
    atomic_fetch_sub_explicit(&huge_live, 1, memory_order_relaxed);
    segment_huge_free(page);
    return;
  }
  atomic_fetch_sub_explicit(&large_live, 1, memory_order_relaxed);
  page->is_zero = 0;
  if (page->secure) { /* segment_span_free lifts the guard page */
    segment_span_free(page);
    return;
  }
  if (heap == &heap_empty || page->slice_count > LARGE_CACHE_MAX_SLICES / 4) {
    segment_span_free(page);
    return;
  }
  /* Evict the oldest entries until the new one fits. */
  while (
      heap->large_cache_count > 0 &&
      (heap->large_cache_count == LARGE_CACHE_ENTRIES ||
       large_cache_slices(heap) + page->slice_count > LARGE_CACHE_MAX_SLICES)) {
    page_t *oldest = heap->large_cache[0];
    for (unsigned i = 1; i < heap->large_cache_count; i++)
      heap->large_cache[i - 1] = heap->large_cache[i];
    heap->large_cache_count--;
    large_cache_release(oldest);
  }
  page->free_since_ms = clock_now_ms();
  page->purged = 0;
  heap->large_cache[heap->large_cache_count++] = page;
  /* Not PAGE_LARGE any more: a second free of the block is reported. The
   * release publishes the fields above to a purging thread. */
  __atomic_store_n(&page->kind, PAGE_LARGE_CACHED, __ATOMIC_RELEASE);
}

/* A fork child's heap of a thread that is gone (heap.c, heap_drop_caches):
 * an entry whose claim fails was mid-claim, and leaks rather than waits. */
void large_cache_orphan(heap_t *heap) {
  unsigned count = heap->large_cache_count;
  for (unsigned i = 0; i < count && i < LARGE_CACHE_ENTRIES; i++)
    if (large_cache_claim(heap->large_cache[i]))
      segment_span_free_since(heap->large_cache[i],
                              heap->large_cache[i]->free_since_ms);
  heap->large_cache_count = 0;
}

void large_cache_flush(heap_t *heap) {
  while (heap->large_cache_count > 0)
    large_cache_release(heap->large_cache[--heap->large_cache_count]);
}

bool large_block_is_zero(const void *p) {
  page_t *page = segment_lookup(p);
  page_kind_t kind = page_kind(page);
  return (kind == PAGE_LARGE || kind == PAGE_HUGE) && page->is_zero &&
         p == page->start;
}

void *large_try_resize(void *p, size_t size) {
  page_t *page = segment_lookup(p);
  /* A task's block is copied: its task lists its descriptor. */
  if (page_kind(page) != PAGE_HUGE || size <= LARGE_MAX || p != page->start ||
      page->task != NULL)
    return NULL;
  large_unaccount(page);
  page_t *resized = segment_huge_resize(page, size);
  if (resized == NULL) {
    large_account(page, (size_t)page->reserved * OS_PAGE_SIZE);
    return NULL;
  }
  large_account(resized, size);
  return resized->start;
}

void large_collect_stats(zk_stats_t *out) {
  out->large_allocations =
      atomic_load_explicit(&large_allocations, memory_order_relaxed);
  out->large_live = atomic_load_explicit(&large_live, memory_order_relaxed);
  out->huge_allocations =
      atomic_load_explicit(&huge_allocations, memory_order_relaxed);
  out->huge_live = atomic_load_explicit(&huge_live, memory_order_relaxed);
  size_t bytes = atomic_load_explicit(&large_bytes_live, memory_order_relaxed);
  out->bytes_live += bytes;
  out->bytes_committed += bytes;
}
