/* The malloc API. The two fast paths are here and nowhere else:
 *   zk_malloc: pop the free list of the current page of the size's class.
 *   zk_free:   push onto the owning page's free list.
 * Everything else is one noinline call away (heap.c, large.c). */
#include "internal.h"
#include "sizeclass.h"

#include <errno.h>
#include <string.h>

ZK_EXPORT void *zk_malloc(size_t size) {
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
    block_t *next = page_decode(page, block->next_encoded);
    /* A link leaving the block's segment was overwritten (use after free
     * or overflow): the key makes a forged link land anywhere. */
    if (unlikely(((uintptr_t)next ^ (uintptr_t)block) >> SEGMENT_SHIFT) &&
        next != NULL)
      return heap_free_list_corrupted(page, block);
    page->free = next;
    page->used++;
    return block;
  }
  return heap_malloc_generic(heap, size, 0);
}

ZK_EXPORT void zk_free(void *p) {
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
      block->next_encoded = page_encode(page, page->free);
      page->free = block;
      page->frees++;
      if (unlikely(--page->used < page->free_trigger))
        heap_free_local_slow(heap, page);
      return;
    }
  }
  heap_free_generic(p);
}

ZK_EXPORT void *zk_calloc(size_t count, size_t size) {
  size_t total;
  if (unlikely(__builtin_mul_overflow(count, size, &total))) {
    errno = ENOMEM;
    return NULL;
  }
  void *p = zk_malloc(total);
  if (p != NULL && !large_block_is_zero(p))
    memset(p, 0, total);
  return p;
}

ZK_EXPORT size_t zk_usable_size(const void *p) {
  if (p == NULL)
    return 0;
  segment_t *segment = segment_of(p);
  if (!segment_is_owned(segment))
    return 0;
  page_t *page = segment_page_of(segment, p);
  switch ((page_kind_t)page->kind) {
  case PAGE_SMALL:
  case PAGE_POOL:
    return page->block_size -
           (size_t)((uint8_t *)p - page->start) % page->block_size;
  case PAGE_LARGE:
  case PAGE_HUGE:
    return page->large_size - (size_t)((uint8_t *)p - page->start);
  default:
    return 0;
  }
}

ZK_EXPORT void *zk_realloc(void *p, size_t size) {
  if (p == NULL)
    return zk_malloc(size);
  if (size == 0) {
    zk_free(p);
    return NULL;
  }
  size_t usable = zk_usable_size(p);
  if (usable == 0) {
    heap_free_generic(p); /* reports the foreign pointer */
    errno = EINVAL;
    return NULL;
  }
  /* Shrinking by less than half keeps the block. */
  if (size <= usable && size >= usable / 2)
    return p;
  void *resized = large_try_resize(p, size);
  if (resized != NULL)
    return resized;
  void *fresh = zk_malloc(size);
  if (fresh == NULL)
    return NULL; /* p is untouched, as C requires */
  memcpy(fresh, p, size < usable ? size : usable);
  zk_free(p);
  return fresh;
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
  return heap_malloc_generic(heap_current, size, alignment);
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
