/* Task heaps under threads: every thread plays a worker that polls tasks.
 * A task has its own heap; a worker enters a random task's heap, allocates
 * blocks of random sizes with plain zk_malloc (counted in the task), frees
 * some of the task's blocks that other workers made, and leaves. Every
 * block carries a pattern from its address, size and tag, checked before
 * its free. At the end every task's live bytes must be exactly zero, and a
 * last round fills heaps and destroys them with their blocks live.
 *
 * Usage: stress_heaps [threads] [operations per thread] */
#include "test_util.h"
#include "zkmem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define TASKS 8
#define SLOTS 256 /* per task */

typedef struct task {
  zk_heap_t *heap;
  pthread_mutex_t lock; /* the slots */
  unsigned char *blocks[SLOTS];
  size_t sizes[SLOTS];
  unsigned tags[SLOTS];
} task_t;

static task_t tasks[TASKS];
static atomic_ullong corruptions, checked;
static size_t operations = 100000;

static uint64_t next_random(uint64_t *state) {
  *state ^= *state << 13;
  *state ^= *state >> 7;
  *state ^= *state << 17;
  return *state;
}

static size_t random_size(uint64_t *state) {
  uint64_t r = next_random(state);
  if (r % 1000 == 0)
    return 70 * 1024 + r % (200 * 1024); /* large */
  return 1 + (r >> 16) % ((r >> 40) % 4 == 0 ? 4096 : 256);
}

static void check_and_free(unsigned char *block, size_t size, unsigned tag) {
  if (!test_verify(block, size, tag))
    atomic_fetch_add(&corruptions, 1);
  atomic_fetch_add(&checked, 1);
  zk_free(block);
}

static void *worker(void *arg) {
  uint64_t state = (uintptr_t)arg * 0x9e3779b97f4a7c15ull + 1;
  for (size_t op = 0; op < operations; op++) {
    task_t *task = &tasks[next_random(&state) % TASKS];
    zk_heap_t *before = zk_heap_enter(task->heap);
    CHECK(before == NULL);
    for (int step = 0; step < 4; step++) {
      unsigned slot = (unsigned)(next_random(&state) % SLOTS);
      size_t size = random_size(&state);
      unsigned tag = (unsigned)next_random(&state);
      unsigned char *fresh = zk_malloc(size);
      CHECK(fresh != NULL);
      test_fill(fresh, size, tag);
      pthread_mutex_lock(&task->lock);
      unsigned char *old = task->blocks[slot];
      size_t old_size = task->sizes[slot];
      unsigned old_tag = task->tags[slot];
      task->blocks[slot] = fresh;
      task->sizes[slot] = size;
      task->tags[slot] = tag;
      pthread_mutex_unlock(&task->lock);
      if (old != NULL) /* often another worker's block */
        check_and_free(old, old_size, old_tag);
    }
    CHECK(zk_heap_enter(NULL) == task->heap);
  }
  zk_thread_idle();
  return NULL;
}

static void run(unsigned threads) {
  pthread_t ids[64];
  for (uintptr_t t = 0; t < threads; t++)
    CHECK(pthread_create(&ids[t], NULL, worker, (void *)(t + 1)) == 0);
  for (unsigned t = 0; t < threads; t++)
    CHECK(pthread_join(ids[t], NULL) == 0);
}

int main(int argc, char **argv) {
  unsigned threads = argc > 1 ? (unsigned)atoi(argv[1]) : 8;
  if (argc > 2)
    operations = (size_t)atoll(argv[2]);
  if (threads > 64)
    threads = 64;
  zk_heap_t *tenant = zk_heap_create(&(zk_heap_options_t){.name = "tenant"});
  CHECK(tenant != NULL);
  for (int i = 0; i < TASKS; i++) {
    tasks[i].heap =
        zk_heap_create(&(zk_heap_options_t){.name = "task", .parent = tenant});
    CHECK(tasks[i].heap != NULL);
    pthread_mutex_init(&tasks[i].lock, NULL);
  }
  run(threads);
  /* Half the tasks end with their blocks freed one by one, and must show
   * exactly zero live bytes; the other half are destroyed full. */
  uint64_t allocations = 0;
  for (int i = 0; i < TASKS; i++) {
    if (i % 2 == 0) {
      for (int s = 0; s < SLOTS; s++)
        if (tasks[i].blocks[s] != NULL)
          check_and_free(tasks[i].blocks[s], tasks[i].sizes[s],
                         tasks[i].tags[s]);
      zk_heap_stats_t stats;
      CHECK_EQ(zk_heap_stats(tasks[i].heap, &stats), 0);
      CHECK_EQ(stats.live_bytes, 0);
      CHECK_EQ(stats.allocations, stats.frees);
      allocations += stats.allocations;
    } else {
      for (int s = 0; s < SLOTS; s++)
        if (tasks[i].blocks[s] != NULL &&
            !test_verify(tasks[i].blocks[s], tasks[i].sizes[s],
                         tasks[i].tags[s]))
          atomic_fetch_add(&corruptions, 1);
    }
    zk_heap_destroy(tasks[i].heap);
  }
  zk_heap_stats_t stats;
  CHECK_EQ(zk_heap_stats(tenant, &stats), 0);
  CHECK_EQ(stats.live_bytes, 0); /* children destroyed: nothing charged */
  zk_heap_destroy(tenant);
  printf("stress_heaps: %u threads x %zu task polls, %d tasks: %llu blocks "
         "checked, %llu allocations counted in freed tasks, %llu "
         "corruptions\n",
         threads, operations, TASKS, (unsigned long long)atomic_load(&checked),
         (unsigned long long)allocations,
         (unsigned long long)atomic_load(&corruptions));
  CHECK_EQ(atomic_load(&corruptions), 0);
  return 0;
}
