#define _GNU_SOURCE /* MREMAP_FIXED */
/* Large blocks and the span layer under them: split and merge of spans,
 * cross-size reuse of freed memory, RSS returned to the OS (forced and by
 * the purge delay), huge blocks resized by realloc, huge-page modes,
 * statistics and options (set at run time and read from ZKMEM_*).
 *
 * The span tests come first in main: they need the first segment of the
 * process to themselves, so that the addresses spans get are predictable. */
#include "internal.h"
#include "os.h"
#include "sizeclass.h"
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- mremap, interposed ----
 *
 * Every mremap zkmem makes comes here. A move (MREMAP_FIXED) unmaps the old
 * range, and from then on another thread may map a segment of its own
 * there: the old range must no longer be in the owned-segment map by then,
 * or clearing it afterwards would disown the newcomer. With
 * mremap_refuse_in_place set, growing in place fails, so that realloc has
 * to move. */
static int mremap_refuse_in_place;
static int mremap_moves, mremap_moves_still_owned;

void *mremap(void *old_address, size_t old_size, size_t new_size, int flags,
             ...) {
  void *new_address = NULL;
  if (flags & MREMAP_FIXED) {
    va_list arguments;
    va_start(arguments, flags);
    new_address = va_arg(arguments, void *);
    va_end(arguments);
    mremap_moves++;
    if (segment_map_state(segment_of(old_address)) != SEGMENT_MAP_NONE)
      mremap_moves_still_owned++;
  } else if (mremap_refuse_in_place && new_size > old_size) {
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return (void *)syscall(SYS_mremap, old_address, old_size, new_size, flags,
                         new_address);
}

/* ---- utilities ---- */

/* One place that knows the span layer's allocation signature. */
static page_t *span_alloc(size_t slices) {
  return segment_span_alloc(slices, PAGE_LARGE, NULL);
}

static size_t rss_now(void) {
  zk_stats_t stats;
  zk_stats_get(&stats);
  return stats.rss;
}

static size_t segments_now(void) {
  zk_stats_t stats;
  zk_stats_get(&stats);
  return stats.segments_mapped;
}

static void sleep_ms(long ms) {
  struct timespec wait = {ms / 1000, (ms % 1000) * 1000000L};
  while (nanosleep(&wait, &wait) != 0)
    ;
}

/* ---- spans: split and merge ---- */

/* The segment's descriptors say [first, first + slices) is one free span. */
static void check_free_span(const page_t *first, size_t slices) {
  CHECK_EQ(first->kind, PAGE_FREE_SPAN);
  CHECK_EQ(first->slice_offset, 0);
  CHECK_EQ(first->slice_count, slices);
  /* Every slice finds the head: a pointer anywhere in the span resolves. */
  for (size_t i = 1; i < slices; i++)
    CHECK_EQ(first[i].slice_offset, i);
}

static void test_span_split(void) {
  /* The whole usable segment, then 1 slice of it: the other 62 stay one
   * free span right behind it, and serve a 62-slice request without a new
   * segment. */
  page_t *whole = span_alloc(SEGMENT_USABLE_SLICES);
  CHECK(whole != NULL);
  segment_t *segment = segment_of(whole);
  CHECK(whole == &segment_pages(segment)[SEGMENT_FIRST_SLICE]);
  CHECK(whole->start == (uint8_t *)segment + SLICE_SIZE);
  CHECK_EQ(segment->used_slices, SEGMENT_USABLE_SLICES);
  segment_span_free(whole);
  CHECK_EQ(segment->used_slices, 0);
  check_free_span(whole, SEGMENT_USABLE_SLICES);
  size_t segments = segments_now();

  page_t *one = span_alloc(1);
  CHECK(one == whole);
  CHECK_EQ(one->kind, PAGE_LARGE);
  CHECK_EQ(one->slice_count, 1);
  check_free_span(one + 1, SEGMENT_USABLE_SLICES - 1);
  page_t *rest = span_alloc(SEGMENT_USABLE_SLICES - 1);
  CHECK(rest == one + 1);
  CHECK(rest->start == one->start + SLICE_SIZE);
  CHECK_EQ(segment->used_slices, SEGMENT_USABLE_SLICES);
  CHECK_EQ(segments_now(), segments);
  /* A pointer into the last slice finds the span's head. */
  CHECK(segment_page_of(segment, rest->start +
                                     (SEGMENT_USABLE_SLICES - 1) * SLICE_SIZE -
                                     1) == rest);
  segment_span_free(rest);
  segment_span_free(one);
  check_free_span(whole, SEGMENT_USABLE_SLICES);
}

/* A, B, C adjacent (2, 3 and 4 slices) then freed in the given order: each
 * free merges with whatever free neighbour it has, so at the end one span
 * covers the segment again, and a request for all of it returns A. */
static void merge_in_order(const int order[3]) {
  static const size_t sizes[3] = {2, 3, 4};
  page_t *spans[3];
  for (int i = 0; i < 3; i++) {
    spans[i] = span_alloc(sizes[i]);
    CHECK(spans[i] != NULL);
  }
  segment_t *segment = segment_of(spans[0]);
  CHECK(spans[0] == &segment_pages(segment)[SEGMENT_FIRST_SLICE]);
  CHECK(spans[1] == spans[0] + 2);
  CHECK(spans[2] == spans[1] + 3);
  uint8_t *a_start = spans[0]->start;
  bool freed[3] = {false, false, false};
  for (int step = 0; step < 3; step++) {
    int which = order[step];
    segment_span_free(spans[which]);
    freed[which] = true;
    /* The run of free spans containing `which`: bounded by used spans or
     * the segment's ends (C's right neighbour is the free rest). */
    int first = which, last = which;
    while (first > 0 && freed[first - 1])
      first--;
    while (last < 2 && freed[last + 1])
      last++;
    size_t slices = 0;
    for (int i = first; i <= last; i++)
      slices += sizes[i];
    if (last == 2)
      slices = SEGMENT_USABLE_SLICES - (size_t)(spans[first] - spans[0]);
    check_free_span(spans[first], slices);
    /* Slices inside the merged run resolve to its head. */
    CHECK(segment_page_of(segment, spans[which]->start) == spans[first]);
  }
  CHECK_EQ(segment->used_slices, 0);
  page_t *all = span_alloc(SEGMENT_USABLE_SLICES);
  CHECK(all != NULL && all->start == a_start);
  segment_span_free(all);
}

static void test_span_merge(void) {
  static const int orders[6][3] = {{1, 0, 2}, {0, 1, 2}, {0, 2, 1},
                                   {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
  size_t segments = segments_now();
  for (int i = 0; i < 6; i++)
    merge_in_order(orders[i]);
  CHECK_EQ(segments_now(), segments); /* all in the same segment */
}

/* The same with large blocks from zk_malloc. 18 slices is above what a
 * heap caches (16), so each free goes straight to the span layer. */
static void test_large_merge(void) {
  const size_t size = 18 * SLICE_SIZE;
  zk_stats_t before, after;
  zk_stats_get(&before);
  uint8_t *a = zk_malloc(size);
  uint8_t *b = zk_malloc(size);
  uint8_t *c = zk_malloc(size);
  CHECK(a && b && c);
  CHECK(b == a + size && c == b + size);
  CHECK_EQ(zk_usable_size(a), size);
  zk_stats_get(&after);
  CHECK_EQ(after.large_live - before.large_live, 3);
  CHECK_EQ(after.large_allocations - before.large_allocations, 3);
  memset(b, 1, size);
  zk_free(b);
  zk_free(a);
  zk_free(c);
  zk_stats_get(&after);
  CHECK_EQ(after.large_live, before.large_live);
  segment_t *segment = segment_of(a);
  CHECK_EQ(segment->used_slices, 0);
  page_t *all = span_alloc(3 * 18);
  CHECK(all != NULL && all->start == a);
  segment_span_free(all);

  /* Blocks small enough for the heap's cache: freed, they stay out of the
   * span layer until zk_collect(true), which flushes the cache, merges the
   * spans and unmaps every segment left entirely free. */
  uint8_t *x = zk_malloc(4 * SLICE_SIZE);
  uint8_t *y = zk_malloc(4 * SLICE_SIZE);
  CHECK(x && y && y == x + 4 * SLICE_SIZE);
  zk_free(x);
  zk_free(y);
  CHECK(segment_of(x)->used_slices == 8);
  uint8_t *again = zk_malloc(4 * SLICE_SIZE); /* a cache hit: same span */
  CHECK(again == x || again == y);
  zk_free(again);
  zk_collect(true);
  zk_stats_get(&after);
  CHECK_EQ(after.segments_mapped, 0);
  CHECK_EQ(after.bytes_mapped, 0);
}

/* ---- cross-size reuse ---- */

static void test_cross_size_reuse(void) {
  enum { LARGE_COUNT = 200, SMALL_BYTES = 30 << 20 };
  /* The pointer array first: it is a huge block with a mapping of its own,
   * which must not count against the reuse. */
  enum { SMALL_COUNT = SMALL_BYTES / 64 };
  void **blocks = zk_malloc(SMALL_COUNT * sizeof(void *));
  CHECK(blocks != NULL);

  /* Large spans freed, then small pages carved from them. */
  for (int i = 0; i < LARGE_COUNT; i++) {
    blocks[i] = zk_malloc(256 * 1024);
    CHECK(blocks[i] != NULL);
    memset(blocks[i], 0x5a, 256 * 1024);
  }
  for (int i = 0; i < LARGE_COUNT; i++)
    zk_free(blocks[i]);
  zk_stats_t before, after;
  zk_stats_get(&before);
  for (int i = 0; i < SMALL_COUNT; i++) {
    blocks[i] = zk_malloc(64);
    CHECK(blocks[i] != NULL);
  }
  zk_stats_get(&after);
  printf("large -> small: %zu -> %zu segments, %zu -> %zu MiB mapped\n",
         before.segments_mapped, after.segments_mapped,
         before.bytes_mapped >> 20, after.bytes_mapped >> 20);
  CHECK(after.segments_mapped <= before.segments_mapped);
  CHECK(after.bytes_mapped <= before.bytes_mapped);

  /* And back: the emptied small pages serve large blocks and another
   * class's small blocks. */
  for (int i = 0; i < SMALL_COUNT; i++)
    zk_free(blocks[i]);
  zk_stats_get(&before);
  int large_count = (SMALL_BYTES / 2) / (256 * 1024);
  for (int i = 0; i < large_count; i++) {
    blocks[i] = zk_malloc(256 * 1024);
    CHECK(blocks[i] != NULL);
  }
  int medium_count = (SMALL_BYTES / 2) / 4000;
  for (int i = 0; i < medium_count; i++) {
    blocks[large_count + i] = zk_malloc(4000);
    CHECK(blocks[large_count + i] != NULL);
  }
  zk_stats_get(&after);
  printf("small -> large and 4000 B: %zu -> %zu segments\n",
         before.segments_mapped, after.segments_mapped);
  CHECK(after.segments_mapped <= before.segments_mapped);
  CHECK(after.bytes_mapped <= before.bytes_mapped);
  for (int i = 0; i < large_count + medium_count; i++)
    zk_free(blocks[i]);
  zk_free(blocks);
  zk_collect(true);
}

/* Threads that come and go: each new heap wants a segment of its own, but
 * an entirely free one (the last thread's) serves as well as a fresh
 * mapping. Mapping one per thread would grow the address space with the
 * rate of thread creation until the purge unmaps them, seconds later. */
static void *short_lived_thread(void *arg) {
  (void)arg;
  void *small = zk_malloc(64);
  void *large = zk_malloc(300 << 10);
  CHECK(small && large);
  memset(large, 1, 300 << 10);
  zk_free(small);
  zk_free(large);
  return NULL;
}

static void test_thread_churn_reuse(void) {
  zk_collect(true);
  size_t before = segments_now();
  for (int i = 0; i < 50; i++) {
    pthread_t thread;
    CHECK(pthread_create(&thread, NULL, short_lived_thread, NULL) == 0);
    CHECK(pthread_join(thread, NULL) == 0);
  }
  size_t after = segments_now();
  printf("50 short-lived threads one after another: %zu -> %zu segments\n",
         before, after);
  CHECK(after <= before + 2);
  zk_collect(true);
}

/* A page left by an exited thread keeps that thread's list key; the thread
 * that reclaims it relinks its free blocks into its own bin. Blocks still
 * live stay untouched and are never handed out twice. */
enum { RECLAIM_COUNT = 1000, RECLAIM_SIZE = 1500 }; /* a class of its own */

static uint8_t *reclaim_freed[RECLAIM_COUNT / 2];

static void *fill_and_exit_half_live(void *arg) {
  uint8_t **blocks = arg;
  for (int i = 0; i < RECLAIM_COUNT; i++) {
    CHECK((blocks[i] = zk_malloc(RECLAIM_SIZE)) != NULL);
    memset(blocks[i], (i & 0x7f) | 1, RECLAIM_SIZE);
  }
  for (int i = 0; i < RECLAIM_COUNT; i += 2) {
    reclaim_freed[i / 2] = blocks[i];
    zk_free(blocks[i]);
  }
  return NULL;
}

static int compare_pointers(const void *a, const void *b) {
  uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;
  return (x > y) - (x < y);
}

static void test_reclaimed_pages_feed_bins(void) {
  static uint8_t *left[RECLAIM_COUNT];
  static uint8_t *mine[2 * RECLAIM_COUNT];
  static uintptr_t all[3 * RECLAIM_COUNT];
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, fill_and_exit_half_live, left) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  size_t count = 0, reused = 0;
  for (int i = 0; i < 2 * RECLAIM_COUNT; i++) {
    CHECK((mine[i] = zk_malloc(RECLAIM_SIZE)) != NULL);
    memset(mine[i], 0xee, RECLAIM_SIZE);
    all[count++] = (uintptr_t)mine[i];
  }
  for (int i = 1; i < RECLAIM_COUNT; i += 2) {
    all[count++] = (uintptr_t)left[i];
    for (int j = 0; j < RECLAIM_SIZE; j++)
      CHECK_EQ(left[i][j], (i & 0x7f) | 1);
  }
  qsort(all, count, sizeof(all[0]), compare_pointers);
  for (size_t i = 1; i < count; i++) /* no block handed out twice */
    CHECK(all[i] - all[i - 1] >= RECLAIM_SIZE);
  /* The exited thread's free blocks were handed out here. */
  for (int i = 0; i < 2 * RECLAIM_COUNT; i++)
    for (int j = 0; j < RECLAIM_COUNT / 2; j++)
      reused += mine[i] == reclaim_freed[j];
  printf("%zu of the exited thread's %d free blocks reused\n", reused,
         RECLAIM_COUNT / 2);
  CHECK(reused > 0);
  for (int i = 0; i < 2 * RECLAIM_COUNT; i++)
    zk_free(mine[i]);
  for (int i = 1; i < RECLAIM_COUNT; i += 2)
    zk_free(left[i]);
}

/* A remote free reads the page's owner before its push. If the page is
 * abandoned and reclaimed into its new owner's full queue in between, the
 * push hints the old owner (here: none). The page must still come back to
 * its new owner: through the next remote free into it, which finds the
 * full flag still set and hints the right heap, or, when no other free
 * follows, through the owner's rescan of `full` in its bin decay pass. */
enum { STALE_BLOCKS = 20000, STALE_TRIES = 200000 };

typedef struct stale_owner_case {
  size_t size;
  bool more_remote_frees; /* after the stale push */
  void **blocks;          /* the exited thread's, all live */
  page_t *page;           /* the first block's */
  pthread_barrier_t barrier;
  size_t from_page; /* blocks the reclaiming thread got from it */
} stale_owner_case_t;

static void *allocate_all_and_exit(void *arg) {
  stale_owner_case_t *test = arg;
  for (int i = 0; i < STALE_BLOCKS; i++)
    CHECK((test->blocks[i] = zk_malloc(test->size)) != NULL);
  return NULL; /* its full pages are abandoned */
}

static void *reclaim_then_allocate(void *arg) {
  stale_owner_case_t *test = arg;
  void **mine = zk_malloc(STALE_TRIES * sizeof(void *));
  CHECK(mine != NULL);
  int count = 0;
  while (page_owner(test->page) != heap_current) {
    CHECK(count < STALE_TRIES);
    CHECK((mine[count++] = zk_malloc(test->size)) != NULL);
  }
  CHECK(test->page->in_full);
  pthread_barrier_wait(&test->barrier); /* the stale push and the frees */
  pthread_barrier_wait(&test->barrier);
  if (!test->more_remote_frees)
    sleep_ms(zk_option_get(ZK_OPTION_PURGE_DELAY_MS) / 4 + 5);
  while (test->from_page == 0 && count < STALE_TRIES) {
    CHECK((mine[count] = zk_malloc(test->size)) != NULL);
    test->from_page += segment_lookup(mine[count++]) == test->page;
  }
  for (int i = 0; i < count; i++)
    zk_free(mine[i]);
  zk_free(mine);
  return NULL;
}

static void stale_owner_case(size_t size, bool more_remote_frees) {
  stale_owner_case_t test = {.size = size,
                             .more_remote_frees = more_remote_frees};
  CHECK((test.blocks = zk_malloc(STALE_BLOCKS * sizeof(void *))) != NULL);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, allocate_all_and_exit, &test) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  test.page = segment_lookup(test.blocks[0]);
  CHECK(test.page != NULL && page_owner(test.page) == NULL);
  CHECK(test.page->used == test.page->reserved); /* no free block */
  heap_t *owner_read = page_owner(test.page);    /* the free's first step */
  CHECK(pthread_barrier_init(&test.barrier, NULL, 2) == 0);
  CHECK(pthread_create(&thread, NULL, reclaim_then_allocate, &test) == 0);
  pthread_barrier_wait(&test.barrier);
  /* The rest of that free, as heap_free_remote_checked does it. */
  if (page_free_remote(test.page, (block_t *)test.blocks[0]) &&
      owner_read != NULL)
    atomic_store(&owner_read->remote_frees_to_full, 1);
  int freed = 1;
  if (more_remote_frees)
    for (int i = 1; i < STALE_BLOCKS; i++)
      if (segment_lookup(test.blocks[i]) == test.page) {
        zk_free(test.blocks[i]);
        test.blocks[i] = NULL;
        freed++;
      }
  pthread_barrier_wait(&test.barrier);
  CHECK(pthread_join(thread, NULL) == 0);
  printf("%zu B, %d blocks freed into a reclaimed full page, first with a "
         "stale owner: %s; its owner got %zu back\n",
         size, freed, more_remote_frees ? "more frees" : "decay pass",
         test.from_page);
  CHECK(test.from_page > 0);
  for (int i = 1; i < STALE_BLOCKS; i++)
    zk_free(test.blocks[i]);
  zk_free(test.blocks);
  pthread_barrier_destroy(&test.barrier);
}

static void test_stale_owner_remote_free(void) {
  stale_owner_case(48, true);
  stale_owner_case(80, false);
}

/* ---- RSS ---- */

/* Random 1 KB - 64 KB blocks, every byte written, until `total` bytes;
 * returns the RSS with all of them live, after freeing them. */
static size_t fill_touch_free(size_t total, uint64_t seed) {
  size_t capacity = total / 1024 + 1;
  void **blocks = zk_malloc(capacity * sizeof(void *));
  CHECK(blocks != NULL);
  size_t count = 0, bytes = 0;
  while (bytes < total) {
    size_t size = 1024 + (size_t)(random_next(&seed) % (63 * 1024 + 1));
    CHECK(count < capacity);
    void *p = zk_malloc(size);
    CHECK(p != NULL);
    memset(p, (int)(count | 1), size);
    blocks[count++] = p;
    bytes += size;
  }
  size_t peak = rss_now();
  for (size_t i = 0; i < count; i++)
    zk_free(blocks[i]);
  zk_free(blocks);
  return peak;
}

/* 512 MiB rather than more: every page is faulted in, at about 4 s per GiB
 * on a small virtual machine, and the ratio checked does not depend on the
 * total. */
static void test_rss_forced(void) {
  size_t base = rss_now();
  size_t peak = fill_touch_free((size_t)512 << 20, 1);
  zk_stats_t stats;
  zk_stats_get(&stats);
  size_t purged_before = stats.bytes_purged;
  zk_collect(true);
  zk_stats_get(&stats);
  printf("512 MiB of 1-64 KB blocks: rss %zu MiB before, %zu MiB at peak, "
         "%zu MiB after zk_collect(true)\n",
         base >> 20, peak >> 20, stats.rss >> 20);
  CHECK(peak > ((size_t)500 << 20));
  CHECK(stats.rss < peak / 10);
  CHECK(stats.bytes_purged > purged_before);
  CHECK_EQ(stats.bytes_live, 0);
}

static void test_rss_by_delay(void) {
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 100) == 0);
  size_t peak = fill_touch_free((size_t)200 << 20, 2);
  sleep_ms(350);
  /* No zk_collect: slow paths drive the purge. Large blocks of 20 slices
   * are never cached, so each allocation reaches the span layer. */
  for (int i = 0; i < 8; i++) {
    void *p = zk_malloc(20 * SLICE_SIZE - (size_t)i * 4096);
    CHECK(p != NULL);
    zk_free(p);
  }
  size_t after = rss_now();
  printf("200 MiB without zk_collect: rss %zu MiB at peak, %zu MiB 350 ms "
         "after the free\n",
         peak >> 20, after >> 20);
  CHECK(after < peak / 4);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 1000) == 0);
  zk_collect(true);
}

