/* Thread heaps: the slow paths behind alloc_fast.h's fast paths.
 *
 * Bins. Malloc pops and the owner's free pushes a per-class stack of free
 * blocks, the bin, which may hold blocks of any of the heap's pages of that
 * class: neither fast path touches a page's free list or counters. A
 * workload that frees at random (most servers, the mixed benchmark) thus
 * never moves a page between queues per call, which per-page free lists do
 * whenever a free lands in a full page and the page becomes current for a
 * block or two. An empty bin is refilled with a page's whole free list (one
 * splice: the page's key is the heap's bin key); a bin above its limit
 * gives its coldest blocks back to their pages. Blocks in a bin stay
 * counted as used by their pages.
 *
 * Pages. A heap keeps, per size class, a queue of pages that may have free
 * blocks. Pages found without free blocks move to the `full` queue. A page
 * in `full` gets back into its class queue when a bin flush returns a block
 * to it or another thread frees into it (the remote free sets
 * `remote_frees_to_full` and the owner rescans `full`). Secure pages bypass
 * the bins: each of their blocks is checked on the way out and filled on the
 * way in, at the page.
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
#include <unistd.h>

extern magazine_t pool_magazine_empty;

/* Empty bins and no pages: every fast path falls through to a slow path,
 * which gives the thread a heap of its own. */
#define ALL_POOLS(value) [0 ... POOL_SLOTS - 1] = (value)
heap_t heap_empty = {
    .bins = {[0 ... CLASS_COUNT - 1] = {.keep_floor = BIN_KEEPS_NONE}},
    .pool_magazines = {ALL_POOLS(&pool_magazine_empty)},
};

__thread heap_t *heap_current = &heap_empty;
/* Set when this thread's heap was abandoned at its exit: frees after that
 * (later key destructors, glibc's own freeing of its thread state) push
 * at once, with no heap made for a chain that no destructor would push. */
static __thread bool heap_thread_gone;

static pthread_mutex_t abandoned_lock = PTHREAD_MUTEX_INITIALIZER;
static page_queue_t abandoned[CLASS_COUNT];
static atomic_uint abandoned_count[CLASS_COUNT]; /* peeked without the lock */
static pthread_mutex_t heaps_lock = PTHREAD_MUTEX_INITIALIZER;
static heap_t *heaps_live;
static heap_t *heaps_free;
static atomic_size_t heaps_made;         /* heaps are reused, never unmapped */
static heap_stats_t heaps_retired_stats; /* heaps_lock */
static pthread_key_t heap_exit_key;
/* 0 new, PROCESS_READY, or (pid << 2) | 1 while the process `pid`
 * initializes: a fork child that finds its parent's initialization under
 * way (the thread doing it is not in the child) does it again itself. */
#define PROCESS_READY 2
static _Atomic(uint64_t) process_state;
/* Every heap's bin key and so every small page's list key: one per
 * process, not per heap. A page changes heaps (one reclaimed from an
 * exited thread, its remote frees pushed meanwhile with its key), and with
 * a key per heap its lists had to be decoded and relinked block by block
 * into the new owner's bins: where threads come and go, that second walk
 * was 20% of the producer/consumer batches' time (perf). */
static uintptr_t process_bin_key;

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

/* ---- bins ---- */

/* A bin holds up to BIN_BYTES of blocks, and from BIN_MIN_COUNT to
 * BIN_MAX_COUNT of them: enough that a class's mallocs and frees, however
 * interleaved, seldom reach either end; little enough that blocks do not
 * wait long in one thread's bin while their pages could be given back.
 * A thread heap's bin whose class swings past that grows (bin_grow), up
 * to BIN_GROWN_MAX_COUNT blocks and still BIN_BYTES. */
#define BIN_BYTES           ((size_t)256 * 1024)
#define BIN_MIN_COUNT       8
#define BIN_MAX_COUNT       512
#define BIN_GROWN_MAX_COUNT 4096
_Static_assert(BIN_GROWN_MAX_COUNT <= BIN_KEEP_MASK / 2,
               "a room and-ed with the keep mask stays a room");
static uint32_t bin_limit[CLASS_COUNT];
static uint32_t bin_limit_grown[CLASS_COUNT];

static uint32_t bin_count_for(unsigned class_index, size_t most) {
  size_t count = BIN_BYTES / class_block_size[class_index];
  if (count < BIN_MIN_COUNT)
    count = BIN_MIN_COUNT;
  return (uint32_t)(count > most ? most : count);
}

static void bin_limits_init(void) {
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    bin_limit[c] = bin_count_for(c, BIN_MAX_COUNT);
    bin_limit_grown[c] = bin_count_for(c, BIN_GROWN_MAX_COUNT);
  }
}

/* Remote chains (see heap_chain_add): at most this many blocks or bytes. */
#define REMOTE_CHAIN_BLOCKS 64u
#define REMOTE_CHAIN_BYTES  4096u
_Static_assert(REMOTE_CHAIN_CLASSES <= 64, "one bit per chain");
static uint32_t remote_chain_limit[REMOTE_CHAIN_CLASSES];

static void remote_chain_limits_init(void) {
  for (unsigned c = 0; c < REMOTE_CHAIN_CLASSES; c++) {
    uint32_t limit = REMOTE_CHAIN_BYTES / class_block_size[c];
    remote_chain_limit[c] =
        limit < REMOTE_CHAIN_BLOCKS ? limit : REMOTE_CHAIN_BLOCKS;
  }
}

/* Another heap's blocks a bin keeps (see heap_free_foreign): 128 B to
 * 1 KiB, in a thread heap's bin that ran empty since the last decay pass,
 * while it holds under half its class's limit (a grown bin keeps no more
 * of them). The free fast path reads the bin's part as one field, set here
 * whenever it changes (the page's: its keep_mask). */
static void bin_set_keep_floor(const heap_t *heap, bin_t *bin) {
  unsigned class_index = (unsigned)(bin - heap->bins);
  uint32_t size = class_block_size[class_index];
  /* Kept while the bin holds under half its base limit (rounded up),
   * grown or not: the room is then above the limit less that half. */
  uint32_t base = bin_limit[class_index];
  bin->keep_floor = (bin->flags & BIN_REFILLED) && heap->task == NULL &&
                            size >= FOREIGN_KEEP_MIN && size <= FOREIGN_KEEP_MAX
                        ? (uint16_t)(bin->limit - (base - base / 2) + 1)
                        : BIN_KEEPS_NONE;
}

static void bin_set_refilled(const heap_t *heap, bin_t *bin, bool refilled) {
  bin->flags = refilled ? BIN_REFILLED | BIN_CYCLED
                        : (uint8_t)(bin->flags & ~BIN_REFILLED);
  bin_set_keep_floor(heap, bin);
}

static bool heap_page_return_block(heap_t *heap, page_t *page, block_t *block,
                                   uint64_t free_since_ms);
static void heap_free_remote(page_t *page, block_t *block);

/* A free-list link that fails its check: every list reports it alike. */
static ZK_COLD void report_corrupted_list(const block_t *block, size_t size) {
  error_report("corrupted free list (write after free or overflow)", block,
               size);
}

static void bin_set_count(bin_t *bin, uint32_t count) {
  bin->room = (int32_t)(bin->limit - count);
}

/* The blocks held stay; the room and the keep floor follow the limit. The
 * room and the limit in one store (see bin_t). */
static void bin_set_limit(const heap_t *heap, bin_t *bin, uint32_t limit) {
  bin_t next = {.limit = limit};
  bin_set_count(&next, bin_count(bin));
  *(volatile uint64_t *)&bin->room_and_limit = next.room_and_limit;
  bin_set_keep_floor(heap, bin);
}

/* A flush of a bin that ran empty since its last flush: the thread's live
 * blocks of the class swing wider than the bin, and every swing would give
 * half of it back to its pages, block by block, and take them again. A
 * thread heap's bin doubles its limit instead, up to its class's grown
 * limit (a task heap's bins hold blocks charged to its task: they keep
 * theirs); the decay pass that empties it sets it back. A thread that
 * allocates 1,600 blocks of 16 B and frees them all, over and over (glibc's
 * malloc-simple benchmark), ran 1.17x as fast (7 alternating rounds). */
static ZK_COLD bool bin_grow(heap_t *heap, bin_t *bin) {
  unsigned class_index = (unsigned)(bin - heap->bins);
  if (heap->task != NULL || bin->limit >= bin_limit_grown[class_index])
    return false;
  uint32_t limit = bin->limit * 2;
  bin_set_limit(heap, bin,
                limit < bin_limit_grown[class_index]
                    ? limit
                    : bin_limit_grown[class_index]);
  return bin->room >= 0; /* a refill may have taken it far past */
}

/* A bin emptied for good: back to its class's limit, and a flush like any
 * other (it grows again only after running empty since). */
static void bin_reset_limit(const heap_t *heap, bin_t *bin) {
  unsigned class_index = (unsigned)(bin - heap->bins);
  bin->flags &= (uint8_t)~BIN_CYCLED;
  if (bin->limit != bin_limit[class_index])
    bin_set_limit(heap, bin, bin_limit[class_index]);
}

/* Gives the blocks of a bin beyond its first `keep` back to their pages:
 * the bin keeps the ones freed last, warm in cache. Pages that empty count
 * as free since `free_since_ms` (0: now). */
