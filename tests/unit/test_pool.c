/* Object pools: every call and every statistic, in deterministic
 * single-threaded scenarios where the counts are exact; NULL and foreign
 * pools, misuse reports, and user code (constructors, visitors) that calls
 * back into zkmem, each in a forked child where it could hang or abort. */
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define ROUND 1000

static void test_counts_and_reuse(void) {
  zk_pool_options_t options = {0};
  options.name = "counts";
  zk_pool_t *pool = zk_pool_create(64, &options);
  CHECK(pool != NULL);
  zk_pool_stats_t stats;
  CHECK_EQ(zk_pool_stats(pool, &stats), 0);
  CHECK_EQ(stats.allocations, 0);
  CHECK_EQ(stats.pages, 0); /* lazy: nothing until the first alloc */
  CHECK(strcmp(stats.name, "counts") == 0);
  CHECK_EQ(stats.object_size, 64);

  void *objects[ROUND];
  for (int i = 0; i < ROUND; i++) {
    objects[i] = zk_pool_alloc(pool);
    CHECK(objects[i] != NULL);
    CHECK(((uintptr_t)objects[i] & 15) == 0);
    memset(objects[i], i & 0xff, 64);
  }
  CHECK_EQ(zk_pool_stats(pool, &stats), 0);
  CHECK_EQ(stats.allocations, ROUND);
  CHECK_EQ(stats.frees, 0);
  CHECK_EQ(stats.live, ROUND);
  CHECK_EQ(stats.peak_live, ROUND);
  CHECK_EQ(stats.reused, 0);
  CHECK(stats.bytes_committed >= ROUND * 64);
  CHECK(stats.fragmentation >= 1.0 && stats.fragmentation < 1.2);
  for (int i = 0; i < ROUND; i++) {
    unsigned char *bytes = objects[i];
    CHECK(bytes[0] == (i & 0xff) && bytes[63] == (i & 0xff));
    zk_pool_free(pool, objects[i]);
  }
  CHECK_EQ(zk_pool_stats(pool, &stats), 0);
  CHECK_EQ(stats.frees, ROUND);
  CHECK_EQ(stats.live, 0);
  CHECK_EQ(stats.cached, ROUND);
  /* Second round: every object is a freed one. */
  for (int i = 0; i < ROUND; i++)
    objects[i] = zk_pool_alloc(pool);
  CHECK_EQ(zk_pool_stats(pool, &stats), 0);
  CHECK_EQ(stats.allocations, 2 * ROUND);
  CHECK_EQ(stats.reused, ROUND);
  CHECK(stats.reuse_rate > 0.4999 && stats.reuse_rate < 0.5001);
  CHECK_EQ(stats.live, ROUND);
  CHECK_EQ(stats.peak_live, ROUND);
  /* Objects are distinct. */
  for (int i = 1; i < ROUND; i++)
    CHECK(objects[i] != objects[i - 1]);
  for (int i = 0; i < ROUND; i++)
    zk_pool_free(pool, objects[i]);
  zk_pool_destroy(pool);
}

static void test_seed_reuse_scenario(void) {
  /* One object allocated and freed repeatedly: always the same address. */
  zk_pool_t *pool = zk_pool_create(128, NULL);
  void *first = zk_pool_alloc(pool);
  zk_pool_free(pool, first);
  for (int i = 0; i < 100000; i++) {
    void *object = zk_pool_alloc(pool);
    CHECK(object == first);
    zk_pool_free(pool, object);
  }
  zk_pool_stats_t stats;
  zk_pool_stats(pool, &stats);
  CHECK_EQ(stats.allocations, 100001);
  CHECK_EQ(stats.reused, 100000);
  zk_pool_destroy(pool);
}

static int constructed;
static void construct(void *object, void *arg) {
  CHECK(arg == &constructed);
  *(uint64_t *)object = 0xc0ffee;
  constructed++;
}

