/* The malloc API: size classes, alignment, calloc, realloc, usable size,
 * bad input. */
#include "sizeclass.h"
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Runs body on a thread of its own, and so on a fresh heap whose pages are
 * its own. */
static void run_in_thread(void *(*body)(void *)) {
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, body, NULL) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
}

static void test_size_classes(void) {
  for (size_t size = 0; size <= SMALL_MAX; size++) {
    unsigned c = size_to_class(size);
    CHECK(c < CLASS_COUNT);
    CHECK(class_block_size[c] >= size);
    /* The class is the smallest that fits. */
    if (c > 0)
      CHECK(class_block_size[c - 1] < size);
    /* Waste bound: 12.5% of the size from 128 B up, 25% above 8 KiB. */
    if (size > 128 && size <= 8192)
      CHECK((class_block_size[c] - size) * 8 <= size);
    if (size > 8192)
      CHECK((class_block_size[c] - size) * 4 <= size);
    if (class_block_size[c] >= 16)
      CHECK(class_block_size[c] % 16 == 0);
  }
  for (unsigned c = 1; c < CLASS_COUNT; c++)
    CHECK(class_block_size[c] > class_block_size[c - 1]);
  /* The fast path's table agrees. */
  zk_free(zk_malloc(1)); /* initializes the process */
  for (size_t size = 0; size <= SMALL_MAX; size++)
    CHECK_EQ(bin_offset_of_small(size), size_to_class(size) * sizeof(bin_t));
  CHECK_EQ(class_block_size[CLASS_COUNT - 1], SMALL_MAX);
}

static void test_alignment_and_usable_size(void) {
  static const size_t sizes[] = {0,     1,      7,       8,       9,      15,
                                 16,    17,     24,      100,     128,    129,
                                 1000,  1024,   1025,    4096,    5000,   65536,
                                 65537, 100000, 1 << 20, 3 << 20, 9 << 20};
  for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
    size_t size = sizes[i];
    unsigned char *p = zk_malloc(size);
    CHECK(p != NULL);
    size_t alignment = size <= 8 ? 8 : 16;
    CHECK(((uintptr_t)p & (alignment - 1)) == 0);
    CHECK(zk_usable_size(p) >= size);
    memset(p, 0xab, zk_usable_size(p));
    zk_free(p);
  }
  CHECK_EQ(zk_usable_size(NULL), 0);
}

static void test_calloc(void) {
  for (size_t size = 1; size < (1u << 22); size = size * 3 + 1) {
    /* Dirty a block of that size first so calloc must really clear. */
    unsigned char *dirty = zk_malloc(size);
    memset(dirty, 0xff, size);
    zk_free(dirty);
    unsigned char *p = zk_calloc(1, size);
    CHECK(p != NULL);
    for (size_t i = 0; i < size; i++)
      CHECK(p[i] == 0);
    zk_free(p);
  }
  errno = 0;
  CHECK(zk_calloc(SIZE_MAX / 2, 3) == NULL);
  CHECK_EQ(errno, ENOMEM);
}

/* Contents that do not depend on where the block lives. */
static void fill_moving(unsigned char *p, size_t size) {
  for (size_t i = 0; i < size; i++)
    p[i] = (unsigned char)(i * 131 + (i >> 8));
}

static int verify_moving(const unsigned char *p, size_t size) {
  for (size_t i = 0; i < size; i++)
    if (p[i] != (unsigned char)(i * 131 + (i >> 8)))
      return 0;
  return 1;
}

static void test_realloc(void) {
  /* Grow through every kind of block and shrink back, keeping contents. */
  size_t size = 1;
  unsigned char *p = zk_malloc(size);
  fill_moving(p, size);
  while (size < (16u << 20)) {
    size_t next = size * 2 + 3;
    p = zk_realloc(p, next);
    CHECK(p != NULL);
    CHECK(verify_moving(p, size));
    fill_moving(p, next);
    size = next;
  }
  while (size > 4) {
    size_t next = size / 3;
    p = zk_realloc(p, next);
    CHECK(p != NULL);
    CHECK(verify_moving(p, next));
    size = next;
  }
  CHECK(zk_realloc(p, 0) == NULL); /* frees */
  p = zk_realloc(NULL, 10);
  CHECK(p != NULL);
  zk_free(p);
}

