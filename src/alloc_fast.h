/* The two fast paths, and nowhere else:
 *   malloc: pop the bin of the size's class.
 *   free:   push onto the bin of the block's class, when this thread owns
 *           the block's page.
 * Everything else is one noinline call away (heap.c, large.c). They are
 * inlined into zk_malloc/zk_free (alloc.c) and into the exported malloc/free
 * (override.c), so that neither entry point pays a jump to the other. */
#ifndef ZKMEM_ALLOC_FAST_H
#define ZKMEM_ALLOC_FAST_H

#include "internal.h"
#include "sizeclass.h"

ZK_INLINE void *alloc_fast_malloc(size_t size) {
  heap_t *heap = heap_current;
  if (unlikely(size > SMALL_MAX))
    return heap_malloc_generic(heap, size, 0);
  bin_t *bin = heap_bin_at(heap, bin_offset_of_small(size));
  if (likely(bin->head != NULL))
    return bin_pop(heap, bin);
  return heap_malloc_bin_empty(heap, bin, size);
}

ZK_INLINE void alloc_fast_free(void *p) {
  segment_t *segment = segment_of(p);
  if (likely(segment_is_owned(segment))) {
    const page_t *slice = segment_slice_of(segment, p); /* see page_set_owner */
    heap_t *heap = heap_current;
    uintptr_t foreign =
        (uintptr_t)atomic_load_explicit(&slice->owner, memory_order_relaxed) ^
        (uintptr_t)heap;
    __asm__("" : "+r"(foreign)); /* tested as is, not the owner kept too */
    bin_t *bin = heap_bin_at(heap, slice->bin_offset);
    block_t *block = p;
    block_t *head = bin->head;
    /* The owner's block, or another thread heap's that the bin keeps (why
     * and which: heap.c, before heap_block_freeable), one test for both
     * (bin_takes); never the head of the bin (an O(1) double-free check).
     * LIFO: the next malloc of the class gets this block while it is
     * still in cache. */
    uint16_t keep_mask =
        atomic_load_explicit(&slice->keep_mask, memory_order_relaxed);
    if (likely(bin_takes(bin, keep_mask, foreign) && block != head)) {
      /* The room read again: one read-modify-write, not a load kept from
       * the test and a store (an instruction). */
      __asm__("" : "+r"(bin));
      bin_set_next(heap, block, head);
      bin->head = block;
      bin->frees++;
      if (unlikely(--bin->room < 0))
        heap_bin_flush(heap, bin);
      return;
    }
    if (foreign != 0) {
      /* Another heap's block the bin does not keep, with the descriptor
       * found here: pushed to its page's remote list, or on to the checks
       * of the full path. */
      alloc_free_foreign(heap, slice, p);
      return;
    }
  }
  alloc_free_slow(p);
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

/* A free that is told the block's size (C23 free_sized, C++ sized
 * delete): the size is checked in secure mode only. */
ZK_INLINE void alloc_free_sized(void *p, size_t size, const char *what) {
  if (unlikely(option(ZK_OPTION_SECURE) != 0) && p != NULL &&
      alloc_sized_free_misuse(what, p, size))
    return; /* reported: the block leaks, as after any misuse */
  alloc_free(p);
}

#endif