static void heap_bin_trim(heap_t *heap, bin_t *bin, uint32_t keep,
                          uint64_t free_since_ms) {
  uint32_t count = bin_count(bin);
  if (keep > count)
    keep = count;
  /* The walk below ends after the bin's count: a block freed twice in a
   * row but for other frees between links the bin into a cycle. */
  uint32_t returned = count - keep;
  block_t *rest;
  if (keep == 0) {
    rest = bin->head;
    bin->head = NULL;
  } else {
    block_t *last = bin->head;
    uint32_t kept = 1;
    for (block_t *next; kept < keep; kept++, last = next) {
      next = bin_next(heap, last);
      if (unlikely(next == NULL || bin_link_is_forged(next)))
        break;
    }
    rest = bin_next(heap, last);
    if (unlikely(kept < keep || bin_link_is_forged(rest))) {
      report_corrupted_list(last, 0);
      rest = NULL; /* ZKMEM_ON_ERROR=warn: the bin ends here */
      keep = kept;
    }
    bin_set_next(heap, last, NULL);
  }
  bin_set_count(bin, keep);
  zk_heap_t *task = heap->task;
  uint32_t back = 0, back_to_arenas = 0;
  uint64_t foreign = 0;
  while (rest != NULL) {
    block_t *block = rest;
    rest = bin_next(heap, block);
    if (unlikely(bin_link_is_forged(rest) || returned-- == 0)) {
      report_corrupted_list(block, 0);
      break; /* ZKMEM_ON_ERROR=warn: leak the rest */
    }
    page_t *page = segment_page_of(segment_of(block), block);
    /* Another heap's block, kept by the free fast path: to its page's
     * owner now. Only this thread makes a page its own, so the check holds
     * while the block is handed over. */
    if (task == NULL && page_owner(page) != heap) {
      heap_free_remote(page, block);
      foreign++;
      continue;
    }
    bool to_arena = page_kind(page) == PAGE_ARENA; /* the page may go back */
    bool returned_block =
        heap_page_return_block(heap, page, block, free_since_ms);
    back += returned_block;
    back_to_arenas += returned_block && to_arena;
  }
  /* The page counts those frees when its owner takes them. */
  bin->frees -= foreign;
  if (unlikely(task != NULL) && back != 0) {
    unsigned class_index = (unsigned)(bin - heap->bins);
    heap->bin_returned += back - back_to_arenas; /* arena_out has those */
    task_uncharge(task, (size_t)back * class_block_size[class_index]);
  }
}

/* A task sub-heap charges its task for blocks moved into a bin: all of
 * them, or one, or none when a limit stands in the way. */
static uint32_t heap_charge_blocks(heap_t *heap, unsigned class_index,
                                   uint32_t count) {
  zk_heap_t *task = heap->task;
  if (likely(task == NULL) || count == 0)
    return count;
  size_t size = class_block_size[class_index];
  if (!task_charge(task, (size_t)count * size)) {
    if (count == 1 || !task_charge(task, size))
      return 0;
    count = 1;
  }
  heap->bin_taken += count;
  return count;
}

/* Decay: a bin that has not run empty since the last pass holds blocks the
 * thread did not need in that time, and gives them all back to their pages
 * (all bins do after a whole purge delay without a pass); pages that empty
 * count as free since that last pass, so the purge that follows can return
 * them. Runs at most every quarter purge delay, through purge_maybe: from
 * the thread's slow paths, and every BIN_DECAY_EVENTS bin refills or
 * flushes. A thread that stops allocating keeps its bins until it starts
 * again, calls zk_collect or exits. */
#define BIN_DECAY_EVENTS 64

static void heap_rescan_full(heap_t *heap);
static void heap_chains_push(heap_t *heap);

void heap_bins_decay(heap_t *heap, uint64_t now) {
  uint64_t delay = (uint64_t)option(ZK_OPTION_PURGE_DELAY_MS);
  if (heap == &heap_empty || heap->bin_decaying ||
      now - heap->bin_decay_ms < delay / 4)
    return;
  uint64_t idle_since = heap->bin_decay_ms != 0 ? heap->bin_decay_ms : now;
  /* No slow path for a whole delay: the thread was idle, every bin goes. */
  bool thread_was_idle = now - idle_since >= delay;
  heap->bin_decay_ms = now;
  heap->bin_decaying = true; /* releasing pages calls purge_maybe */
  heap_chains_push(heap);
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    bin_t *bin = &heap->bins[c];
    if ((bin->flags & BIN_REFILLED) == 0 || thread_was_idle) {
      heap_bin_trim(heap, bin, 0, idle_since);
      bin_reset_limit(heap, bin);
    }
    bin_set_refilled(heap, bin, false);
  }
  /* A remote free whose owner read was stale hinted the wrong heap; if no
   * other free into that page followed, this finds it (PAGE_REMOTE_FULL). */
  heap_rescan_full(heap);
  heap->bin_decaying = false;
}

static void heap_bins_decay_maybe(heap_t *heap) {
  if (++heap->bin_slow_events % BIN_DECAY_EVENTS == 0)
    purge_maybe(); /* decays this heap's bins, then purges */
}

/* The free that took a bin above its limit: the bin grows, or keeps
 * half. */
ZK_NOINLINE void heap_bin_flush(heap_t *heap, bin_t *bin) {
  int saved_errno = errno; /* a free's */
  bool cycled = (bin->flags & BIN_CYCLED) != 0;
  bin->flags &= (uint8_t)~BIN_CYCLED;
  if (!cycled || !bin_grow(heap, bin))
    heap_bin_trim(heap, bin, bin->limit / 2, 0);
  heap_bins_decay_maybe(heap);
  errno = saved_errno;
}

/* The owner's free fast path, for the slow paths that end as one (an arena
 * block, a block of the thread's own heap freed inside a task heap). */
/* A push with no flush: the caller knows the bin has room. */
ZK_INLINE void heap_bin_keep(heap_t *heap, bin_t *bin, block_t *block) {
  bin_set_next(heap, block, bin->head);
  bin->head = block;
  bin->frees++;
  bin->room--;
}

static void heap_bin_push(heap_t *heap, bin_t *bin, block_t *block) {
  heap_bin_keep(heap, bin, block);
  if (unlikely(bin->room < 0))
    heap_bin_flush(heap, bin);
}

void heap_flush_bins(heap_t *heap) {
  heap_chains_push(heap);
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    heap_bin_trim(heap, &heap->bins[c], 0, 0);
    bin_reset_limit(heap, &heap->bins[c]);
  }
  if (heap->task_credit != 0) {
    task_uncharge(heap->task, heap->task_credit);
    heap->task_credit = 0;
  }
}

ZK_COLD void *heap_bin_corrupted(heap_t *heap, bin_t *bin, block_t *block) {
  report_corrupted_list(block, 0);
  /* ZKMEM_ON_ERROR=warn: drop the bin's list rather than follow it. */
  bin->head = NULL;
  bin_set_count(bin, 0);
  return heap_malloc_generic(heap, class_block_size[bin - heap->bins], 0);
}

/* ---- task arenas ----
 *
 * A task heap's sub-heap with pages of its own would take a page per size
 * class it touches: a short task that allocates a few dozen blocks of many
 * sizes set up a 64 KiB span per class and thread and gave them back at its
 * end (the tasks benchmark ran at 0.03x plain malloc's speed with 25x its
 * RSS). Its small blocks come from arenas instead: a slice carved front to
 * back in blocks of whatever class is asked, each block's class in a table
 * of one byte per 16-byte granule at the slice's start (the class plus one
 * at a block's first granule, zero elsewhere; ARENA_BLOCK_BACK set once the
 * block is back in its arena or freed by another thread, so a second such
 * free is reported). A block the owner frees goes
 * to its bin, as any block does; a bin gives it back to its arena, and
 * another thread's free only counts it: an arena is reset (or released)
 * once all its blocks are back, never block by block. A sub-heap keeps at
 * most ARENA_MAX arenas; beyond, its small blocks come from pages of their
 * class as a thread heap's do, so a long-lived task heap strands at most
 * ARENA_MAX slices in partly used arenas. Not in secure mode, whose checks
 * need a page per class. */
#define ARENA_TABLE_BYTES (SLICE_SIZE / 16)
#define ARENA_BLOCK_BACK  0x80 /* in a table entry: see above */
#define ARENA_MAX         4
/* Charged at a time: a task's counters are shared by every thread that
 * runs it, and one atomic add per carve was a fifth of a short task's time
 * (perf, the tasks benchmark). */
#define ARENA_CHARGE_CHUNK ((size_t)16 * 1024)

_Static_assert(ARENA_BLOCK_MAX <= SLICE_SIZE - ARENA_TABLE_BYTES,
               "an arena holds a block of every arena class");

/* Owner frees after which a class leaves the arenas (see heap_t). */
#define ARENA_HOT_FREES 64
/* heap_t.arena_carve of a class pages serve: more than an arena holds. */
#define ARENA_CARVE_NEVER ((uint32_t)1 << 31)

/* The class an arena carve of `class_index` makes: class 0's blocks are
 * class 1's, since arena blocks start on a 16-byte granule. */
ZK_INLINE unsigned arena_carved_class(unsigned class_index) {
  return class_index + (class_index == 0);
}

_Static_assert(ARENA_CLASSES <= 64, "heap_t.arena_hot has a bit per class");

static void arena_class_carve(heap_t *heap, unsigned class_index) {
  heap->bins[class_index].arena_carve =
      class_block_size[arena_carved_class(class_index)];
}

/* A new heap's bins: the arena classes carved, none hot. */
static void arena_classes_init(heap_t *heap) {
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    bin_t *bin = &heap->bins[c];
    bool carved = c < ARENA_CLASSES;
    bin->arena_code = (uint8_t)(carved ? arena_carved_class(c) + 1 : 0);
    bin->arena_carve =
        carved ? class_block_size[arena_carved_class(c)] : ARENA_CARVE_NEVER;
  }
}

/* Pages serve `class_index` from now on (its blocks' owner frees are many:
 * they should take the fast path), and class 0 with class 1, whose blocks
 * it carves. */
static void arena_class_turns_hot(heap_t *heap, unsigned class_index) {
  heap->arena_owner_frees[class_index] = ARENA_HOT_FREES + 1;
  heap->arena_hot |= UINT64_C(1) << class_index;
  heap->bins[class_index].arena_carve = ARENA_CARVE_NEVER;
  if (class_index == 1)
    heap->bins[0].arena_carve = ARENA_CARVE_NEVER;
}

/* A released sub-heap's classes carved again, none hot. */
static void arena_classes_reset(heap_t *heap) {
  memset(heap->arena_owner_frees, 0, sizeof(heap->arena_owner_frees));
  for (uint64_t hot = heap->arena_hot; hot != 0; hot &= hot - 1) {
    unsigned c = (unsigned)__builtin_ctzll(hot);
    arena_class_carve(heap, c);
    if (c == 1)
      arena_class_carve(heap, 0);
  }
  heap->arena_hot = 0;
}

