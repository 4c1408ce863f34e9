/* Object pools: every call and every statistic, in deterministic
 * single-threaded scenarios where the counts are exact. */
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <stdint.h>
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
  printf("test_pool: ok\n");
  return 0;
}