static void test_constructor(void) {
  zk_pool_options_t options = {0};
  options.constructor = construct;
  options.constructor_arg = &constructed;
  zk_pool_t *pool = zk_pool_create(24, &options);
  void *objects[300];
  for (int i = 0; i < 300; i++) {
    objects[i] = zk_pool_alloc(pool);
    CHECK(*(uint64_t *)objects[i] == 0xc0ffee);
  }
  CHECK_EQ(constructed, 300);
  for (int i = 0; i < 300; i++) {
    *(uint64_t *)objects[i] = 0xc0ffee; /* users keep objects constructed */
    zk_pool_free(pool, objects[i]);
  }
  for (int i = 0; i < 300; i++)
    objects[i] = zk_pool_alloc(pool);
  CHECK_EQ(constructed, 300); /* reuse runs no constructor */
  zk_pool_destroy(pool);
}

static void test_alignment_and_odd_sizes(void) {
  static const size_t sizes[] = {1, 7, 24, 100, 1000, 4097, 70000};
  for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
    for (size_t alignment = 8; alignment <= 4096; alignment *= 8) {
      zk_pool_options_t options = {0};
      options.alignment = alignment;
      zk_pool_t *pool = zk_pool_create(sizes[s], &options);
      CHECK(pool != NULL);
      zk_pool_stats_t stats;
      zk_pool_stats(pool, &stats);
      CHECK(stats.slot_size >= sizes[s]);
      CHECK(stats.slot_size % alignment == 0);
      for (int i = 0; i < 50; i++) {
        void *object = zk_pool_alloc(pool);
        CHECK(object != NULL);
        CHECK(((uintptr_t)object & (alignment - 1)) == 0);
        memset(object, 0x77, sizes[s]);
      }
      zk_pool_destroy(pool); /* with 50 live objects */
    }
  }
}

static void test_bad_options(void) {
  errno = 0;
  CHECK(zk_pool_create(0, NULL) == NULL);
  CHECK_EQ(errno, EINVAL);
  zk_pool_options_t options = {0};
  options.alignment = 24;
  errno = 0;
  CHECK(zk_pool_create(64, &options) == NULL);
  CHECK_EQ(errno, EINVAL);
  errno = 0;
  CHECK(zk_pool_stats(NULL, NULL) == -1);
  CHECK_EQ(errno, EINVAL);
  zk_pool_destroy(NULL);
}

static size_t visited;
static void count_visit(void *object, void *arg) {
  CHECK(*(uint32_t *)object == 0xfeedu);
  (void)arg;
  visited++;
}

static void count_any_visit(void *object, void *arg) {
  (void)object;
  (void)arg;
  visited++;
}

static void test_visit_and_destroy(void) {
  zk_pool_t *pool = zk_pool_create(32, NULL);
  void *objects[2000];
  for (int i = 0; i < 2000; i++) {
    objects[i] = zk_pool_alloc(pool);
    *(uint32_t *)objects[i] = 0xfeedu;
  }
  for (int i = 0; i < 2000; i += 2) {
    *(uint32_t *)objects[i] = 0;
    zk_pool_free(pool, objects[i]);
  }
  visited = 0;
  zk_pool_visit(pool, count_visit, NULL);
  CHECK_EQ(visited, 1000);
  zk_pool_destroy(pool); /* frees the 1000 live ones too */
  /* The slot is reusable and the new pool starts clean. */
  zk_pool_t *again = zk_pool_create(32, NULL);
  zk_pool_stats_t stats;
  zk_pool_stats(again, &stats);
  CHECK_EQ(stats.allocations, 0);
  CHECK_EQ(stats.live, 0);
  void *object = zk_pool_alloc(again);
  CHECK(object != NULL);
  zk_pool_free(again, object);
  zk_pool_stats(again, &stats);
  CHECK_EQ(stats.allocations, 1);
  CHECK_EQ(stats.frees, 1);
  zk_pool_destroy(again);
}