/* calloc of memory that was written, freed and purged reads as zero with
 * either purge method (MADV_FREE leaves contents undefined: zkmem must
 * clear). One block stays live so the segment stays mapped. */
static void test_calloc_after_purge(void) {
  for (long decommit = 1; decommit >= 0; decommit--) {
    CHECK(zk_option_set(ZK_OPTION_PURGE_DECOMMIT, decommit) == 0);
    const size_t size = 20 * SLICE_SIZE; /* not cached by the heap */
    void *keep = zk_malloc(size);
    void *dirty = zk_malloc(size);
    CHECK(keep && dirty);
    memset(dirty, 0xee, size);
    zk_free(dirty);
    zk_collect(true);
    unsigned char *p = zk_calloc(1, size);
    CHECK(p != NULL);
    for (size_t i = 0; i < size; i++)
      CHECK(p[i] == 0);
    zk_free(p);
    zk_free(keep);
  }
  CHECK(zk_option_set(ZK_OPTION_PURGE_DECOMMIT, 1) == 0);
  zk_collect(true);
}

/* Under mlockall the kernel refuses every purge (MADV_DONTNEED and
 * MADV_FREE fail with EINVAL on locked memory): a span zkmem could not
 * purge keeps its contents, and calloc must clear it. MCL_ONFAULT locks
 * pages as they are touched, so the owned-segment map's zero pages stay
 * untouched. Needs CAP_IPC_LOCK (root) or a high RLIMIT_MEMLOCK. */