/* Owner only; read by statistics on other threads. */
ZK_INLINE void heap_class_used(heap_t *heap, unsigned class_index) {
  uint64_t *word = &heap->classes_used[class_index / 64];
  __atomic_store_n(word,
                   __atomic_load_n(word, __ATOMIC_RELAXED) |
                       UINT64_C(1) << (class_index % 64),
                   __ATOMIC_RELAXED);
}

/* The next used class at or after `from`; CLASS_COUNT when none. */
static unsigned heap_next_used_class(const heap_t *heap, unsigned from) {
  for (unsigned word = from / 64; word < (CLASS_COUNT + 63) / 64; word++) {
    uint64_t bits =
        __atomic_load_n(&heap->classes_used[word], __ATOMIC_RELAXED);
    if (word == from / 64)
      bits &= ~UINT64_C(0) << (from % 64);
    if (bits != 0)
      return word * 64 + (unsigned)__builtin_ctzll(bits);
  }
  return CLASS_COUNT;
}

#define FOR_EACH_USED_CLASS(heap, c)                                           \
  for (unsigned c = heap_next_used_class((heap), 0); c < CLASS_COUNT;          \
       c = heap_next_used_class((heap), c + 1))

/* The table is at the span's start (page->start); blocks follow it. */
ZK_INLINE uint8_t *arena_table(const page_t *arena) {
  return arena->start;
}

/* Blocks out of the arena: carved and not back, in a bin or live. */
static uint32_t arena_live(const page_t *arena) {
  return arena->used - (uint32_t)atomic_load_explicit(
                           &arena->arena_remote_frees, memory_order_acquire);
}

static void arena_unlink(heap_t *heap, page_t *arena) {
  page_list_unlink(&heap->arenas, arena);
  heap->arena_count--;
}

/* An arena whose blocks are all back: carved again from the start. The
 * table is cleared so that no stale entry names a block start. */
static void arena_reset(page_t *arena) {
  size_t granules = (ARENA_TABLE_BYTES + arena->capacity) / 16;
  memset(arena_table(arena) + ARENA_TABLE_BYTES / 16, 0,
         granules - ARENA_TABLE_BYTES / 16);
  arena->capacity = 0;
  arena->used = 0;
  atomic_store_explicit(&arena->arena_remote_frees, 0, memory_order_relaxed);
}

static void arena_release(heap_t *heap, page_t *arena) {
  arena_unlink(heap, arena);
  page_span_free(arena, 0);
  purge_maybe();
}

static page_t *arena_new(heap_t *heap) {
  page_t *arena = segment_span_alloc(1, PAGE_ARENA, heap_home_segment(heap));
  if (arena == NULL)
    return NULL;
  track_defined(arena->start, ARENA_TABLE_BYTES);
  if (!arena->is_zero)
    memset(arena_table(arena), 0, ARENA_TABLE_BYTES);
  track_noaccess(arena->start + ARENA_TABLE_BYTES,
                 SLICE_SIZE - ARENA_TABLE_BYTES);
  arena->reserved = (uint32_t)(SLICE_SIZE - ARENA_TABLE_BYTES);
  arena->task = atomic_load_explicit(&heap->task, memory_order_relaxed);
  arena->arena_heap = heap;
  page_list_push(&heap->arenas, arena);
  heap->arena_count++;
  return arena;
}

/* The arena to carve `size` bytes from, first in the list: the current one,
 * one whose blocks all came back, or a new one; NULL when the sub-heap
 * has ARENA_MAX arenas with live blocks. */
static page_t *arena_with_room(heap_t *heap, size_t size) {
  page_t *arena = heap->arenas;
  if (arena != NULL && arena->capacity + size <= arena->reserved)
    return arena;
  for (; arena != NULL; arena = arena->next) {
    if (arena_live(arena) != 0)
      continue;
    arena_reset(arena);
    if (arena != heap->arenas) { /* to the front: the current one */
      page_list_unlink(&heap->arenas, arena);
      page_list_push(&heap->arenas, arena);
    }
    return arena;
  }
  return heap->arena_count < ARENA_MAX ? arena_new(heap) : NULL;
}

/* A block of `size` (class_index's) from the arena's room and the charge
 * made ahead, both checked by the caller. */
ZK_INLINE void *arena_carve(heap_t *heap, page_t *arena, size_t class_index,
                            size_t size) {
  size_t offset = ARENA_TABLE_BYTES + arena->capacity;
  uint8_t *block = arena->start + offset; /* read once: the table store */
  arena_table(arena)[offset / 16] = (uint8_t)(class_index + 1);
  arena->capacity += (uint32_t)size;
  arena->used++;
  heap->task_credit -= size;
  heap->arena_out[class_index]++; /* bin_taken counts pages' blocks only */
  return block;
}

/* Charges the task ahead for carves of at least `size` bytes; false when
 * that would pass a limit. Near a limit the chunk is refused and the block
 * alone asked for. */
static bool arena_charge(heap_t *heap, size_t size) {
  size_t charge = task_charge(heap->task, ARENA_CHARGE_CHUNK)
                      ? ARENA_CHARGE_CHUNK
                  : task_charge(heap->task, size) ? size
                                                  : 0;
  if (charge == 0)
    return false;
  heap->task_credit += charge;
  heap->arena_charged = true; /* every carve follows a charge */
  return true;
}

/* A block of class `class_index` carved for a sub-heap's malloc, charged
 * to its task. NULL with *refused false: no arena room (pages serve it);
 * with *refused true: over a limit. */
static void *arena_alloc(heap_t *heap, unsigned class_index, bool *refused) {
  if (class_index == 0)
    class_index = 1; /* blocks are granule-aligned */
  if (heap->arena_owner_frees[class_index] > ARENA_HOT_FREES)
    return NULL;
  size_t size = class_block_size[class_index];
  page_t *arena = arena_with_room(heap, size);
  if (arena == NULL)
    return NULL;
  if (heap->task_credit < size && !arena_charge(heap, size)) {
    *refused = true;
    return NULL;
  }
  return arena_carve(heap, arena, class_index, size);
}

/* heap_malloc_bin_empty's carve once the charge made ahead ran out (a few
 * times a task: a short one took the whole generic path three times, 465
 * instructions of the 6,500 it costs). */
static ZK_NOINLINE void *heap_malloc_arena_charge(heap_t *heap, bin_t *bin,
                                                  size_t size) {
  size_t block_size = bin->arena_carve;
  if (option(ZK_OPTION_SECURE)) /* turned on since: pages from now on */
    return heap_malloc_generic(heap, size, 0);
  /* The generic path's pacing: a slow event, which may decay bins (and
   * give the arena blocks back: read it after). */
  heap_bins_decay_maybe(heap);
  page_t *arena = heap->arenas;
  if (arena == NULL || arena->capacity + block_size > arena->reserved)
    return heap_malloc_generic(heap, size, 0);
  if (!arena_charge(heap, block_size))
    return task_limit_reached(heap, size, 0);
  bin_set_refilled(heap, bin, true);
  return arena_carve(heap, arena, (size_t)bin->arena_code - 1, block_size);
}

/* The common case of arena_alloc, kept small: room in the current arena
 * and in the charge already made, for a class the arenas serve (one load
 * of arena_carve says which and how much). A short task's every block
 * comes this way: 26 instructions, where the checks written out one by one
 * took 38. */
ZK_NOINLINE void *heap_malloc_bin_empty(heap_t *heap, bin_t *bin, size_t size) {
  page_t *arena = heap->arenas; /* only sub-heaps have arenas */
  if (arena != NULL) {
    size_t block_size = bin->arena_carve;
    if (arena->capacity + block_size <= arena->reserved) {
      if (likely(heap->task_credit >= block_size))
        return arena_carve(heap, arena, (size_t)bin->arena_code - 1,
                           block_size);
      return heap_malloc_arena_charge(heap, bin, size);
    }
  }
  return heap_malloc_generic(heap, size, 0);
}

/* Marks the block at `offset` back (its owner's return, another thread's
 * free); false, reported, when it already was: freed twice. */
static bool arena_mark_back(page_t *arena, size_t offset, size_t size) {
  uint8_t old = __atomic_fetch_or(&arena_table(arena)[offset / 16],
                                  ARENA_BLOCK_BACK, __ATOMIC_RELAXED);
  if (likely(!(old & ARENA_BLOCK_BACK)))
    return true;
  error_report("double free", arena->start + offset, size);
  return false;
}

/* The block at `offset` (of class `class_index`) back in its arena from a
 * bin; false when it was back already (reported). The arena is reset when
 * it is the current one, released otherwise, once its last block is back. */
static bool arena_return_block(heap_t *heap, page_t *arena, size_t offset,
                               unsigned class_index) {
  if (!arena_mark_back(arena, offset, class_block_size[class_index]))
    return false;
  arena->used--;
  heap->arena_out[class_index]--;
  if (arena_live(arena) != 0)
    return true;
  if (arena == heap->arenas)
    arena_reset(arena);
  else
    arena_release(heap, arena);
  return true;
}

/* Arenas whose blocks are all back go (all of them with `force`; else the
 * current one stays, reset). */
static void arena_collect(heap_t *heap, bool force) {
  page_t *arena = heap->arenas;
  while (arena != NULL) {
    page_t *next = arena->next;
    if (arena_live(arena) == 0) {
      if (force || arena != heap->arenas)
        arena_release(heap, arena);
      else
        arena_reset(arena);
    }
    arena = next;
  }
}

/* The class of the block at `offset` into the arena; -1 where no block
 * starts. */
static int arena_class_at(const page_t *arena, size_t offset) {
  if (offset < ARENA_TABLE_BYTES || offset >= SLICE_SIZE || offset % 16 != 0)
    return -1;
  return (int)(__atomic_load_n(&arena_table(arena)[offset / 16],
                               __ATOMIC_RELAXED) &
               ~ARENA_BLOCK_BACK) -
         1;
}

size_t heap_arena_usable_size(const page_t *page, const void *p) {
  size_t offset = (size_t)((const uint8_t *)p - page->start);
  size_t start = offset & ~(size_t)15;
  /* An interior pointer: its block starts at most ARENA_BLOCK_MAX back. */
  for (size_t back = 0; back < ARENA_BLOCK_MAX && start >= ARENA_TABLE_BYTES;
       back += 16, start -= 16) {
    int class_index = arena_class_at(page, start);
    if (class_index >= 0) {
      size_t end = start + class_block_size[class_index];
      return offset < end ? end - offset : 0;
    }
  }
  return 0;
}