static void test_preallocate(void) {
  zk_pool_options_t options = {0};
  options.preallocate = 10000;
  zk_pool_t *pool = zk_pool_create(64, &options);
  CHECK(pool != NULL);
  zk_pool_stats_t stats;
  zk_pool_stats(pool, &stats);
  CHECK(stats.pages >= 1);
  CHECK_EQ(stats.allocations, 0);
  size_t pages_before = stats.pages;
  for (int i = 0; i < 10000; i++)
    CHECK(zk_pool_alloc(pool) != NULL);
  zk_pool_stats(pool, &stats);
  CHECK_EQ(stats.pages, pages_before); /* no growth needed */
  CHECK_EQ(stats.reused, 0);
  zk_pool_destroy(pool);
}

static void test_adaptive_reserve(void) {
  /* A burst of 100,000 objects, then a long quiet phase at 100 live: the
   * prediction decays, and the cached surplus goes back. */
  zk_pool_t *pool = zk_pool_create(64, NULL);
  enum { BURST = 100000 };
  void **objects = zk_malloc(BURST * sizeof(void *));
  for (int i = 0; i < BURST; i++)
    objects[i] = zk_pool_alloc(pool);
  for (int i = 0; i < BURST; i++)
    zk_pool_free(pool, objects[i]);
  zk_pool_stats_t peak;
  zk_pool_stats(pool, &peak);
  CHECK(peak.predicted_live > 0);
  for (int round = 0; round < 20000; round++) {
    for (int i = 0; i < 300; i++)
      objects[i] = zk_pool_alloc(pool);
    for (int i = 0; i < 300; i++)
      zk_pool_free(pool, objects[i]);
  }
  zk_pool_stats_t quiet;
  zk_pool_stats(pool, &quiet);
  printf("adaptive reserve: predicted %llu -> %llu, cached %llu -> %llu, "
         "pages %llu -> %llu, committed %zu -> %zu\n",
         (unsigned long long)peak.predicted_live,
         (unsigned long long)quiet.predicted_live,
         (unsigned long long)peak.cached, (unsigned long long)quiet.cached,
         (unsigned long long)peak.pages, (unsigned long long)quiet.pages,
         peak.bytes_committed, quiet.bytes_committed);
  CHECK(quiet.predicted_live < 1000);
  CHECK(quiet.cached < peak.cached / 4);
  CHECK(quiet.pages < peak.pages);
  CHECK(quiet.bytes_committed < peak.bytes_committed);
  zk_free(objects);
  zk_pool_destroy(pool);
}

static void test_max_cached(void) {
  zk_pool_options_t options = {0};
  options.max_cached = 256;
  zk_pool_t *pool = zk_pool_create(256, &options);
  void *objects[20000];
  for (int round = 0; round < 3; round++) {
    for (int i = 0; i < 20000; i++)
      objects[i] = zk_pool_alloc(pool);
    for (int i = 0; i < 20000; i++)
      zk_pool_free(pool, objects[i]);
  }
  zk_pool_stats_t stats;
  zk_pool_stats(pool, &stats);
  /* The slab and depot honour the cap up to one page and a magazine. */
  printf("max_cached 256: cached %llu, pages %llu\n",
         (unsigned long long)stats.cached, (unsigned long long)stats.pages);
  CHECK(stats.cached < 20000 / 2);
  zk_pool_destroy(pool);
}

typedef struct point {
  double x, y, z;
} point_t;
ZK_POOL_TYPED(points, point_t)

static void test_typed(void) {
  point_t *p = points_alloc();
  CHECK(p != NULL);
  CHECK(((uintptr_t)p & (_Alignof(point_t) - 1)) == 0);
  p->x = 1;
  points_free(p);
  CHECK(points_alloc() == p);
}

static void free_to_wrong_pool(void) {
  zk_option_set(ZK_OPTION_SECURE, 1); /* every pool free is checked */
  zk_pool_t *a = zk_pool_create(64, NULL);
  zk_pool_t *b = zk_pool_create(64, NULL);
  void *object = zk_pool_alloc(a);
  zk_pool_free(b, object);
}