static void calloc_under_mlockall(void) {
  struct rlimit unlimited = {RLIM_INFINITY, RLIM_INFINITY};
  setrlimit(RLIMIT_MEMLOCK, &unlimited);
  if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0) {
    printf("mlockall refused (%s)\n", strerror(errno));
    _exit(geteuid() == 0 ? 1 : 77);
  }
  /* 256 KiB goes through the heap's large cache, 1.25 MiB does not. */
  static const size_t sizes[] = {256 << 10, 20 * SLICE_SIZE};
  for (size_t i = 0; i < 2; i++) {
    void *keep = zk_malloc(sizes[i]); /* keeps the segment mapped */
    unsigned char *dirty = zk_malloc(sizes[i]);
    CHECK(keep && dirty);
    memset(dirty, 0xaa, sizes[i]);
    zk_free(dirty);
    int saved_errno = errno = EDOM;
    zk_collect(true);
    CHECK_EQ(errno, saved_errno); /* the refused purges left errno alone */
    unsigned char *p = zk_calloc(1, sizes[i]);
    CHECK(p != NULL);
    for (size_t j = 0; j < sizes[i]; j++)
      if (p[j] != 0) {
        printf("calloc(1, %zu) byte %zu is %#x\n", sizes[i], j, p[j]);
        _exit(1);
      }
    zk_free(p);
    zk_free(keep);
  }
  _exit(0);
}

static void test_calloc_after_refused_purge(void) {
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0)
    calloc_under_mlockall();
  int status;
  CHECK(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  if (WEXITSTATUS(status) == 77) {
    printf("skipped: mlockall needs root or RLIMIT_MEMLOCK\n");
    return;
  }
  CHECK_EQ(WEXITSTATUS(status), 0);
}

/* Freed large spans wait in their thread's cache; the purge of any thread
 * returns their memory after the purge delay, while the threads that
 * freed them keep running without allocating. They then reuse the spans,
 * which read as zero. */
#define DECAY_THREADS 8
#define DECAY_BLOCK   ((size_t)512 << 10)
static pthread_barrier_t decay_freed, decay_checked;

static void *free_large_and_idle(void *arg) {
  (void)arg;
  unsigned char *p = zk_malloc(DECAY_BLOCK);
  CHECK(p != NULL);
  memset(p, 0x77, DECAY_BLOCK);
  zk_free(p);
  pthread_barrier_wait(&decay_freed);
  pthread_barrier_wait(&decay_checked); /* idle, no allocation */
  unsigned char *again = zk_calloc(1, DECAY_BLOCK);
  CHECK(again == p); /* the cached span */
  for (size_t i = 0; i < DECAY_BLOCK; i++)
    CHECK(again[i] == 0);
  zk_free(again);
  return NULL;
}

static void test_large_cache_decays(void) {
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 50) == 0);
  zk_collect(true);
  pthread_t threads[DECAY_THREADS];
  CHECK(pthread_barrier_init(&decay_freed, NULL, DECAY_THREADS + 1) == 0);
  CHECK(pthread_barrier_init(&decay_checked, NULL, DECAY_THREADS + 1) == 0);
  for (int i = 0; i < DECAY_THREADS; i++)
    CHECK(pthread_create(&threads[i], NULL, free_large_and_idle, NULL) == 0);
  pthread_barrier_wait(&decay_freed);
  zk_stats_t stats;
  zk_stats_get(&stats);
  size_t cached_rss = stats.rss, cached_committed = stats.bytes_committed;
  sleep_ms(200); /* four delays */
  zk_collect(false);
  zk_stats_get(&stats);
  printf("%d threads' freed 512 KiB blocks: rss %zu KiB, committed %zu KiB; "
         "after the delay rss %zu KiB, committed %zu KiB\n",
         DECAY_THREADS, cached_rss >> 10, cached_committed >> 10,
         stats.rss >> 10, stats.bytes_committed >> 10);
  size_t cached = DECAY_THREADS * DECAY_BLOCK;
  CHECK(cached_rss > stats.rss && cached_rss - stats.rss >= cached * 3 / 4);
  CHECK(cached_committed - stats.bytes_committed >= cached);
  pthread_barrier_wait(&decay_checked);
  for (int i = 0; i < DECAY_THREADS; i++)
    CHECK(pthread_join(threads[i], NULL) == 0);
  pthread_barrier_destroy(&decay_freed);
  pthread_barrier_destroy(&decay_checked);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 1000) == 0);
  zk_collect(true);
}

/* ZKMEM_LIMIT: mapped memory stays under the limit; free memory goes back
 * before an allocation is refused, and allocation works again once blocks
 * are freed. */
static void test_process_limit(void) {
  zk_collect(true);
  zk_stats_t stats;
  zk_stats_get(&stats);
  size_t limit = stats.bytes_mapped + ((size_t)64 << 20);
  CHECK(zk_option_set(ZK_OPTION_LIMIT, (long)limit) == 0);
  static void *blocks[4096];
  size_t count = 0;
  for (; count < 4096; count++) {
    size_t size =
        count % 3 == 0 ? (size_t)3 << 20 : (size_t)(count % 5 + 1) << 16;
    blocks[count] = zk_malloc(size);
    if (blocks[count] == NULL)
      break;
    memset(blocks[count], 1, 4096);
  }
  CHECK_EQ(errno, ENOMEM);
  zk_stats_get(&stats);
  CHECK(stats.bytes_mapped <= limit);
  CHECK(count > 10);
  /* Freed memory is returned first, then serves the next allocation. */
  for (size_t i = 0; i < count; i += 2)
    zk_free(blocks[i]);
  void *again = zk_malloc((size_t)3 << 20);
  CHECK(again != NULL);
  zk_free(again);
  CHECK(zk_malloc((size_t)1 << 30) == NULL && errno == ENOMEM);
  for (size_t i = 1; i < count; i += 2)
    zk_free(blocks[i]);
  printf("ZKMEM_LIMIT of 64 MiB over the start: %zu blocks, then ENOMEM, %zu "
         "MiB mapped at most\n",
         count, stats.bytes_mapped >> 20);
  CHECK(zk_option_set(ZK_OPTION_LIMIT, 0) == 0);
  zk_collect(true);
}

/* ---- realloc of huge blocks ---- */

/* 64-bit words that depend on their index only: blocks that move keep
 * them. Written and checked word by word, so 100 MB takes milliseconds. */
static void fill_words(void *p, size_t from, size_t to, uint64_t seed) {
  uint64_t *words = p;
  for (size_t i = from / 8; i < to / 8; i++)
    words[i] = (i * 0x9e3779b97f4a7c15ull) ^ seed;
}

static int verify_words(const void *p, size_t from, size_t to, uint64_t seed) {
  const uint64_t *words = p;
  for (size_t i = from / 8; i < to / 8; i++)
    if (words[i] != ((i * 0x9e3779b97f4a7c15ull) ^ seed))
      return 0;
  return 1;
}

static void test_realloc_huge(void) {
  const size_t mb = (size_t)1 << 20;
  size_t size = 100 * mb;
  uint8_t *p = zk_malloc(size);
  CHECK(p != NULL);
  fill_words(p, 0, size, 7);
  /* Growth: the old contents stay, and marks written in the grown part
   * (one word per MiB: faulting in every page would cost seconds) survive
   * the next growth too. */
  for (size_t grown = 200 * mb; grown <= 300 * mb; grown += 100 * mb) {
    p = zk_realloc(p, grown);
    CHECK(p != NULL);
    CHECK(zk_usable_size(p) >= grown);
    CHECK(verify_words(p, 0, 100 * mb, 7));
    for (size_t at = 100 * mb; at < size; at += mb)
      CHECK(*(uint64_t *)(p + at) == at);
    for (size_t at = size; at < grown; at += mb)
      *(uint64_t *)(p + at) = at;
    size = grown;
  }
  /* Shrinking: to 150 MB (the mapping is trimmed), to 1 MB (a large
   * block), to 100 KiB, and back up to a huge block. */
  static const size_t shrinks[] = {150 << 20, 1 << 20, 100 << 10, 3 << 20};
  size_t kept = 100 * mb;
  for (size_t i = 0; i < sizeof(shrinks) / sizeof(shrinks[0]); i++) {
    p = zk_realloc(p, shrinks[i]);
    CHECK(p != NULL);
    CHECK(zk_usable_size(p) >= shrinks[i]);
    if (shrinks[i] < kept)
      kept = shrinks[i];
    CHECK(verify_words(p, 0, kept, 7));
    if (i == 0)
      CHECK(*(uint64_t *)(p + 149 * mb) == 149 * mb);
  }
  zk_free(p);

  /* A large block grows into a huge one and back. */
  size = 100 << 10;
  p = zk_malloc(size);
  CHECK(p != NULL);
  fill_words(p, 0, size, 9);
  static const size_t steps[] = {1 << 20, 2 << 20, 5 << 20, 70 << 10};
  for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
    p = zk_realloc(p, steps[i]);
    CHECK(p != NULL);
    CHECK(zk_usable_size(p) >= steps[i]);
    size_t check = steps[i] < size ? steps[i] : size;
    CHECK(verify_words(p, 0, check, 9));
  }
  zk_free(p);

  /* A move: the old range leaves the owned map before mremap unmaps it. */
  mremap_refuse_in_place = 1;
  int moves = mremap_moves;
  p = zk_malloc(8 * mb);
  CHECK(p != NULL);
  fill_words(p, 0, 8 * mb, 11);
  p = zk_realloc(p, 64 * mb);
  CHECK(p != NULL);
  CHECK(verify_words(p, 0, 8 * mb, 11));
  CHECK(mremap_moves > moves);
  CHECK_EQ(mremap_moves_still_owned, 0);
  CHECK(zk_usable_size(p) >= 64 * mb);
  zk_free(p);

  /* Moves in 4 MiB steps land at addresses of every colour (bits 22-23,
   * segment_pages): the descriptors move with the header to where the new
   * address looks for them. */
  p = zk_malloc(4 * mb);
  CHECK(p != NULL);
  fill_words(p, 0, 4 * mb, 13);
  int colour_changes = 0;
  for (size = 8 * mb; size <= 40 * mb; size += 4 * mb) {
    uintptr_t colour_before = segment_slice_offset(segment_of(p));
    p = zk_realloc(p, size);
    CHECK(p != NULL);
    colour_changes += segment_slice_offset(segment_of(p)) != colour_before;
    page_t *page = segment_lookup(p);
    CHECK(page != NULL && page_kind(page) == PAGE_HUGE && page->start == p);
    CHECK(zk_usable_size(p) >= size);
    CHECK(verify_words(p, 0, 4 * mb, 13));
  }
  printf("9 moves of a huge block, %d to another descriptor colour\n",
         colour_changes);
  zk_free(p);
  mremap_refuse_in_place = 0;
  zk_collect(true);
}

/* Freed huge blocks keep their pages for later huge blocks: a smaller one
 * splits a freed mapping, a larger one is assembled from several by moving
 * their pages, and neither faults the reused pages in again. calloc gets
 * fresh pages (zero without clearing); the purge delay and zk_collect
 * return the rest. */