static void test_aligned(void) {
  void *p_aligned = NULL;
  for (size_t alignment = 1; alignment <= (2u << 20); alignment *= 2) {
    for (size_t size = 1; size < 300000; size = size * 7 + 5) {
      void *p = zk_aligned_alloc(alignment, size);
      CHECK(p != NULL);
      CHECK(((uintptr_t)p & (alignment - 1)) == 0);
      CHECK(zk_usable_size(p) >= size);
      memset(p, 1, size);
      zk_free(p);
    }
  }
  /* A segment's alignment and beyond (DMA buffers, huge-page-aligned
   * arenas): the block lives one segment past its header. */
  for (unsigned shift = 22; shift <= 30; shift += 2) {
    size_t alignment = (size_t)1 << shift;
    size_t sizes[] = {100, (size_t)5 << 20};
    for (int i = 0; i < 2; i++) {
      int saved_errno = errno = EDOM;
      char *q = zk_aligned_alloc(alignment, sizes[i]);
      CHECK(q != NULL);
      CHECK_EQ(errno, saved_errno);
      CHECK(((uintptr_t)q & (alignment - 1)) == 0);
      CHECK(zk_usable_size(q) >= sizes[i]);
      memset(q, 0x5a, sizes[i]);
      CHECK(zk_posix_memalign(&p_aligned, alignment, 64) == 0);
      CHECK(((uintptr_t)p_aligned & (alignment - 1)) == 0);
      zk_free(p_aligned);
      /* realloc copies it into an ordinary block */
      q = zk_realloc(q, sizes[i] * 2);
      CHECK(q != NULL && q[0] == 0x5a && q[sizes[i] - 1] == 0x5a);
      zk_free(q);
    }
    char *zeroed = zk_aligned_alloc(alignment, 1 << 20);
    CHECK(zeroed != NULL && zeroed[0] == 0 && zeroed[(1 << 20) - 1] == 0);
    zk_free(zeroed);
  }
  /* Size 0 beyond a segment's alignment: still a block of its own, which
   * realloc grows and free gives back. */
  for (int i = 0; i < 4; i++) {
    char *empty = zk_aligned_alloc((size_t)4 << 20, 0);
    CHECK(empty != NULL && ((uintptr_t)empty & ((4u << 20) - 1)) == 0);
    CHECK(zk_usable_size(empty) >= 1);
    empty[0] = 7;
    void *others[4];
    for (int j = 0; j < 4; j++) /* segments mapped after it */
      CHECK((others[j] = zk_malloc((size_t)3 << 20)) != NULL);
    empty = zk_realloc(empty, 100);
    CHECK(empty != NULL && empty[0] == 7);
    zk_free(empty);
    for (int j = 0; j < 4; j++)
      zk_free(others[j]);
  }
  /* Beyond the address space: ENOMEM, nothing reserved. */
  errno = 0;
  CHECK(zk_aligned_alloc((size_t)1 << 62, 100) == NULL);
  CHECK_EQ(errno, ENOMEM);
  errno = 0;
  CHECK(zk_aligned_alloc((size_t)1 << 63, 100) == NULL);
  CHECK_EQ(errno, ENOMEM);
  errno = 0;
  CHECK(zk_aligned_alloc(24, 100) == NULL);
  CHECK_EQ(errno, EINVAL);
  void *p = NULL;
  CHECK_EQ(zk_posix_memalign(&p, 3, 10), EINVAL);
  CHECK_EQ(zk_posix_memalign(&p, 4, 10), EINVAL); /* < sizeof(void *) */
  CHECK_EQ(zk_posix_memalign(&p, 256, 10), 0);
  CHECK(((uintptr_t)p & 255) == 0);
  zk_free(p);
}

static void test_bad_input(void) {
  errno = 0;
  CHECK(zk_malloc(SIZE_MAX) == NULL);
  CHECK_EQ(errno, ENOMEM);
  errno = 0;
  CHECK(zk_malloc(SIZE_MAX / 2) == NULL);
  CHECK_EQ(errno, ENOMEM);
  zk_free(NULL);
  void *p = zk_malloc(100);
  errno = 0;
  CHECK(zk_realloc(p, SIZE_MAX) == NULL);
  CHECK_EQ(errno, ENOMEM);
  CHECK(zk_usable_size(p) >= 100); /* untouched */
  zk_free(p);
}

/* zk_free_sized gives back blocks of every kind; NULL is a no-op. */
static void test_free_sized(void) {
  static const size_t sizes[] = {1, 16, 100, 4000, 70000, 3 << 20};
  zk_stats_t before, after;
  zk_stats_get(&before);
  for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
    char *p = zk_malloc(sizes[i]);
    CHECK(p != NULL);
    memset(p, 0x5a, sizes[i]);
    zk_free_sized(p, sizes[i]);
  }
  zk_free_sized(NULL, 0);
  zk_free_sized(NULL, 100);
  zk_stats_get(&after);
  CHECK_EQ(after.bytes_live, before.bytes_live);
  CHECK_EQ(after.large_live, before.large_live);
  CHECK_EQ(after.huge_live, before.huge_live);
}

static void test_reuse_after_free(void) {
  /* A freed block of one size class comes back for the next request. */
  void *first = zk_malloc(48);
  zk_free(first);
  void *second = zk_malloc(48);
  CHECK(first == second);
  zk_free(second);
}

/* Frees beyond a bin's limit go back to their pages, which empty and are
 * released; zk_collect empties the bins. */
