/* Thread heaps: the slow paths behind alloc.c's fast paths.
 *
 * A heap keeps, per size class, a queue of pages that may have free blocks;
 * the first page of each queue is the one heap->direct[] points at. Pages
 * found without free blocks move to the `full` queue. A page in `full` gets
 * back into its class queue when the owner frees into it (the local free
 * path checks `in_full`) or when another thread frees into it (the remote
 * free sets `remote_frees_to_full` and the owner rescans `full`).
 *
 * Thread exit abandons the heap's pages: empty ones go back to the segment
 * layer, the others onto per-class abandoned lists, from which any thread
 * reclaims them when it needs a page of that class. Other threads can free
 * into abandoned pages at all times: their thread_free list is lock-free.
 *
 * Locks: abandoned_lock (abandoned lists), heaps_lock (the list of heaps).
 * Neither is taken on a fast path. */
#include "internal.h"
#include "os.h"
#include "sizeclass.h"

#include <errno.h>
#include <string.h>

extern magazine_t pool_magazine_empty;

page_t page_empty; /* free == NULL: every fast path falls through */

#define ALL_DIRECT(value)  [0 ... DIRECT_COUNT - 1] = (value)
#define ALL_POOLS(value)   [0 ... POOL_SLOTS - 1] = (value)
#define ALL_CLASSES(value) [0 ... CLASS_COUNT - 1] = (value)
heap_t heap_empty = {
    .direct = {ALL_DIRECT(&page_empty)},
    .class_pages = {ALL_CLASSES(&page_empty)},
    .pool_magazines = {ALL_POOLS(&pool_magazine_empty)},
};

__thread heap_t *heap_current = &heap_empty;

static pthread_mutex_t abandoned_lock = PTHREAD_MUTEX_INITIALIZER;
static page_queue_t abandoned[CLASS_COUNT];
static atomic_uint abandoned_count[CLASS_COUNT]; /* peeked without the lock */
static pthread_mutex_t heaps_lock = PTHREAD_MUTEX_INITIALIZER;
static heap_t *heaps_live;
static heap_t *heaps_free;
static heap_stats_t heaps_retired_stats; /* heaps_lock */
static pthread_key_t heap_exit_key;
static atomic_int process_state; /* 0 new, 1 initializing, 2 ready */

/* ---- queues ---- */

static void queue_push_front(page_queue_t *queue, page_t *page) {
  page->prev = NULL;
  page->next = queue->first;
  if (queue->first)
    queue->first->prev = page;
  else
    queue->last = page;
  queue->first = page;
}

static void queue_push_back(page_queue_t *queue, page_t *page) {
  page->next = NULL;
  page->prev = queue->last;
  if (queue->last)
    queue->last->next = page;
  else
    queue->first = page;
  queue->last = page;
}

static void queue_remove(page_queue_t *queue, page_t *page) {
  if (page->prev)
    page->prev->next = page->next;
  else
    queue->first = page->next;
  if (page->next)
    page->next->prev = page->prev;
  else
    queue->last = page->prev;
  page->next = page->prev = NULL;
}

/* ---- direct map: granule -> current page of its class ---- */

/* Secure pages send every free to the slow path, which fills the block. */
static void page_set_trigger(page_t *page, uint32_t trigger) {
  page->free_trigger = page->secure ? UINT32_MAX : trigger;
}

/* Called whenever the first page of a queue may have changed: it becomes
 * current (its frees stay on the fast path), and the page it displaced
 * gets released when it empties. */
static void heap_update_direct(heap_t *heap, unsigned class_index) {
  page_t *page = heap->queues[class_index].first;
  if (page != NULL) {
    page_set_trigger(page, 0);
    if (page->next != NULL)
      page_set_trigger(page->next, 1);
  }
  /* Secure pages are never on a fast path: malloc checks their fill. */
  if (page == NULL || page->secure)
    page = &page_empty;
  heap->class_pages[class_index] = page;
  if (class_block_size[class_index] > DIRECT_MAX)
    return;
  /* Granules g with size_to_class(8g) == class_index form one range. */
  size_t granule = class_block_size[class_index] / 8;
  for (size_t g = granule; g > 0 && size_to_class(g * 8) == class_index; g--)
    heap->direct[g] = page;
  if (class_index == 0)
    heap->direct[0] = page;
}

/* ---- process and heap life cycle ---- */