static long minor_faults(void) {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

static void test_huge_reuse(void) {
  const size_t mb = (size_t)1 << 20;
  zk_collect(true);
  zk_stats_t stats;
  zk_stats_get(&stats);
  size_t mapped_before = stats.bytes_mapped;
  uint8_t *a = zk_malloc(20 * mb), *b = zk_malloc(10 * mb);
  CHECK(a && b);
  memset(a, 0xa1, 20 * mb);
  memset(b, 0xb2, 10 * mb);
  zk_free(a);
  zk_free(b);
  /* Split: 12 MiB from the 20 MiB mapping. */
  long faults = minor_faults();
  uint8_t *c = zk_malloc(12 * mb);
  CHECK(c != NULL);
  memset(c, 0xc3, 12 * mb);
  long split_faults = minor_faults() - faults;
  /* Assembled: 22 MiB from what is left. The split took whole page
   * tables' reach (2 MiB) of a's mapping, 14 MiB; its rest gives 6 MiB and
   * b's mapping 10 MiB and its last 64 KiB, all pages a block touched, and
   * 6 MiB are fresh. A mapping ends at the page after its block, so the
   * pieces' pages come first in the block and the fresh ones after, with
   * no untouched page among them (with mappings rounded to whole
   * segments, the untouched ends of both fell inside the block: 2,034
   * faults). */
  faults = minor_faults();
  uint8_t *d = zk_malloc(22 * mb);
  CHECK(d != NULL);
  static unsigned char resident[(22 << 20) / 4096];
  CHECK(mincore(d, 22 * mb, resident) == 0);
  size_t prefix = 0;
  while (prefix < 22 * mb / 4096 && (resident[prefix] & 1))
    prefix++;
  size_t resident_after = 0;
  for (size_t i = prefix; i < 22 * mb / 4096; i++)
    resident_after += resident[i] & 1;
  memset(d, 0xd4, 22 * mb);
  long assembled_faults = minor_faults() - faults;
  printf("huge blocks from freed mappings: %ld faults for 12 MiB (3072 "
         "pages), %ld for 22 MiB (5632 pages); the 22 MiB one's first %zu "
         "pages resident, %zu after them\n",
         split_faults, assembled_faults, prefix, resident_after);
  CHECK(split_faults < 64);
  CHECK(prefix >= 16 * mb / 4096 && resident_after == 0);
  CHECK(assembled_faults < 6 * 256 + 64);
  CHECK(zk_usable_size(c) >= 12 * mb && zk_usable_size(d) >= 22 * mb);
  CHECK(c[0] == 0xc3 && c[12 * mb - 1] == 0xc3);
  CHECK(d[0] == 0xd4 && d[22 * mb - 1] == 0xd4);
  zk_free(c);
  /* calloc: zero, whatever the pieces held. */
  uint8_t *zeroed = zk_calloc(1, 9 * mb);
  CHECK(zeroed != NULL);
  for (size_t i = 0; i < 9 * mb; i += 4096)
    CHECK(zeroed[i] == 0 && zeroed[i + 4095] == 0);
  zk_free(zeroed);
  zk_free(d);
  /* The delay returns the pieces. */
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 50) == 0);
  sleep_ms(120);
  zk_collect(false);
  zk_stats_get(&stats);
  CHECK_EQ(stats.bytes_mapped, mapped_before);
  CHECK_EQ(stats.huge_live, 0);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 1000) == 0);
}

static size_t bytes_mapped_now(void) {
  zk_stats_t stats;
  zk_stats_get(&stats);
  return stats.bytes_mapped;
}

/* Maps `count` blocks of `size` into `blocks`, then frees them all. */
static void huge_blocks_churn(uint8_t **blocks, int count, size_t size) {
  for (int i = 0; i < count; i++)
    CHECK((blocks[i] = zk_malloc(size)) != NULL);
  for (int i = 0; i < count; i++)
    zk_free(blocks[i]);
}

/* Freed huge mappings stay cached up to the bytes of huge blocks still
 * live: at least 128 MiB, more while more is live. */
static void test_huge_cache_follows_live(void) {
  const size_t mb = (size_t)1 << 20;
  enum { COUNT = 20, LIVE = 24 };
  uint8_t *blocks[COUNT], *live[LIVE];
  zk_collect(true);
  size_t before = bytes_mapped_now();
  huge_blocks_churn(blocks, COUNT, 10 * mb);
  size_t cached_alone = bytes_mapped_now() - before;
  zk_collect(true);
  CHECK_EQ(bytes_mapped_now(), before);
  for (int i = 0; i < LIVE; i++)
    CHECK((live[i] = zk_malloc(10 * mb)) != NULL);
  size_t with_live = bytes_mapped_now();
  huge_blocks_churn(blocks, COUNT, 10 * mb);
  size_t cached_beside = bytes_mapped_now() - with_live;
  printf("20 freed 10 MiB blocks keep %zu MiB mapped alone, %zu MiB beside "
         "%d live ones\n",
         cached_alone >> 20, cached_beside >> 20, LIVE);
  CHECK(cached_alone >= 100 * mb && cached_alone <= 128 * mb);
  CHECK(cached_beside > 128 * mb && cached_beside <= with_live - before);
  for (int i = 0; i < LIVE; i++)
    zk_free(live[i]);
  zk_collect(true);
  CHECK_EQ(bytes_mapped_now(), before);
}

/* The probe of whether one mremap call moves a range of several mappings
 * agrees with what such a move does. */
static void test_os_moves_mappings(void) {
  const size_t page = 4096;
  uint8_t *area = mmap(NULL, 8 * page, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(area != MAP_FAILED);
  area[0] = 1;
  area[2 * page] = 3;
  CHECK(madvise(area + page, page, MADV_DONTFORK) == 0); /* three mappings */
  bool moved = os_move_to(area, 3 * page, area + 4 * page);
  printf("one mremap moves a range of several mappings: %s (probe: %s)\n",
         moved ? "yes" : "no", os_moves_mappings() ? "yes" : "no");
  CHECK(moved == os_moves_mappings());
  if (moved)
    CHECK(area[4 * page] == 1 && area[6 * page] == 3);
  munmap(area, 8 * page);
}

/* A block assembled from several freed mappings is several kernel
 * mappings side by side. Where the kernel moves such a range in one call
 * (Linux 6.17 on), a growing realloc moves its pages instead of copying
 * them into fresh ones (which faults every page in again); before, it is
 * copied, and its mapping is never cached (os_moves_mappings). */
static void test_huge_assembled_grows(void) {
  const size_t mb = (size_t)1 << 20;
  zk_collect(true);
  size_t before = bytes_mapped_now();
  uint8_t *a = zk_malloc(20 * mb), *b = zk_malloc(10 * mb);
  CHECK(a && b);
  memset(a, 0xa1, 20 * mb);
  memset(b, 0xb2, 10 * mb);
  zk_free(a);
  zk_free(b);
  uint8_t *d = zk_malloc(30 * mb); /* no single piece holds it */
  CHECK(d != NULL);
  memset(d, 0xd4, 30 * mb);
  long faults = minor_faults();
  uint8_t *grown = zk_realloc(d, 40 * mb);
  long grow_faults = minor_faults() - faults;
  CHECK(grown != NULL);
  faults = minor_faults();
  uint8_t *moved = zk_realloc(grown, 60 * mb);
  long move_faults = minor_faults() - faults;
  CHECK(moved != NULL);
  printf("an assembled 30 MiB block grown to 40 MiB: %ld faults; to 60 MiB: "
         "%ld faults (a copy: 7680)\n",
         grow_faults, move_faults);
  if (os_moves_mappings())
    CHECK(grow_faults < 1000 && move_faults < 1000);
  for (size_t i = 0; i < 30 * mb; i += 4096)
    CHECK(moved[i] == 0xd4 && moved[i + 4095] == 0xd4);
  memset(moved + 30 * mb, 0x11, 30 * mb);
  zk_free(moved);
  zk_collect(true);
  CHECK_EQ(bytes_mapped_now(), before);
}

/* Two freed mappings side by side in memory are one piece of the cache:
 * a block larger than either is then the pair, in place, where kept apart
 * it was assembled by moving both into a fresh range. It is several
 * kernel mappings, and grows and keeps its bytes as such a block must. */
static void test_huge_neighbours_join(void) {
  const size_t mb = (size_t)1 << 20;
  zk_collect(true);
  size_t before = bytes_mapped_now();
  /* A mapping is the block's header slice and its pages: 16 MiB. */
  const size_t header = (size_t)64 << 10;
  uint8_t *whole = zk_malloc(16 * mb - header);
  CHECK(whole != NULL);
  zk_free(whole);
  /* 8 MiB mappings each: the front of the piece, then the rest of it. */
  uint8_t *front = zk_malloc(8 * mb - header),
          *back = zk_malloc(8 * mb - header);
  CHECK(front != NULL && back != NULL);
  CHECK(front == whole && back == whole + 8 * mb);
  memset(front, 0xf1, 6 * mb);
  memset(back, 0xb1, 6 * mb);
  zk_free(back);
  zk_free(front);
  uint8_t *joined = zk_malloc(14 * mb);
  CHECK(joined != NULL);
  printf("a 14 MiB block after two 8 MiB neighbours were freed: %s\n",
         joined == front ? "the pair, in place" : "elsewhere");
  if (os_moves_mappings()) {
    CHECK(joined == front);
    CHECK(joined[0] == 0xf1 && joined[8 * mb] == 0xb1); /* the same pages */
  }
  memset(joined, 0x3c, 14 * mb);
  uint8_t *grown = zk_realloc(joined, 40 * mb);
  CHECK(grown != NULL);
  for (size_t i = 0; i < 14 * mb; i += 4096)
    CHECK(grown[i] == 0x3c && grown[i + 4095] == 0x3c);
  zk_free(grown);
  zk_collect(true);
  CHECK_EQ(bytes_mapped_now(), before);
}

/* A piece is not joined with its neighbour into one too large for the
 * cache: freed while the cache's limit is low, the neighbour goes back to
 * the OS alone, and the cached piece stays (joined, both were unmapped). */
static void test_huge_join_within_limit(void) {
  const size_t mb = (size_t)1 << 20;
  zk_collect(true);
  size_t before = bytes_mapped_now();
  /* Live blocks aligned to a whole segment are never cached: they raise the
   * cache's limit (the huge bytes live) while the pieces are made. */
  enum { LIVE = 10 };
  void *live[LIVE];
  for (int i = 0; i < LIVE; i++)
    CHECK((live[i] = zk_aligned_alloc(4 * mb, 40 * mb)) != NULL);
  const size_t header = (size_t)64 << 10;        /* a block's header slice */
  uint8_t *whole = zk_malloc(192 * mb - header); /* a 192 MiB mapping */
  CHECK(whole != NULL);
  zk_free(whole);
  uint8_t *front = zk_malloc(96 * mb - header),
          *back = zk_malloc(96 * mb - header);
  CHECK(front == whole && back == whole + 96 * mb);
  front[0] = back[0] = 1;
  zk_free(front); /* cached: 96 MiB */
  for (int i = 0; i < LIVE; i++)
    zk_free(live[i]); /* the limit falls to its floor, 128 MiB */
  zk_free(back);      /* over half the limit: unmapped, alone */
  size_t kept = bytes_mapped_now() - before;
  printf("a 96 MiB piece beside a freed 96 MiB block over half the limit: "
         "%zu MiB still mapped\n",
         kept / mb);
  CHECK(kept >= 96 * mb);
  zk_collect(true);
  CHECK_EQ(bytes_mapped_now(), before);
}

/* A cache out of entries (32 pieces) but not of bytes drops its smallest
 * piece, not its oldest: 31 freed 4 MiB mappings after a freed 40 MiB
 * one, then one more, unmap a 4 MiB piece (oldest first unmapped the 40
 * MiB one, which holds ten times the pages). Live blocks between the
 * freed ones keep them from joining; live blocks aligned to a segment
 * (never cached) raise the cache's limit above the pieces' bytes. */
static void test_huge_cache_out_of_entries(void) {
  const size_t mb = (size_t)1 << 20, header = (size_t)64 << 10;
  enum { SMALL = 32 };
  zk_collect(true);
  long delay = zk_option_get(ZK_OPTION_PURGE_DELAY_MS);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 600000) == 0);
  void *raise = zk_aligned_alloc(4 * mb, 100 * mb);
  uint8_t *big = zk_malloc(40 * mb - header);
  void *after_big = zk_malloc(4 * mb - header);
  void *small[SMALL], *spacer[SMALL];
  CHECK(raise != NULL && big != NULL && after_big != NULL);
  for (int i = 0; i < SMALL; i++) {
    small[i] = zk_malloc(4 * mb - header);
    spacer[i] = zk_malloc(4 * mb - header);
    CHECK(small[i] != NULL && spacer[i] != NULL);
  }
  zk_free(big);
  for (int i = 0; i < SMALL - 1; i++)
    zk_free(small[i]);
  size_t full = bytes_mapped_now();
  zk_free(small[SMALL - 1]);
  size_t unmapped = full - bytes_mapped_now();
  printf("a 33rd piece in a full huge cache unmapped %zu MiB\n", unmapped / mb);
  CHECK_EQ(unmapped, 4 * mb);
  zk_free(after_big);
  for (int i = 0; i < SMALL; i++)
    zk_free(spacer[i]);
  zk_free(raise);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, delay) == 0);
  zk_collect(true);
}