/* Inside a task heap, a block of the thread's own heap: its bin is this
 * thread's to push onto, as outside (the runtime's reply freed by the task
 * it reached). Only for the thread heap: a task sub-heap's block freed by
 * its thread outside the task stays a remote free, which uncharges last
 * with release order, so that a live count of 0 read by a destroy means
 * every free is complete; a push onto a sub-heap the thread is not in, and
 * the flush it may cause, would race with that destroy, and keep freed
 * blocks charged against the task's limit. */
ZK_INLINE bool heap_is_current_home(const heap_t *owner,
                                    const heap_t *current) {
  return owner != NULL &&
         owner == __atomic_load_n(&current->home, __ATOMIC_RELAXED);
}

void heap_free_arena(page_t *page, void *p) {
  size_t offset = (size_t)((uint8_t *)p - page->start);
  int class_index = arena_class_at(page, offset);
  if (unlikely(class_index < 0 || class_index >= (int)ARENA_CLASSES)) {
    error_report("free of a pointer zkmem never handed out (or inside a "
                 "block)",
                 p, 0);
    return;
  }
  heap_t *owner = page->arena_heap;
  size_t size = class_block_size[class_index];
  if (owner == heap_current) {
    bin_t *bin = &owner->bins[class_index];
    block_t *block = p;
    /* In the bin already (its head), or back in the arena. */
    if (unlikely(block == bin->head ||
                 (__atomic_load_n(&arena_table(page)[offset / 16],
                                  __ATOMIC_RELAXED) &
                  ARENA_BLOCK_BACK))) {
      error_report("double free", p, size);
      return;
    }
    /* Carves leave the class unmarked (heap_release_all clears the arena
     * counters of all classes); its bin is used from here on. */
    heap_class_used(owner, (unsigned)class_index);
    if (unlikely(++owner->arena_owner_frees[class_index] > ARENA_HOT_FREES)) {
      /* A hot class: its blocks leave the arena (counted as a bin's push
       * and return), and pages serve it from now on. */
      arena_class_turns_hot(owner, (unsigned)class_index);
      if (!arena_return_block(owner, page, offset, (unsigned)class_index))
        return;
      bin->frees++; /* the return was arena_out's */
      task_uncharge(owner->task, size);
      return;
    }
    heap_bin_push(owner, bin, block);
    return;
  }
  /* Counted, not listed: the block's memory is reused when its whole
   * arena is. The task was set when the arena was, before this block was
   * carved; the owner sub-heap is never unmapped. The task's charge goes
   * last: a heap seen with nothing live may be destroyed at once, which
   * resets or releases this arena. */
  zk_heap_t *task = page->task;
  if (!arena_mark_back(page, offset, size))
    return;
  atomic_fetch_add_explicit(&owner->arena_remote[class_index], 1,
                            memory_order_relaxed);
  atomic_fetch_add_explicit(&page->arena_remote_frees, 1, memory_order_release);
  task_remote_free(task, size);
}

/* ---- process and heap life cycle ---- */

static void heap_thread_exit(void *value);
static void heap_retire(heap_t *heap, heap_t **list);
static bool heap_exit_key_created;

/* fork: every allocator lock is held across it, in the lock order of
 * internal.h, so the child starts with consistent structures. */
static void fork_prepare(void) {
  task_lock_all();
  pool_lock_all();
  heap_lock_all();
  segment_lock_all();
  os_meta_lock();
}

static void fork_parent(void) {
  os_meta_unlock();
  segment_unlock_all();
  heap_unlock_all();
  pool_unlock_all();
  task_unlock_all();
}

/* The child has one thread. The other threads' heaps stay as they are,
 * their memory unused in the child: a fork can catch a thread in the
 * middle of a slow path (a page's list half spliced into a bin), and
 * abandoning those heaps to the child handed out a block twice (a preload
 * test failed about 1 run in 20). Task heaps' counts and caches are made
 * safe to destroy (taskheap.c). */
static void fork_child(void) {
  fork_parent();
  heap_t *current = heap_current;
  heap_t *home = current->home != NULL ? current->home : current;
  /* Secure keys and shuffles of its own, not the ones its parent and every
   * other child of this thread would draw next. */
  if (home != &heap_empty)
    home->random_state ^= random_seed();
  if (current != home)
    current->random_state ^= random_seed();
  task_fork_child(home);
}

void process_init(void) {
  uint64_t state = atomic_load(&process_state);
  if (state == PROCESS_READY)
    return;
  uint64_t mine = ((uint64_t)getpid() << 2) | 1;
  /* Another process's initialization: this is a fork child of a process
   * one of whose threads was initializing, and that thread is gone. */
  if (state != 0 && state != mine)
    atomic_compare_exchange_strong(&process_state, &state, 0);
  uint64_t expected = 0;
  if (atomic_compare_exchange_strong(&process_state, &expected, mine)) {
    options_init();
    sizeclass_init();
    bin_limits_init();
    remote_chain_limits_init();
    /* Top two bits 10: a zero or an all-ones top in a forged link word both
     * decode above user space. */
    if (process_bin_key == 0) /* a fork child's pages keep the parent's */
      process_bin_key = (random_seed() & ~BIN_KEY_TOPMASK) | BIN_KEY_TOP;
    /* Without the key, thread exit cannot give a heap's pages back: they
     * stay with the heap, still correct (other threads free into them),
     * but not reused. */
    heap_exit_key_created =
        pthread_key_create(&heap_exit_key, heap_thread_exit) == 0;
    if (!heap_exit_key_created && option(ZK_OPTION_VERBOSE))
      error_warning("zkmem: warning: no thread-exit key: the pages of "
                    "exiting threads will not be reused\n");
    atomic_store(&process_state, PROCESS_READY);
    /* After the state is ready: registering may allocate. Every build
     * registers, the static library as well as the preloaded one. */
    pthread_atfork(fork_prepare, fork_parent, fork_child);
    return;
  }
  /* Another thread is reading options: a few microseconds. (A fork may
   * take that thread away: the child then starts over, above.) */
  while ((state = atomic_load(&process_state)) != PROCESS_READY) {
    if (state != mine) {
      process_init();
      return;
    }
  }
}

heap_t *heap_create(void) {
  pthread_mutex_lock(&heaps_lock);
  heap_t *heap = heaps_free;
  if (heap != NULL)
    heaps_free = heap->next_heap;
  pthread_mutex_unlock(&heaps_lock);
  if (heap == NULL) {
    heap = os_meta_alloc(sizeof(heap_t));
    if (heap == NULL)
      return NULL;
    atomic_fetch_add_explicit(&heaps_made, 1, memory_order_relaxed);
  }
  /* Heaps are never unmapped: a stale owner pointer in a page read by a
   * remote free still points at some heap, which at worst gets a spurious
   * rescan hint. That hint is the one field a stale reader may write while
   * the heap is reset here (others are written under the task lock, or
   * only while the heap lives): the reset steps around it. */
  size_t hint_at = offsetof(heap_t, remote_frees_to_full);
  size_t after_hint = hint_at + sizeof(heap->remote_frees_to_full);
  memset(heap, 0, hint_at);
  memset((char *)heap + after_hint, 0, sizeof(*heap) - after_hint);
  atomic_store_explicit(&heap->remote_frees_to_full, 0, memory_order_relaxed);
  for (size_t i = 0; i < CLASS_COUNT; i++) {
    heap->bins[i].limit = bin_limit[i];
    heap->bins[i].keep_floor = BIN_KEEPS_NONE;
    bin_set_count(&heap->bins[i], 0);
  }
  for (size_t i = 0; i < POOL_SLOTS; i++)
    heap->pool_magazines[i] = &pool_magazine_empty;
  arena_classes_init(heap);
  /* Secure pages' keys: a thread's task sub-heaps draw theirs from its own
   * heap's state, no system call per task heap. */
  heap_t *current = heap_current;
  uint64_t seed = current != &heap_empty ? random_next(&current->random_state)
                                         : random_seed();
  heap->random_state = seed ^ (uint64_t)(uintptr_t)heap;
  heap->bin_key = process_bin_key;
  pthread_mutex_lock(&heaps_lock);
  heap->prev_heap = NULL;
  heap->next_heap = heaps_live;
  if (heaps_live != NULL)
    heaps_live->prev_heap = heap;
  heaps_live = heap;
  pthread_mutex_unlock(&heaps_lock);
  return heap;
}

size_t heap_count_made(void) {
  return atomic_load_explicit(&heaps_made, memory_order_relaxed);
}

heap_t *heap_get_initialized(void) {
  heap_t *heap = heap_current;
  if (likely(heap != &heap_empty))
    return heap;
  process_init();
  /* process_init's pthread_atfork may allocate, which gave this thread a
   * heap already. */
  if (heap_current != &heap_empty)
    return heap_current;
  heap = heap_create();
  if (heap == NULL)
    return NULL;
  heap_current = heap;
  if (heap_exit_key_created && pthread_setspecific(heap_exit_key, heap) != 0 &&
      option(ZK_OPTION_VERBOSE))
    error_warning("zkmem: warning: no memory to register this thread's exit: "
                  "its pages will not be reused after it exits\n");
  return heap;
}

static void stats_retire_page(heap_stats_t *stats, page_t *page) {
  unsigned class_index = page->class_index;
  stats->class_frees_retired[class_index] += page->frees;
  stats->class_allocs_retired[class_index] += page->frees + page->used;
  page->frees = 0;
}

/* Give a page whose blocks are all free back to the segment layer. */
static void heap_page_release(heap_t *heap, page_t *page,
                              uint64_t free_since_ms) {
  stats_retire_page(&heap->stats, page);
  page_span_free(page, free_since_ms);
  heap->page_count--;
  purge_maybe();
}

static void abandon_page(heap_t *heap, page_t *page) {
  page_collect(page);
  if (page->used == 0) {
    heap_page_release(heap, page, 0);
    return;
  }
  /* The page carries its counters to the abandoned list and on to the heap
   * that reclaims it. */
  page->in_full = 0;
  page_leave_full(page);
  page_set_owner(page, NULL, memory_order_release);
  pthread_mutex_lock(&abandoned_lock);
  queue_push_back(&abandoned[page->class_index], page);
  atomic_fetch_add(&abandoned_count[page->class_index], 1);
  pthread_mutex_unlock(&abandoned_lock);
}