static void heap_thread_exit(void *value);

void process_init(void) {
  int expected = 0;
  if (atomic_compare_exchange_strong(&process_state, &expected, 1)) {
    options_init();
    sizeclass_init();
    pthread_key_create(&heap_exit_key, heap_thread_exit);
    atomic_store(&process_state, 2);
    return;
  }
  while (atomic_load(&process_state) != 2)
    ; /* another thread is reading options: a few microseconds */
}

static heap_t *heap_create(void) {
  pthread_mutex_lock(&heaps_lock);
  heap_t *heap = heaps_free;
  if (heap != NULL)
    heaps_free = heap->next_heap;
  pthread_mutex_unlock(&heaps_lock);
  if (heap == NULL) {
    heap = os_meta_alloc(sizeof(heap_t));
    if (heap == NULL)
      return NULL;
  }
  /* Heaps are never unmapped: a stale owner pointer in a page read by a
   * remote free still points at some heap, which at worst gets a spurious
   * rescan hint. */
  memset(heap, 0, sizeof(*heap));
  for (size_t i = 0; i < DIRECT_COUNT; i++)
    heap->direct[i] = &page_empty;
  for (size_t i = 0; i < CLASS_COUNT; i++)
    heap->class_pages[i] = &page_empty;
  for (size_t i = 0; i < POOL_SLOTS; i++)
    heap->pool_magazines[i] = &pool_magazine_empty;
  heap->random_state = random_seed() ^ (uint64_t)(uintptr_t)heap;
  pthread_mutex_lock(&heaps_lock);
  heap->next_heap = heaps_live;
  heaps_live = heap;
  pthread_mutex_unlock(&heaps_lock);
  return heap;
}

heap_t *heap_get_initialized(void) {
  heap_t *heap = heap_current;
  if (likely(heap != &heap_empty))
    return heap;
  process_init();
  heap = heap_create();
  if (heap == NULL)
    return NULL;
  heap_current = heap;
  pthread_setspecific(heap_exit_key, heap);
  return heap;
}

static void stats_retire_page(heap_stats_t *stats, page_t *page) {
  unsigned class_index = page->class_index;
  stats->class_frees_retired[class_index] += page->frees;
  stats->class_allocs_retired[class_index] += page->frees + page->used;
  page->frees = 0;
}

/* Give a page whose blocks are all free back to the segment layer. */
static void heap_page_release(heap_t *heap, page_t *page) {
  stats_retire_page(&heap->stats, page);
  segment_span_free(page);
  purge_maybe();
}

static void abandon_page(heap_t *heap, page_t *page) {
  page_collect(page);
  if (page->used == 0) {
    heap_page_release(heap, page);
    return;
  }
  /* The page carries its counters to the abandoned list and on to the heap
   * that reclaims it. */
  __atomic_store_n(&page->in_full, 0, __ATOMIC_RELAXED);
  atomic_store_explicit(&page->owner, NULL, memory_order_release);
  pthread_mutex_lock(&abandoned_lock);
  queue_push_back(&abandoned[page->class_index], page);
  atomic_fetch_add(&abandoned_count[page->class_index], 1);
  pthread_mutex_unlock(&abandoned_lock);
}

static void heap_abandon(heap_t *heap) {
  pool_heap_exit(heap);
  large_cache_flush(heap);
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    page_t *page;
    while ((page = heap->queues[c].first) != NULL) {
      queue_remove(&heap->queues[c], page);
      abandon_page(heap, page);
    }
  }
  page_t *page;
  while ((page = heap->full.first) != NULL) {
    queue_remove(&heap->full, page);
    abandon_page(heap, page);
  }
  pthread_mutex_lock(&heaps_lock);
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    heaps_retired_stats.class_allocs_retired[c] +=
        heap->stats.class_allocs_retired[c];
    heaps_retired_stats.class_frees_retired[c] +=
        heap->stats.class_frees_retired[c];
  }
  heap_t **link = &heaps_live;
  while (*link != NULL && *link != heap)
    link = &(*link)->next_heap;
  if (*link == heap)
    *link = heap->next_heap;
  heap->next_heap = heaps_free;
  heaps_free = heap;
  pthread_mutex_unlock(&heaps_lock);
}

static void heap_thread_exit(void *value) {
  heap_t *heap = value;
  if (heap == NULL || heap == &heap_empty)
    return;
  heap_current = &heap_empty;
  heap_abandon(heap);
  purge_maybe();
}

