/* Object pools: exact-size objects with 100% reuse.
 *
 * Three layers, after Bonwick's magazines and depot:
 *   magazine  per thread and pool: a stack of free objects. zk_pool_alloc
 *             pops, zk_pool_free pushes, with no lock, no atomic and no
 *             owner check: every object of a pool is interchangeable, so a
 *             free goes to the freeing thread's magazine.
 *   depot     per pool, under pool->lock: full rounds of MAGAZINE_CAPACITY
 *             objects. A full magazine is copied into a round, an empty one
 *             refilled from a round: O(1) per MAGAZINE_CAPACITY operations,
 *             whatever the threads do (one thread allocating and another
 *             freeing is the async-runtime case).
 *   slab      per pool, under pool->lock: PAGE_POOL spans whose free objects
 *             sit in per-page free lists. The depot spills rounds into it
 *             when it holds more than the reserve allows; magazines take
 *             from it when the depot is empty. A page whose objects are all
 *             back in its list can return to the segment layer (and then,
 *             after the purge delay, to the OS).
 *
 * Fresh objects are carved, and constructed, one at a time from a region a
 * magazine reserves in a page (so "fresh" vs "reused" is exact), with no
 * lock held. A region whose thread exits before carving all of it goes back
 * to its page if it is the page's tail, and otherwise onto the pool's list of
 * leftover regions, which the next magazine needing fresh objects takes
 * before new memory: its objects are still constructed once, when carved.
 *
 * Counting: a magazine counts its allocations and `taken` (objects moved in
 * from the slab minus objects moved out). Over all magazines,
 *   live = sum(taken - count),  frees = allocations - live,
 *   reused = allocations - fresh.
 *
 * Adaptive reserve: every POOL_EPOCH slab exchanges, predicted_live becomes
 * an EWMA (weight 1/4) of the epoch's live high-water mark. The slab keeps
 * at most predicted_live - live free objects (or max_cached, when set);
 * empty pages beyond that go back to the segment layer.
 *
 * Locks: pools_lock (slots, magazine attach/detach, destroy) before
 * pool->lock before the segment lock. No user code (constructor, visitor)
 * runs while any is held: user code may call any zkmem function, and a
 * constructor that allocated from a pool at thread exit, or a visitor that
 * freed, deadlocked on the registry or on its own pool's lock. */
#include "internal.h"
#include "os.h"

#include <errno.h>
#include <string.h>

#define MAGAZINE_CAPACITY    128
#define MAGAZINE_BATCH       64 /* objects taken from the slab at once */
#define CARVE_REGION_BYTES   8192
#define POOL_EPOCH           64
#define POOL_MAX_PAGE_SLICES 16
#define POOL_MAX_OBJECT      ((size_t)1 << 20)

/* A leftover region's first word: the next region's address, and in the top
 * bits the region's object count (a region is at most CARVE_REGION_BYTES of
 * objects of at least 8 bytes, so the word fits in the first object). */
#define LEFTOVER_COUNT_SHIFT 48
#define LEFTOVER_NEXT_MASK   ((UINT64_C(1) << LEFTOVER_COUNT_SHIFT) - 1)
_Static_assert(CARVE_REGION_BYTES / 8 < (1u << (64 - LEFTOVER_COUNT_SHIFT)),
               "a region's object count fits its link word");

typedef struct depot_round {
  struct depot_round *next;
  void *items[MAGAZINE_CAPACITY];
} depot_round_t;

struct zk_pool {
  uint32_t slot;
  uint64_t uid;
  size_t object_size;
  size_t stride;
  size_t max_cached;
  void (*constructor)(void *object, void *arg);
  void *constructor_arg;
  char name[48];
  pthread_mutex_t lock;
  page_queue_t partial; /* pages with objects in their free list */
  page_queue_t drained; /* pages without */
  page_t *carve_page;   /* where the next carve region comes from */
  uint8_t *leftover;    /* regions of exited threads, see the top */
  uint32_t next_page_slices;
  uint32_t page_count;
  uint64_t free_in_pages;
  depot_round_t *depot_full;  /* each holds MAGAZINE_CAPACITY objects */
  depot_round_t *depot_empty; /* spare rounds */
  uint64_t depot_rounds;      /* in depot_full */
  magazine_t *magazines;      /* attached to a heap */
  /* Totals of magazines that have been detached. */
  uint64_t retired_allocations;
  uint64_t retired_fresh;
  int64_t retired_taken;
  uint64_t peak_live;
  uint64_t epoch_peak;
  double predicted_live;
  uint32_t epoch_exchanges;
} __attribute__((aligned(256)));

magazine_t pool_magazine_empty; /* count == capacity == 0 */

static pthread_mutex_t pools_lock = PTHREAD_MUTEX_INITIALIZER;
static zk_pool_t *pool_slots[POOL_SLOTS]; /* non-NULL: slot in use */
/* Pools live in one table, so a pool's slot is its index, found from its
 * address with no load on the fast path. Half a MiB of address space, touched
 * only as pools are created. */
static zk_pool_t pool_table[POOL_SLOTS];
_Static_assert((sizeof(zk_pool_t) & (sizeof(zk_pool_t) - 1)) == 0,
               "pool slot arithmetic wants a power-of-two size");

/* Unsigned: NULL and every pointer outside the table give a slot of
 * POOL_SLOTS or more. */
ZK_INLINE size_t pool_slot(const zk_pool_t *pool) {
  return ((uintptr_t)pool - (uintptr_t)pool_table) / sizeof(zk_pool_t);
}