static void test_wrong_pool_detected(void) {
  test_expect_abort(free_to_wrong_pool,
                    "object freed to a pool that does not own it");
}

/* ---- children ---- */

/* The line error_report prints, for test_expect_abort. */
static char expected_line[256];
static const char *report_line(const char *what, const void *pointer,
                               size_t size) {
  if (size != 0)
    snprintf(expected_line, sizeof(expected_line),
             "zkmem: error: %s: pointer %p (block size %zu)\n", what, pointer,
             size);
  else
    snprintf(expected_line, sizeof(expected_line),
             "zkmem: error: %s: pointer %p\n", what, pointer);
  return expected_line;
}

/* ---- NULL and pointers that are not pools ---- */

static _Alignas(512) char not_a_pool[512];
static zk_pool_t *destroyed_pool;
static void *misuse_object;

static void free_to_null_pool(void) {
  zk_pool_free(NULL, misuse_object);
}
static void alloc_from_foreign(void) {
  zk_pool_alloc((zk_pool_t *)not_a_pool);
}
static void free_to_foreign(void) {
  zk_pool_free((zk_pool_t *)not_a_pool, misuse_object);
}
static void alloc_from_destroyed(void) {
  zk_pool_alloc(destroyed_pool);
}
static void free_to_destroyed(void) {
  zk_pool_free(destroyed_pool, misuse_object);
}
static void destroy_twice(void) {
  zk_pool_destroy(destroyed_pool);
}
static void visit_foreign(void) {
  zk_pool_visit((zk_pool_t *)not_a_pool, count_visit, NULL);
}

/* With ZK_OPTION_ON_ERROR = warn the misuses are logged and the calls
 * return: the alloc NULL with EINVAL. */
static void foreign_pools_warned(void) {
  CHECK(zk_option_set(ZK_OPTION_ON_ERROR, 1) == 0);
  errno = 0;
  CHECK(zk_pool_alloc((zk_pool_t *)not_a_pool) == NULL);
  CHECK_EQ(errno, EINVAL);
  errno = 0;
  CHECK(zk_pool_alloc(destroyed_pool) == NULL);
  CHECK_EQ(errno, EINVAL);
  zk_pool_free(NULL, misuse_object);
  zk_pool_free((zk_pool_t *)not_a_pool, misuse_object);
}

static void test_null_and_foreign_pools(void) {
  errno = 0;
  CHECK(zk_pool_alloc(NULL) == NULL);
  CHECK_EQ(errno, EINVAL);
  zk_pool_free(NULL, NULL);
  zk_pool_free((zk_pool_t *)not_a_pool, NULL); /* NULL: as free(NULL) */
  zk_pool_destroy(NULL);
  visited = 0;
  zk_pool_visit(NULL, count_visit, NULL);
  CHECK_EQ(visited, 0);
  zk_pool_stats_t stats;
  errno = 0;
  CHECK_EQ(zk_pool_stats(NULL, &stats), -1);
  CHECK_EQ(errno, EINVAL);
  errno = 0;
  CHECK_EQ(zk_pool_stats((zk_pool_t *)not_a_pool, &stats), -1);
  CHECK_EQ(errno, EINVAL);

  zk_pool_t *pool = zk_pool_create(64, NULL);
  misuse_object = zk_pool_alloc(pool);
  CHECK(misuse_object != NULL);
  destroyed_pool = zk_pool_create(64, NULL);
  CHECK(zk_pool_alloc(destroyed_pool) != NULL); /* leaves a magazine */
  zk_pool_destroy(destroyed_pool);
  test_expect_abort(
      free_to_null_pool,
      report_line("object freed to a NULL pool", misuse_object, 0));
  test_expect_abort(alloc_from_foreign,
                    report_line("not a zkmem pool", not_a_pool, 0));
  test_expect_abort(free_to_foreign,
                    report_line("not a zkmem pool", not_a_pool, 0));
  test_expect_abort(alloc_from_destroyed,
                    report_line("not a zkmem pool", destroyed_pool, 0));
  test_expect_abort(free_to_destroyed,
                    report_line("not a zkmem pool", destroyed_pool, 0));
  test_expect_abort(destroy_twice,
                    report_line("not a zkmem pool", destroyed_pool, 0));
  test_expect_abort(visit_foreign,
                    report_line("not a zkmem pool", not_a_pool, 0));
  test_expect_success("foreign pools, warn", foreign_pools_warned);
  zk_pool_free(pool, misuse_object);
  zk_pool_destroy(pool);
}