/* ---- abandoned pages ---- */

static page_t *heap_reclaim_page(heap_t *heap, unsigned class_index) {
  if (atomic_load_explicit(&abandoned_count[class_index],
                           memory_order_relaxed) == 0)
    return NULL;
  page_queue_t *list = &abandoned[class_index];
  pthread_mutex_lock(&abandoned_lock);
  page_t *page = list->first;
  if (page != NULL) {
    queue_remove(list, page);
    atomic_fetch_sub(&abandoned_count[class_index], 1);
  }
  pthread_mutex_unlock(&abandoned_lock);
  if (page == NULL)
    return NULL;
  atomic_store_explicit(&page->owner, page_owner_word(page, heap),
                        memory_order_release);
  page_collect(page);
  return page;
}

/* Collects the remote frees of every abandoned page and gives back the
 * pages they emptied. */
void heap_reclaim_abandoned(void) {
  pthread_mutex_lock(&abandoned_lock);
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    page_t *page = abandoned[c].first;
    while (page != NULL) {
      page_t *next = page->next;
      page_collect(page);
      if (page->used == 0) {
        queue_remove(&abandoned[c], page);
        atomic_fetch_sub(&abandoned_count[c], 1);
        pthread_mutex_lock(&heaps_lock);
        stats_retire_page(&heaps_retired_stats, page);
        pthread_mutex_unlock(&heaps_lock);
        segment_span_free(page);
      }
      page = next;
    }
  }
  pthread_mutex_unlock(&abandoned_lock);
}

/* ---- allocation slow path ---- */

static void heap_move_to_full(heap_t *heap, page_t *page) {
  queue_remove(&heap->queues[page->class_index], page);
  page_set_trigger(page, UINT32_MAX);
  queue_push_back(&heap->full, page);
  /* Dekker with heap_free_remote, both sides sequentially consistent: a
   * remote free that missed in_full == 1 left its block where this load
   * sees it. */
  __atomic_store_n(&page->in_full, 1, __ATOMIC_SEQ_CST);
  if (atomic_load_explicit(&page->thread_free, memory_order_seq_cst) != NULL)
    atomic_store_explicit(&heap->remote_frees_to_full, 1, memory_order_relaxed);
}

static void heap_unfull(heap_t *heap, page_t *page) {
  queue_remove(&heap->full, page);
  __atomic_store_n(&page->in_full, 0, __ATOMIC_RELAXED);
  page_set_trigger(page, 1);
  queue_push_back(&heap->queues[page->class_index], page);
  if (heap->queues[page->class_index].first == page)
    heap_update_direct(heap, page->class_index);
}

static void heap_rescan_full(heap_t *heap) {
  atomic_store_explicit(&heap->remote_frees_to_full, 0, memory_order_relaxed);
  page_t *page = heap->full.first;
  while (page != NULL) {
    page_t *next = page->next;
    if (atomic_load_explicit(&page->thread_free, memory_order_relaxed) !=
        NULL) {
      page_collect(page);
      heap_unfull(heap, page);
    }
    page = next;
  }
}

/* A page of this class with a free block, made current. */
static page_t *heap_find_page(heap_t *heap, unsigned class_index) {
  if (atomic_load_explicit(&heap->remote_frees_to_full, memory_order_relaxed))
    heap_rescan_full(heap);
  page_queue_t *queue = &heap->queues[class_index];
  page_t *page = queue->first;
  while (page != NULL) {
    page_t *next = page->next;
    page_collect(page);
    if (page->free != NULL || page_extend(page)) {
      if (page != queue->first) {
        queue_remove(queue, page);
        queue_push_front(queue, page);
      }
      heap_update_direct(heap, class_index);
      return page;
    }
    heap_move_to_full(heap, page);
    page = next;
  }
  page = heap_reclaim_page(heap, class_index);
  if (page == NULL) {
    purge_maybe();
    page = segment_span_alloc(class_page_slices[class_index], PAGE_SMALL,
                              &heap->home_segment);
    if (page == NULL)
      return NULL;
    page_init_small(page, heap, class_index);
  }
  if (page->free == NULL && !page_extend(page)) {
    /* A reclaimed page that is still full. */
    __atomic_store_n(&page->in_full, 1, __ATOMIC_RELAXED);
    page_set_trigger(page, UINT32_MAX);
    queue_push_back(&heap->full, page);
    return heap_find_page(heap, class_index);
  }
  queue_push_front(queue, page);
  heap_update_direct(heap, class_index);
  return page;
}