static void test_bins_return_blocks(void) {
  enum { COUNT = 4096, SIZE = 3000 };
  unsigned c = size_to_class(SIZE);
  static void *blocks[COUNT];
  zk_stats_t before, full, freed, collected;
  zk_stats_get(&before);
  for (int i = 0; i < COUNT; i++)
    CHECK((blocks[i] = zk_malloc(SIZE)) != NULL);
  zk_stats_get(&full);
  for (int i = 0; i < COUNT; i++)
    zk_free(blocks[i]);
  zk_stats_get(&freed);
  CHECK_EQ(freed.classes[c].live, before.classes[c].live);
  CHECK_EQ(freed.classes[c].frees - before.classes[c].frees, COUNT);
  /* 3072 B blocks, 21 a page: 196 pages at the peak. The bin keeps at most
   * 256 KiB of blocks, which can hold a page each, plus a spare. */
  CHECK(full.classes[c].pages >= COUNT / 21);
  CHECK(freed.classes[c].pages <= before.classes[c].pages + 86);
  zk_collect(true);
  zk_stats_get(&collected);
  CHECK(collected.classes[c].pages <= before.classes[c].pages);
}

/* A bin the thread stops using gives its blocks back while the thread goes
 * on allocating other sizes. */
static void test_bins_decay(void) {
  /* CHURN: more 64 B blocks than a grown bin holds (4,096). */
  enum { COUNT = 200, SIZE = 2000, CHURN = 6000 };
  unsigned c = size_to_class(SIZE);
  static void *blocks[CHURN];
  zk_collect(true);
  long delay = zk_option_get(ZK_OPTION_PURGE_DELAY_MS);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 8) == 0);
  for (int i = 0; i < COUNT; i++)
    CHECK((blocks[i] = zk_malloc(SIZE)) != NULL);
  for (int i = 0; i < COUNT; i++)
    zk_free(blocks[i]);
  zk_stats_t idle, decayed;
  zk_stats_get(&idle);
  CHECK(idle.classes[c].pages >= 2); /* the bin's blocks pin their pages */
  /* Another class's bin runs empty and over its limit every round: the
   * slow paths that pace decay. */
  for (int round = 0; round < 100; round++) {
    for (int i = 0; i < CHURN; i++)
      CHECK((blocks[i] = zk_malloc(64)) != NULL);
    for (int i = 0; i < CHURN; i++)
      zk_free(blocks[i]);
    struct timespec pause = {0, 1000000};
    nanosleep(&pause, NULL);
  }
  zk_stats_get(&decayed);
  CHECK(decayed.classes[c].pages <= 1); /* a class keeps one page */
  CHECK_EQ(decayed.classes[c].live, idle.classes[c].live);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, delay) == 0);
}

/* A thread's pages start carving at different 4 KiB colours of their
 * slice, so that the first (hot) blocks of its classes do not all share the
 * same cache sets; carving wraps to the page's start and reaches every
 * block exactly once. */
enum { SLICE_BYTES = 64 * 1024, COLOUR_BYTES = 4096 };

static void *page_colours_thread(void *unused) {
  (void)unused;
  static const size_t sizes[] = {8,   16,  32,  48,  64,  80,  96,  112,
                                 128, 144, 160, 176, 192, 208, 224, 240};
  enum { SIZES = sizeof(sizes) / sizeof(sizes[0]) };
  bool colour_seen[SLICE_BYTES / COLOUR_BYTES] = {false};
  unsigned colours = 0;
  for (unsigned i = 0; i < SIZES; i++) {
    uintptr_t first = (uintptr_t)zk_malloc(sizes[i]);
    CHECK(first != 0);
    unsigned colour = (unsigned)(first % SLICE_BYTES) / COLOUR_BYTES;
    colours += !colour_seen[colour];
    colour_seen[colour] = true;
  }
  CHECK(colours >= SIZES / 2);

  /* 1,024 blocks of 64 B fill a slice: allocate three slices' worth and
   * check every page filled whole got each of its blocks once. */
  enum { BLOCK = 64, PER_PAGE = SLICE_BYTES / BLOCK, COUNT = 3 * PER_PAGE };
  static uintptr_t blocks[COUNT];
  for (unsigned i = 0; i < COUNT; i++)
    CHECK((blocks[i] = (uintptr_t)zk_malloc(BLOCK)) != 0);
  unsigned full_pages = 0;
  for (unsigned i = 0; i < COUNT; i++) {
    uintptr_t page = blocks[i] & ~(uintptr_t)(SLICE_BYTES - 1);
    bool page_seen = false;
    for (unsigned j = 0; j < i && !page_seen; j++)
      page_seen = (blocks[j] & ~(uintptr_t)(SLICE_BYTES - 1)) == page;
    if (page_seen)
      continue;
    static bool offset_seen[PER_PAGE];
    memset(offset_seen, 0, sizeof(offset_seen));
    unsigned in_page = 0;
    for (unsigned j = i; j < COUNT; j++) {
      if ((blocks[j] & ~(uintptr_t)(SLICE_BYTES - 1)) != page)
        continue;
      CHECK_EQ(blocks[j] % BLOCK, 0);
      unsigned index = (unsigned)(blocks[j] - page) / BLOCK;
      CHECK(!offset_seen[index]);
      offset_seen[index] = true;
      in_page++;
    }
    full_pages += in_page == PER_PAGE;
  }
  CHECK(full_pages >= 1);
  for (unsigned i = 0; i < COUNT; i++)
    zk_free((void *)blocks[i]);
  return NULL;
}