static size_t kernel_mappings(void) {
  FILE *maps = fopen("/proc/self/maps", "r");
  CHECK(maps != NULL);
  size_t lines = 0;
  for (int c; (c = fgetc(maps)) != EOF;)
    lines += c == '\n';
  fclose(maps);
  return lines;
}

/* Pieces of freed mappings, split and moved side by side over and over,
 * must still give blocks that a growing realloc extends a segment at a
 * time: a block assembled from several moved pieces is several kernel
 * mappings, which mremap cannot move, and a split remainder that starts
 * off a segment boundary cannot take a header. Growing one block page by
 * page after such churn must move it rarely, and keep its bytes. Pieces
 * are cut only at a page table's reach: cut at any page, the churn left
 * them in ever more kernel mappings, each moved page by page. */
static void test_huge_churn_then_grow(void) {
  const size_t mb = (size_t)1 << 20, page = 4096;
  zk_collect(true);
  size_t before = bytes_mapped_now();
  enum { SLOTS = 12 };
  uint8_t *slots[SLOTS] = {0};
  size_t sizes[SLOTS] = {0};
  uint32_t seed = 12345;
  size_t mappings_before = kernel_mappings();
  for (int step = 0; step < 3000; step++) {
    seed = seed * 1103515245u + 12345u;
    unsigned slot = (seed >> 16) % SLOTS;
    if (slots[slot] != NULL) {
      CHECK(slots[slot][0] == (uint8_t)slot &&
            slots[slot][sizes[slot] - 1] == (uint8_t)slot);
      zk_free(slots[slot]);
    }
    seed = seed * 1103515245u + 12345u;
    /* 2-14 MiB and a few pages: never a whole number of segments. */
    sizes[slot] = 2 * mb + ((seed >> 8) % (12 * mb / page)) * page + 100;
    slots[slot] = zk_malloc(sizes[slot]);
    CHECK(slots[slot] != NULL);
    CHECK(((uintptr_t)slots[slot] & 15) == 0);
    slots[slot][0] = slots[slot][sizes[slot] - 1] = (uint8_t)slot;
    slots[slot][sizes[slot] / 2] = (uint8_t)slot;
  }
  size_t mappings = kernel_mappings() - mappings_before;
  printf("12 huge blocks replaced 3,000 times: %zu kernel mappings more\n",
         mappings);
  CHECK(mappings < 200);
  for (int i = 0; i < SLOTS; i += 2) { /* leave pieces of every shape */
    zk_free(slots[i]);
    slots[i] = NULL;
  }
  size_t size = 3 * mb + 123;
  uint8_t *grown = zk_malloc(size);
  CHECK(grown != NULL);
  memset(grown, 0x5a, size);
  unsigned moves = 0;
  while (size < 16 * mb) {
    size_t next = size + page;
    uint8_t *p = zk_realloc(grown, next);
    CHECK(p != NULL);
    CHECK(p[0] == 0x5a && p[size - 1] == 0x5a && p[size / 2] == 0x5a);
    memset(p + size, 0x5a, next - size);
    moves += p != grown;
    grown = p;
    size = next;
  }
  printf("grown 3 to 16 MiB a page at a time after churn: moved %u times\n",
         moves);
  CHECK(moves <= 8);
  for (size_t i = 0; i < size; i += page)
    CHECK(grown[i] == 0x5a);
  zk_free(grown);
  for (int i = 0; i < SLOTS; i++)
    if (slots[i] != NULL) {
      CHECK(slots[i][0] == (uint8_t)i && slots[i][sizes[i] / 2] == (uint8_t)i &&
            slots[i][sizes[i] - 1] == (uint8_t)i);
      zk_free(slots[i]);
    }
  zk_collect(true);
  CHECK_EQ(bytes_mapped_now(), before);
}

/* A piece the program split (madvise of part of its block): before 6.12 a
 * failed move unmaps its destination (the old-mremap shim does too). */
static void test_huge_split_by_program(void) {
  const size_t mb = (size_t)1 << 20;
  zk_collect(true);
  uint8_t *a = zk_malloc(20 * mb), *b = zk_malloc(10 * mb);
  CHECK(a != NULL && b != NULL);
  memset(a, 0xa1, 20 * mb);
  memset(b, 0xb2, 10 * mb);
  CHECK(madvise(b + 2 * mb, 64 << 10, MADV_DONTDUMP) == 0); /* 3 mappings */
  zk_free(a);
  zk_free(b);
  uint8_t *d = zk_malloc(30 * mb); /* assembled: a's piece, then b's */
  CHECK(d != NULL);
  static unsigned char resident[(32 << 20) / 4096];
  /* The block and its header slice: no hole. */
  CHECK(mincore(segment_of(d), 30 * mb + (64 << 10), resident) == 0);
  zk_free(d);
  zk_collect(true);
}

/* ZKMEM_LIMIT: 1 MiB aligned to 256 MiB maps 8 MiB; 64 MiB of room. */
static void test_limit_aligned_huge(void) {
  const size_t mb = (size_t)1 << 20;
  zk_collect(true);
  size_t limit = bytes_mapped_now() + 64 * mb;
  CHECK(zk_option_set(ZK_OPTION_LIMIT, (long)limit) == 0);
  void *p = zk_aligned_alloc(256 * mb, 1 * mb);
  size_t mapped = bytes_mapped_now();
  zk_free(p);
  CHECK(zk_option_set(ZK_OPTION_LIMIT, 0) == 0);
  CHECK(p != NULL);
  CHECK(mapped <= limit);
}

/* A piece between two live blocks of one mapping, released at
 * vm.max_map_count: munmap (a 3-way split) fails with ENOMEM. */
static void test_huge_piece_release_refused(void) {
  const size_t mb = (size_t)1 << 20;
  enum { SPARES = 300000 };
  static void *spares[SPARES];
  static unsigned char resident[2048];
  zk_collect(true);
  size_t before = bytes_mapped_now();
  (void)os_moves_mappings(); /* probed before the map count is full */
  const size_t header = (size_t)64 << 10;       /* a block's header slice */
  uint8_t *whole = zk_malloc(24 * mb - header); /* one 24 MiB mapping */
  zk_free(whole);
  uint8_t *b = zk_malloc(8 * mb - header), *c = zk_malloc(8 * mb - header);
  uint8_t *d = zk_malloc(8 * mb - header);
  CHECK(b == whole && c == whole + 8 * mb && d == whole + 16 * mb);
  void *c_mapping = segment_of(c);
  zk_free(c);
  size_t count = 0;
  while (count < SPARES &&
         (spares[count] = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
                               MAP_SHARED | MAP_ANONYMOUS, -1, 0)) !=
             MAP_FAILED)
    count++;
  if (count == SPARES)
    return;         /* vm.max_map_count too high to reach: skipped */
  zk_collect(true); /* releases c's piece: munmap refused */
  bool still_mapped = mincore(c_mapping, 8 * mb, resident) == 0;
  size_t counted = bytes_mapped_now() - before;
  for (size_t i = 0; i < count; i++)
    munmap(spares[i], 4096);
  zk_free(b);
  zk_free(d);
  zk_collect(true);
  printf("piece kept mapped: %d, counted %zu MiB with 16 live; at the end "
         "mapped: %d, counted %zu MiB\n",
         still_mapped, counted / mb, mincore(c_mapping, 8 * mb, resident) == 0,
         (bytes_mapped_now() - before) / mb);
  CHECK(!still_mapped || counted >= 24 * mb);
}

/* Aligned large and huge blocks: alignments above a slice get a mapping of
 * their own at that offset. */
static void test_aligned_large(void) {
  static const size_t alignments[] = {4096,      32 << 10, 64 << 10,
                                      128 << 10, 1 << 20,  2 << 20};
  static const size_t sizes[] = {100, 40 << 10, 100 << 10, 3 << 20};
  for (size_t a = 0; a < sizeof(alignments) / sizeof(alignments[0]); a++) {
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
      void *p = zk_aligned_alloc(alignments[a], sizes[s]);
      CHECK(p != NULL);
      CHECK(((uintptr_t)p & (alignments[a] - 1)) == 0);
      CHECK(zk_usable_size(p) >= sizes[s]);
      memset(p, 0x11, sizes[s]);
      zk_free(p);
    }
  }
}

/* ---- huge pages ---- */

static void test_huge_pages(void) {
  zk_collect(true);
  zk_stats_t stats;
  zk_stats_get(&stats);
  /* Mode 0 until now: nothing was asked to be huge-page backed. */
  CHECK_EQ(stats.bytes_huge_pages, 0);
  CHECK_EQ(stats.segments_mapped, 0);

  for (long mode = 1; mode <= 2; mode++) {
    CHECK(zk_option_set(ZK_OPTION_HUGE_PAGES, mode) == 0);
    CHECK_EQ(zk_option_get(ZK_OPTION_HUGE_PAGES), mode);
    /* Small, large and huge blocks: each works whatever the system gives
     * (MAP_HUGETLB fails without reserved pages; then plain pages). */
    void *small = zk_malloc(100);
    void *large = zk_malloc(300 << 10);
    size_t huge_size = (size_t)8 << 20;
    uint8_t *huge = zk_malloc(huge_size);
    CHECK(small && large && huge);
    memset(small, 1, 100);
    memset(large, 2, 300 << 10);
    fill_words(huge, 0, huge_size, 3);
    zk_stats_get(&stats);
    printf("huge pages mode %ld: %zu of %zu mapped bytes asked to be "
           "huge-page backed\n",
           mode, stats.bytes_huge_pages, stats.bytes_mapped);
    /* Each mapping counts fully or not at all. */
    CHECK(stats.bytes_huge_pages <= stats.bytes_mapped);
    CHECK(stats.bytes_huge_pages % SEGMENT_SIZE == 0);
    /* Growth of a huge block keeps its contents whether or not it can be
     * remapped. */
    huge = zk_realloc(huge, 3 * huge_size);
    CHECK(huge != NULL);
    CHECK(verify_words(huge, 0, huge_size, 3));
    zk_free(huge);
    zk_free(large);
    zk_free(small);
    zk_collect(true);
    zk_stats_get(&stats);
    CHECK_EQ(stats.segments_mapped, 0);
    CHECK_EQ(stats.bytes_huge_pages, 0);
  }
  CHECK(zk_option_set(ZK_OPTION_HUGE_PAGES, ZK_HUGE_PAGES_OFF) == 0);
}