/* Freeing NULL leaves the pool as it was: it used to push NULL into the
 * magazine, and the next allocation returned it (with errno 0). */
static void test_free_null_object(void) {
  zk_pool_t *pool = zk_pool_create(64, NULL);
  void *first = zk_pool_alloc(pool);
  CHECK(first != NULL);
  zk_pool_free(pool, NULL); /* a magazine with room: the fast path */
  void *second = zk_pool_alloc(pool);
  CHECK(second != NULL && second != first);
  enum { COUNT = 300 }; /* more than a magazine holds: the slow path too */
  void *objects[COUNT];
  for (int i = 0; i < COUNT; i++)
    CHECK((objects[i] = zk_pool_alloc(pool)) != NULL);
  for (int i = 0; i < COUNT; i++) {
    zk_pool_free(pool, objects[i]);
    zk_pool_free(pool, NULL);
  }
  zk_pool_stats_t stats;
  zk_pool_stats(pool, &stats);
  CHECK_EQ(stats.allocations, COUNT + 2);
  CHECK_EQ(stats.frees, COUNT);
  CHECK_EQ(stats.live, 2);
  for (int i = 0; i < COUNT; i++) {
    CHECK((objects[i] = zk_pool_alloc(pool)) != NULL);
    CHECK(objects[i] != first && objects[i] != second);
  }
  zk_pool_destroy(pool);
}

/* A typed pool that cannot be created: every pool slot taken. */
ZK_POOL_TYPED(crowded, point_t)

static void typed_without_slots(void) {
  static zk_pool_t *taken[2048];
  size_t count = 0;
  errno = 0;
  while (count < 2048 && (taken[count] = zk_pool_create(8, NULL)) != NULL)
    count++;
  CHECK(count < 2048);
  CHECK_EQ(errno, ENOMEM);
  errno = 0;
  CHECK(crowded_alloc() == NULL);
  CHECK_EQ(errno, ENOMEM);
  crowded_free(NULL);
  zk_pool_destroy(taken[0]);
  point_t *point = crowded_alloc(); /* a slot again: created now */
  CHECK(point != NULL);
  crowded_free(point);
  CHECK(crowded_alloc() == point);
}

static void test_typed_without_slots(void) {
  test_expect_success("typed pool without a slot", typed_without_slots);
}

/* ---- visitors that call into zkmem ---- */

static zk_pool_t *visit_pool;
static size_t visit_calls;
static void *visit_new[6000];
static size_t visit_new_count;

static void visit_and_allocate(void *object, void *arg) {
  (void)arg;
  CHECK(*(uint32_t *)object == 0xfeedu);
  zk_pool_stats_t stats;
  CHECK_EQ(zk_pool_stats(visit_pool, &stats), 0); /* takes the pool lock */
  void *fresh = zk_pool_alloc(visit_pool);
  CHECK(fresh != NULL);
  *(uint32_t *)fresh = 0xfeedu;
  visit_new[visit_new_count++] = fresh;
  visit_calls++;
}

static void visit_and_free(void *object, void *arg) {
  (void)arg;
  CHECK(*(uint32_t *)object == 0xfeedu);
  *(uint32_t *)object = 0;
  zk_pool_free(visit_pool, object);
  visit_calls++;
}