static void test_page_colours(void) {
  run_in_thread(page_colours_thread);
}

/* Blocks a fresh page hands out one after the other share no cache line
 * (page_batch_stride): a thread's objects made in a row and used by
 * different threads do not write one line. Every block still comes once. A
 * batch cut short by the end of the span may hand out neighbours, a few
 * per page; handed out in address order, nearly every pair of blocks under
 * 64 B would share a line. */
static int compare_addresses(const void *a, const void *b) {
  uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;
  return (x > y) - (x < y);
}

static void *fresh_blocks_apart_thread(void *argument) {
  (void)argument;
  if (zk_option_get(ZK_OPTION_SECURE) != 0)
    return NULL; /* secure pages link fresh blocks in a random order */
  static const size_t sizes[] = {8,   16,  32,  48,  80,  96,  112, 144,
                                 160, 176, 208, 240, 288, 352, 416, 480};
  enum { MOST = 2 * SLICE_BYTES / 8 };
  static uintptr_t blocks[MOST];
  for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
    size_t size = sizes[s];
    CHECK_EQ(class_block_size[size_to_class(size)], size);
    size_t count = 2 * SLICE_BYTES / size;
    unsigned sharing = 0;
    for (size_t i = 0; i < count; i++) {
      CHECK((blocks[i] = (uintptr_t)zk_malloc(size)) != 0);
      memset((void *)blocks[i], (int)i, size);
      if (i == 0)
        continue;
      uintptr_t low = blocks[i] < blocks[i - 1] ? blocks[i] : blocks[i - 1];
      uintptr_t high = blocks[i] ^ blocks[i - 1] ^ low;
      sharing += (low + size - 1) / 64 == high / 64;
    }
    if (sharing > count / 50)
      fprintf(stderr, "%zu B: %u of %zu pairs share a line\n", size, sharing,
              count - 1);
    CHECK(sharing <= count / 50);
    qsort(blocks, count, sizeof(blocks[0]), compare_addresses);
    for (size_t i = 1; i < count; i++)
      CHECK(blocks[i] >= blocks[i - 1] + size);
    for (size_t i = 0; i < count; i++)
      zk_free((void *)blocks[i]);
  }
  return NULL;
}

static void test_fresh_blocks_apart(void) {
  run_in_thread(fresh_blocks_apart_thread);
}

/* A block of another thread's heap, freed on a thread that allocates from
 * its class, is handed out again by that thread; the statistics count each
 * allocation and free once, wherever the block went, and the blocks still
 * reach their pages once the bins are flushed and the owner collects. */
enum { FOREIGN_COUNT = 400, FOREIGN_SIZE = 200, FOREIGN_HELD = 300 };

struct foreign_owner {
  void *blocks[FOREIGN_COUNT];
  pthread_barrier_t allocated, freed, collected;
  bool exit_early; /* leave before the blocks are freed */
};

static void *foreign_owner_main(void *argument) {
  struct foreign_owner *owner = argument;
  for (int i = 0; i < FOREIGN_COUNT; i++) {
    CHECK((owner->blocks[i] = zk_malloc(FOREIGN_SIZE)) != NULL);
    memset(owner->blocks[i], 0x5a, FOREIGN_SIZE);
  }
  pthread_barrier_wait(&owner->allocated);
  if (owner->exit_early)
    return NULL;
  pthread_barrier_wait(&owner->freed);
  zk_collect(false); /* takes the frees the other thread sent back */
  pthread_barrier_wait(&owner->collected);
  return NULL;
}

static void foreign_frees_round(bool owner_exits_first) {
  unsigned c = size_to_class(FOREIGN_SIZE);
  static void *held[FOREIGN_HELD];
  static struct foreign_owner owner;
  memset(owner.blocks, 0, sizeof(owner.blocks));
  owner.exit_early = owner_exits_first;
  unsigned parties = owner_exits_first ? 1 : 2;
  CHECK(pthread_barrier_init(&owner.allocated, NULL, 2) == 0);
  CHECK(pthread_barrier_init(&owner.freed, NULL, parties) == 0);
  CHECK(pthread_barrier_init(&owner.collected, NULL, parties) == 0);
  zk_collect(true);
  zk_stats_t before, after;
  zk_stats_get(&before);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, foreign_owner_main, &owner) == 0);
  pthread_barrier_wait(&owner.allocated);
  if (owner_exits_first)
    CHECK(pthread_join(thread, NULL) == 0);
  /* This thread's bin of the class ran empty and is under half full. */
  for (int i = 0; i < FOREIGN_HELD; i++)
    CHECK((held[i] = zk_malloc(FOREIGN_SIZE)) != NULL);
  zk_free(owner.blocks[0]);
  void *again = zk_malloc(FOREIGN_SIZE);
  CHECK(again == owner.blocks[0]);
  unsigned char *bytes = again;
  for (int i = 8; i < FOREIGN_SIZE; i++) /* past the link word */
    CHECK_EQ(bytes[i], 0x5a);
  zk_free(again);
  for (int i = 1; i < FOREIGN_COUNT; i++)
    zk_free(owner.blocks[i]); /* kept, then sent back: the bin half full */
  for (int i = 0; i < FOREIGN_HELD; i++)
    zk_free(held[i]);
  zk_collect(true); /* this thread's bins, foreign blocks included */
  if (!owner_exits_first) {
    pthread_barrier_wait(&owner.freed);
    pthread_barrier_wait(&owner.collected);
    zk_stats_get(&after);
    uint64_t made = FOREIGN_COUNT + FOREIGN_HELD + 1;
    CHECK_EQ(after.classes[c].live, before.classes[c].live);
    CHECK_EQ(after.classes[c].allocations - before.classes[c].allocations,
             made);
    CHECK_EQ(after.classes[c].frees - before.classes[c].frees, made);
    CHECK(pthread_join(thread, NULL) == 0);
  }
  /* Whichever way the blocks went, the pages come back once the owner is
   * gone and the abandoned pages are collected. */
  zk_collect(true);
  zk_stats_get(&after);
  CHECK_EQ(after.classes[c].live, before.classes[c].live);
  CHECK(after.classes[c].pages <= before.classes[c].pages + 1);
  pthread_barrier_destroy(&owner.allocated);
  pthread_barrier_destroy(&owner.freed);
  pthread_barrier_destroy(&owner.collected);
}