/* Whether the VmFlags of the mapping holding `address` in /proc/self/smaps
 * has `flag` (hg: MADV_HUGEPAGE, nh: MADV_NOHUGEPAGE); -1 when the mapping
 * is not found. */
static int mapping_has_flag(const void *address, const char *flag) {
  FILE *smaps = fopen("/proc/self/smaps", "r");
  CHECK(smaps != NULL);
  char line[512];
  bool inside = false;
  int found = -1;
  while (found < 0 && fgets(line, sizeof(line), smaps) != NULL) {
    unsigned long start, end;
    if (sscanf(line, "%lx-%lx ", &start, &end) == 2 && line[0] != 'V') {
      inside = (uintptr_t)address >= start && (uintptr_t)address < end;
    } else if (inside && strncmp(line, "VmFlags:", 8) == 0) {
      char padded[520], wanted[8];
      snprintf(padded, sizeof(padded), "%s ", line + 8);
      padded[strcspn(padded, "\n")] = ' ';
      snprintf(wanted, sizeof(wanted), " %s ", flag);
      found = strstr(padded, wanted) != NULL;
    }
  }
  fclose(smaps);
  return found;
}

/* The transparent huge page setting, "madvise" here: only there does the
 * dense mode advise. */
static bool thp_madvise(void) {
  FILE *setting = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  char text[128] = "";
  if (setting != NULL) {
    if (fgets(text, sizeof(text), setting) == NULL)
      text[0] = '\0';
    fclose(setting);
  }
  return strstr(text, "[madvise]") != NULL;
}

/* 1000 B blocks from the calling thread's heap while they come from the
 * segment of the first, up to all of it. */
#define DENSE_MAX 8192
static void *dense_blocks[DENSE_MAX];
static int dense_count;

static segment_t *dense_fill(void) {
  dense_count = 0;
  segment_t *segment = NULL;
  while (dense_count < DENSE_MAX) {
    void *p = zk_malloc(1000);
    CHECK(p != NULL);
    if (segment == NULL)
      segment = segment_of(p);
    if (segment_of(p) != segment) {
      zk_free(p);
      break;
    }
    memset(p, 0x3c, 1000);
    dense_blocks[dense_count++] = p;
  }
  CHECK(dense_count < DENSE_MAX);
  return segment;
}

static bool all_bytes_are(const void *p, size_t size, uint8_t value) {
  for (size_t i = 0; i < size; i++)
    if (((const uint8_t *)p)[i] != value)
      return false;
  return true;
}

/* Frees all blocks but the first, then purges every free span. */
static void dense_release(void) {
  for (int i = 1; i < dense_count; i++)
    zk_free(dense_blocks[i]);
  zk_collect(true);
}

static size_t huge_bytes_now(void) {
  zk_stats_t stats;
  zk_stats_get(&stats);
  return stats.bytes_huge_pages;
}

/* Halves of `segment` advised, checked against the statistics and the
 * kernel's flags. */
static int dense_halves_advised(segment_t *segment) {
  int advised = 0;
  for (int half = 0; half < 2; half++) {
    uint8_t *start = (uint8_t *)segment + half * (SEGMENT_SIZE / 2);
    bool huge = segment->half_advised[half];
    advised += huge;
    CHECK_EQ(mapping_has_flag(start, "hg"), huge);
  }
  CHECK_EQ(huge_bytes_now(), (size_t)advised * (SEGMENT_SIZE / 2));
  return advised;
}

/* Resident OS pages of [start, start + size). */
static size_t resident_pages(const void *start, size_t size) {
  static unsigned char vector[SEGMENT_SIZE / 4096];
  CHECK(size / 4096 <= sizeof(vector));
  CHECK(mincore((void *)start, size, vector) == 0);
  size_t resident = 0;
  for (size_t i = 0; i < size / 4096; i++)
    resident += vector[i] & 1;
  return resident;
}

/* The purge pass, which gives and withdraws the advice. */
static void dense_review(void) {
  zk_collect(false);
}

/* Each in a thread of its own, whose heap starts in a fresh segment. */
static void *dense_cycles(void *unused) {
  (void)unused;
  segment_t *segment = dense_fill();
  dense_review();
  CHECK_EQ(dense_halves_advised(segment), 2);
  void *first = dense_blocks[0];
  CHECK(all_bytes_are(first, 1000, 0x3c));

  /* Purged in part: advice withdrawn, the pages returned. */
  dense_release();
  CHECK_EQ(dense_halves_advised(segment), 0);
  for (int half = 0; half < 2; half++)
    CHECK_EQ(
        mapping_has_flag((uint8_t *)segment + half * (SEGMENT_SIZE / 2), "nh"),
        1);
  CHECK_EQ(
      resident_pages((uint8_t *)segment + SEGMENT_SIZE / 2, SEGMENT_SIZE / 2),
      0);
  CHECK(all_bytes_are(first, 1000, 0x3c));

  /* Dense again at once: not advised within four purge delays of the
   * withdrawal; after them, advised at the next pass, with no carving
   * since. */
  CHECK(dense_fill() == segment);
  dense_review();
  CHECK_EQ(dense_halves_advised(segment), 0);
  sleep_ms(4 * zk_option_get(ZK_OPTION_PURGE_DELAY_MS) + 50);
  dense_review();
  CHECK_EQ(dense_halves_advised(segment), 2);
  for (int i = 0; i < dense_count; i++)
    CHECK(all_bytes_are(dense_blocks[i], 1000, 0x3c));

  /* The blocks freed, the pages back in the segment and not yet purged:
   * no longer dense, the advice goes at the next pass. */
  for (int i = 1; i < dense_count; i++)
    zk_free(dense_blocks[i]);
  dense_review();
  CHECK_EQ(dense_halves_advised(segment), 0);
  zk_collect(true);
  zk_free(dense_blocks[0]);
  zk_free(first);
  return NULL;
}

/* A block of each class up to 4 KiB: a half of pages begun, hardly
 * carved, is not advised. */
static void *dense_sparse(void *unused) {
  (void)unused;
  static void *blocks[4096 / 16];
  int count = 0;
  for (size_t size = 16; size <= 4096; size += 16) {
    blocks[count] = zk_malloc(size);
    CHECK(blocks[count] != NULL);
    memset(blocks[count], 1, 1);
    count++;
  }
  segment_t *segment = segment_of(blocks[0]);
  CHECK(segment->used_slices >= SLICES_PER_SEGMENT / 2);
  dense_review();
  CHECK_EQ(dense_halves_advised(segment), 0);
  for (int i = 0; i < count; i++)
    zk_free(blocks[i]);
  return NULL;
}

/* A half more than an eighth of which is a large block is not advised. */
static void *dense_with_large(void *unused) {
  (void)unused;
  void *large = zk_malloc(300 << 10);
  CHECK(large != NULL);
  memset(large, 7, 4096);
  segment_t *segment = dense_fill();
  CHECK(segment_of(large) == segment);
  dense_review();
  CHECK_EQ(dense_halves_advised(segment), 1);
  CHECK(!segment->half_advised[0]);
  dense_release();
  zk_free(dense_blocks[0]);
  zk_free(large);
  return NULL;
}

/* Mode off: nothing advised. */
static void *dense_off(void *unused) {
  (void)unused;
  segment_t *segment = dense_fill();
  dense_review();
  CHECK_EQ(dense_halves_advised(segment), 0);
  dense_release();
  zk_free(dense_blocks[0]);
  return NULL;
}

static void run_in_thread(void *(*body)(void *)) {
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, body, NULL) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
}

/* ZKMEM_HUGE_PAGES=dense: a 2 MiB half of a segment 7/8 of
 * which is carved small blocks is advised for huge pages; a purge in it
 * withdraws the advice and returns the pages; dense again, it is advised
 * again, but not within four purge delays; pages begun but hardly carved,
 * a large block in the half, or mode off: no advice. */
static void test_huge_pages_dense(void) {
  CHECK(zk_option_set(ZK_OPTION_HUGE_PAGES, ZK_HUGE_PAGES_DENSE) == 0);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 50) == 0);
  zk_collect(true);
  CHECK_EQ(segments_now(), 0);
  if (!thp_madvise()) {
    printf("transparent huge pages are not \"madvise\" here: dense mode "
           "checked for doing nothing\n");
    run_in_thread(dense_off);
  } else {
    run_in_thread(dense_cycles);
    zk_collect(true);
    run_in_thread(dense_sparse);
    zk_collect(true);
    run_in_thread(dense_with_large);
    CHECK(zk_option_set(ZK_OPTION_HUGE_PAGES, ZK_HUGE_PAGES_OFF) == 0);
    zk_collect(true);
    run_in_thread(dense_off);
  }
  CHECK(zk_option_set(ZK_OPTION_HUGE_PAGES, ZK_HUGE_PAGES_OFF) == 0);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 1000) == 0);
  zk_collect(true);
}

/* The bytes dense pages carved in each half of `segment`, counted from
 * its descriptors, against the counters the carving and the frees keep
 * (in every mode: dense mode reads them). Threads quiet. */
static void check_carved_counts(segment_t *segment) {
  uint64_t expected[2] = {0, 0};
  uint8_t *middle = (uint8_t *)segment + SEGMENT_SIZE / 2;
  page_t *pages = segment_pages(segment);
  for (size_t index = SEGMENT_FIRST_SLICE; index < SLICES_PER_SEGMENT;) {
    page_t *page = &pages[index];
    size_t slices = page->slice_count != 0 ? page->slice_count : 1;
    if (page_dense(page) && page->capacity != 0) {
      uint32_t to_end = page->reserved - page->carve_first;
      uint32_t first = page->capacity < to_end ? page->capacity : to_end;
      uint8_t *ranges[2][2] = {
          {page->start + (size_t)page->carve_first * page->block_size,
           page->start +
               (size_t)(page->carve_first + first) * page->block_size},
          {page->start,
           page->start + (size_t)(page->capacity - first) * page->block_size}};
      for (int r = 0; r < 2; r++) {
        uint8_t *low = ranges[r][0], *high = ranges[r][1];
        if (low < middle)
          expected[0] += (size_t)((high < middle ? high : middle) - low);
        if (high > middle)
          expected[1] += (size_t)(high - (low > middle ? low : middle));
      }
    }
    index += slices;
  }
  for (int half = 0; half < 2; half++)
    CHECK_EQ(atomic_load(&segment->half_carved[half]), expected[half]);
}

#define CARVE_THREADS 4
#define CARVE_BLOCKS  12000
static void *carve_blocks[CARVE_THREADS][CARVE_BLOCKS];
static pthread_barrier_t carve_barrier;

static void *carve_worker(void *argument) {
  int self = (int)(intptr_t)argument;
  uint64_t state = 0x9e3779b97f4a7c15u * (uint64_t)(self + 1);
  for (int i = 0; i < CARVE_BLOCKS; i++) {
    state = state * 6364136223846793005u + 1442695040888963407u;
    size_t size = (size_t)(state >> 33) % 4096 + 8;
    if (i % 97 == 0)
      size = 9000 + (size_t)(state >> 40) % 60000; /* other kinds of span */
    carve_blocks[self][i] = zk_malloc(size);
    CHECK(carve_blocks[self][i] != NULL);
    memset(carve_blocks[self][i], 1, 8);
  }
  pthread_barrier_wait(&carve_barrier);
  /* Half of the next thread's blocks, freed here: remote frees. */
  int other = (self + 1) % CARVE_THREADS;
  for (int i = self % 2; i < CARVE_BLOCKS; i += 2) {
    zk_free(carve_blocks[other][i]);
    carve_blocks[other][i] = NULL;
  }
  return NULL; /* exits with its heap's pages abandoned */
}

