/* Pools in secure mode, on from before the first allocation, so that every
 * segment keeps its guard slice and every pool page its free bits: large
 * preallocation, double frees caught at once (and, in warn mode, refused
 * with exact statistics), NULL handling on the secure paths. Misuse runs in
 * a forked child whose exact report is checked. */
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static char expected_line[256];
static const char *report_line(const char *what, const void *pointer,
                               size_t size) {
  snprintf(expected_line, sizeof(expected_line),
           "zkmem: error: %s: pointer %p (block size %zu)\n", what, pointer,
           size);
  return expected_line;
}

/* More objects than a guarded segment's 62 slices hold: pages used to be
 * asked for 63 slices, which only an unguarded segment has. */
static void test_preallocate_large(void) {
  enum { COUNT = 100000 };
  zk_pool_options_t options = {0};
  options.preallocate = COUNT;
  errno = 0;
  zk_pool_t *pool = zk_pool_create(64, &options);
  CHECK(pool != NULL);
  zk_pool_stats_t stats;
  CHECK_EQ(zk_pool_stats(pool, &stats), 0);
  CHECK(stats.pages >= 2);
  CHECK_EQ(stats.allocations, 0);
  uint64_t pages = stats.pages;
  static void *objects[COUNT];
  for (int i = 0; i < COUNT; i++) {
    objects[i] = zk_pool_alloc(pool);
    CHECK(objects[i] != NULL);
    *(uint64_t *)objects[i] = (uint64_t)i;
  }
  CHECK_EQ(zk_pool_stats(pool, &stats), 0);
  CHECK_EQ(stats.pages, pages); /* all of it preallocated */
  CHECK_EQ(stats.live, COUNT);
  CHECK_EQ(stats.reused, 0);
  for (int i = 0; i < COUNT; i++) {
    CHECK_EQ(*(uint64_t *)objects[i], i);
    zk_pool_free(pool, objects[i]);
  }
  CHECK_EQ(zk_pool_stats(pool, &stats), 0);
  CHECK_EQ(stats.live, 0);
  zk_pool_destroy(pool);
}

static zk_pool_t *pool;
static void *object_a, *object_b, *object_c;

static void double_free_at_once(void) {
  zk_pool_free(pool, object_a);
  zk_pool_free(pool, object_a);
}

static void double_free_after_others(void) {
  zk_pool_free(pool, object_a);
  zk_pool_free(pool, object_b);
  zk_pool_free(pool, object_c);
  zk_pool_free(pool, object_a);
}

/* The object went out again in between: only the last free is wrong. */
static void double_free_after_reuse(void) {
  zk_pool_free(pool, object_a);
  CHECK(zk_pool_alloc(pool) == object_a);
  zk_pool_free(pool, object_a);
  zk_pool_free(pool, object_b);
  zk_pool_free(pool, object_a);
}

/* free() of a pool object goes through the same check. */
static void double_free_through_free(void) {
  zk_pool_free(pool, object_a);
  zk_free(object_a);
}

/* Warn mode: the second free is refused, so the object is handed out once
 * and the statistics do not count it. */
static void double_free_warned(void) {
  CHECK(zk_option_set(ZK_OPTION_ON_ERROR, 1) == 0);
  zk_pool_stats_t before, after;
  CHECK_EQ(zk_pool_stats(pool, &before), 0);
  zk_pool_free(pool, object_a);
  zk_pool_free(pool, object_a);
  void *first = zk_pool_alloc(pool);
  void *second = zk_pool_alloc(pool);
  CHECK(first != NULL && second != NULL && first != second);
  CHECK_EQ(zk_pool_stats(pool, &after), 0);
  CHECK_EQ(after.frees, before.frees + 1);
  CHECK_EQ(after.live, before.live + 1);
  CHECK_EQ(after.allocations, before.allocations + 2);
}

static void test_double_free(void) {
  pool = zk_pool_create(40, NULL); /* 48-byte slots: reports say 40 */
  CHECK(pool != NULL);
  object_a = zk_pool_alloc(pool);
  object_b = zk_pool_alloc(pool);
  object_c = zk_pool_alloc(pool);
  CHECK(object_a != NULL && object_b != NULL && object_c != NULL);
  const char *line = report_line("double free", object_a, 40);
  test_expect_abort(double_free_at_once, line);
  test_expect_abort(double_free_after_others, line);
  test_expect_abort(double_free_after_reuse, line);
  test_expect_abort(double_free_through_free, line);

  char message[512];
  int status = test_run_child(double_free_warned, message, sizeof(message));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
      strcmp(message, line) != 0) {
    fprintf(stderr, "double free, warn: status %#x, expected \"%s\": %s\n",
            status, line, message);
    exit(1);
  }

  /* Correct use goes on working: each object freed once, reused. */
  zk_pool_free(pool, object_a);
  CHECK(zk_pool_alloc(pool) == object_a);
  zk_pool_free(pool, object_a);
  zk_pool_free(pool, object_b);
  zk_pool_free(pool, object_c);
  zk_pool_stats_t stats;
  CHECK_EQ(zk_pool_stats(pool, &stats), 0);
  CHECK_EQ(stats.live, 0);
  CHECK_EQ(stats.frees, 4);
  zk_pool_destroy(pool);
}

/* Secure magazines hold nothing, so NULL reaches the slow paths. */
static void test_null_secure(void) {
  zk_pool_t *secure_pool = zk_pool_create(32, NULL);
  void *object = zk_pool_alloc(secure_pool);
  CHECK(object != NULL);
  zk_pool_free(secure_pool, NULL);
  zk_pool_free(NULL, NULL);
  errno = 0;
  CHECK(zk_pool_alloc(NULL) == NULL);
  CHECK_EQ(errno, EINVAL);
  void *next = zk_pool_alloc(secure_pool);
  CHECK(next != NULL && next != object);
  zk_pool_stats_t stats;
  CHECK_EQ(zk_pool_stats(secure_pool, &stats), 0);
  CHECK_EQ(stats.frees, 0);
  CHECK_EQ(stats.live, 2);
  zk_pool_destroy(secure_pool);
}

int main(int argc, char **argv) {
  (void)argc;
  test_reexec_without_zkmem_environment(argv[0]);
  CHECK(zk_option_set(ZK_OPTION_SECURE, 1) == 0);
  test_preallocate_large();
  test_double_free();
  test_null_secure();
  printf("test_pool_secure: ok\n");
  return 0;
}