static void test_foreign_frees(void) {
  foreign_frees_round(false);
  foreign_frees_round(true);
}

/* Blocks of every kind of small page freed by a thread that does not own
 * them (kept in its bins where it allocates the class, sent back where it
 * does not), handed out again by it, freed once more after it has exited
 * (its pages abandoned): no block is handed out twice and every byte
 * survives. The free fast path passes such frees on with the descriptor it
 * found (heap_free_foreign); pages of several slices take the full path. */
#define EVERY_CLASS_COUNT 48
static const size_t every_class_sizes[] = {8,    24,   64,    100,   128,
                                           200,  512,  1000,  1024,  2000,
                                           4096, 9000, 20000, 40000, 65536};
#define EVERY_CLASS_SIZES                                                      \
  (sizeof(every_class_sizes) / sizeof(every_class_sizes[0]))
static uint8_t *main_blocks[EVERY_CLASS_SIZES][EVERY_CLASS_COUNT];
static uint8_t *thread_blocks[EVERY_CLASS_SIZES][EVERY_CLASS_COUNT];

static void fill_block(uint8_t *p, size_t size, uint8_t mark) {
  p[0] = mark;
  p[size / 2] = mark;
  p[size - 1] = mark;
}

static bool block_intact(const uint8_t *p, size_t size, uint8_t mark) {
  return p[0] == mark && p[size / 2] == mark && p[size - 1] == mark;
}

static void *foreign_every_class_thread(void *unused) {
  (void)unused;
  void *own[EVERY_CLASS_SIZES];
  for (size_t s = 0; s < EVERY_CLASS_SIZES; s++) /* bins that keep */
    CHECK((own[s] = zk_malloc(every_class_sizes[s])) != NULL);
  for (size_t s = 0; s < EVERY_CLASS_SIZES; s++)
    for (int i = 0; i < EVERY_CLASS_COUNT; i++) {
      CHECK(block_intact(main_blocks[s][i], every_class_sizes[s],
                         (uint8_t)(s * 7 + i)));
      zk_free(main_blocks[s][i]);
    }
  for (size_t s = 0; s < EVERY_CLASS_SIZES; s++)
    for (int i = 0; i < EVERY_CLASS_COUNT; i++) {
      CHECK((thread_blocks[s][i] = zk_malloc(every_class_sizes[s])) != NULL);
      fill_block(thread_blocks[s][i], every_class_sizes[s],
                 (uint8_t)(0x80 + s * 3 + i));
    }
  for (size_t s = 0; s < EVERY_CLASS_SIZES; s++)
    zk_free(own[s]);
  return NULL;
}

static int compare_pointers(const void *a, const void *b) {
  uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;
  return x < y ? -1 : x > y;
}

static void test_foreign_frees_every_class(void) {
  for (size_t s = 0; s < EVERY_CLASS_SIZES; s++)
    for (int i = 0; i < EVERY_CLASS_COUNT; i++) {
      CHECK((main_blocks[s][i] = zk_malloc(every_class_sizes[s])) != NULL);
      fill_block(main_blocks[s][i], every_class_sizes[s], (uint8_t)(s * 7 + i));
    }
  run_in_thread(foreign_every_class_thread);
  for (size_t s = 0; s < EVERY_CLASS_SIZES; s++)
    for (int i = 0; i < EVERY_CLASS_COUNT; i++) {
      CHECK((main_blocks[s][i] = zk_malloc(every_class_sizes[s])) != NULL);
      fill_block(main_blocks[s][i], every_class_sizes[s], (uint8_t)(s * 5 + i));
    }
  enum { TOTAL = 2 * EVERY_CLASS_SIZES * EVERY_CLASS_COUNT };
  static uintptr_t all[TOTAL];
  size_t n = 0;
  for (size_t s = 0; s < EVERY_CLASS_SIZES; s++)
    for (int i = 0; i < EVERY_CLASS_COUNT; i++) {
      all[n++] = (uintptr_t)main_blocks[s][i];
      all[n++] = (uintptr_t)thread_blocks[s][i];
    }
  qsort(all, n, sizeof(all[0]), compare_pointers);
  for (size_t k = 1; k < n; k++)
    CHECK(all[k] != all[k - 1]); /* no block handed out twice */
  for (size_t s = 0; s < EVERY_CLASS_SIZES; s++)
    for (int i = 0; i < EVERY_CLASS_COUNT; i++) {
      CHECK(block_intact(thread_blocks[s][i], every_class_sizes[s],
                         (uint8_t)(0x80 + s * 3 + i)));
      CHECK(block_intact(main_blocks[s][i], every_class_sizes[s],
                         (uint8_t)(s * 5 + i)));
      zk_free(thread_blocks[s][i]); /* its thread gone: pages abandoned */
      zk_free(main_blocks[s][i]);
    }
  printf("%zu blocks of %zu sizes freed across threads, none handed out "
         "twice\n",
         n, (size_t)EVERY_CLASS_SIZES);
}