static void visitors_call_back(void) {
  alarm(10);
  visit_pool = zk_pool_create(64, NULL);
  enum { COUNT = 6000 }; /* pages of 1, 2 and 4 slices */
  static void *objects[COUNT];
  for (int i = 0; i < COUNT; i++) {
    objects[i] = zk_pool_alloc(visit_pool);
    *(uint32_t *)objects[i] = 0xfeedu;
  }
  for (int i = 0; i < COUNT; i += 3) {
    *(uint32_t *)objects[i] = 0;
    zk_pool_free(visit_pool, objects[i]);
  }
  zk_pool_stats_t stats;
  zk_pool_stats(visit_pool, &stats);
  CHECK(stats.pages >= 3);
  size_t live = stats.live;
  CHECK_EQ(live, COUNT - COUNT / 3);
  /* Objects allocated during the visit are not visited. */
  visit_calls = 0;
  zk_pool_visit(visit_pool, visit_and_allocate, NULL);
  CHECK_EQ(visit_calls, live);
  CHECK_EQ(visit_new_count, live);
  zk_pool_stats(visit_pool, &stats);
  CHECK_EQ(stats.live, 2 * live);
  /* Every object frees itself. */
  visit_calls = 0;
  zk_pool_visit(visit_pool, visit_and_free, NULL);
  CHECK_EQ(visit_calls, 2 * live);
  zk_pool_stats(visit_pool, &stats);
  CHECK_EQ(stats.live, 0);
  CHECK_EQ(stats.frees, stats.allocations);
  visit_calls = 0;
  zk_pool_visit(visit_pool, visit_and_free, NULL);
  CHECK_EQ(visit_calls, 0);
  zk_pool_destroy(visit_pool);
}

static void test_visitors_call_back(void) {
  test_expect_success("visitor calling into zkmem", visitors_call_back);
}

/* ---- a thread exits with part of its carve region left ---- */

/* The constructor calls into zkmem: another pool (created just before, the
 * neighbouring slot) and the pool registry. Thread exit used to construct
 * the rest of an exiting thread's region itself, holding the registry and
 * the pool lock: the first such call deadlocked. */
#define CONSTRUCTED_MAGIC UINT64_C(0x5eed5eed5eed5eed)
/* The word holding it: a free object's first word is zkmem's. */
#define MAGIC_WORD 2

static zk_pool_t *exit_pool, *exit_other;
static atomic_int exit_constructed;
static atomic_int exit_stage;
static void *exit_thread_objects[5];

static void construct_calling_zkmem(void *object, void *arg) {
  (void)arg;
  uint64_t *words = object;
  if (words[MAGIC_WORD] == CONSTRUCTED_MAGIC) {
    fprintf(stderr, "object %p constructed twice\n", object);
    _exit(3);
  }
  words[MAGIC_WORD] = CONSTRUCTED_MAGIC;
  void *other = zk_pool_alloc(exit_other);
  CHECK(other != NULL);
  words[1] = (uint64_t)(uintptr_t)other;
  zk_pool_t *scratch = zk_pool_create(16, NULL);
  CHECK(scratch != NULL);
  zk_pool_destroy(scratch);
  atomic_fetch_add(&exit_constructed, 1);
}

static void *carve_a_little_and_exit(void *arg) {
  (void)arg;
  for (int i = 0; i < 5; i++)
    CHECK((exit_thread_objects[i] = zk_pool_alloc(exit_pool)) != NULL);
  atomic_store(&exit_stage, 1);
  while (atomic_load(&exit_stage) != 2)
    usleep(100);
  return NULL; /* exits with 123 objects of its region uncarved */
}

static int compare_pointers(const void *a, const void *b) {
  uintptr_t x = *(const uintptr_t *)a, y = *(const uintptr_t *)b;
  return x < y ? -1 : x > y;
}

