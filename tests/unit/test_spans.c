/* Spans, large and huge blocks, purge, huge pages, statistics and options:
 * split and merge, cross-size reuse, RSS returned to the OS, in-place
 * growth of huge blocks, and ZKMEM_* parsing. */
#include "internal.h"
#include "sizeclass.h"
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void test_split_and_merge(void) {
  /* First allocations of the process: one fresh segment, spans in order. */
  page_t *a = segment_span_alloc(2, PAGE_LARGE, NULL);
  page_t *b = segment_span_alloc(2, PAGE_LARGE, NULL);
  page_t *c = segment_span_alloc(2, PAGE_LARGE, NULL);
  CHECK(a && b && c);
  CHECK(b->start == a->start + 2 * SLICE_SIZE); /* split from one span */
  CHECK(c->start == b->start + 2 * SLICE_SIZE);
  uint8_t *a_start = a->start;
  segment_span_free(b);
  segment_span_free(a); /* merges with b */
  segment_span_free(c); /* merges with a+b and the free rest */
  /* One free span: the whole usable segment is available from A on. */
  page_t *whole = segment_span_alloc(SEGMENT_USABLE_SLICES, PAGE_LARGE, NULL);
  CHECK(whole != NULL && whole->start == a_start);
  segment_span_free(whole);
}

static void test_cross_size_reuse(void) {
  enum { LARGE_COUNT = 200, SMALL_COUNT = 20 * 1024 * 1024 / 64 };
  void **small = zk_malloc(SMALL_COUNT * sizeof(void *)); /* huge: own map */
  void *large[LARGE_COUNT];
  for (int i = 0; i < LARGE_COUNT; i++) {
    large[i] = zk_malloc(256 * 1024);
    CHECK(large[i] != NULL);
    memset(large[i], 1, 4096);
  }
  for (int i = 0; i < LARGE_COUNT; i++)
    zk_free(large[i]);
  zk_stats_t before;
  zk_stats_get(&before);
  /* 20 MiB of small blocks fit in the 50 MiB of freed large spans. */
  for (int i = 0; i < SMALL_COUNT; i++)
    small[i] = zk_malloc(64);
  zk_stats_t after;
  zk_stats_get(&after);
  printf("cross-size reuse: mapped %zu -> %zu bytes\n", before.bytes_mapped,
         after.bytes_mapped);
  CHECK(after.bytes_mapped <= before.bytes_mapped);
  for (int i = 0; i < SMALL_COUNT; i++)
    zk_free(small[i]);
  zk_free(small);
}

static size_t rss_now(void) {
  return stats_rss(NULL);
}

static size_t fill_and_free(size_t total, unsigned seed) {
  size_t capacity = total / 1024;
  void **blocks = zk_malloc(capacity * sizeof(void *));
  size_t count = 0, bytes = 0;
  uint64_t state = seed;
  while (bytes < total && count < capacity) {
    size_t size = 1024 + (size_t)(random_next(&state) % (63 * 1024));
    blocks[count] = zk_malloc(size);
    CHECK(blocks[count] != NULL);
    memset(blocks[count], (int)count, size);
    bytes += size;
    count++;
  }
  size_t peak = rss_now();
  for (size_t i = 0; i < count; i++)
    zk_free(blocks[i]);
  zk_free(blocks);
  return peak;
}

static void test_rss_returned(void) {
  size_t peak = fill_and_free((size_t)1 << 30, 1);
  zk_collect(true);
  size_t after = rss_now();
  printf("1 GiB of 1-64 KB blocks: rss %zu MiB at peak, %zu MiB after "
         "zk_collect(true)\n",
         peak >> 20, after >> 20);
  CHECK(after < peak / 10);

  /* Without zk_collect: the purge delay, then some allocation activity. */
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 100) == 0);
  peak = fill_and_free((size_t)256 << 20, 2);
  struct timespec wait = {0, 350 * 1000 * 1000};
  nanosleep(&wait, NULL);
  for (int i = 0; i < 100; i++)
    zk_free(zk_malloc((size_t)(100 + i) * 1024)); /* large: slow paths */
  nanosleep(&wait, NULL);
  for (int i = 0; i < 100; i++)
    zk_free(zk_malloc((size_t)(100 + i) * 1024));
  after = rss_now();
  printf("256 MiB without zk_collect: rss %zu MiB at peak, %zu MiB after "
         "the purge delay\n",
         peak >> 20, after >> 20);
  CHECK(after < peak / 4);
  zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 1000);
}

