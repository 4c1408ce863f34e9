/* Fast-path probe: N allocation + free pairs through one entry point, with
 * nothing else in the loop, for instruction counting under callgrind.
 *
 *   bench_fastpath malloc N   zk_malloc(64) + zk_free
 *   bench_fastpath pool N     zk_pool_alloc + zk_pool_free on a 64 B pool
 *   bench_fastpath system N   malloc(64) + free as linked (glibc, unless the
 *                             static library was built to override malloc)
 *   bench_fastpath heap_entered N   zk_malloc(64) + zk_free inside an
 *                             entered task heap
 *   bench_fastpath heap_empty N     zk_heap_create + zk_heap_destroy
 *   bench_fastpath task_heap N      a task: create a heap, enter it, 100
 *                             blocks of 16 B-2 KiB, leave, destroy
 *   bench_fastpath task_free N      the same 100 blocks from the default
 *                             heap, freed one by one
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

static void run_heap_entered(uint64_t pairs) {
  zk_heap_t *heap = zk_heap_create(NULL);
  if (heap == NULL) {
    perror("zk_heap_create");
    exit(1);
  }
  zk_heap_enter(heap);
  run_malloc(pairs);
  zk_heap_enter(NULL);
  zk_heap_destroy(heap);
}

static void run_heap_empty(uint64_t pairs) {
  for (uint64_t pair = 0; pair < pairs; pair++) {
    zk_heap_t *heap = zk_heap_create(NULL);
    escape(heap);
    zk_heap_destroy(heap);
  }
}

/* A short task's blocks: 100 sizes spread log-uniformly over 16 B-2 KiB. */
#define TASK_BLOCKS 100
static size_t task_sizes[TASK_BLOCKS];

static void task_sizes_init(void) {
  uint64_t state = 0x9e3779b97f4a7c15u;
  for (int i = 0; i < TASK_BLOCKS; i++) {
    state = state * 6364136223846793005u + 1442695040888963407u;
    unsigned shift = 4 + (unsigned)(state >> 33) % 7; /* 16 B .. 1 KiB */
    task_sizes[i] = ((size_t)1 << shift) + (state >> 45) % ((size_t)1 << shift);
  }
}

static void run_task_heap(uint64_t tasks) {
  task_sizes_init();
  for (uint64_t task = 0; task < tasks; task++) {
    zk_heap_t *heap = zk_heap_create(NULL);
    zk_heap_t *previous = zk_heap_enter(heap);
    for (int i = 0; i < TASK_BLOCKS; i++)
      escape(zk_malloc(task_sizes[i]));
    zk_heap_enter(previous);
    zk_heap_destroy(heap);
  }
}

static void run_task_free(uint64_t tasks) {
  task_sizes_init();
  static void *blocks[TASK_BLOCKS];
  for (uint64_t task = 0; task < tasks; task++) {
    for (int i = 0; i < TASK_BLOCKS; i++)
      escape(blocks[i] = zk_malloc(task_sizes[i]));
    for (int i = 0; i < TASK_BLOCKS; i++)
      zk_free(blocks[i]);
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr,
            "usage: %s malloc|pool|system|heap_entered|heap_empty|task_heap|"
            "task_free PAIRS\n",
            argv[0]);
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
  else if (strcmp(argv[1], "heap_entered") == 0)
    run_heap_entered(pairs);
  else if (strcmp(argv[1], "heap_empty") == 0)
    run_heap_empty(pairs);
  else if (strcmp(argv[1], "task_heap") == 0)
    run_task_heap(pairs);
  else if (strcmp(argv[1], "task_free") == 0)
    run_task_free(pairs);
  else {
    fprintf(stderr, "%s: unknown entry point '%s'\n", argv[0], argv[1]);
    return 2;
  }
  return 0;
}