static void check_carved_counts_of_live_blocks(void) {
  for (int t = 0; t < CARVE_THREADS; t++)
    for (int i = 0; i < CARVE_BLOCKS; i++)
      if (carve_blocks[t][i] != NULL &&
          segment_map_state(segment_of(carve_blocks[t][i])) ==
              SEGMENT_MAP_HEADER)
        check_carved_counts(segment_of(carve_blocks[t][i]));
}

/* The carving counters stay exact through threads that carve, free each
 * other's blocks and exit, pages adopted, purged and released: counted
 * from the descriptors at each quiet point. */
static void test_carved_counts(void) {
  pthread_t threads[CARVE_THREADS];
  CHECK(pthread_barrier_init(&carve_barrier, NULL, CARVE_THREADS) == 0);
  for (int t = 0; t < CARVE_THREADS; t++)
    CHECK(pthread_create(&threads[t], NULL, carve_worker,
                         (void *)(intptr_t)t) == 0);
  for (int t = 0; t < CARVE_THREADS; t++)
    CHECK(pthread_join(threads[t], NULL) == 0);
  pthread_barrier_destroy(&carve_barrier);
  check_carved_counts_of_live_blocks();
  zk_collect(false);
  check_carved_counts_of_live_blocks();
  for (int t = 0; t < CARVE_THREADS; t++)
    for (int i = 0; i < CARVE_BLOCKS; i += 3)
      if (carve_blocks[t][i] != NULL) {
        zk_free(carve_blocks[t][i]);
        carve_blocks[t][i] = NULL;
      }
  zk_collect(true);
  check_carved_counts_of_live_blocks();
  for (int t = 0; t < CARVE_THREADS; t++)
    for (int i = 0; i < CARVE_BLOCKS; i++)
      if (carve_blocks[t][i] != NULL) {
        zk_free(carve_blocks[t][i]);
        carve_blocks[t][i] = NULL;
      }
  zk_collect(true);
}

/* zk_collect(true) returns the free spans of partly used segments in the
 * transparent huge page mode too: one block in twelve stays live, so no
 * segment is entirely free and only span purging can lower the RSS. */
static void test_huge_pages_purge(void) {
  CHECK(zk_option_set(ZK_OPTION_HUGE_PAGES, 1) == 0);
  enum { COUNT = 240, SIZE = 300 << 10 };
  static void *blocks[COUNT];
  size_t base = rss_now();
  for (int i = 0; i < COUNT; i++) {
    blocks[i] = zk_malloc(SIZE);
    CHECK(blocks[i] != NULL);
    memset(blocks[i], 4, SIZE);
  }
  size_t peak = rss_now();
  for (int i = 0; i < COUNT; i++)
    if (i % 12 != 0)
      zk_free(blocks[i]);
  zk_collect(true);
  size_t after = rss_now();
  printf("transparent huge pages: rss %zu MiB before, %zu MiB at peak, "
         "%zu MiB after freeing 11/12 and zk_collect(true)\n",
         base >> 20, peak >> 20, after >> 20);
  for (int i = 0; i < COUNT; i += 12)
    zk_free(blocks[i]);
  CHECK(zk_option_set(ZK_OPTION_HUGE_PAGES, ZK_HUGE_PAGES_OFF) == 0);
  zk_collect(true);
  CHECK(after - base < (peak - base) / 2);
}

/* ---- statistics ---- */

/* A small JSON reader: true when `text` holds exactly one JSON value. */
static const char *json_value(const char *s);

static const char *json_space(const char *s) {
  while (*s == ' ' || *s == '\n' || *s == '\t' || *s == '\r')
    s++;
  return s;
}

static const char *json_string(const char *s) {
  if (*s++ != '"')
    return NULL;
  while (*s != '"') {
    if (*s == '\0' || (unsigned char)*s < 0x20)
      return NULL;
    if (*s == '\\' && *++s == '\0')
      return NULL;
    s++;
  }
  return s + 1;
}

static const char *json_number(const char *s) {
  const char *start = s;
  if (*s == '-')
    s++;
  if (*s < '0' || *s > '9')
    return NULL;
  while (*s >= '0' && *s <= '9')
    s++;
  if (*s == '.') {
    s++;
    if (*s < '0' || *s > '9')
      return NULL;
    while (*s >= '0' && *s <= '9')
      s++;
  }
  if (*s == 'e' || *s == 'E') {
    s++;
    if (*s == '+' || *s == '-')
      s++;
    if (*s < '0' || *s > '9')
      return NULL;
    while (*s >= '0' && *s <= '9')
      s++;
  }
  return s > start ? s : NULL;
}

static const char *json_list(const char *s, char close, bool keys) {
  s = json_space(s + 1);
  if (*s == close)
    return s + 1;
  for (;;) {
    if (keys) {
      s = json_string(json_space(s));
      if (s == NULL)
        return NULL;
      s = json_space(s);
      if (*s++ != ':')
        return NULL;
    }
    s = json_value(s);
    if (s == NULL)
      return NULL;
    s = json_space(s);
    if (*s == close)
      return s + 1;
    if (*s++ != ',')
      return NULL;
  }
}

static const char *json_value(const char *s) {
  s = json_space(s);
  switch (*s) {
  case '{':
    return json_list(s, '}', true);
  case '[':
    return json_list(s, ']', false);
  case '"':
    return json_string(s);
  case 't':
    return strncmp(s, "true", 4) == 0 ? s + 4 : NULL;
  case 'f':
    return strncmp(s, "false", 5) == 0 ? s + 5 : NULL;
  case 'n':
    return strncmp(s, "null", 4) == 0 ? s + 4 : NULL;
  default:
    return json_number(s);
  }
}

static bool json_valid(const char *text) {
  const char *end = json_value(text);
  return end != NULL && *json_space(end) == '\0';
}

/* The value after "key": in the text, as a number. */
static long long json_field(const char *text, const char *key) {
  char quoted[64];
  snprintf(quoted, sizeof(quoted), "\"%s\":", key);
  const char *at = strstr(text, quoted);
  CHECK(at != NULL);
  return strtoll(at + strlen(quoted), NULL, 10);
}

static size_t read_stream(FILE *file, char *text, size_t capacity) {
  rewind(file);
  size_t length = fread(text, 1, capacity - 1, file);
  text[length] = '\0';
  return length;
}

static void *alloc_and_exit(void *arg) {
  void **blocks = arg;
  for (int i = 0; i < 500; i++)
    blocks[i] = zk_malloc(100);
  for (int i = 0; i < 200; i++)
    zk_free(blocks[i]);
  return NULL; /* 300 blocks live in the pages the thread leaves behind */
}

static void test_stats(void) {
  unsigned c = size_to_class(100);
  zk_stats_t before, after;
  zk_stats_get(&before);
  CHECK_EQ(before.class_count, CLASS_COUNT);
  CHECK_EQ(before.classes[c].block_size, 112);
  static void *blocks[1000];
  for (int i = 0; i < 1000; i++)
    blocks[i] = zk_malloc(100);
  for (int i = 0; i < 400; i++)
    zk_free(blocks[i]);
  void *large = zk_malloc(500 << 10);
  void *huge = zk_malloc((size_t)5 << 20);
  CHECK(large && huge);
  zk_stats_get(&after);
  CHECK_EQ(after.classes[c].allocations - before.classes[c].allocations, 1000);
  CHECK_EQ(after.classes[c].frees - before.classes[c].frees, 400);
  CHECK_EQ(after.classes[c].live - before.classes[c].live, 600);
  CHECK(after.classes[c].pages >= 1);
  CHECK_EQ(after.large_allocations - before.large_allocations, 1);
  CHECK_EQ(after.large_live - before.large_live, 1);
  CHECK_EQ(after.huge_allocations - before.huge_allocations, 1);
  CHECK_EQ(after.huge_live - before.huge_live, 1);
  CHECK(after.bytes_live >= before.bytes_live + 600 * 112);
  CHECK(after.bytes_committed >= after.bytes_live - before.bytes_live);
  CHECK(after.rss > 0 && after.peak_rss >= after.rss);

  /* Text and JSON reports of the same state. */
  static char text[1 << 16];
  FILE *file = tmpfile();
  CHECK(file != NULL);
  zk_stats_print(file);
  CHECK(read_stream(file, text, sizeof(text)) > 0);
  fclose(file);
  CHECK(strstr(text, "zkmem statistics") != NULL);
  CHECK(strstr(text, "large:") != NULL);
  file = tmpfile();
  CHECK(file != NULL);
  zk_stats_json(file);
  CHECK(read_stream(file, text, sizeof(text)) > 0);
  fclose(file);
  CHECK(json_valid(text));
  CHECK(strstr(text, "\"classes\":[{\"block_size\":") != NULL);
  CHECK(strstr(text, "{\"block_size\":112,") != NULL);
  CHECK_EQ(json_field(text, "large_live"), after.large_live);
  CHECK_EQ(json_field(text, "huge_live"), after.huge_live);
  CHECK_EQ(json_field(text, "segments_mapped"), after.segments_mapped);
  CHECK(!json_valid("{\"a\":1,}") && !json_valid("{\"a\":1}}"));

  for (int i = 400; i < 1000; i++)
    zk_free(blocks[i]);
  zk_free(large);
  zk_free(huge);
  zk_stats_get(&after);
  CHECK_EQ(after.classes[c].live, before.classes[c].live);
  CHECK_EQ(after.large_live, before.large_live);
  CHECK_EQ(after.huge_live, before.huge_live);

  /* A thread's counters outlive it: its pages keep them when abandoned;
   * frees from here into those pages count once collected. */
  zk_stats_get(&before);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, alloc_and_exit, blocks) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  zk_stats_get(&after);
  CHECK_EQ(after.classes[c].allocations - before.classes[c].allocations, 500);
  CHECK_EQ(after.classes[c].frees - before.classes[c].frees, 200);
  CHECK_EQ(after.classes[c].live - before.classes[c].live, 300);
  for (int i = 200; i < 500; i++)
    zk_free(blocks[i]);
  zk_collect(true);
  zk_stats_get(&after);
  CHECK_EQ(after.classes[c].frees - before.classes[c].frees, 500);
  CHECK_EQ(after.classes[c].live, before.classes[c].live);
}

/* bytes_live counts large and huge blocks too (at least the bytes asked
 * for, at most their usable size), and bytes_committed the spans under
 * them, in use or cached by the heap. */