/* A pool created and not destroyed (a slot reused since is undetectable). */
static bool pool_is_live(const zk_pool_t *pool) {
  size_t slot = pool_slot(pool);
  return slot < POOL_SLOTS &&
         __atomic_load_n(&pool_slots[slot], __ATOMIC_ACQUIRE) == pool;
}
static uint64_t pool_next_uid = 1;

/* ---- fast paths ---- */

/* The fast paths test the pool's byte offset in the table, unsigned: one
 * compare rejects NULL and every pointer outside it. They pass the slow
 * paths that offset or the slot rather than the pool, so the pool's
 * register can hold them: keeping the pool cost a copy. (A pointer inside
 * the table but not at a pool's start acts as that slot's pool.) */
static ZK_COLD void *pool_alloc_outside(uintptr_t offset);
static ZK_NOINLINE void *pool_alloc_slow(size_t slot);
static ZK_COLD void pool_free_outside(uintptr_t offset, void *object);
static ZK_NOINLINE void pool_free_slow(size_t slot, void *object);

/* Under memcheck a pool object is a heap block; a constructed object's
 * contents are defined. */
#define track_pool_alloc(pool, object)                                         \
  track_malloc((object), (pool)->object_size, (pool)->constructor != NULL)

ZK_EXPORT void *zk_pool_alloc(zk_pool_t *pool) {
  uintptr_t offset = (uintptr_t)pool - (uintptr_t)pool_table;
  if (unlikely(offset >= sizeof(pool_table)))
    return pool_alloc_outside(offset);
  size_t slot = offset / sizeof(zk_pool_t);
  magazine_t *magazine = heap_current->pool_magazines[slot];
  uint64_t state = magazine->state;
  void *object;
  if (likely((state & MAGAZINE_COUNT_MASK) != 0)) {
    state += (UINT64_C(1) << MAGAZINE_COUNT_BITS) - 1; /* count one, pop */
    magazine->state = state;
    object = magazine->items[state & MAGAZINE_COUNT_MASK];
  } else {
    object = pool_alloc_slow(slot);
  }
  track_pool_alloc(&pool_table[slot], object);
  return object;
}

ZK_EXPORT void zk_pool_free(zk_pool_t *pool, void *object) {
  if (ZK_TRACKING && object != NULL)
    track_free(object);
  uintptr_t offset = (uintptr_t)pool - (uintptr_t)pool_table;
  if (unlikely(offset >= sizeof(pool_table))) {
    pool_free_outside(offset, object);
    return;
  }
  size_t slot = offset / sizeof(zk_pool_t);
  magazine_t *magazine = heap_current->pool_magazines[slot];
  uint64_t state = magazine->state;
  /* 32 bits: the compare then reads the capacity from memory, saving the
   * instruction that freeing NULL costs below. */
  uint32_t count = (uint32_t)state & MAGAZINE_COUNT_MASK;
  if (likely(count < magazine->capacity)) {
    /* NULL is stored above the count, where it is never popped: freeing
     * NULL costs no branch. */
    magazine->items[count] = object;
    magazine->state = state + (object != NULL);
    return;
  }
  pool_free_slow(slot, object);
}

/* ---- slab (pool->lock held) ---- */

/* Counters written under pool->lock and peeked without it. */
static void relaxed_set(uint64_t *counter, uint64_t value) {
  __atomic_store_n(counter, value, __ATOMIC_RELAXED);
}

static bool pool_has_reusable(const zk_pool_t *pool) {
  return __atomic_load_n(&pool->depot_rounds, __ATOMIC_RELAXED) != 0 ||
         __atomic_load_n(&pool->free_in_pages, __ATOMIC_RELAXED) != 0;
}

static void queue_append(page_queue_t *queue, page_t *page) {
  page->next = NULL;
  page->prev = queue->last;
  if (queue->last)
    queue->last->next = page;
  else
    queue->first = page;
  queue->last = page;
}

