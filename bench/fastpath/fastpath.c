/* Fast-path probe: N allocation + free pairs through one entry point, with
 * nothing else in the loop, for instruction counting under callgrind.
 *
 *   bench_fastpath malloc N   zk_malloc(64) + zk_free
 *   bench_fastpath pool N     zk_pool_alloc + zk_pool_free on a 64 B pool
 *   bench_fastpath system N   malloc(64) + free as linked (glibc, unless the
 *                             static library was built to override malloc)
 *
 * check_budget.py runs it for two values of N and divides the difference in
 * instructions by the difference in pairs, which cancels start-up costs. The
 * figure includes about four instructions of loop and argument set-up. */
#include <zkmem.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define OBJECT_SIZE 64

/* Keeps the block alive in the compiler's eyes so the pair is not elided. */
static inline void escape(void *pointer) {
  __asm__ volatile("" : : "r"(pointer) : "memory");
}

static void run_malloc(uint64_t pairs) {
  for (uint64_t pair = 0; pair < pairs; pair++) {
    void *block = zk_malloc(OBJECT_SIZE);
    escape(block);
    zk_free(block);
  }
}

static void run_pool(uint64_t pairs) {
  zk_pool_t *pool = zk_pool_create(OBJECT_SIZE, NULL);
  if (pool == NULL) {
    perror("zk_pool_create");
    exit(1);
  }
  for (uint64_t pair = 0; pair < pairs; pair++) {
    void *object = zk_pool_alloc(pool);
    escape(object);
    zk_pool_free(pool, object);
  }
  zk_pool_destroy(pool);
}

static void run_system(uint64_t pairs) {
  for (uint64_t pair = 0; pair < pairs; pair++) {
    void *block = malloc(OBJECT_SIZE);
    escape(block);
    free(block);
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s malloc|pool|system PAIRS\n", argv[0]);
    return 2;
  }
  char *end;
  errno = 0;
  uint64_t pairs = strtoull(argv[2], &end, 10);
  if (errno != 0 || *end != '\0') {
    fprintf(stderr, "%s: PAIRS must be a number\n", argv[0]);
    return 2;
  }
  if (strcmp(argv[1], "malloc") == 0)
    run_malloc(pairs);
  else if (strcmp(argv[1], "pool") == 0)
    run_pool(pairs);
  else if (strcmp(argv[1], "system") == 0)
    run_system(pairs);
  else {
    fprintf(stderr, "%s: unknown entry point '%s'\n", argv[0], argv[1]);
    return 2;
  }
  return 0;
}