static void test_huge_realloc(void) {
  size_t size = (size_t)100 << 20;
  unsigned char *p = zk_malloc(size);
  CHECK(p != NULL);
  for (size_t i = 0; i < size; i += 4096)
    p[i] = (unsigned char)(i >> 12);
  for (size_t grown = 200; grown <= 400; grown += 100) {
    p = zk_realloc(p, grown << 20);
    CHECK(p != NULL);
    for (size_t i = 0; i < size; i += 4096)
      CHECK(p[i] == (unsigned char)(i >> 12));
    CHECK(zk_usable_size(p) >= grown << 20);
  }
  p = zk_realloc(p, (size_t)50 << 20); /* shrink keeps the prefix */
  for (size_t i = 0; i < ((size_t)50 << 20); i += 4096)
    CHECK(p[i] == (unsigned char)(i >> 12));
  zk_free(p);
}

static void test_huge_pages_fallback(void) {
  for (long mode = 1; mode <= 2; mode++) {
    CHECK(zk_option_set(ZK_OPTION_HUGE_PAGES, mode) == 0);
    void *huge = zk_malloc((size_t)8 << 20);
    CHECK(huge != NULL);
    memset(huge, 3, (size_t)8 << 20);
    zk_stats_t stats;
    zk_stats_get(&stats);
    CHECK(stats.bytes_huge_pages <= stats.bytes_mapped);
    printf("huge pages mode %ld: %zu of %zu mapped bytes huge-page backed\n",
           mode, stats.bytes_huge_pages, stats.bytes_mapped);
    zk_free(huge);
  }
  zk_option_set(ZK_OPTION_HUGE_PAGES, 0);
}

static void test_class_stats(void) {
  zk_stats_t before, after;
  zk_stats_get(&before);
  void *blocks[1000];
  for (int i = 0; i < 1000; i++)
    blocks[i] = zk_malloc(100);
  for (int i = 0; i < 400; i++)
    zk_free(blocks[i]);
  void *large = zk_malloc(500 * 1024);
  void *huge = zk_malloc((size_t)5 << 20);
  zk_stats_get(&after);
  unsigned c = size_to_class(100);
  CHECK_EQ(after.classes[c].block_size, 112);
  CHECK_EQ(after.classes[c].allocations - before.classes[c].allocations, 1000);
  CHECK_EQ(after.classes[c].frees - before.classes[c].frees, 400);
  CHECK_EQ(after.classes[c].live - before.classes[c].live, 600);
  CHECK_EQ(after.large_live - before.large_live, 1);
  CHECK_EQ(after.huge_live - before.huge_live, 1);
  FILE *json = tmpfile();
  zk_stats_json(json);
  rewind(json);
  char text[16384] = {0};
  CHECK(fread(text, 1, sizeof(text) - 1, json) > 0);
  fclose(json);
  CHECK(text[0] == '{' && strstr(text, "\"bytes_live\":") != NULL &&
        strstr(text, "\"classes\":[") != NULL);
  for (int i = 400; i < 1000; i++)
    zk_free(blocks[i]);
  zk_free(large);
  zk_free(huge);
}

/* Re-run this program with one variable set; the child prints the option. */
static void test_environment(const char *self) {
  int pipe_fds[2];
  CHECK(pipe(pipe_fds) == 0);
  pid_t child = fork();
  if (child == 0) {
    dup2(pipe_fds[1], 1);
    dup2(pipe_fds[1], 2);
    setenv("ZKMEM_PURGE_DELAY_MS", "abc", 1);
    setenv("ZKMEM_HUGE_PAGES", "reserved", 1);
    execl(self, self, "--print-options", (char *)NULL);
    _exit(127);
  }
  close(pipe_fds[1]);
  char output[1024] = {0};
  size_t used = 0;
  ssize_t got;
  while ((got = read(pipe_fds[0], output + used, sizeof(output) - 1 - used)) >
         0)
    used += (size_t)got;
  close(pipe_fds[0]);
  int status;
  waitpid(child, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(strstr(output, "ZKMEM_PURGE_DELAY_MS=\"abc\" is not valid") != NULL);
  CHECK(strstr(output, "purge_delay_ms 1000 huge_pages 2") != NULL);
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--print-options") == 0) {
    printf("purge_delay_ms %ld huge_pages %ld\n",
           zk_option_get(ZK_OPTION_PURGE_DELAY_MS),
           zk_option_get(ZK_OPTION_HUGE_PAGES));
    return 0;
  }
  test_split_and_merge();
  test_cross_size_reuse();
  test_rss_returned();
  test_huge_realloc();
  test_huge_pages_fallback();
  test_class_stats();
  errno = 0;
  CHECK(zk_option_set((zk_option_t)99, 1) == -1 && errno == EINVAL);
  CHECK(zk_option_get(ZK_OPTION_PURGE_DELAY_MS) == 1000);
  test_environment(argv[0]);
  printf("test_spans: ok\n");
  return 0;
}