static unsigned class_for_alignment(unsigned class_index, size_t alignment) {
  while (class_index < CLASS_COUNT &&
         class_block_size[class_index] % alignment != 0)
    class_index++;
  return class_index;
}

void *heap_malloc_generic(heap_t *heap, size_t size, size_t alignment) {
  if (unlikely(heap == &heap_empty)) {
    heap = heap_get_initialized();
    if (heap == NULL) {
      errno = ENOMEM;
      return NULL;
    }
  }
  if (size > SMALL_MAX || alignment > ZK_ALIGN_MAX_SMALL)
    return large_alloc(heap, size, alignment);
  unsigned class_index = size_to_class(size);
  if (alignment > 16)
    class_index = class_for_alignment(class_index, alignment);
  if (class_index >= CLASS_COUNT)
    return large_alloc(heap, size, alignment);
  page_t *page = heap->queues[class_index].first;
  if (page == NULL || page->free == NULL) {
    page = heap_find_page(heap, class_index);
    if (page == NULL) {
      errno = ENOMEM;
      return NULL;
    }
  }
  block_t *block = page->free;
  block_t *next = block_next(page, block);
  if (unlikely(page->secure)) {
    if (link_is_forged(block, next))
      return heap_free_list_corrupted(page, block);
    if (!page_secure_intact(page, block))
      error_report("write after free", block, page->block_size);
  }
  page->free = next;
  page->used++;
  return block;
}

ZK_COLD void *heap_free_list_corrupted(page_t *page, block_t *block) {
  error_report("corrupted free list (write after free or overflow)", block,
               page->block_size);
  /* ZKMEM_ON_ERROR=warn: drop the page's list rather than follow it. */
  page->free = NULL;
  return heap_malloc_generic(heap_current, page->block_size, 0);
}

/* ---- free slow paths ---- */

/* Owner's free hit a page that is in `full` or became empty. */
ZK_NOINLINE void heap_free_local_slow(heap_t *heap, page_t *page) {
  if (page->secure)
    page_secure_fill(page, page->free); /* the block just pushed */
  if (page->in_full)
    heap_unfull(heap, page);
  if (page->used != 0)
    return;
  page_queue_t *queue = &heap->queues[page->class_index];
  /* Keep a class's only page, and one empty single-slice spare behind
   * the current page: the next malloc of that size would want it back at
   * once, and a workload whose live set hovers at a page boundary would
   * otherwise take and return a span on every swing. Larger pages hold few
   * blocks and much memory: no spare. zk_collect releases spares. */
  if (page->next == NULL &&
      (queue->first == page ||
       (queue->first->next == page && page->slice_count == 1)))
    return;
  bool was_current = queue->first == page;
  queue_remove(queue, page);
  if (was_current)
    heap_update_direct(heap, page->class_index);
  heap_page_release(heap, page);
}

static void heap_free_remote(page_t *page, block_t *block) {
  if (page->secure)
    page_secure_fill(page, block);
  page_free_remote(page, block); /* a sequentially consistent CAS */
  if (__atomic_load_n(&page->in_full, __ATOMIC_SEQ_CST)) {
    heap_t *owner = page_owner(page);
    if (owner != NULL && !atomic_load_explicit(&owner->remote_frees_to_full,
                                               memory_order_relaxed))
      atomic_store_explicit(&owner->remote_frees_to_full, 1,
                            memory_order_relaxed);
  }
}

/* Secure pages: a block whose fill pattern is intact may already be free;
 * walking the page's lists makes the answer certain. */
static bool heap_secure_is_free(page_t *page, block_t *block) {
  if (!page->secure || !page_secure_intact(page, block))
    return false;
  page_collect(page);
  for (block_t *b = page->free; b != NULL; b = block_next(page, b))
    if (b == block)
      return true;
  return false;
}

/* Everything zk_free's fast path does not handle: NULL, foreign pointers,
 * remote frees, large, huge and pool blocks, and frees that need the slow
 * local path. */