/* Counters of a heap that leaves heaps_live for `list`. */
static void heap_retire(heap_t *heap, heap_t **list) {
  pthread_mutex_lock(&heaps_lock);
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    uint64_t bin_frees_total = heap->bins[c].frees; /* bins are empty */
    heaps_retired_stats.class_allocs_retired[c] +=
        heap->stats.class_allocs_retired[c] + bin_frees_total;
    heaps_retired_stats.class_frees_retired[c] +=
        heap->stats.class_frees_retired[c] + bin_frees_total;
  }
  for (unsigned c = 0; c < ARENA_CLASSES; c++)
    heaps_retired_stats.class_arena_retired[c] +=
        heap->stats.class_arena_retired[c];
  if (heap->prev_heap != NULL)
    heap->prev_heap->next_heap = heap->next_heap;
  else
    heaps_live = heap->next_heap;
  if (heap->next_heap != NULL)
    heap->next_heap->prev_heap = heap->prev_heap;
  heap->prev_heap = NULL;
  heap->next_heap = *list;
  *list = heap;
  pthread_mutex_unlock(&heaps_lock);
}

static void heap_abandon(heap_t *heap) {
  pool_heap_exit(heap);
  large_cache_flush(heap);
  heap_flush_bins(heap);
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
  heap_retire(heap, &heaps_free);
}

/* Bins emptied without walking them: their blocks' pages are going back
 * whole, or the bins may be torn. */
static void heap_drop_bins(heap_t *heap) {
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    heap->bins[c].head = NULL;
    bin_set_count(&heap->bins[c], 0);
  }
}

/* Every page queue of a heap: its classes' and `full`. */
static void heap_page_queues(heap_t *heap,
                             page_queue_t *queues[CLASS_COUNT + 1]) {
  for (unsigned c = 0; c < CLASS_COUNT; c++)
    queues[c] = &heap->queues[c];
  queues[CLASS_COUNT] = &heap->full;
}

/* Another thread's heap in a fork child: that thread stopped somewhere
 * in its code, so its bins (count and list may disagree mid-push) and its
 * large cache (a span claimed but still listed) are dropped without
 * walking or waiting. */
void heap_drop_caches(heap_t *heap) {
  heap_drop_bins(heap);
  large_cache_orphan(heap);
}

/* An orphaned task sub-heap: nobody collects its pages' remote frees
 * but this (from the purge, tasks_lock held); pages that empty go back.
 * A page's counters move under heaps_lock, which zk_stats_get holds for
 * its walk (collected without it, a class's counters read below their
 * earlier value while nothing allocated); its span goes back after. */
void heap_collect_orphan(heap_t *heap) {
  page_queue_t *queues[CLASS_COUNT + 1];
  heap_page_queues(heap, queues);
  for (unsigned q = 0; q <= CLASS_COUNT; q++) {
    page_t *page = queues[q]->first;
    while (page != NULL) {
      page_t *next = page->next;
      if (page->used != 0 && !page_has_remote(page)) {
        page = next;
        continue;
      }
      pthread_mutex_lock(&heaps_lock);
      page_collect(page);
      bool empty = page->used == 0;
      if (empty) {
        queue_remove(queues[q], page);
        page->in_full = 0;
        stats_retire_page(&heap->stats, page);
        heap->page_count--;
      }
      pthread_mutex_unlock(&heaps_lock);
      if (empty) {
        page_span_free(page, 0);
        purge_maybe();
      }
      page = next;
    }
  }
  arena_collect(heap, true);
}

heap_t *heap_home(void) {
  heap_t *heap = heap_get_initialized();
  return heap != NULL && heap->home != NULL ? heap->home : heap;
}

void heap_recycle(heap_t *heap) {
  arena_collect(heap, true); /* the arena a destroy kept, reset */
  heap_retire(heap, &heaps_free);
}

void heap_release_arenas(heap_t *heap) {
  arena_collect(heap, true);
}

ZK_STATS_READER void heap_bin_counts(const heap_t *heap,
                                     uint64_t *pushed_less_held,
                                     uint64_t *pushed, uint64_t *held_bytes) {
  for (unsigned c = 0; c < ARENA_CLASSES; c++)
    *pushed_less_held += STATS_LOAD(heap->arena_out[c]);
  FOR_EACH_USED_CLASS(heap, c) {
    const bin_t *bin = &heap->bins[c];
    uint64_t frees = STATS_LOAD(bin->frees);
    uint64_t held = bin_count_racy(bin);
    *pushed_less_held += frees - held;
    *pushed += frees;
    *held_bytes += held * class_block_size[c];
  }
}

void heap_adopt_task(heap_t *heap, zk_heap_t *task) {
  /* Its counters restarted when its last task heap released it. */
  for (page_t *arena = heap->arenas; arena != NULL; arena = arena->next)
    arena->task = task;
  atomic_store_explicit(&heap->task, task, memory_order_release);
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    /* A task's bins hold charged blocks and never grow: each task starts
     * at its classes' limits, whatever the heap served before. */
    bin_reset_limit(heap, &heap->bins[c]);
    /* Not refilled: its first refill takes BIN_FIRST_REFILL, and a task
     * heap's bin keeps no other heap's block (bin_set_keep_floor). */
    bin_set_refilled(heap, &heap->bins[c], false);
  }
}

/* A task sub-heap no thread uses (its task is being destroyed): every page
 * and cached span goes back, whatever blocks are still out. */
void heap_release_all(heap_t *heap, bool keep_arena) {
  pool_heap_exit(heap);
  large_cache_flush(heap);
  /* Bins and queues of classes never used are empty. */
  page_queue_t *queues[CLASS_COUNT + 1];
  unsigned queue_count = 0;
  bool used =
      heap->bin_taken != 0 || heap->arena_charged || heap->full.first != NULL;
  for (unsigned word = 0; word < (CLASS_COUNT + 63) / 64; word++)
    used |= heap->classes_used[word] != 0;
  /* The counters move under heaps_lock, which zk_stats_get holds for its
   * walk: a reader sees them all before or all after the release. (Moved
   * one class and one page at a time, a class's frees could read below
   * their earlier value, by what its bin held, or wrap.) */
  page_t *released = NULL;
  size_t released_count = 0;
  if (used)
    pthread_mutex_lock(&heaps_lock);
  /* The per-task counters restart here, not when the sub-heap serves its
   * next task: one pass over the used classes. */
  FOR_EACH_USED_CLASS(heap, c) {
    bin_t *bin = &heap->bins[c];
    /* A bin's pushes were frees and its pops allocations; the blocks it
     * holds now were neither, yet their pages and arenas count them as
     * out and the release as freed: less those (modulo 2^64, a bin
     * refilled from pages holds more than it was pushed). Counting them
     * made a task's held blocks allocations and frees that never were. */
    uint64_t net = bin->frees - bin_count(bin);
    heap->stats.class_allocs_retired[c] += net;
    heap->stats.class_frees_retired[c] += net;
    bin->head = NULL;
    bin_set_count(bin, 0);
    bin->frees = 0;
    if (heap->queues[c].first != NULL)
      queues[queue_count++] = &heap->queues[c];
  }
  /* The arena counters of every arena class, in one dense pass: a short
   * task carves some 40 of the 49 classes, and finding them bit by bit in
   * classes_used cost more than visiting all (callgrind: a task of 100
   * blocks' release, 1,990 instructions before). Not for a heap that
   * carved nothing. */
  if (heap->arena_charged) {
    heap->arena_charged = false;
    for (unsigned c = 0; c < ARENA_CLASSES; c++) {
      heap->stats.class_arena_retired[c] += heap->arena_out[c];
      heap->arena_out[c] = 0;
      atomic_store_explicit(&heap->arena_remote[c], 0, memory_order_relaxed);
    }
    arena_classes_reset(heap);
  }
  for (unsigned word = 0; word < (CLASS_COUNT + 63) / 64; word++)
    __atomic_store_n(&heap->classes_used[word], 0, __ATOMIC_RELAXED);
  heap->bin_taken = heap->bin_returned = 0;
  heap->secure_allocs = heap->secure_frees = 0;
  queues[queue_count++] = &heap->full;
  /* Bounded: a fork child's orphan may have a queue torn mid-update, and
   * its count with it. */
  size_t budget = (size_t)heap->page_count + heap->arena_count + 1024;
  for (unsigned q = 0; q < queue_count; q++) {
    page_t *page;
    while ((page = queues[q]->first) != NULL && budget > 0) {
      budget--;
      queue_remove(queues[q], page);
      atomic_store_explicit(&page->thread_free, 0, memory_order_relaxed);
      page->in_full = 0;
      page->frees += page->used; /* freed by the release */
      page->used = 0;
      stats_retire_page(&heap->stats, page);
      /* A queue torn by a fork (its first page's successor still naming
       * it as prev) gives the same page twice in a row: listed once. */
      if (page == released)
        continue;
      page->next = released;
      released = page;
      released_count++;
    }
  }
  if (used)
    pthread_mutex_unlock(&heaps_lock);
  /* The spans go back outside the lock (the segment lock, the purge). */
  for (; released != NULL && released_count > 0; released_count--) {
    page_t *page = released;
    released = page->next;
    page_span_free(page, 0);
  }
  /* The current arena stays, reset, for the task heap its thread uses
   * next (heap_adopt_task): a short task then costs no span. */
  page_t *kept = keep_arena ? heap->arenas : NULL;
  for (; heap->arenas != NULL && heap->arenas != kept && budget > 0; budget--)
    arena_release(heap, heap->arenas);
  if (kept != NULL) {
    for (; kept->next != NULL && budget > 0; budget--)
      arena_release(heap, kept->next);
    arena_reset(kept);
  }
  heap->task_credit = 0; /* the task's charge goes with it */
  heap->page_count = 0;
}