static void thread_exit_with_region(void) {
  alarm(10);
  exit_other = zk_pool_create(48, NULL);
  zk_pool_options_t options = {0};
  options.constructor = construct_calling_zkmem;
  exit_pool = zk_pool_create(64, &options);
  CHECK(exit_other != NULL && exit_pool != NULL);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, carve_a_little_and_exit, NULL) == 0);
  while (atomic_load(&exit_stage) != 1)
    usleep(100);
  /* This thread's region comes after the other's, which is then not its
   * page's tail when the other thread exits. */
  enum { COUNT = 400 };
  static void *objects[COUNT + 5];
  objects[0] = zk_pool_alloc(exit_pool);
  CHECK(objects[0] != NULL);
  CHECK((uintptr_t)objects[0] > (uintptr_t)exit_thread_objects[4]);
  atomic_store(&exit_stage, 2);
  CHECK(pthread_join(thread, NULL) == 0);

  /* The rest of the exited thread's region is free, not live. */
  visited = 0;
  zk_pool_visit(exit_pool, count_any_visit, NULL);
  CHECK_EQ(visited, 6);
  zk_pool_stats_t stats;
  zk_pool_stats(exit_pool, &stats);
  CHECK_EQ(stats.live, 6);
  CHECK_EQ(stats.reused, 0);
  CHECK_EQ(atomic_load(&exit_constructed), 6);

  /* The region serves later allocations, each object constructed once. */
  uintptr_t region_start = (uintptr_t)exit_thread_objects[0];
  uintptr_t region_end = region_start + 128 * 64; /* 8 KiB of 64 B objects */
  size_t from_region = 0;
  for (int i = 1; i < COUNT; i++) {
    objects[i] = zk_pool_alloc(exit_pool);
    CHECK(objects[i] != NULL);
    CHECK(((uint64_t *)objects[i])[MAGIC_WORD] == CONSTRUCTED_MAGIC);
    if ((uintptr_t)objects[i] >= region_start &&
        (uintptr_t)objects[i] < region_end)
      from_region++;
  }
  CHECK_EQ(from_region, 123);
  for (int i = 0; i < 5; i++)
    objects[COUNT + i] = exit_thread_objects[i];
  qsort(objects, COUNT + 5, sizeof(void *), compare_pointers);
  for (int i = 1; i < COUNT + 5; i++)
    CHECK(objects[i] != objects[i - 1]); /* handed out once */
  zk_pool_stats(exit_pool, &stats);
  CHECK_EQ(stats.allocations, COUNT + 5);
  CHECK_EQ(stats.reused, 0);
  CHECK_EQ(stats.live, COUNT + 5);
  CHECK_EQ(atomic_load(&exit_constructed), COUNT + 5); /* = fresh */
  CHECK_EQ(stats.pages, 1);
  visited = 0;
  zk_pool_visit(exit_pool, count_any_visit, NULL);
  CHECK_EQ(visited, COUNT + 5);
  zk_pool_destroy(exit_pool);
  zk_pool_destroy(exit_other);
}

static void test_thread_exit_with_region(void) {
  test_expect_success("thread exit with part of a region",
                      thread_exit_with_region);
}

/* Many threads exit with regions left, in rounds, while others carve: the
 * leftover list grows and shrinks, and every object is still constructed
 * once and handed out once, with exact statistics. */
enum { CHURN_ROUNDS = 16, CHURN_THREADS = 4, CHURN_MAX = 300 };
static void *churn_kept[CHURN_ROUNDS * CHURN_THREADS * CHURN_MAX];
static atomic_size_t churn_kept_count;

static void *churn_and_exit(void *arg) {
  size_t count = (size_t)(uintptr_t)arg;
  void *objects[CHURN_MAX];
  for (size_t i = 0; i < count; i++) {
    objects[i] = zk_pool_alloc(exit_pool);
    CHECK(objects[i] != NULL);
    CHECK(((uint64_t *)objects[i])[MAGIC_WORD] == CONSTRUCTED_MAGIC);
  }
  for (size_t i = 0; i < count; i++) {
    if (i % 2 == 0) {
      zk_pool_free(exit_pool, objects[i]);
    } else {
      size_t at = atomic_fetch_add(&churn_kept_count, 1);
      churn_kept[at] = objects[i];
    }
  }
  return NULL;
}