static void queue_unlink(page_queue_t *queue, page_t *page) {
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

static page_t *pool_page_new(zk_pool_t *pool, size_t min_objects) {
  /* Secure segments give one slice less (a guard): asking for more fails. */
  size_t max_slices = segment_span_max_slices();
  size_t slices = pool->next_page_slices;
  size_t needed = max_slices;
  if (min_objects < (max_slices << SLICE_SHIFT) / pool->stride)
    needed = (min_objects * pool->stride + SLICE_SIZE - 1) >> SLICE_SHIFT;
  if (slices < needed)
    slices = needed;
  if (slices > max_slices)
    slices = max_slices;
  page_t *page = segment_span_alloc(slices, PAGE_POOL, NULL);
  if (page == NULL)
    return NULL;
  page->pool = pool;
  page->block_size = (uint32_t)pool->stride;
  page->reserved = (uint32_t)(((size_t)slices << SLICE_SHIFT) / pool->stride);
  page->key = random_seed() | 1;
  /* After `reserved`, which sizes the bits. */
  if (option(ZK_OPTION_SECURE) && !page_free_bits_init(page)) {
    segment_span_free(page);
    errno = ENOMEM;
    return NULL;
  }
  queue_append(&pool->drained, page);
  pool->page_count++;
  if (pool->next_page_slices < POOL_MAX_PAGE_SLICES)
    pool->next_page_slices *= 2;
  return page;
}

static void pool_page_release(zk_pool_t *pool, page_t *page) {
  queue_unlink(page->free != NULL ? &pool->partial : &pool->drained, page);
  relaxed_set(&pool->free_in_pages, pool->free_in_pages - page->capacity);
  pool->page_count--;
  if (pool->carve_page == page)
    pool->carve_page = NULL;
  page_span_free(page, 0);
}

/* Owner only (every caller is the magazine's thread). */
static void magazine_publish_locked(magazine_t *magazine) {
  magazine->allocations += magazine->state >> MAGAZINE_COUNT_BITS;
  magazine->state &= MAGAZINE_COUNT_MASK;
  magazine->published_live =
      magazine->taken - (int64_t)magazine_count(magazine);
  magazine->published_allocations = magazine_allocations(magazine);
  magazine->published_fresh = magazine->fresh;
}

/* Live objects as of each thread's last exchange. */
static int64_t pool_live_locked(const zk_pool_t *pool) {
  int64_t live = pool->retired_taken;
  for (const magazine_t *m = pool->magazines; m != NULL; m = m->next_in_pool)
    live += m->published_live;
  return live < 0 ? 0 : live;
}

static uint64_t pool_cache_limit(const zk_pool_t *pool, uint64_t live) {
  if (pool->max_cached != 0)
    return pool->max_cached;
  uint64_t predicted = (uint64_t)pool->predicted_live;
  return predicted > live ? predicted - live : 0;
}

/* Return empty pages while the slab caches more than the limit. The page
 * being carved stays: it is where growth continues. */
static bool slab_put_locked(zk_pool_t *pool, void *object);

static void depot_spill_locked(zk_pool_t *pool) {
  depot_round_t *round = pool->depot_full;
  pool->depot_full = round->next;
  relaxed_set(&pool->depot_rounds, pool->depot_rounds - 1);
  for (uint32_t i = 0; i < MAGAZINE_CAPACITY; i++)
    slab_put_locked(pool, round->items[i]);
  round->next = pool->depot_empty;
  pool->depot_empty = round;
}

static void pool_trim_locked(zk_pool_t *pool, uint64_t live) {
  uint64_t limit = pool_cache_limit(pool, live);
  while (pool->depot_full != NULL &&
         pool->free_in_pages + pool->depot_rounds * MAGAZINE_CAPACITY >
             limit + MAGAZINE_CAPACITY)
    depot_spill_locked(pool);
  page_t *page = pool->partial.first;
  while (page != NULL && pool->free_in_pages > limit) {
    page_t *next = page->next;
    if (page->used == 0 && page != pool->carve_page)
      pool_page_release(pool, page);
    page = next;
  }
}

/* Sample live at every exchange; close an epoch every POOL_EPOCH. */
static void pool_observe_locked(zk_pool_t *pool, magazine_t *magazine) {
  if (magazine != NULL)
    magazine_publish_locked(magazine);
  uint64_t live = (uint64_t)pool_live_locked(pool);
  if (live > pool->peak_live)
    pool->peak_live = live;
  if (live > pool->epoch_peak)
    pool->epoch_peak = live;
  if (++pool->epoch_exchanges >= POOL_EPOCH) {
    pool->predicted_live =
        pool->predicted_live * 0.75 + (double)pool->epoch_peak * 0.25;
    if (pool->predicted_live < (double)pool->epoch_peak &&
        pool->predicted_live < 1.0)
      pool->predicted_live = (double)pool->epoch_peak;
    pool->epoch_peak = live;
    pool->epoch_exchanges = 0;
    pool_trim_locked(pool, live);
  }
}

static page_t *pool_page_of(const void *object) {
  segment_t *segment = segment_of(object);
  if (!segment_is_owned(segment))
    return NULL;
  page_t *page = segment_page_of(segment, object);
  return page_kind(page) == PAGE_POOL ? page : NULL;
}

/* What is wrong with `object` as one of `page`'s objects, or NULL. The
 * capacity counts regions reserved to magazines, carved or not. */
static const char *pool_object_misfit(const zk_pool_t *pool, const page_t *page,
                                      const void *object) {
  size_t offset = (size_t)((const uint8_t *)object - page->start);
  uint32_t capacity = __atomic_load_n(&page->capacity, __ATOMIC_RELAXED);
  if (offset % pool->stride != 0)
    return "free of a pointer inside a block (not its start)";
  if (offset >= (size_t)capacity * pool->stride)
    return "free of a block zkmem never handed out";
  return NULL;
}

static bool pool_owns(const zk_pool_t *pool, const page_t *page,
                      const void *object) {
  return page != NULL && page->pool == pool &&
         pool_object_misfit(pool, page, object) == NULL;
}

static size_t pool_object_index(const zk_pool_t *pool, const page_t *page,
                                const void *object) {
  return (size_t)((const uint8_t *)object - page->start) / pool->stride;
}

/* False when the object was reported (and left out). */
static bool slab_put_locked(zk_pool_t *pool, void *object) {
  page_t *page = pool_page_of(object);
  if (unlikely(!pool_owns(pool, page, object))) {
    error_report("object freed to a pool that does not own it", object,
                 pool->object_size);
    return false;
  }
  /* Secure pages: the bit is set while the object is in the slab, and
   * secure magazines hold nothing, so a second free finds it set. */
  if (page->free_bits != NULL &&
      unlikely(
          !page_free_bit_set(page, pool_object_index(pool, page, object)))) {
    error_report("double free", object, pool->object_size);
    return false;
  }
  block_t *block = object;
  if (page->free == NULL) {
    queue_unlink(&pool->drained, page);
    queue_append(&pool->partial, page);
  }
  block_set_next(page, block, page->free);
  page->free = block;
  page->used--;
  relaxed_set(&pool->free_in_pages, pool->free_in_pages + 1);
  if (page->used == 0 && page != pool->carve_page &&
      pool->free_in_pages > pool_cache_limit(pool, 0) + page->capacity)
    pool_page_release(pool, page);
  return true;
}

static uint32_t slab_take_locked(zk_pool_t *pool, void **out, uint32_t want) {
  uint32_t taken = 0;
  while (taken < want && pool->partial.first != NULL) {
    page_t *page = pool->partial.first;
    while (taken < want && page->free != NULL) {
      block_t *block = page->free;
      page->free = block_next(page, block);
      page->used++;
      if (page->free_bits != NULL)
        page_free_bit_clear(page, pool_object_index(pool, page, block));
      out[taken++] = block;
    }
    if (page->free == NULL) {
      queue_unlink(&pool->partial, page);
      queue_append(&pool->drained, page);
    }
  }
  relaxed_set(&pool->free_in_pages, pool->free_in_pages - taken);
  return taken;
}

/* ---- leftover regions (pool->lock held) ---- */

static uint64_t leftover_word(const uint8_t *region) {
  uint64_t word;
  memcpy(&word, region, sizeof(word));
  return word;
}

static void leftover_set(uint8_t *region, const uint8_t *next, uint64_t count) {
  uint64_t word = (uint64_t)(uintptr_t)next | count << LEFTOVER_COUNT_SHIFT;
  memcpy(region, &word, sizeof(word));
}

static uint8_t *leftover_next(const uint8_t *region) {
  return (uint8_t *)(uintptr_t)(leftover_word(region) & LEFTOVER_NEXT_MASK);
}

static uint32_t leftover_count(const uint8_t *region) {
  return (uint32_t)(leftover_word(region) >> LEFTOVER_COUNT_SHIFT);
}

/* Reserve uncarved objects of a page to this magazine: a leftover region
 * first, so that its page can empty again. */
static bool pool_reserve_region_locked(zk_pool_t *pool, magazine_t *magazine) {
  uint8_t *region = pool->leftover;
  if (region != NULL) {
    uint32_t count = leftover_count(region);
    pool->leftover = leftover_next(region);
    memset(region, 0, sizeof(uint64_t)); /* hand out no zkmem address */
    magazine->carve_next = region;
    magazine->carve_end = region + (size_t)count * pool->stride;
    magazine->carve_page = pool_page_of(region);
    return true;
  }
  page_t *page = pool->carve_page;
  if (page == NULL || page->capacity >= page->reserved) {
    page = NULL;
    for (page_t *p = pool->drained.first; p != NULL; p = p->next) {
      if (p->capacity < p->reserved) {
        page = p;
        break;
      }
    }
    if (page == NULL)
      page = pool_page_new(pool, 1);
    if (page == NULL)
      return false;
    pool->carve_page = page;
  }
  uint32_t count = (uint32_t)(CARVE_REGION_BYTES / pool->stride);
  if (count == 0)
    count = 1;
  if (count > page->reserved - page->capacity)
    count = page->reserved - page->capacity;
  magazine->carve_next = page->start + (size_t)page->capacity * pool->stride;
  magazine->carve_end = magazine->carve_next + (size_t)count * pool->stride;
  magazine->carve_page = page;
  __atomic_store_n(&page->capacity, page->capacity + count, __ATOMIC_RELAXED);
  page->used += count;
  return true;
}

/* Give back the uncarved rest of a magazine's region: roll the page back if
 * the region is its tail, otherwise put it on the leftover list (a page
 * with a leftover region stays in use until a magazine takes the region).
 * Constructing the objects here instead would run the user's constructor
 * under the locks. */
static void pool_release_region_locked(zk_pool_t *pool, magazine_t *magazine) {
  page_t *page = magazine->carve_page;
  uint8_t *start = magazine->carve_next;
  uint8_t *end = magazine->carve_end;
  magazine->carve_next = magazine->carve_end = NULL;
  magazine->carve_page = NULL;
  if (page == NULL || start >= end)
    return;
  uint32_t count = (uint32_t)((size_t)(end - start) / pool->stride);
  uint8_t *tail = page->start + (size_t)page->capacity * pool->stride;
  if (tail == end) {
    __atomic_store_n(&page->capacity, page->capacity - count, __ATOMIC_RELAXED);
    page->used -= count;
  } else {
    leftover_set(start, pool->leftover, count);
    pool->leftover = start;
  }
}

/* ---- magazines ---- */

static size_t magazine_bytes(void) {
  return sizeof(magazine_t) + MAGAZINE_CAPACITY * sizeof(void *);
}

/* Flush a magazine into its pool and fold its counters into the pool. */
static void magazine_detach_locked(zk_pool_t *pool, magazine_t *magazine) {
  uint32_t count = magazine_count(magazine);
  for (uint32_t i = 0; i < count; i++)
    slab_put_locked(pool, magazine->items[i]);
  magazine->taken -= count;
  magazine_set_count(magazine, 0);
  pool_release_region_locked(pool, magazine);
  pool->retired_allocations += magazine_allocations(magazine);
  pool->retired_fresh += magazine->fresh;
  pool->retired_taken += magazine->taken;
  if (magazine->prev_in_pool)
    magazine->prev_in_pool->next_in_pool = magazine->next_in_pool;
  else
    pool->magazines = magazine->next_in_pool;
  if (magazine->next_in_pool)
    magazine->next_in_pool->prev_in_pool = magazine->prev_in_pool;
  magazine->pool = NULL;
  magazine->capacity = 0;
}

static magazine_t *magazine_attach(heap_t *heap, zk_pool_t *pool) {
  magazine_t *stale = heap->pool_magazines[pool_slot(pool)];
  magazine_t *magazine = os_meta_alloc(magazine_bytes());
  if (magazine == NULL)
    return NULL;
  magazine->capacity = option(ZK_OPTION_SECURE) ? 0 : MAGAZINE_CAPACITY;
  magazine->pool = pool;
  magazine->pool_uid = pool->uid;
  magazine->heap = heap;
  pthread_mutex_lock(&pools_lock);
  pthread_mutex_lock(&pool->lock);
  magazine->next_in_pool = pool->magazines;
  if (pool->magazines)
    pool->magazines->prev_in_pool = magazine;
  pool->magazines = magazine;
  pthread_mutex_unlock(&pool->lock);
  heap->pool_magazines[pool_slot(pool)] = magazine;
  heap->has_pool_magazines = true;
  pthread_mutex_unlock(&pools_lock);
  /* A magazine left by a destroyed pool in this slot. */
  if (stale != &pool_magazine_empty)
    os_meta_free(stale, magazine_bytes());
  return magazine;
}

static magazine_t *magazine_for(zk_pool_t *pool) {
  heap_t *heap = heap_get_initialized();
  if (heap == NULL)
    return NULL;
  magazine_t *magazine = heap->pool_magazines[pool_slot(pool)];
  if (magazine->pool == pool && magazine->pool_uid == pool->uid)
    return magazine;
  return magazine_attach(heap, pool);
}

void pool_heap_exit(heap_t *heap) {
  /* Most task sub-heaps never touch a pool: no lock, no walk. Set by the
   * heap's own thread, which is the caller or is not using the heap. */
  if (!heap->has_pool_magazines)
    return;
  pthread_mutex_lock(&pools_lock);
  for (uint32_t slot = 0; slot < POOL_SLOTS; slot++) {
    magazine_t *magazine = heap->pool_magazines[slot];
    if (magazine == &pool_magazine_empty)
      continue;
    zk_pool_t *pool = magazine->pool;
    if (pool != NULL) {
      pthread_mutex_lock(&pool->lock);
      magazine_detach_locked(pool, magazine);
      pthread_mutex_unlock(&pool->lock);
    }
    heap->pool_magazines[slot] = &pool_magazine_empty;
    os_meta_free(magazine, magazine_bytes());
  }
  heap->has_pool_magazines = false;
  pthread_mutex_unlock(&pools_lock);
}

/* ---- slow paths ---- */

static void *pool_carve(zk_pool_t *pool, magazine_t *magazine) {
  void *object = magazine->carve_next;
  magazine->carve_next += pool->stride;
  if (pool->constructor)
    pool->constructor(object, pool->constructor_arg);
  magazine->fresh++;
  magazine->taken++;
  magazine->allocations++;
  return object;
}

/* Out of the fast paths' slot range, or a slot whose pool is gone. */
static ZK_COLD void *pool_alloc_invalid(zk_pool_t *pool) {
  if (pool != NULL)
    error_report("not a zkmem pool", pool, 0);
  errno = EINVAL;
  return NULL;
}

static ZK_COLD void pool_free_invalid(zk_pool_t *pool, void *object) {
  if (pool == NULL)
    error_report("object freed to a NULL pool", object, 0);
  else
    error_report("not a zkmem pool", pool, 0);
}

static ZK_COLD void *pool_alloc_outside(uintptr_t offset) {
  return pool_alloc_invalid((zk_pool_t *)((uintptr_t)pool_table + offset));
}

static ZK_NOINLINE void *pool_alloc_slow(size_t slot) {
  zk_pool_t *pool = &pool_table[slot];
  if (unlikely(!pool_is_live(pool)))
    return pool_alloc_invalid(pool);
  magazine_t *magazine = magazine_for(pool);
  if (magazine == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  /* Freed objects first (100% reuse), then fresh ones from the region. */
  if (magazine->carve_next < magazine->carve_end && !pool_has_reusable(pool))
    return pool_carve(pool, magazine);
  pthread_mutex_lock(&pool->lock);
  if (pool->depot_full != NULL && magazine->capacity != 0) {
    depot_round_t *round = pool->depot_full;
    pool->depot_full = round->next;
    relaxed_set(&pool->depot_rounds, pool->depot_rounds - 1);
    memcpy(magazine->items, round->items, sizeof(round->items));
    magazine_set_count(magazine, MAGAZINE_CAPACITY - 1);
    magazine->taken += MAGAZINE_CAPACITY;
    round->next = pool->depot_empty;
    pool->depot_empty = round;
    pool_observe_locked(pool, magazine);
    pthread_mutex_unlock(&pool->lock);
    magazine->allocations++;
    return magazine->items[MAGAZINE_CAPACITY - 1];
  }
  uint32_t want = magazine->capacity ? MAGAZINE_BATCH : 1;
  uint32_t got = slab_take_locked(pool, magazine->items, want);
  if (magazine->capacity == 0 && got == 1) {
    /* Secure mode: no caching, hand the object out directly. */
    magazine->taken++;
    magazine->allocations++;
    pool_observe_locked(pool, magazine);
    pthread_mutex_unlock(&pool->lock);
    return magazine->items[0];
  }
  if (magazine->capacity == 0)
    got = 0;
  magazine_set_count(magazine, got);
  magazine->taken += got;
  bool carving = magazine->carve_next < magazine->carve_end;
  if (got == 0 && !carving)
    carving = pool_reserve_region_locked(pool, magazine);
  pool_observe_locked(pool, magazine);
  pthread_mutex_unlock(&pool->lock);
  if (got != 0) {
    magazine->allocations++;
    magazine_set_count(magazine, got - 1);
    return magazine->items[got - 1];
  }
  if (carving)
    return pool_carve(pool, magazine);
  errno = ENOMEM;
  return NULL;
}

static ZK_COLD void pool_free_outside(uintptr_t offset, void *object) {
  if (object != NULL) /* whatever the pool, as free(NULL) */
    pool_free_invalid((zk_pool_t *)((uintptr_t)pool_table + offset), object);
}

static void pool_free_checked(zk_pool_t *pool, void *object);

/* A free leaves errno as it was, whatever the slow path met (no memory for
 * a magazine or a depot round: the object goes to the slab). */
static ZK_NOINLINE void pool_free_slow(size_t slot, void *object) {
  if (object == NULL)
    return;
  int saved_errno = errno;
  pool_free_checked(&pool_table[slot], object);
  errno = saved_errno;
}

static void pool_free_checked(zk_pool_t *pool, void *object) {
  if (unlikely(!pool_is_live(pool))) {
    pool_free_invalid(pool, object);
    return;
  }
  page_t *page = pool_page_of(object);
  if (unlikely(!pool_owns(pool, page, object))) {
    error_report("object freed to a pool that does not own it", object,
                 pool->object_size);
    return;
  }
  magazine_t *magazine = magazine_for(pool);
  if (magazine != NULL && magazine_count(magazine) < magazine->capacity) {
    uint32_t count = magazine_count(magazine); /* freshly attached */
    magazine->items[count] = object;
    magazine_set_count(magazine, count + 1);
    return;
  }
  pthread_mutex_lock(&pool->lock);
  if (magazine == NULL || magazine->capacity == 0) {
    /* A double free reported in warn mode frees nothing: live stays exact. */
    if (slab_put_locked(pool, object)) {
      if (magazine != NULL)
        magazine->taken--;
      else
        pool->retired_taken--;
    }
    pool_observe_locked(pool, magazine);
    pthread_mutex_unlock(&pool->lock);
    return;
  }
  /* Full: the whole magazine becomes a depot round. */
  depot_round_t *round = pool->depot_empty;
  if (round != NULL) {
    pool->depot_empty = round->next;
  } else {
    round = os_meta_alloc(sizeof(depot_round_t));
    if (round == NULL) { /* no memory for a round: spill to the slab */
      for (uint32_t i = 0; i < magazine_count(magazine); i++)
        slab_put_locked(pool, magazine->items[i]);
    }
  }
  if (round != NULL) {
    memcpy(round->items, magazine->items, sizeof(round->items));
    round->next = pool->depot_full;
    pool->depot_full = round;
    relaxed_set(&pool->depot_rounds, pool->depot_rounds + 1);
  }
  magazine->taken -= magazine_count(magazine);
  magazine_set_count(magazine, 0);
  pool_observe_locked(pool, magazine);
  pthread_mutex_unlock(&pool->lock);
  magazine->items[0] = object;
  magazine_set_count(magazine, 1);
}

/* free() of a pool object: the pool's own free checks nothing on its fast
 * path, so check here what free() checks for small blocks. */
void pool_free_from_malloc(page_t *page, void *object) {
  zk_pool_t *pool = page->pool;
  const char *misfit = pool_object_misfit(pool, page, object);
  if (unlikely(misfit != NULL)) {
    error_report(misfit, object, pool->stride);
    return;
  }
  zk_pool_free(pool, object);
}

/* ---- life cycle ---- */

ZK_EXPORT zk_pool_t *zk_pool_create(size_t object_size,
                                    const zk_pool_options_t *options) {
  zk_pool_options_t defaults = {0};
  if (options == NULL)
    options = &defaults;
  size_t alignment = options->alignment;
  if (alignment == 0)
    alignment = object_size >= 16 ? 16 : 8;
  if (object_size == 0 || object_size > POOL_MAX_OBJECT ||
      (alignment & (alignment - 1)) != 0 || alignment > SLICE_SIZE) {
    errno = EINVAL;
    return NULL;
  }
  process_init();
  pthread_mutex_lock(&pools_lock);
  uint32_t slot = 0;
  while (slot < POOL_SLOTS && pool_slots[slot] != NULL)
    slot++;
  if (slot == POOL_SLOTS) {
    pthread_mutex_unlock(&pools_lock);
    errno = ENOMEM;
    return NULL;
  }
  zk_pool_t *pool = &pool_table[slot];
  memset(pool, 0, sizeof(*pool));
  pool->slot = slot;
  pool->uid = pool_next_uid++;
  __atomic_store_n(&pool_slots[slot], pool, __ATOMIC_RELEASE);
  size_t stride = (object_size + alignment - 1) & ~(alignment - 1);
  if (stride < sizeof(block_t))
    stride = sizeof(block_t);
  pool->object_size = object_size;
  pool->stride = stride;
  pool->max_cached = options->max_cached;
  pool->constructor = options->constructor;
  pool->constructor_arg = options->constructor_arg;
  strncpy(pool->name, options->name ? options->name : "pool",
          sizeof(pool->name) - 1);
  pthread_mutex_init(&pool->lock, NULL);
  pool->next_page_slices = 1;
  pthread_mutex_unlock(&pools_lock);

  if (options->preallocate != 0) {
    /* Reserve and fault in the memory now; objects are still carved (and
     * constructed) on first use, so reuse counts stay exact. */
    pthread_mutex_lock(&pool->lock);
    size_t remaining = options->preallocate;
    while (remaining > 0) {
      page_t *page = pool_page_new(pool, remaining);
      if (page == NULL)
        break;
      size_t bytes = (size_t)page->reserved * stride;
      for (size_t offset = 0; offset < bytes; offset += OS_PAGE_SIZE)
        ((volatile uint8_t *)page->start)[offset] = 0;
      remaining -= page->reserved < remaining ? page->reserved : remaining;
      if (pool->carve_page == NULL)
        pool->carve_page = page;
    }
    pool->predicted_live = (double)options->preallocate;
    pthread_mutex_unlock(&pool->lock);
    if (remaining > 0) {
      zk_pool_destroy(pool);
      errno = ENOMEM;
      return NULL;
    }
  }
  return pool;
}

#ifdef ZKMEM_VALGRIND
static void track_pool_object_gone(void *object, void *arg) {
  (void)arg;
  track_free(object);
}
#endif

ZK_EXPORT void zk_pool_destroy(zk_pool_t *pool) {
  if (pool == NULL)
    return;
  if (unlikely(!pool_is_live(pool))) {
    error_report("not a zkmem pool", pool, 0);
    return;
  }
#ifdef ZKMEM_VALGRIND
  /* Objects still live die with the pool: not leaks of the program's. */
  zk_pool_visit(pool, track_pool_object_gone, NULL);
#endif
  pthread_mutex_lock(&pools_lock);
  pthread_mutex_lock(&pool->lock);
  /* Magazines stay where their heaps point at them, emptied and marked
   * dead; the heap frees one when it next touches this slot or exits. */
  for (magazine_t *m = pool->magazines; m != NULL; m = m->next_in_pool) {
    m->pool = NULL;
    m->state = 0;
    m->capacity = 0;
    m->carve_next = m->carve_end = NULL;
  }
  pool->magazines = NULL;
  depot_round_t *lists[2] = {pool->depot_full, pool->depot_empty};
  for (int l = 0; l < 2; l++) {
    while (lists[l] != NULL) {
      depot_round_t *next = lists[l]->next;
      os_meta_free(lists[l], sizeof(depot_round_t));
      lists[l] = next;
    }
  }
  pool->leftover = NULL; /* in the pages freed below */
  page_t *page;
  while ((page = pool->partial.first) != NULL) {
    queue_unlink(&pool->partial, page);
    page_span_free(page, 0);
  }
  while ((page = pool->drained.first) != NULL) {
    queue_unlink(&pool->drained, page);
    page_span_free(page, 0);
  }
  pthread_mutex_unlock(&pool->lock);
  pthread_mutex_destroy(&pool->lock);
  pool->uid = 0; /* no magazine matches a free slot */
  __atomic_store_n(&pool_slots[pool->slot], NULL, __ATOMIC_RELAXED);
  pthread_mutex_unlock(&pools_lock);
}

/* ---- visiting and statistics ---- */

static void bitmap_set(uint64_t *bits, size_t index) {
  bits[index >> 6] |= (uint64_t)1 << (index & 63);
}

static bool bitmap_get(const uint64_t *bits, size_t index) {
  return (bits[index >> 6] >> (index & 63)) & 1;
}

static void visit_mark_free(zk_pool_t *pool, uint64_t *bits,
                            const void *object) {
  page_t *page = pool_page_of(object);
  if (page == NULL || page->pool != pool)
    return;
  /* page->large_size holds the page's first bit while visiting. */
  size_t index = (size_t)((const uint8_t *)object - page->start) / pool->stride;
  bitmap_set(bits, page->large_size + index);
}

static void visit_queue_offsets(page_queue_t *queue, size_t *total_bits) {
  for (page_t *page = queue->first; page != NULL; page = page->next) {
    page->large_size = *total_bits;
    *total_bits += page->reserved;
  }
}

/* Live objects of the queue's pages: counted (out == NULL) or collected. */
static size_t visit_queue_live(const zk_pool_t *pool, const page_queue_t *queue,
                               const uint64_t *bits, void **out) {
  size_t live = 0;
  for (const page_t *page = queue->first; page != NULL; page = page->next) {
    for (uint32_t i = 0; i < page->capacity; i++) {
      if (bitmap_get(bits, page->large_size + i))
        continue;
      if (out != NULL)
        out[live] = page->start + (size_t)i * pool->stride;
      live++;
    }
  }
  return live;
}

/* The live objects, in a metadata block of *bytes bytes the caller frees;
 * NULL when there are none or no memory for them (errno ENOMEM). */
static void **visit_collect_locked(zk_pool_t *pool, size_t *count,
                                   size_t *bytes) {
  *count = *bytes = 0;
  size_t total_bits = 0;
  visit_queue_offsets(&pool->partial, &total_bits);
  visit_queue_offsets(&pool->drained, &total_bits);
  size_t bitmap_bytes = ((total_bits + 63) / 64) * 8 + 8;
  uint64_t *bits = os_meta_alloc(bitmap_bytes);
  if (bits == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  /* Free: in page lists, in the depot, in magazines, or reserved but not
   * yet carved (magazines' regions, leftover regions). */
  for (page_t *page = pool->partial.first; page != NULL; page = page->next)
    for (block_t *b = page->free; b != NULL; b = block_next(page, b))
      visit_mark_free(pool, bits, b);
  for (depot_round_t *r = pool->depot_full; r != NULL; r = r->next)
    for (uint32_t i = 0; i < MAGAZINE_CAPACITY; i++)
      visit_mark_free(pool, bits, r->items[i]);
  for (magazine_t *m = pool->magazines; m != NULL; m = m->next_in_pool) {
    for (uint32_t i = 0; i < magazine_count(m); i++)
      visit_mark_free(pool, bits, m->items[i]);
    for (uint8_t *object = m->carve_next; object < m->carve_end;
         object += pool->stride)
      visit_mark_free(pool, bits, object);
  }
  for (uint8_t *region = pool->leftover; region != NULL;
       region = leftover_next(region)) {
    uint8_t *end = region + (size_t)leftover_count(region) * pool->stride;
    for (uint8_t *object = region; object < end; object += pool->stride)
      visit_mark_free(pool, bits, object);
  }
  size_t live = visit_queue_live(pool, &pool->partial, bits, NULL) +
                visit_queue_live(pool, &pool->drained, bits, NULL);
  void **objects = NULL;
  if (live != 0) {
    objects = os_meta_alloc(live * sizeof(void *));
    if (objects == NULL) {
      errno = ENOMEM;
    } else {
      size_t first = visit_queue_live(pool, &pool->partial, bits, objects);
      visit_queue_live(pool, &pool->drained, bits, objects + first);
      *count = live;
      *bytes = live * sizeof(void *);
    }
  }
  os_meta_free(bits, bitmap_bytes);
  return objects;
}

/* The visitor runs on a list of the live objects taken under the lock, with
 * no lock held: one that freed its object, or called into the pool at all,
 * deadlocked when it ran under pool->lock. */
ZK_EXPORT void zk_pool_visit(zk_pool_t *pool,
                             void (*visitor)(void *object, void *arg),
                             void *arg) {
  if (pool == NULL || visitor == NULL)
    return;
  if (unlikely(!pool_is_live(pool))) {
    error_report("not a zkmem pool", pool, 0);
    return;
  }
  size_t count, bytes;
  pthread_mutex_lock(&pool->lock);
  void **objects = visit_collect_locked(pool, &count, &bytes);
  pthread_mutex_unlock(&pool->lock);
  for (size_t i = 0; i < count; i++)
    visitor(objects[i], arg);
  if (objects != NULL)
    os_meta_free(objects, bytes);
}

ZK_EXPORT int zk_pool_stats(const zk_pool_t *pool, zk_pool_stats_t *out) {
  if (!pool_is_live(pool) || out == NULL) {
    errno = EINVAL;
    return -1;
  }
  zk_pool_t *mutable_pool = (zk_pool_t *)pool;
  memset(out, 0, sizeof(*out));
  pthread_mutex_lock(&mutable_pool->lock);
  uint64_t allocations = pool->retired_allocations;
  uint64_t fresh = pool->retired_fresh;
  uint64_t cached =
      pool->free_in_pages + pool->depot_rounds * MAGAZINE_CAPACITY;
  for (const magazine_t *m = pool->magazines; m != NULL; m = m->next_in_pool)
    if (m->heap == heap_current)
      cached += magazine_count(m); /* others' magazines are theirs */
  int64_t signed_live = pool->retired_taken;
  for (const magazine_t *m = pool->magazines; m != NULL; m = m->next_in_pool) {
    if (m->heap == heap_current) { /* this thread's: exact */
      allocations += magazine_allocations(m);
      fresh += m->fresh;
      signed_live += m->taken - (int64_t)magazine_count(m);
    } else {
      allocations += m->published_allocations;
      fresh += m->published_fresh;
      signed_live += m->published_live;
    }
  }
  uint64_t live = signed_live > 0 ? (uint64_t)signed_live : 0;
  if (live > mutable_pool->peak_live)
    mutable_pool->peak_live = live;
  size_t committed = 0;
  const page_queue_t *queues[2] = {&pool->partial, &pool->drained};
  for (int q = 0; q < 2; q++)
    for (const page_t *page = queues[q]->first; page; page = page->next)
      committed += ((size_t)page->capacity * pool->stride + OS_PAGE_SIZE - 1) &
                   ~(OS_PAGE_SIZE - 1);
  out->name = pool->name;
  out->object_size = pool->object_size;
  out->slot_size = pool->stride;
  out->allocations = allocations;
  out->live = live;
  out->frees = allocations - live;
  out->reused = allocations - fresh;
  out->reuse_rate =
      allocations ? (double)out->reused / (double)allocations : 0.0;
  out->peak_live = pool->peak_live;
  out->predicted_live = (uint64_t)(pool->predicted_live + 0.5);
  out->cached = cached;
  out->pages = pool->page_count;
  out->bytes_committed = committed;
  out->fragmentation =
      live ? (double)committed / ((double)live * pool->object_size) : 0.0;
  pthread_mutex_unlock(&mutable_pool->lock);
  return 0;
}

void pool_lock_all(void) {
  pthread_mutex_lock(&pools_lock);
  for (uint32_t slot = 0; slot < POOL_SLOTS; slot++)
    if (pool_slots[slot] != NULL)
      pthread_mutex_lock(&pool_slots[slot]->lock);
}

void pool_unlock_all(void) {
  for (uint32_t slot = 0; slot < POOL_SLOTS; slot++)
    if (pool_slots[slot] != NULL)
      pthread_mutex_unlock(&pool_slots[slot]->lock);
  pthread_mutex_unlock(&pools_lock);
}