static void heap_thread_exit(void *value) {
  heap_t *heap = value;
  if (heap == NULL || heap == &heap_empty)
    return;
  heap_t *current = heap_current;
  heap_current = &heap_empty;
  heap_thread_gone = true;
  task_thread_exit(heap, current);
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
  page_set_owner(page, page_owner_word(page, heap), memory_order_release);
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
        page_span_free(page, 0);
      }
      page = next;
    }
  }
  pthread_mutex_unlock(&abandoned_lock);
}

/* ---- allocation slow path ---- */

static void heap_queue_full(heap_t *heap, page_t *page) {
  queue_push_back(&heap->full, page);
  page->in_full = 1;
  /* One word for the flag and the remote list: a remote free either
   * pushed before this (seen here) or finds the flag in the word its CAS
   * replaces (and sets the hint). */
  uintptr_t word = atomic_fetch_or_explicit(
      &page->thread_free, PAGE_REMOTE_FULL, memory_order_seq_cst);
  if ((word & ~PAGE_REMOTE_FULL) != 0)
    atomic_store_explicit(&heap->remote_frees_to_full, 1, memory_order_relaxed);
}

static void heap_move_to_full(heap_t *heap, page_t *page) {
  queue_remove(&heap->queues[page->class_index], page);
  heap_queue_full(heap, page);
}

/* A page that leaves `full` has a block or two free: it goes to the front
 * of its queue, so refills fill it again before they touch emptier pages,
 * which then drain and can be released (memory benchmark: 1.5% less RSS at
 * peak than putting it at the back). */
static void heap_unfull(heap_t *heap, page_t *page) {
  queue_remove(&heap->full, page);
  page->in_full = 0;
  page_leave_full(page);
  queue_push_front(&heap->queues[page->class_index], page);
}

/* The hint is cleared before the scan, both sequentially consistent, as in
 * heap_free_remote: a remote free that saw the hint still set (and so did
 * not set it again) pushed its block before the clear, and the scan's loads
 * come after it. */
static void heap_rescan_full(heap_t *heap) {
  atomic_store_explicit(&heap->remote_frees_to_full, 0, memory_order_seq_cst);
  page_t *page = heap->full.first;
  while (page != NULL) {
    page_t *next = page->next;
    /* Not collected here: the refill that takes from the page takes its
     * remote list into the bin in one splice. */
    if ((atomic_load_explicit(&page->thread_free, memory_order_seq_cst) &
         ~PAGE_REMOTE_FULL) != 0)
      heap_unfull(heap, page);
    page = next;
  }
}

/* A page of this class with a free block, first in its queue. */
static page_t *heap_find_page(heap_t *heap, unsigned class_index) {
  heap_class_used(heap, class_index);
  if (atomic_load_explicit(&heap->remote_frees_to_full, memory_order_relaxed))
    heap_rescan_full(heap);
  page_queue_t *queue = &heap->queues[class_index];
  page_t *page = queue->first;
  while (page != NULL) {
    page_t *next = page->next;
    /* Secure pages serve malloc from `free` alone: a remote free that
     * lands after the collect must not make an empty one look usable. */
    bool usable = page->secure ? (page_collect(page), page->free != NULL)
                               : page->free != NULL || page_has_remote(page);
    if (usable || page_extend(page)) {
      if (page != queue->first) {
        queue_remove(queue, page);
        queue_push_front(queue, page);
      }
      return page;
    }
    heap_move_to_full(heap, page);
    page = next;
  }
  /* A task's sub-heap keeps to its own pages: an abandoned page's live
   * blocks were never charged to its task. */
  page = heap->task == NULL ? heap_reclaim_page(heap, class_index) : NULL;
  if (page == NULL) {
    purge_maybe();
    /* Its decay pass may have put a page with free blocks back here (bin
     * blocks returned, a page out of `full`): that page before a new one. */
    if (queue->first != NULL)
      return heap_find_page(heap, class_index);
    page = segment_span_alloc(class_page_slices[class_index], PAGE_SMALL,
                              heap_home_segment(heap));
    if (page == NULL)
      return NULL;
    if (!page_init_small(page, heap, class_index)) {
      segment_span_free(page);
      return NULL;
    }
  }
  heap->page_count++;
  if (page->free == NULL && !page_extend(page)) {
    /* A reclaimed page that is still full: a remote free racing with this
     * move must find the full flag set, or be found here
     * (heap_queue_full). */
    heap_queue_full(heap, page);
    return heap_find_page(heap, class_index);
  }
  queue_push_front(queue, page);
  return page;
}

/* ZKMEM_ON_ERROR=warn: the page's list is dropped (its blocks leak) and
 * nothing is taken from it. */
static ZK_COLD uint32_t heap_page_list_corrupted(page_t *page, block_t *block) {
  report_corrupted_list(block, page->block_size);
  page->used = page->capacity;
  page->free = NULL;
  return 0;
}

/* Moves up to `want` blocks of a collected page's free list onto a bin;
 * returns how many. */
static uint32_t heap_bin_take(heap_t *heap, bin_t *bin, page_t *page,
                              uint32_t want) {
  uint32_t available = page->capacity - page->used; /* all in `free` */
  uint32_t take = available < want ? available : want;
  take = heap_charge_blocks(heap, page->class_index, take);
  if (take == 0)
    return 0;
  /* One key for pages and bins (process_bin_key): the list is spliced
   * whole. A page's list stays in its page: a link that leaves the segment
   * was overwritten, and is not followed. */
  block_t *first = page->free;
  block_t *last = first;
  for (uint32_t i = 1; i < take; i++) {
    block_t *next = block_next(page, last);
    if (unlikely(next == NULL || link_is_forged(last, next)))
      return heap_page_list_corrupted(page, last);
    last = next;
  }
  block_t *rest = block_next(page, last);
  if (unlikely(link_is_forged(last, rest)))
    return heap_page_list_corrupted(page, last);
  page->free = rest;
  block_set_next(page, last, bin->head);
  bin->head = first;
  page->used += take;
  bin_set_count(bin, bin_count(bin) + take);
  return take;
}

/* Fills an empty bin to half its limit (a full one would flush at the next
 * free; BIN_FIRST_REFILL blocks at a first refill) from the first page of the
 * class's queue and, where that page has fewer, the next few: the queue puts
 * nearly full pages first (see heap_unfull), and gathering keeps refills rare
 * all the same. */
#define BIN_REFILL_PAGES 4

/* A page's remote frees go to the bin whole, in one splice: the walk that
 * checks the list finds its tail, and the blocks stay counted as used by
 * the page, as bin blocks are. (Splicing them into the page's list and
 * then taking them from there walked every block twice: with blocks freed
 * by other threads in batches, 16% and 34% of the time in the two walks.) */
static uint32_t heap_bin_take_remote(heap_t *heap, bin_t *bin, page_t *page) {
  block_t *tail = NULL;
  uint32_t count;
  zk_heap_t *task = heap->task;
  block_t *remote = bin->head == NULL && task == NULL && !page->secure
                        ? page_take_remote_unwalked(page, &count)
                        : page_take_remote(page, &tail, &count);
  if (remote == NULL)
    return 0;
  if (tail == NULL) { /* the list ends the bin as it ends itself */
    bin->head = remote;
    page->frees += count;
    bin_set_count(bin, count);
    return count;
  }
  if (unlikely(task != NULL)) {
    if (!task_charge(task,
                     (size_t)count * class_block_size[page->class_index])) {
      page_splice_free(page, remote, tail, count); /* over a limit */
      return 0;
    }
    heap->bin_taken += count;
  }
  block_set_next(page, tail, bin->head);
  bin->head = remote;
  page->frees += count;
  bin_set_count(bin, bin_count(bin) + count);
  return count;
}

static uint32_t heap_bin_take_page(heap_t *heap, bin_t *bin, page_t *page,
                                   uint32_t want) {
  uint32_t got = heap_bin_take_remote(heap, bin, page);
  if (got < want)
    got += heap_bin_take(heap, bin, page, want - got);
  return got;
}

static uint32_t heap_bin_refill(heap_t *heap, bin_t *bin, page_t *page) {
  uint32_t want = bin->limit / 2;
  if ((bin->flags & BIN_REFILLED) == 0 && want > BIN_FIRST_REFILL)
    want = BIN_FIRST_REFILL;
  uint32_t got = heap_bin_take_page(heap, bin, page, want);
  unsigned pages = 1;
  for (page_t *more = page->next;
       got < want && more != NULL && pages < BIN_REFILL_PAGES;
       more = more->next, pages++) {
    if (more->secure)
      continue;
    got += heap_bin_take_page(heap, bin, more, want - got);
  }
  return got;
}

/* ZKMEM_ON_ERROR=warn: the page's list is dropped, the block comes from
 * elsewhere. */
static ZK_COLD void *heap_free_list_corrupted(page_t *page, block_t *block) {
  heap_page_list_corrupted(page, block);
  return heap_malloc_generic(heap_current, page->block_size, 0);
}

/* Secure pages: one block at a time, checked. */
static void *heap_malloc_secure(heap_t *heap, page_t *page) {
  if (unlikely(heap->task != NULL)) {
    if (!task_charge(heap->task, page->block_size))
      return task_limit_reached(heap, page->block_size, 0);
    heap->secure_allocs++;
  }
  block_t *block = page->free;
  block_t *next = block_next(page, block);
  if (link_is_forged(block, next))
    return heap_free_list_corrupted(page, block);
  if (!page_secure_intact(page, block))
    error_report("write after free", block, page->block_size);
  page->free = next;
  page->used++;
  page_free_bit_clear(page, page_block_index(page, block));
  return block;
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
  bin_t *bin = &heap->bins[class_index];
  /* An aligned block comes from a page: a sub-heap's bin may hold arena
   * blocks, aligned to 16 only, and a refill puts the page's blocks (each
   * aligned to its size) in front of them. */
  bool unaligned_head =
      alignment > 16 && ((uintptr_t)bin->head & (alignment - 1)) != 0;
  if (bin->head == NULL || unaligned_head) {
    heap_bins_decay_maybe(heap); /* before the refill, which it could undo */
    /* Arena blocks are 16-byte aligned: larger alignments take pages. */
    if (heap->task != NULL && class_index < ARENA_CLASSES && alignment <= 16 &&
        !option(ZK_OPTION_SECURE)) {
      bool refused = false;
      void *block = arena_alloc(heap, class_index, &refused);
      if (block != NULL) {
        bin_set_refilled(heap, bin, true);
        return block;
      }
      if (refused)
        return task_limit_reached(heap, size, alignment);
    }
    page_t *page = heap_find_page(heap, class_index);
    if (page == NULL) {
      errno = ENOMEM;
      return NULL;
    }
    if (unlikely(page->secure))
      return heap_malloc_secure(heap, page);
    uint32_t got = heap_bin_refill(heap, bin, page);
    if (unlikely(got == 0 && heap->task != NULL))
      return task_limit_reached(heap, size, alignment);
    if (unlikely(bin->head == NULL)) /* the page's list was corrupted */
      return heap_malloc_generic(heap, size, alignment);
    bin_set_refilled(heap, bin, true);
  }
  return bin_pop(heap, bin);
}

