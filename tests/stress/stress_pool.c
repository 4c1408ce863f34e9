/* Pools across threads: producers allocate objects from shared pools, fill
 * them with a checksum pattern and pass them through a queue to consumers,
 * which check and free them (cross-thread frees into the consumers'
 * magazines). Every thread also allocates and frees locally. At the end,
 * the pool statistics must balance exactly. */
#include "test_util.h"
#include "zkmem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define POOLS       3
#define QUEUE_SLOTS 4096

static const size_t object_sizes[POOLS] = {24, 64, 200};
static zk_pool_t *pools[POOLS];
static _Atomic(void *) queue[QUEUE_SLOTS];
static atomic_ullong corruptions, passed, local_checked;
static atomic_int producers_running;
static size_t operations = 200000;

typedef struct header {
  uint32_t pool_index;
  uint32_t tag;
} header_t;

static void object_fill(void *object, unsigned pool_index, unsigned tag) {
  header_t *header = object;
  header->pool_index = pool_index;
  header->tag = tag;
  size_t size = object_sizes[pool_index];
  test_fill((char *)object + sizeof(header_t), size - sizeof(header_t), tag);
}

static void object_check_free(void *object) {
  header_t *header = object;
  unsigned pool_index = header->pool_index;
  if (pool_index >= POOLS ||
      !test_verify((char *)object + sizeof(header_t),
                   object_sizes[pool_index] - sizeof(header_t), header->tag)) {
    atomic_fetch_add(&corruptions, 1);
    return;
  }
  zk_pool_free(pools[pool_index], object);
}

static uint64_t next_random(uint64_t *state) {
  *state ^= *state << 13;
  *state ^= *state >> 7;
  *state ^= *state << 17;
  return *state;
}

static void local_churn(uint64_t *state) {
  void *local[16];
  unsigned pool_index = (unsigned)(next_random(state) % POOLS);
  for (int i = 0; i < 16; i++) {
    local[i] = zk_pool_alloc(pools[pool_index]);
    CHECK(local[i] != NULL);
    object_fill(local[i], pool_index, (unsigned)i * 7919u);
  }
  for (int i = 15; i >= 0; i--) {
    object_check_free(local[i]);
    atomic_fetch_add_explicit(&local_checked, 1, memory_order_relaxed);
  }
}

static void *producer(void *arg) {
  uint64_t state = 0x2545f4914f6cdd1dull ^ (uintptr_t)arg;
  for (size_t op = 0; op < operations; op++) {
    uint64_t r = next_random(&state);
    unsigned pool_index = (unsigned)(r % POOLS);
    void *object = zk_pool_alloc(pools[pool_index]);
    CHECK(object != NULL);
    object_fill(object, pool_index, (unsigned)(r >> 16));
    _Atomic(void *) *slot = &queue[(r >> 24) % QUEUE_SLOTS];
    void *expected = NULL;
    while (!atomic_compare_exchange_weak(slot, &expected, object)) {
      expected = NULL;
      slot = &queue[next_random(&state) % QUEUE_SLOTS];
    }
    if (op % 64 == 0)
      local_churn(&state);
  }
  atomic_fetch_sub(&producers_running, 1);
  return NULL;
}

static void *consumer(void *arg) {
  uint64_t state = 0x9e3779b97f4a7c15ull ^ (uintptr_t)arg;
  size_t index = (uintptr_t)arg;
  for (;;) {
    int running = atomic_load(&producers_running);
    size_t found = 0;
    for (size_t i = 0; i < QUEUE_SLOTS; i++) {
      void *object = atomic_exchange(&queue[(index + i) % QUEUE_SLOTS], NULL);
      if (object != NULL) {
        object_check_free(object);
        atomic_fetch_add(&passed, 1);
        found++;
      }
    }
    if (found == 0 && running == 0)
      break;
    if (found % 97 == 0)
      local_churn(&state);
  }
  return NULL;
}

int main(int argc, char **argv) {
  unsigned pairs = argc > 1 ? (unsigned)atoi(argv[1]) : 2;
  if (argc > 2)
    operations = (size_t)atoll(argv[2]);
  for (int i = 0; i < POOLS; i++) {
    zk_pool_options_t options = {0};
    options.name = "stress";
    pools[i] = zk_pool_create(object_sizes[i], &options);
    CHECK(pools[i] != NULL);
  }
  pthread_t threads[2 * 32];
  atomic_store(&producers_running, (int)pairs);
  for (unsigned i = 0; i < pairs; i++) {
    CHECK(pthread_create(&threads[2 * i], NULL, producer,
                         (void *)(uintptr_t)(i + 1)) == 0);
    CHECK(pthread_create(&threads[2 * i + 1], NULL, consumer,
                         (void *)(uintptr_t)(i * 997)) == 0);
  }
  for (unsigned i = 0; i < 2 * pairs; i++)
    pthread_join(threads[i], NULL);
  printf("stress_pool: %u producers, %u consumers, %llu objects passed "
         "between threads, %llu freed locally, %llu corruptions\n",
         pairs, pairs, (unsigned long long)atomic_load(&passed),
         (unsigned long long)atomic_load(&local_checked),
         (unsigned long long)atomic_load(&corruptions));
  CHECK_EQ(atomic_load(&corruptions), 0);
  CHECK_EQ(atomic_load(&passed), (unsigned long long)pairs * operations);
  uint64_t allocations = 0, frees = 0;
  for (int i = 0; i < POOLS; i++) {
    zk_pool_stats_t stats;
    CHECK_EQ(zk_pool_stats(pools[i], &stats), 0);
    CHECK_EQ(stats.live, 0);
    CHECK_EQ(stats.allocations, stats.frees);
    CHECK(stats.reuse_rate > 0.9);
    allocations += stats.allocations;
    frees += stats.frees;
    zk_pool_destroy(pools[i]);
  }
  CHECK_EQ(allocations, frees);
  CHECK(allocations >= (uint64_t)pairs * operations);
  return 0;
}