/* A thread that frees other threads' blocks chains those of one page and
 * pushes each chain with one CAS (heap.c, "remote chains"). Whatever the
 * order of its frees (one page's blocks in a row, pages of a class
 * alternating, classes interleaved, classes not chained), every block is
 * back with its owner once the freeing thread calls zk_thread_idle, while
 * it still runs, or exits; and none is handed out twice after. The
 * freeing thread never allocates: it gets a heap for its chains. */
#define CHAIN_COUNT 600
static const size_t chain_sizes[] = {8, 64, 512, 2048, 4096};
#define CHAIN_SIZES (sizeof(chain_sizes) / sizeof(chain_sizes[0]))
static uint8_t *chain_blocks[CHAIN_SIZES][CHAIN_COUNT];
static pthread_barrier_t chain_freed, chain_checked;
static int chain_idle = 1;

static void chain_free_all(void) {
  /* First half: each class's blocks in order (long chains, pushed at
   * their limit); second half: from both ends of it in turn (pages
   * alternate), classes interleaved. */
  for (size_t s = 0; s < CHAIN_SIZES; s++)
    for (int i = 0; i < CHAIN_COUNT / 2; i++) {
      CHECK(block_intact(chain_blocks[s][i], chain_sizes[s], (uint8_t)i));
      zk_free(chain_blocks[s][i]);
    }
  for (int k = 0; k < CHAIN_COUNT / 2; k++)
    for (size_t s = 0; s < CHAIN_SIZES; s++) {
      int i = k % 2 == 0 ? CHAIN_COUNT / 2 + k / 2 : CHAIN_COUNT - 1 - k / 2;
      CHECK(block_intact(chain_blocks[s][i], chain_sizes[s], (uint8_t)i));
      zk_free(chain_blocks[s][i]);
    }
}

static void *chain_freer(void *idle) {
  chain_free_all();
  if (idle != NULL) {
    zk_thread_idle();
    pthread_barrier_wait(&chain_freed);
    pthread_barrier_wait(&chain_checked); /* alive while main checks */
  }
  return NULL;
}

static void chain_allocate_all(void) {
  for (size_t s = 0; s < CHAIN_SIZES; s++)
    for (int i = 0; i < CHAIN_COUNT; i++) {
      CHECK((chain_blocks[s][i] = zk_malloc(chain_sizes[s])) != NULL);
      fill_block(chain_blocks[s][i], chain_sizes[s], (uint8_t)i);
    }
}

static void chain_check_all_back(const zk_stats_t *before) {
  zk_collect(false); /* takes the pages' remote lists */
  zk_stats_t after;
  zk_stats_get(&after);
  for (size_t s = 0; s < CHAIN_SIZES; s++) {
    unsigned c = size_to_class(chain_sizes[s]);
    CHECK_EQ(after.classes[c].live, before->classes[c].live);
  }
}

static void test_remote_chains(void) {
  zk_stats_t before;
  zk_collect(false);
  zk_stats_get(&before);
  /* zk_thread_idle, the freeing thread still running. */
  chain_allocate_all();
  CHECK(pthread_barrier_init(&chain_freed, NULL, 2) == 0);
  CHECK(pthread_barrier_init(&chain_checked, NULL, 2) == 0);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, chain_freer, &chain_idle) == 0);
  pthread_barrier_wait(&chain_freed);
  chain_check_all_back(&before);
  pthread_barrier_wait(&chain_checked);
  CHECK(pthread_join(thread, NULL) == 0);
  pthread_barrier_destroy(&chain_freed);
  pthread_barrier_destroy(&chain_checked);
  /* Thread exit. */
  chain_allocate_all();
  CHECK(pthread_create(&thread, NULL, chain_freer, NULL) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  chain_check_all_back(&before);
  /* Handed out again, each block once. */
  chain_allocate_all();
  enum { TOTAL = CHAIN_SIZES * CHAIN_COUNT };
  static uintptr_t all[TOTAL];
  size_t n = 0;
  for (size_t s = 0; s < CHAIN_SIZES; s++)
    for (int i = 0; i < CHAIN_COUNT; i++)
      all[n++] = (uintptr_t)chain_blocks[s][i];
  qsort(all, n, sizeof(all[0]), compare_pointers);
  for (size_t k = 1; k < n; k++)
    CHECK(all[k] != all[k - 1]);
  for (size_t s = 0; s < CHAIN_SIZES; s++)
    for (int i = 0; i < CHAIN_COUNT; i++) {
      CHECK(block_intact(chain_blocks[s][i], chain_sizes[s], (uint8_t)i));
      zk_free(chain_blocks[s][i]);
    }
  printf("%zu blocks of %zu sizes freed by a thread that only frees, all "
         "back at zk_thread_idle and at its exit\n",
         n, (size_t)CHAIN_SIZES);
}