/* ---- free slow paths ---- */

/* A block back on its page (bin flush, secure free): requeue a page that
 * was in `full`, release one that emptied. A page counts the frees that
 * reach it directly (secure, remote), a bin those pushed onto it. */
static bool heap_page_return_block(heap_t *heap, page_t *page, block_t *block,
                                   uint64_t free_since_ms) {
  if (page_kind(page) == PAGE_ARENA) {
    size_t offset = (size_t)((uint8_t *)block - page->start);
    int class_index = arena_class_at(page, offset);
    if (unlikely(arena_live(page) == 0 || class_index < 0)) {
      error_report("double free", block, 0);
      return false;
    }
    return arena_return_block(heap, page, offset, (unsigned)class_index);
  }
  if (unlikely(page->used == 0)) { /* freed twice through a bin */
    error_report("double free", block, page->block_size);
    return false;
  }
  block_set_next(page, block, page->free);
  page->free = block;
  page->used--;
  if (page->in_full)
    heap_unfull(heap, page);
  if (page->used != 0)
    return true;
  page_queue_t *queue = &heap->queues[page->class_index];
  /* Keep a class's only page, and one empty single-slice spare behind
   * the first page: the next refill of that class would want it back at
   * once, and a workload whose live set hovers at a page boundary would
   * otherwise take and return a span on every swing. Larger pages hold few
   * blocks and much memory: no spare. zk_collect releases spares. */
  if (page->next == NULL &&
      (queue->first == page ||
       (queue->first->next == page && page->slice_count == 1)))
    return true;
  queue_remove(queue, page);
  heap_page_release(heap, page, free_since_ms);
  return true;
}

/* A push onto a page in its owner's full queue: the owner's hint, unless
 * set already (see heap_free_remote_checked). */
ZK_INLINE void heap_hint_full(heap_t *owner, remote_push_t pushed) {
  if (pushed == REMOTE_PUSHED_TO_FULL && owner != NULL &&
      !atomic_load_explicit(&owner->remote_frees_to_full, memory_order_seq_cst))
    atomic_store_explicit(&owner->remote_frees_to_full, 1,
                          memory_order_relaxed);
}

/* heap_free_remote of a page that is not secure: inlined where the caller
 * knows it (the free's small-block path). Everything it needs of the page
 * is read before the push: once the block is in the list, the owner may
 * collect it, release the page and the segment may be unmapped. A page in
 * its owner's full queue gets the owner's hint, with the handshake of
 * heap_rescan_full: the push, then the hint's load, both sequentially
 * consistent. The owner read before the push may be stale (the page
 * abandoned and reclaimed meanwhile): heaps are never unmapped, and a
 * hint to the wrong heap costs a spare rescan there, while the page waits
 * in its new owner's full queue for the next remote free (the flag stays
 * set until the owner takes the page out of `full`) or the owner's next
 * bin decay pass. */
ZK_INLINE void heap_free_remote_checked(page_t *page, block_t *block) {
  /* Set when the page was set up, before any of its blocks was handed out:
   * unlike the owner word, never stale for a block being freed. */
  zk_heap_t *task = page->task;
  uint32_t block_size = page->block_size;
  heap_t *owner = page_owner(page);
  remote_push_t pushed = page_free_remote(page, block);
  if (unlikely(pushed == REMOTE_REFUSED))
    return; /* reported; ZKMEM_ON_ERROR=warn: the task keeps its charge */
  heap_hint_full(owner, pushed);
  /* Last: a task heap whose charge shows this block gone may be destroyed
   * at once (zk_heap_stats), releasing this page. */
  if (unlikely(task != NULL))
    task_remote_free(task, block_size);
}

static void heap_free_remote(page_t *page, block_t *block) {
  if (page->secure) {
    /* The free bit is exact from any thread: every double free is caught
     * here, before the list could be linked into a cycle. */
    if (!page_free_bit_set(page, page_block_index(page, block))) {
      error_report("double free", block, page->block_size);
      return;
    }
    page_secure_fill(page, block);
  }
  heap_free_remote_checked(page, block);
}

/* Another thread heap's block, freed on this thread: onto this thread's
 * bin, to be handed out again from here, as thread caches that take any
 * thread's frees do. Where threads replace each other's blocks (a server's
 * shared tables), a remote free costs a CAS on the page's list and the
 * owner's walk of that list, a cache miss a block: 39% of the time of the
 * server scenario (perf). Only into a bin this thread allocates from (it
 * ran empty since the last decay pass) and while it holds under half its
 * class's base limit (a grown bin no more): a
 * thread that only frees (a consumer) sends every block straight back, as
 * before (keeping half a bin of them cost the producer/consumer batches
 * 10%, 11 runs side by side). A bin that overflows or decays sends its
 * foreign blocks to their owners (heap_bin_trim). Blocks of 128 B to
 * 1 KiB only (FOREIGN_KEEP_MIN, FOREIGN_KEEP_MAX). A smaller block shares
 * its cache lines with blocks its owner hands out, and handed out here it
 * has two threads writing one line: a Tokio pipeline of 16 B-4 KiB
 * messages ran 0.93x the code before keeping 16 B-1 KiB, 0.95x from 64 B,
 * 0.99x from 128 B (9 rounds each; server churn 2.02x, 1.72x, 1.74x). A
 * larger one is a larger share of its page kept from its owner, and
 * keeping those measured slower too (the pipeline 0.92x keeping every
 * size, 0.96x up to 1 KiB, 11 rounds against keeping none). Not inside a
 * task heap (its bins charge the task), nor for a task heap's block (its
 * heap counts it free when it is) or a secure page's (checked remote
 * free). The bin's side of these conditions is one field, keep_floor,
 * set by bin_set_keep_floor; the page's is its keep mask (page_set_owner).
 * The free fast path alone keeps blocks, testing both (bin_takes) with the
 * owner's test: what it leaves to the paths below, they check and push to
 * the block's page. */

/* heap_free_small's checks, without its reports (a failure takes its
 * path, which reports): p starts a carved block of the page, and is not
 * the head of `bin` (a double free). One division gives both block checks
 * (32 bits: a span is under 4 GiB). */
ZK_INLINE bool heap_block_freeable(const page_t *page, const void *p,
                                   const bin_t *bin) {
  uint32_t offset = (uint32_t)((const uint8_t *)p - page->start);
  uint32_t index = offset / page->block_size;
  return offset == index * page->block_size &&
         page_block_is_carved(page, index) && p != (const void *)bin->head;
}

/* ---- remote chains ----
 *
 * A thread that frees other threads' blocks (a consumer of another
 * thread's batches, the end of a pipeline) links those of each class into
 * a chain while they come from one page, and pushes the chain to the page
 * with one CAS: at a free of another page's block of the class, at
 * REMOTE_CHAIN_BLOCKS blocks or REMOTE_CHAIN_BYTES, and at the thread's
 * bin flush (exit, zk_thread_idle, zk_collect) and decay pass. Pushed one
 * at a time, each free's CAS waited for its store into the block, a cache
 * line the allocating core had just written: one cross-core miss after
 * another. Linked here, those stores overlap. Blocks of up to 2 KiB; the
 * chains hold at most 4 KiB each, under 164 KiB in all. Their blocks stay
 * counted as used by their page until pushed, so the page cannot be
 * released under a chain. Not for task heaps' pages (a destroy releases
 * them with blocks out) nor inside a task heap (its sub-heap may be
 * destroyed by another thread), nor for secure pages (every free checked
 * at once). */
static ZK_NOINLINE void heap_chain_push(heap_t *heap, unsigned class_index) {
  struct remote_chain *chain = &heap->remote_chains[class_index];
  uint32_t count = chain->count;
  chain->count = 0;
  heap->remote_chains_open &= ~(UINT64_C(1) << class_index);
  page_t *page = chain->page;
  /* Read before the push: once the chain is in the list, the owner may
   * collect it and release the page (see heap_free_remote_checked). */
  heap_t *owner = page_owner(page);
  heap_hint_full(owner,
                 page_free_remote_chain(page, chain->head, chain->tail, count));
}

static void heap_chains_push(heap_t *heap) {
  while (heap->remote_chains_open != 0)
    heap_chain_push(heap, (unsigned)__builtin_ctzll(heap->remote_chains_open));
}

/* A thread that only frees: its first HEAPLESS_REMOTE_FREES frees of
 * other heaps' blocks go straight to their pages; then it gets a heap for
 * its chains, as its first malloc would give it. So a thread that frees a
 * few blocks gets no heap, and one that frees in the last round of key
 * destructors (whose heap no later round would abandon, its chains never
 * pushed) does not get one on the way; nor does a thread whose heap is
 * gone (heap_thread_gone). */
#define HEAPLESS_REMOTE_FREES 64
static __thread uint32_t heapless_remote_frees;

static ZK_NOINLINE heap_t *heap_for_chain(void) {
  if (heap_thread_gone || ++heapless_remote_frees <= HEAPLESS_REMOTE_FREES)
    return &heap_empty;
  int saved_errno = errno;
  heap_t *heap = heap_get_initialized();
  errno = saved_errno;
  return heap != NULL ? heap : &heap_empty;
}

/* A free of a block of `page`, a thread heap's small page of a chained
 * class (not secure), outside a task heap. */