void heap_free_generic(void *p) {
  if (p == NULL)
    return;
  segment_t *segment = segment_of(p);
  if (!segment_is_owned(segment)) {
    error_report("free of a pointer zkmem does not own", p, 0);
    return;
  }
  page_t *page = segment_page_of(segment, p);
  switch ((page_kind_t)page->kind) {
  case PAGE_SMALL: {
    size_t offset = (size_t)((uint8_t *)p - page->start);
    uint32_t capacity = __atomic_load_n(&page->capacity, __ATOMIC_RELAXED);
    if (unlikely(offset % page->block_size != 0 ||
                 offset >= (size_t)capacity * page->block_size)) {
      error_report("free of a pointer inside a block (not its start)", p,
                   page->block_size);
      return;
    }
    heap_t *heap = heap_current;
    block_t *block = p;
    if (page_owner(page) == heap) {
      if (unlikely(block == page->free || heap_secure_is_free(page, block))) {
        error_report("double free", p, page->block_size);
        return;
      }
      block_set_next(page, block, page->free);
      page->free = block;
      page->frees++;
      page->used--;
      heap_free_local_slow(heap, page);
    } else {
      heap_free_remote(page, block);
    }
    return;
  }
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
  default:
    error_report("double free or free of an invalid pointer", p, 0);
    return;
  }
}

/* ---- collection ---- */

void heap_collect(heap_t *heap, bool force) {
  if (heap == &heap_empty)
    return;
  heap_rescan_full(heap);
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    page_t *page = heap->queues[c].first;
    while (page != NULL) {
      page_t *next = page->next;
      page_collect(page);
      if (page->used == 0 && (force || page != heap->queues[c].first)) {
        queue_remove(&heap->queues[c], page);
        heap_page_release(heap, page);
      }
      page = next;
    }
    heap_update_direct(heap, c);
  }
  if (force)
    large_cache_flush(heap);
}

static void stats_add_page(zk_stats_t *out, const page_t *page) {
  zk_class_stats_t *cls = &out->classes[page->class_index];
  uint64_t used = __atomic_load_n(&page->used, __ATOMIC_RELAXED);
  uint64_t frees = __atomic_load_n(&page->frees, __ATOMIC_RELAXED);
  uint64_t capacity = __atomic_load_n(&page->capacity, __ATOMIC_RELAXED);
  cls->allocations += frees + used;
  cls->frees += frees;
  cls->pages++;
  out->bytes_live += used * page->block_size;
  /* Blocks are carved 4 KiB at a time: the carved part is what can be
   * resident. */
  out->bytes_committed +=
      (capacity * page->block_size + OS_PAGE_SIZE - 1) & ~(OS_PAGE_SIZE - 1);
}

static void stats_add_queue(zk_stats_t *out, const page_queue_t *queue) {
  for (const page_t *page = queue->first; page != NULL; page = page->next)
    stats_add_page(out, page);
}

static void stats_add_retired(zk_stats_t *out, const heap_stats_t *stats) {
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    out->classes[c].allocations += stats->class_allocs_retired[c];
    out->classes[c].frees += stats->class_frees_retired[c];
  }
}

/* Other threads' counters are read while they run: exact only when they
 * are quiescent. */
void heap_collect_stats(zk_stats_t *out) {
  pthread_mutex_lock(&abandoned_lock);
  pthread_mutex_lock(&heaps_lock);
  for (heap_t *heap = heaps_live; heap != NULL; heap = heap->next_heap) {
    for (unsigned c = 0; c < CLASS_COUNT; c++)
      stats_add_queue(out, &heap->queues[c]);
    stats_add_queue(out, &heap->full);
    stats_add_retired(out, &heap->stats);
    for (unsigned i = 0; i < heap->large_cache_count; i++) /* free, resident */
      out->bytes_committed += (size_t)heap->large_cache[i]->slice_count
                              << SLICE_SHIFT;
  }
  stats_add_retired(out, &heaps_retired_stats);
  for (unsigned c = 0; c < CLASS_COUNT; c++)
    stats_add_queue(out, &abandoned[c]);
  pthread_mutex_unlock(&heaps_lock);
  pthread_mutex_unlock(&abandoned_lock);
}

void heap_lock_all(void) {
  pthread_mutex_lock(&abandoned_lock);
  pthread_mutex_lock(&heaps_lock);
}

void heap_unlock_all(void) {
  pthread_mutex_unlock(&heaps_lock);
  pthread_mutex_unlock(&abandoned_lock);
}