/* A free of another heap's block after the thread's heap is gone (a
 * later round of key destructors; glibc frees its own thread state after
 * them all) goes straight to its page: a heap made there for a chain
 * would be registered when no destructor round is left to push it, and
 * the block and the heap would stay out for good. */
#define LATE_THREADS 8
/* More than a thread that never allocated frees before it gets a heap for
 * its chains (64, heap.c): a thread whose heap is gone gets none even so. */
#define LATE_MAX_EACH 80
static pthread_key_t late_key;
static void *late_blocks[LATE_THREADS][LATE_MAX_EACH];
static int late_index, late_each;

static void late_destructor(void *value) {
  uintptr_t round = (uintptr_t)value;
  if (round < PTHREAD_DESTRUCTOR_ITERATIONS) {
    CHECK(pthread_setspecific(late_key, (void *)(round + 1)) == 0);
    return;
  }
  for (int i = 0; i < late_each; i++) /* main's blocks, in the last round */
    zk_free(late_blocks[late_index][i]);
}

static void *late_thread(void *unused) {
  (void)unused;
  zk_free(zk_malloc(64)); /* a heap of its own, abandoned at its exit */
  CHECK(pthread_setspecific(late_key, (void *)(uintptr_t)1) == 0);
  return NULL;
}

/* Runs `thread` LATE_THREADS times, each freeing `each` of main's blocks
 * in the last round of key destructors: every block is back, and no heap
 * was made, counted from before the first run or, where the thread makes
 * a heap of its own (`recycled`), after it: the others recycle that one. */
static void check_late_frees(void *(*thread)(void *), int each, bool recycled) {
  CHECK(pthread_key_create(&late_key, late_destructor) == 0);
  unsigned c = size_to_class(64);
  late_each = each;
  for (int t = 0; t < LATE_THREADS; t++)
    for (int i = 0; i < each; i++)
      CHECK((late_blocks[t][i] = zk_malloc(64)) != NULL);
  zk_collect(false);
  zk_stats_t before, after;
  zk_stats_get(&before);
  size_t heaps_before = heap_count_made();
  for (late_index = 0; late_index < LATE_THREADS; late_index++) {
    run_in_thread(thread);
    if (recycled && late_index == 0)
      heaps_before = heap_count_made();
  }
  zk_collect(true);
  zk_stats_get(&after);
  CHECK_EQ(after.classes[c].live,
           before.classes[c].live - (uint64_t)LATE_THREADS * each);
  CHECK_EQ(heap_count_made(), heaps_before);
  pthread_key_delete(late_key);
}

static void test_free_after_heap_gone(void) {
  check_late_frees(late_thread, LATE_MAX_EACH, true);
}

/* As test_free_after_heap_gone, but the thread never had a heap: its
 * only free, of main's block, comes in the last round of key destructors.
 * A heap made there for a chain would be registered when no round is left
 * to abandon it; a thread gets one for its chains only after
 * HEAPLESS_REMOTE_FREES such frees, so this one goes to its page. */
static void *late_thread_no_heap(void *unused) {
  (void)unused;
  CHECK(pthread_setspecific(late_key, (void *)(uintptr_t)1) == 0);
  return NULL;
}

static void test_free_in_last_round_no_heap(void) {
  check_late_frees(late_thread_no_heap, 1, false);
}

/* The free fast path's one test (bin_takes, an asm mask on x86-64)
 * against its plain C meaning, over every room a bin can have (a refill
 * can take it below zero), both keep masks and the floors that occur. */
#define BIN_MAX_ROOM_TESTED 1024
static void test_bin_takes(void) {
  static const uint16_t floors[] = {1, 5, 33, 257, 511, BIN_KEEPS_NONE};
  static const uintptr_t foreign[] = {0, 1, 0x1000, UINTPTR_MAX};
  static const uint16_t masks[] = {0, BIN_KEEP_MASK};
  bin_t bin;
  memset(&bin, 0, sizeof(bin));
  size_t checked = 0;
  for (int32_t room = -9000; room <= BIN_MAX_ROOM_TESTED; room++) {
    bin.room = room;
    for (size_t f = 0; f < sizeof(floors) / sizeof(floors[0]); f++) {
      bin.keep_floor = floors[f];
      for (size_t m = 0; m < 2; m++)
        for (size_t o = 0; o < sizeof(foreign) / sizeof(foreign[0]); o++) {
          bool kept = (room & masks[m]) >= floors[f];
          CHECK_EQ(bin_takes(&bin, masks[m], foreign[o]),
                   foreign[o] == 0 || kept);
          /* Never past a floor of none, whatever the room. */
          if (floors[f] == BIN_KEEPS_NONE)
            CHECK(!kept);
          checked++;
        }
    }
  }
  printf("bin_takes agrees with its meaning in %zu cases\n", checked);
}