static void threads_exit_in_rounds(void) {
  alarm(20);
  exit_other = zk_pool_create(48, NULL);
  zk_pool_options_t options = {0};
  options.constructor = construct_calling_zkmem;
  exit_pool = zk_pool_create(64, &options);
  CHECK(exit_other != NULL && exit_pool != NULL);
  for (unsigned round = 0; round < CHURN_ROUNDS; round++) {
    pthread_t threads[CHURN_THREADS];
    for (unsigned t = 0; t < CHURN_THREADS; t++) {
      size_t count = (round * 97 + t * 61) % CHURN_MAX + 1;
      CHECK(pthread_create(&threads[t], NULL, churn_and_exit,
                           (void *)(uintptr_t)count) == 0);
    }
    for (unsigned t = 0; t < CHURN_THREADS; t++)
      CHECK(pthread_join(threads[t], NULL) == 0);
  }
  size_t kept = atomic_load(&churn_kept_count);
  enum { MORE = 5000 };
  static void *all[CHURN_ROUNDS * CHURN_THREADS * CHURN_MAX + MORE];
  memcpy(all, churn_kept, kept * sizeof(void *));
  for (size_t i = 0; i < MORE; i++) {
    all[kept + i] = zk_pool_alloc(exit_pool);
    CHECK(all[kept + i] != NULL);
    CHECK(((uint64_t *)all[kept + i])[MAGIC_WORD] == CONSTRUCTED_MAGIC);
  }
  size_t total = kept + MORE;
  qsort(all, total, sizeof(void *), compare_pointers);
  for (size_t i = 1; i < total; i++)
    CHECK(all[i] != all[i - 1]);
  zk_pool_stats_t stats;
  zk_pool_stats(exit_pool, &stats);
  CHECK_EQ(stats.live, total);
  CHECK_EQ(atomic_load(&exit_constructed), stats.allocations - stats.reused);
  visited = 0;
  zk_pool_visit(exit_pool, count_any_visit, NULL);
  CHECK_EQ(visited, total);
  zk_pool_destroy(exit_pool);
  zk_pool_destroy(exit_other);
}

static void test_threads_exit_in_rounds(void) {
  test_expect_success("threads exiting in rounds", threads_exit_in_rounds);
}

/* ---- free() of what is not a pool object's start ---- */

static char *interior_object;

static void free_interior(void) {
  zk_free(interior_object + 8);
}
static void free_never_handed_out(void) {
  zk_free(interior_object + 1000 * 48);
}

static void test_free_checks_pool_objects(void) {
  zk_pool_t *pool = zk_pool_create(40, NULL); /* 48-byte slots */
  interior_object = zk_pool_alloc(pool);
  CHECK(interior_object != NULL);
  /* The first object of a fresh page of one slice (1365 slots), of which
   * the first region reserves 170. */
  CHECK(((uintptr_t)interior_object & 0xffff) == 0);
  test_expect_abort(
      free_interior,
      report_line("free of a pointer inside a block (not its start)",
                  interior_object + 8, 48));
  test_expect_abort(free_never_handed_out,
                    report_line("free of a block zkmem never handed out",
                                interior_object + 1000 * 48, 48));
  zk_free(interior_object); /* its start: back to the pool */
  CHECK(zk_pool_alloc(pool) == interior_object);
  zk_pool_destroy(pool);
}

int main(void) {
  test_counts_and_reuse();
  test_seed_reuse_scenario();
  test_constructor();
  test_alignment_and_odd_sizes();
  test_bad_options();
  test_visit_and_destroy();
  test_preallocate();
  test_adaptive_reserve();
  test_max_cached();
  test_typed();
  test_wrong_pool_detected();
  test_null_and_foreign_pools();
  test_free_null_object();
  test_typed_without_slots();
  test_visitors_call_back();
  test_thread_exit_with_region();
  test_threads_exit_in_rounds();
  test_free_checks_pool_objects();
  printf("test_pool: ok\n");
  return 0;
}