static void test_stats_bytes(void) {
  zk_collect(true);
  zk_stats_t before, after;
  zk_stats_get(&before);
  const size_t large_size = 500 << 10, huge_size = (size_t)5 << 20;
  void *large = zk_malloc(large_size);
  void *huge = zk_malloc(huge_size);
  CHECK(large && huge);
  size_t large_usable = zk_usable_size(large);
  size_t huge_usable = zk_usable_size(huge);
  memset(large, 1, large_size);
  memset(huge, 1, huge_size);
  zk_stats_get(&after);
  size_t live = after.bytes_live - before.bytes_live;
  size_t committed = after.bytes_committed - before.bytes_committed;
  printf("500 KiB and 5 MiB blocks live: bytes_live +%zu, bytes_committed "
         "+%zu\n",
         live, committed);
  CHECK(live >= large_size + huge_size);
  CHECK(live <= large_usable + huge_usable);
  CHECK(committed >= live);
  zk_free(large); /* into the heap's cache: no longer live, still committed */
  zk_stats_get(&after);
  size_t live_now = after.bytes_live - before.bytes_live;
  committed = after.bytes_committed - before.bytes_committed;
  printf("500 KiB block freed: bytes_live +%zu, bytes_committed +%zu\n",
         live_now, committed);
  CHECK(live - live_now >= large_size && live - live_now <= large_usable);
  CHECK(committed >= large_size + huge_size);
  zk_free(huge);
  zk_collect(true);
  zk_stats_get(&after);
  CHECK_EQ(after.bytes_live, before.bytes_live);
  CHECK_EQ(after.bytes_committed, before.bytes_committed);
}

/* ---- options ---- */

static void test_options(void) {
  static const long defaults[ZK_OPTION_COUNT] = {
      [ZK_OPTION_PURGE_DELAY_MS] = 1000, [ZK_OPTION_PURGE_DECOMMIT] = 1};
  for (int i = 0; i < ZK_OPTION_COUNT; i++)
    CHECK_EQ(zk_option_get((zk_option_t)i), defaults[i]);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 12345) == 0);
  CHECK_EQ(zk_option_get(ZK_OPTION_PURGE_DELAY_MS), 12345);
  CHECK(zk_option_set(ZK_OPTION_VERBOSE, 1) == 0);
  CHECK_EQ(zk_option_get(ZK_OPTION_VERBOSE), 1);
  CHECK(zk_option_set(ZK_OPTION_VERBOSE, 0) == 0);

  /* Unknown options and out-of-range values: -1, EINVAL, nothing set. */
  errno = 0;
  CHECK(zk_option_set(ZK_OPTION_COUNT, 1) == -1 && errno == EINVAL);
  errno = 0;
  CHECK(zk_option_set((zk_option_t)-1, 1) == -1 && errno == EINVAL);
  errno = 0;
  CHECK(zk_option_get(ZK_OPTION_COUNT) == -1 && errno == EINVAL);
  errno = 0;
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, -1) == -1 && errno == EINVAL);
  errno = 0;
  CHECK(zk_option_set(ZK_OPTION_HUGE_PAGES, 4) == -1 && errno == EINVAL);
  CHECK_EQ(zk_option_get(ZK_OPTION_PURGE_DELAY_MS), 12345);
  CHECK_EQ(zk_option_get(ZK_OPTION_HUGE_PAGES), ZK_HUGE_PAGES_OFF);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 1000) == 0);
}

/* This program again with ZKMEM_* set (and every other ZKMEM_* removed):
 * it prints each option's value; returns its stdout and stderr together. */
static void run_with_environment(const char *const *variables, char *output,
                                 size_t capacity) {
  int pipe_fds[2];
  CHECK(pipe(pipe_fds) == 0);
  fflush(stdout);
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    dup2(pipe_fds[1], 1);
    dup2(pipe_fds[1], 2);
    close(pipe_fds[0]);
    static const char *const names[] = {
        "ZKMEM_PURGE_DELAY_MS", "ZKMEM_PURGE_DECOMMIT", "ZKMEM_HUGE_PAGES",
        "ZKMEM_SECURE",         "ZKMEM_ON_ERROR",       "ZKMEM_SHOW_STATS",
        "ZKMEM_VERBOSE"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
      unsetenv(names[i]);
    for (size_t i = 0; variables[i] != NULL; i += 2)
      setenv(variables[i], variables[i + 1], 1);
    execl("/proc/self/exe", "test_large", "--print-options", (char *)NULL);
    _exit(127);
  }
  close(pipe_fds[1]);
  size_t used = 0;
  ssize_t got;
  while (used < capacity - 1 &&
         (got = read(pipe_fds[0], output + used, capacity - 1 - used)) > 0)
    used += (size_t)got;
  output[used] = '\0';
  close(pipe_fds[0]);
  int status;
  CHECK(waitpid(child, &status, 0) == child);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "child failed (status %d): %s\n", status, output);
    exit(1);
  }
}

static int print_options(void) {
  printf("options:");
  for (int i = 0; i < ZK_OPTION_COUNT; i++)
    printf(" %ld", zk_option_get((zk_option_t)i));
  printf("\n");
  fflush(stdout);
  return 0;
}

/* The child's "options:" line must be `expected`, and its output must (or
 * must not, for NULL) contain `warning`. */
static void check_environment(const char *const *variables,
                              const char *expected, const char *warning) {
  static char output[1 << 16];
  run_with_environment(variables, output, sizeof(output));
  char line[128];
  snprintf(line, sizeof(line), "options: %s\n", expected);
  bool ok = strstr(output, line) != NULL;
  if (warning != NULL)
    ok = ok && strstr(output, warning) != NULL;
  else
    ok = ok && strstr(output, "warning") == NULL;
  if (!ok) {
    fprintf(stderr, "with %s=%s: expected \"%s\" and %s, got:\n%s\n",
            variables[0], variables[1], expected,
            warning ? warning : "no warning", output);
    exit(1);
  }
}

static void test_environment(void) {
  /* Order: purge_delay_ms purge_decommit huge_pages secure on_error
   * show_stats verbose limit. */
  const char *const nothing[] = {NULL};
  check_environment(nothing, "1000 1 0 0 0 0 0 0", NULL);
  const char *const bad_delay[] = {"ZKMEM_PURGE_DELAY_MS", "abc", NULL};
  check_environment(bad_delay, "1000 1 0 0 0 0 0 0",
                    "warning: ZKMEM_PURGE_DELAY_MS=\"abc\" is not valid; "
                    "using 1000");
  const char *const reserved[] = {"ZKMEM_HUGE_PAGES", "reserved", NULL};
  check_environment(reserved, "1000 1 2 0 0 0 0 0", NULL);
  const char *const words[] = {"ZKMEM_HUGE_PAGES",
                               "Transparent",
                               "ZKMEM_ON_ERROR",
                               "warn",
                               "ZKMEM_PURGE_DECOMMIT",
                               "free",
                               "ZKMEM_SECURE",
                               "yes",
                               "ZKMEM_PURGE_DELAY_MS",
                               "250",
                               NULL};
  check_environment(words, "250 0 1 1 1 0 0 0", NULL);
  const char *const negative[] = {"ZKMEM_PURGE_DELAY_MS", "-5", NULL};
  check_environment(negative, "1000 1 0 0 0 0 0 0",
                    "ZKMEM_PURGE_DELAY_MS=\"-5\" is not valid");
  const char *const too_big[] = {"ZKMEM_PURGE_DELAY_MS", "99999999999999999999",
                                 NULL};
  check_environment(too_big, "1000 1 0 0 0 0 0 0",
                    "ZKMEM_PURGE_DELAY_MS=\"99999999999999999999\" is not "
                    "valid");
  const char *const out_of_range[] = {"ZKMEM_HUGE_PAGES", "4", NULL};
  check_environment(out_of_range, "1000 1 0 0 0 0 0 0",
                    "ZKMEM_HUGE_PAGES=\"4\" is not valid; using 0");
  const char *const dense[] = {"ZKMEM_HUGE_PAGES", "DENSE", NULL};
  check_environment(dense, "1000 1 3 0 0 0 0 0", NULL);
  const char *const off[] = {"ZKMEM_HUGE_PAGES", "off", NULL};
  check_environment(off, "1000 1 0 0 0 0 0 0", NULL);
  const char *const trailing[] = {"ZKMEM_SECURE", "1x", NULL};
  check_environment(trailing, "1000 1 0 0 0 0 0 0",
                    "ZKMEM_SECURE=\"1x\" is not valid");
  const char *const limit[] = {"ZKMEM_LIMIT", "64M", NULL};
  check_environment(limit, "1000 1 0 0 0 0 0 67108864", NULL);
  const char *const limit_kib[] = {"ZKMEM_LIMIT", "3KiB", NULL};
  check_environment(limit_kib, "1000 1 0 0 0 0 0 3072", NULL);
  const char *const limit_bad[] = {"ZKMEM_LIMIT", "64X", NULL};
  check_environment(limit_bad, "1000 1 0 0 0 0 0 0",
                    "ZKMEM_LIMIT=\"64X\" is not valid");
  const char *const limit_huge[] = {"ZKMEM_LIMIT", "99999999999T", NULL};
  check_environment(limit_huge, "1000 1 0 0 0 0 0 0",
                    "ZKMEM_LIMIT=\"99999999999T\" is not valid");
  const char *const empty[] = {"ZKMEM_PURGE_DELAY_MS", "", NULL};
  check_environment(empty, "1000 1 0 0 0 0 0 0", NULL);
  /* Verbose lists every option; show_stats prints the report at exit. */
  const char *const verbose[] = {"ZKMEM_VERBOSE", "1", "ZKMEM_SHOW_STATS", "on",
                                 NULL};
  check_environment(verbose, "1000 1 0 0 0 1 1 0",
                    "zkmem: option ZKMEM_PURGE_DELAY_MS = 1000");
  static char output[1 << 16];
  run_with_environment(verbose, output, sizeof(output));
  CHECK(strstr(output, "zkmem statistics") != NULL);
}

static double seconds_since(const struct timespec *start) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)(now.tv_sec - start->tv_sec) +
         (double)(now.tv_nsec - start->tv_nsec) / 1e9;
}

#define RUN(test)                                                              \
  do {                                                                         \
    struct timespec start;                                                     \
    clock_gettime(CLOCK_MONOTONIC, &start);                                    \
    test();                                                                    \
    printf("%-24s %.2f s\n", #test, seconds_since(&start));                    \
    fflush(stdout);                                                            \
  } while (0)

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--print-options") == 0)
    return print_options();
  /* Options are read once at start-up and several checks expect the
   * defaults: run again without any ZKMEM_* variable. */
  test_reexec_without_zkmem_environment(argv[0]);
  setvbuf(stdout, NULL, _IOLBF, 0); /* reports in order with failures */
  RUN(test_span_split);
  RUN(test_span_merge);
  RUN(test_large_merge);
  RUN(test_cross_size_reuse);
  RUN(test_rss_forced);
  RUN(test_rss_by_delay);
  RUN(test_calloc_after_purge);
  RUN(test_calloc_after_refused_purge);
  RUN(test_large_cache_decays);
  RUN(test_realloc_huge);
  RUN(test_huge_reuse);
  RUN(test_huge_cache_follows_live);
  RUN(test_huge_neighbours_join);
  RUN(test_huge_join_within_limit);
  RUN(test_huge_cache_out_of_entries);
  RUN(test_os_moves_mappings);
  RUN(test_huge_assembled_grows);
  RUN(test_huge_churn_then_grow);
  RUN(test_process_limit);
  RUN(test_aligned_large);
  RUN(test_huge_pages);
  RUN(test_stats);
  RUN(test_options);
  RUN(test_environment);
  RUN(test_stats_bytes);
  RUN(test_huge_pages_purge);
  RUN(test_huge_pages_dense);
  RUN(test_carved_counts);
  RUN(test_thread_churn_reuse);
  RUN(test_reclaimed_pages_feed_bins);
  RUN(test_stale_owner_remote_free);
  RUN(test_limit_aligned_huge);
  RUN(test_huge_piece_release_refused);
  RUN(test_huge_split_by_program);
  printf("test_large: ok\n");
  return 0;
}