/* What the free fast path keeps of another thread's frees: a block of a
 * class from 128 B to 1 KiB, into a bin that ran empty and is under half
 * full, is handed out again by the freeing thread (LIFO: at once); a
 * smaller class, and a task heap's block (its heap counts it free only
 * when its page has it), go back to their page. */
#define KEEP_SIZE      256
#define KEEP_SMALL     64
#define KEEP_COUNT     600
#define KEEP_TASK_HELD 8
static void *keep_blocks[KEEP_COUNT], *keep_small, *keep_task[KEEP_TASK_HELD];
static zk_heap_t *keep_task_heap;

static void *foreign_keep_thread(void *unused) {
  (void)unused;
  void *own = zk_malloc(KEEP_SIZE), *own_small = zk_malloc(KEEP_SMALL);
  CHECK(own != NULL && own_small != NULL); /* both bins refilled */
  zk_free(keep_blocks[0]);
  void *again = zk_malloc(KEEP_SIZE);
  CHECK(again == keep_blocks[0]);
  CHECK(((unsigned char *)again)[KEEP_SIZE - 1] == 0xa5); /* untouched */
  zk_free(keep_small);
  void *small_again = zk_malloc(KEEP_SMALL);
  CHECK(small_again != NULL && small_again != keep_small);
  for (int i = 0; i < KEEP_TASK_HELD; i++)
    zk_free(keep_task[i]);
  void *after_task = zk_malloc(KEEP_SIZE);
  for (int i = 0; i < KEEP_TASK_HELD; i++)
    CHECK(after_task != keep_task[i]);
  zk_heap_stats_t task_stats;
  CHECK(zk_heap_stats(keep_task_heap, &task_stats) == 0);
  CHECK_EQ(task_stats.live_bytes, 0); /* every push uncharged it */
  /* The rest: kept until the bin is half full, then sent back. */
  zk_free(again);
  for (int i = 1; i < KEEP_COUNT; i++)
    zk_free(keep_blocks[i]);
  static void *taken[KEEP_COUNT];
  size_t kept = 0;
  for (int i = 0; i < KEEP_COUNT; i++) {
    CHECK((taken[i] = zk_malloc(KEEP_SIZE)) != NULL);
    for (int j = 0; j < KEEP_COUNT; j++)
      if (taken[i] == keep_blocks[j]) {
        kept++;
        break;
      }
  }
  CHECK(kept > 1 && kept < KEEP_COUNT);
  for (int i = 0; i < KEEP_COUNT; i++)
    zk_free(taken[i]);
  zk_free(after_task);
  zk_free(small_again);
  zk_free(own_small);
  zk_free(own);
  printf("kept %zu of %d foreign %d B blocks; %d B and task blocks sent "
         "back\n",
         kept, KEEP_COUNT, KEEP_SIZE, KEEP_SMALL);
  return NULL;
}

static void test_foreign_keep(void) {
  for (int i = 0; i < KEEP_COUNT; i++) {
    CHECK((keep_blocks[i] = zk_malloc(KEEP_SIZE)) != NULL);
    memset(keep_blocks[i], 0xa5, KEEP_SIZE);
  }
  CHECK((keep_small = zk_malloc(KEEP_SMALL)) != NULL);
  /* The class hot in the task heap (its owner frees many of them), so
   * that its blocks come from pages of the task's, not from an arena. */
  CHECK((keep_task_heap = zk_heap_create(NULL)) != NULL);
  CHECK(zk_heap_enter(keep_task_heap) == NULL);
  for (int i = 0; i < 1000; i++)
    zk_free(zk_malloc(KEEP_SIZE));
  for (int i = 0; i < KEEP_TASK_HELD; i++)
    CHECK((keep_task[i] = zk_malloc(KEEP_SIZE)) != NULL);
  CHECK(zk_heap_enter(NULL) == keep_task_heap);
  run_in_thread(foreign_keep_thread);
  zk_heap_destroy(keep_task_heap);
}

int main(void) {
  test_fresh_blocks_apart(); /* first: pages no earlier test has used */
  test_size_classes();
  test_alignment_and_usable_size();
  test_calloc();
  test_realloc();
  test_aligned();
  test_bad_input();
  test_free_sized();
  test_reuse_after_free();
  test_bins_return_blocks();
  test_bins_decay();
  test_page_colours();
  test_foreign_frees();
  test_foreign_frees_every_class();
  test_foreign_keep();
  test_remote_chains();
  test_free_after_heap_gone();
  test_free_in_last_round_no_heap();
  test_bin_takes();
  printf("test_malloc: ok\n");
  return 0;
}