ZK_INLINE void heap_chain_add(heap_t *heap, page_t *page, block_t *block) {
  unsigned class_index = page->class_index;
  struct remote_chain *chain = &heap->remote_chains[class_index];
  if (chain->count != 0) {
    if (likely(chain->page == page)) {
      /* The O(1) double-free check the bin and the remote list make. */
      if (unlikely(block == chain->head)) {
        page_remote_list_corrupted(page, block);
        return;
      }
      block_set_next(page, block, chain->head);
      chain->head = block;
      if (++chain->count == chain->limit)
        heap_chain_push(heap, class_index);
      return;
    }
    heap_chain_push(heap, class_index);
  }
  chain->page = page;
  chain->head = chain->tail = block;
  chain->count = 1;
  chain->limit = remote_chain_limit[class_index];
  heap->remote_chains_open |= UINT64_C(1) << class_index;
}

bool heap_free_foreign(heap_t *heap, const page_t *slice, void *p) {
  /* The block's slice is its page's head (always so for the classes a bin
   * keeps, one slice each); anything else takes the full path, and so does
   * a block of the thread's own heap freed inside a task heap. */
  page_t *page = (page_t *)slice;
  if (page_kind(page) != PAGE_SMALL || page->slice_offset != 0 ||
      page->secure || heap_is_current_home(page_owner(page), heap))
    return false;
  if (!heap_block_freeable(page, p, &heap->bins[page->class_index]))
    return false;
  if (page->task == NULL && heap->task == NULL &&
      page->class_index < REMOTE_CHAIN_CLASSES &&
      (likely(heap != &heap_empty) ||
       (heap = heap_for_chain()) != &heap_empty)) {
    heap_chain_add(heap, page, p);
    return true;
  }
  heap_free_remote_checked(page, p); /* no errno set */
  return true;
}

bool heap_free_small_block(void *p) {
  segment_t *segment = segment_of(p);
  if (!segment_is_owned(segment))
    return false;
  page_t *page = segment_page_of(segment, p);
  if (page_kind(page) != PAGE_SMALL)
    return false;
  heap_t *heap = heap_current;
  heap_t *owner = page_owner(page);
  /* Another heap's block, not a secure page's. Inside a task heap, the
   * thread heap's block goes to that heap's bin (heap_is_current_home: half
   * the cost of a scoped request on the full path); a push that would
   * flush takes the full path, which saves errno. */
  if (owner != heap && !page->secure) {
    if (heap_is_current_home(owner, heap)) {
      bin_t *bin = &owner->bins[page->class_index];
      if (bin->room > 0 && heap_block_freeable(page, p, bin)) {
        heap_bin_keep(owner, bin, p);
        return true;
      }
    } else if (heap_free_foreign(heap, page, p)) {
      return true;
    }
  }
  int saved_errno = errno;
  heap_free_small(page, p);
  errno = saved_errno;
  return true;
}

/* A small block's free outside the owner's fast path: checks, then a
 * remote free, or the owner's secure or double-free path. */
void heap_free_small(page_t *page, void *p) {
  size_t offset = (size_t)((uint8_t *)p - page->start);
  if (unlikely(offset % page->block_size != 0)) {
    error_report("free of a pointer inside a block (not its start)", p,
                 page->block_size);
    return;
  }
  if (unlikely(!page_block_is_carved(page, offset / page->block_size))) {
    error_report("free of a block zkmem never handed out", p, page->block_size);
    return;
  }
  heap_t *heap = heap_current;
  block_t *block = p;
  heap_t *owner = page_owner(page);
  if (owner != heap) {
    /* Inside a task heap, a block of the thread's own heap (a runtime's,
     * a library's): onto its bin, as outside, not a remote free. Only this
     * thread touches its own heap's bins. Anything else goes to its page,
     * unless this thread's bin kept it before (heap_empty's head is NULL):
     * the head of the bin it would go to or came from is a double free. */
    bool home = heap_is_current_home(owner, heap) && !page->secure;
    heap_t *bins_of = home ? owner : heap;
    bin_t *bin = &bins_of->bins[page->class_index];
    if (unlikely(block == bin->head)) {
      error_report("double free", p, page->block_size);
      return;
    }
    if (home)
      heap_bin_push(owner, bin, block);
    else
      heap_free_remote(page, block);
    return;
  }
  /* A page that is not secure is here only because the fast path found
   * the block at the head of the bin. */
  if (!page->secure || !page_free_bit_set(page, offset / page->block_size)) {
    error_report("double free", p, page->block_size);
    return;
  }
  page_secure_fill(page, block);
  page->frees++;
  /* Read first: a page that empties goes back to the span layer. */
  uint32_t block_size = page->block_size;
  if (heap_page_return_block(heap, page, block, 0) &&
      unlikely(heap->task != NULL)) {
    heap->secure_frees++;
    task_uncharge(heap->task, block_size);
  }
}

/* ---- collection ---- */

void heap_collect(heap_t *heap, bool force) {
  if (heap == &heap_empty)
    return;
  heap_flush_bins(heap);
  heap_rescan_full(heap);
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    page_t *page = heap->queues[c].first;
    while (page != NULL) {
      page_t *next = page->next;
      page_collect(page);
      if (page->used == 0 && (force || page != heap->queues[c].first)) {
        queue_remove(&heap->queues[c], page);
        heap_page_release(heap, page, 0);
      }
      page = next;
    }
  }
  arena_collect(heap, force);
  if (force)
    large_cache_flush(heap);
}

ZK_STATS_READER static void stats_add_page(zk_stats_t *out,
                                           const page_t *page) {
  unsigned class_index = STATS_LOAD(page->class_index);
  if (class_index >= CLASS_COUNT)
    return; /* a descriptor being set up for another span */
  zk_class_stats_t *cls = &out->classes[class_index];
  uint64_t block_size = STATS_LOAD(page->block_size);
  uint64_t used = STATS_LOAD(page->used);
  uint64_t frees = STATS_LOAD(page->frees);
  uint64_t capacity = STATS_LOAD(page->capacity);
  cls->allocations += frees + used;
  cls->frees += frees;
  cls->pages++;
  out->bytes_live += used * block_size;
  /* Blocks are carved 4 KiB at a time: the carved part is what can be
   * resident. */
  out->bytes_committed +=
      (capacity * block_size + OS_PAGE_SIZE - 1) & ~(OS_PAGE_SIZE - 1);
}

/* Another thread's queue, read while it changes: its links are read
 * once each, and the walk stops after `*budget` pages in all (a page that
 * moves between queues as it is read could lead the walk around again). */
ZK_STATS_READER static void
stats_add_queue(zk_stats_t *out, const page_queue_t *queue, size_t *budget) {
  for (const page_t *page = STATS_LOAD(queue->first);
       page != NULL && *budget > 0; page = STATS_LOAD(page->next), --*budget)
    stats_add_page(out, page);
}

/* A sub-heap's arena blocks by class, and its arenas' carved bytes. */
ZK_STATS_READER static void
stats_add_arenas(zk_stats_t *out, const heap_t *heap, size_t *budget) {
  for (unsigned c = 0; c < ARENA_CLASSES; c++) {
    uint64_t carved = STATS_LOAD(heap->arena_out[c]);
    uint64_t remote =
        atomic_load_explicit(&heap->arena_remote[c], memory_order_relaxed);
    out->classes[c].allocations += carved;
    out->classes[c].frees += remote;
    out->bytes_live += (carved - remote) * class_block_size[c];
  }
  for (const page_t *arena = STATS_LOAD(heap->arenas);
       arena != NULL && *budget > 0; arena = STATS_LOAD(arena->next), --*budget)
    out->bytes_committed +=
        (ARENA_TABLE_BYTES + STATS_LOAD(arena->capacity) + OS_PAGE_SIZE - 1) &
        ~(OS_PAGE_SIZE - 1);
}

ZK_STATS_READER static void stats_add_retired(zk_stats_t *out,
                                              const heap_stats_t *stats) {
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    out->classes[c].allocations += STATS_LOAD(stats->class_allocs_retired[c]);
    out->classes[c].frees += STATS_LOAD(stats->class_frees_retired[c]);
  }
  for (unsigned c = 0; c < ARENA_CLASSES; c++) {
    uint64_t retired = STATS_LOAD(stats->class_arena_retired[c]);
    out->classes[c].allocations += retired;
    out->classes[c].frees += retired;
  }
}

/* Other threads' counters are read while they run: exact only when they
 * are quiescent. Safe at any time: the segment lock keeps every segment
 * mapped while the walk follows other threads' links to page descriptors
 * (a page leaves a queue before its span goes back to the segment layer,
 * under that lock), and each walk is bounded. */
ZK_STATS_READER void heap_collect_stats(zk_stats_t *out) {
  pthread_mutex_lock(&abandoned_lock);
  pthread_mutex_lock(&heaps_lock);
  segment_lock_all();
  /* More pages than slices mapped: the walk went around a moving page. */
  size_t budget = segment_slices_mapped();
  for (heap_t *heap = heaps_live; heap != NULL; heap = heap->next_heap) {
    for (unsigned c = 0; c < CLASS_COUNT; c++)
      stats_add_queue(out, &heap->queues[c], &budget);
    stats_add_queue(out, &heap->full, &budget);
    stats_add_arenas(out, heap, &budget);
    stats_add_retired(out, &heap->stats);
    for (unsigned c = 0; c < CLASS_COUNT; c++) {
      /* Pages count a bin's blocks as used: they are free. */
      const bin_t *bin = &heap->bins[c];
      uint64_t frees = STATS_LOAD(bin->frees);
      uint64_t held = bin_count_racy(bin);
      out->classes[c].frees += frees;
      out->classes[c].allocations += frees - held;
      out->bytes_live -= held * class_block_size[c];
    }
    unsigned cached = STATS_LOAD(heap->large_cache_count);
    for (unsigned i = 0; i < cached && i < LARGE_CACHE_ENTRIES; i++) {
      /* Free, and resident until a purge returns it. */
      const page_t *span = STATS_LOAD(heap->large_cache[i]);
      if (span != NULL && !STATS_LOAD(span->purged))
        out->bytes_committed += (size_t)STATS_LOAD(span->slice_count)
                                << SLICE_SHIFT;
    }
  }
  stats_add_retired(out, &heaps_retired_stats);
  for (unsigned c = 0; c < CLASS_COUNT; c++)
    stats_add_queue(out, &abandoned[c], &budget);
  segment_unlock_all();
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
