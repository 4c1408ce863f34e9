/* The two fast paths, and nowhere else:
 *   malloc: pop the free list of the current page of the size's class.
 *   free:   push onto the owning page's free list.
 * Everything else is one noinline call away (heap.c, large.c). They are
 * inlined into zk_malloc/zk_free (alloc.c) and into the exported malloc/free
 * (override.c), so that neither entry point pays a jump to the other. */
#ifndef ZKMEM_ALLOC_FAST_H
#define ZKMEM_ALLOC_FAST_H

#include "internal.h"
#include "sizeclass.h"

ZK_INLINE void *alloc_fast_malloc(size_t size) {
  heap_t *heap = heap_current;
  page_t *page;
  if (likely(size <= DIRECT_MAX))
    page = heap->direct[(size + 7) >> 3];
  else if (likely(size <= SMALL_MAX))
    page = heap->class_pages[class_by_128[(size + 127) >> 7]];
  else
    return heap_malloc_generic(heap, size, 0);
  block_t *block = page->free;
  if (likely(block != NULL)) {
    block_t *next = block_next(page, block);
    if (unlikely(link_is_forged(block, next)))
      return heap_free_list_corrupted(page, block);
    page->free = next;
    page->used++;
    return block;
  }
  return heap_malloc_generic(heap, size, 0);
}

ZK_INLINE void alloc_fast_free(void *p) {
  segment_t *segment = segment_of(p);
  if (likely(segment_is_owned(segment))) {
    page_t *page = segment_page_of(segment, p);
    heap_t *heap = heap_current;
    block_t *block = p;
    /* Owner's free, not the head of its list (an O(1) double-free check).
     * The block goes straight back where malloc pops: LIFO reuse keeps the
     * hottest block in cache. */
    if (likely(atomic_load_explicit(&page->owner, memory_order_relaxed) ==
                   heap &&
               block != page->free)) {
      block_set_next(page, block, page->free);
      page->free = block;
      page->frees++;
      if (unlikely(--page->used < page->free_trigger))
        heap_free_local_slow(heap, page);
      return;
    }
  }
  heap_free_generic(p);
}

/* The entry points' malloc and free: the fast paths plus the memcheck
 * annotations (nothing without ZKMEM_VALGRIND). */
ZK_INLINE void *alloc_malloc(size_t size) {
  void *p = alloc_fast_malloc(size);
  track_malloc(p, size, 0);
  return p;
}

ZK_INLINE void alloc_free(void *p) {
  if (ZK_TRACKING && p != NULL)
    track_free(p);
  alloc_fast_free(p);
}

#endif
