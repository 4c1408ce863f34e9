/* Multi-threaded stress: random sizes, random lifetimes, and a share of
 * blocks handed to another thread through an exchange table and freed
 * there. Every block carries a pattern derived from its address, size and
 * a per-block tag; it is checked before every free. Any corruption (two
 * live blocks overlapping, a block reused while live, a lost write) fails.
 *
 * Usage: stress_threads [threads] [operations per thread] */
#include "test_util.h"
#include "zkmem.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define LIVE_SLOTS     512
#define EXCHANGE_SLOTS 1024

typedef struct tagged_block {
  unsigned char *data;
  size_t size;
  unsigned tag;
} tagged_block_t;

/* What travels between threads: itself a zk_malloc block, freed by the
 * receiver. */
typedef struct envelope {
  tagged_block_t block;
  unsigned check;
} envelope_t;

static _Atomic(envelope_t *) exchange[EXCHANGE_SLOTS];
static atomic_ullong corruptions, handed_off, checked;
static size_t operations_per_thread = 200000;

static uint64_t next_random(uint64_t *state) {
  *state ^= *state << 13;
  *state ^= *state >> 7;
  *state ^= *state << 17;
  return *state;
}

/* Mostly small, some medium, a few large and huge. */
static size_t random_size(uint64_t *state) {
  uint64_t r = next_random(state);
  switch (r % 16) {
  case 0:
    return 1 + (r >> 8) % 65536;
  case 1:
    return (r >> 8) % 64 == 0 ? (1 + (r >> 16) % (3u << 20))
                              : 1 + (r >> 8) % 8192;
  default:
    return 1 + (r >> 8) % 512;
  }
}

/* Fill or check only the ends and a sample of the middle of big blocks, so
 * the test spends its time in the allocator. */
static void pattern_apply(unsigned char *data, size_t size, unsigned tag,
                          int check) {
  size_t limit = size < 256 ? size : 128;
  for (int end = 0; end < 2; end++) {
    size_t start = end == 0 ? 0 : size - limit;
    for (size_t i = start; i < start + limit; i++) {
      unsigned char expected = test_pattern_byte(data, i, tag);
      if (check) {
        if (data[i] != expected) {
          atomic_fetch_add(&corruptions, 1);
          return;
        }
      } else {
        data[i] = expected;
      }
    }
  }
}

static void block_free_checked(unsigned char *data, size_t size, unsigned tag) {
  pattern_apply(data, size, tag, 1);
  atomic_fetch_add_explicit(&checked, 1, memory_order_relaxed);
  zk_free(data);
}

static void envelope_receive(envelope_t *envelope) {
  if (envelope->check != (envelope->block.tag ^ 0xa5a5a5a5u))
    atomic_fetch_add(&corruptions, 1);
  block_free_checked(envelope->block.data, envelope->block.size,
                     envelope->block.tag);
  zk_free(envelope);
}

static void *worker(void *arg) {
  uint64_t state = 0x9e3779b97f4a7c15ull * ((uintptr_t)arg + 1);
  tagged_block_t live[LIVE_SLOTS];
  memset(live, 0, sizeof(live));
  for (size_t op = 0; op < operations_per_thread; op++) {
    uint64_t r = next_random(&state);
    size_t slot = r % LIVE_SLOTS;
    tagged_block_t *block = &live[slot];
    if (block->data != NULL) {
      if ((r >> 20) % 4 == 0) {
        /* Hand it to whichever thread takes this exchange slot next; free
         * what was waiting there. */
        _Atomic(envelope_t *) *entry = &exchange[(r >> 24) % EXCHANGE_SLOTS];
        envelope_t *waiting = atomic_exchange(entry, NULL);
        if (waiting != NULL) {
          envelope_receive(waiting);
          atomic_fetch_add(&handed_off, 1);
        }
        envelope_t *envelope = zk_malloc(sizeof(*envelope));
        CHECK(envelope != NULL);
        envelope->block = *block;
        envelope->check = block->tag ^ 0xa5a5a5a5u;
        envelope_t *expected = NULL;
        if (!atomic_compare_exchange_strong(entry, &expected, envelope))
          envelope_receive(envelope);
      } else {
        block_free_checked(block->data, block->size, block->tag);
      }
      block->data = NULL;
      continue;
    }
    size_t size = random_size(&state);
    unsigned char *data;
    switch ((r >> 32) % 8) {
    case 0:
      data = zk_calloc(1, size);
      CHECK(data != NULL);
      CHECK(data[0] == 0 && data[size - 1] == 0);
      break;
    case 1:
      data = zk_aligned_alloc((size_t)64 << ((r >> 40) % 4), size);
      break;
    case 2: {
      /* realloc keeps the old contents. */
      data = zk_malloc(size / 2 + 1);
      CHECK(data != NULL);
      memset(data, 0x5a, size / 2 + 1);
      data = zk_realloc(data, size);
      CHECK(data != NULL);
      CHECK(data[0] == 0x5a && data[size / 2] == 0x5a);
      break;
    }
    default:
      data = zk_malloc(size);
      break;
    }
    CHECK(data != NULL);
    CHECK(zk_usable_size(data) >= size);
    block->data = data;
    block->size = size;
    block->tag = (unsigned)(r >> 8);
    pattern_apply(data, size, block->tag, 0);
  }
  for (size_t slot = 0; slot < LIVE_SLOTS; slot++)
    if (live[slot].data != NULL)
      block_free_checked(live[slot].data, live[slot].size, live[slot].tag);
  return NULL;
}

static void run_round(unsigned threads) {
  pthread_t ids[64];
  for (unsigned i = 0; i < threads; i++)
    CHECK(pthread_create(&ids[i], NULL, worker, (void *)(uintptr_t)i) == 0);
  for (unsigned i = 0; i < threads; i++)
    pthread_join(ids[i], NULL);
}

int main(int argc, char **argv) {
  unsigned max_threads = argc > 1 ? (unsigned)atoi(argv[1]) : 8;
  if (argc > 2)
    operations_per_thread = (size_t)atoll(argv[2]);
  if (max_threads > 64)
    max_threads = 64;
  for (unsigned threads = 2; threads <= max_threads; threads *= 2) {
    run_round(threads);
    printf("stress: %u threads x %zu operations: %llu blocks checked, %llu "
           "handed to another thread, %llu corruptions\n",
           threads, operations_per_thread,
           (unsigned long long)atomic_load(&checked),
           (unsigned long long)atomic_load(&handed_off),
           (unsigned long long)atomic_load(&corruptions));
  }
  /* Drain the exchange table: its blocks were allocated by exited
   * threads, whose pages were abandoned and are freed into now. */
  for (size_t i = 0; i < EXCHANGE_SLOTS; i++) {
    envelope_t *waiting = atomic_exchange(&exchange[i], NULL);
    if (waiting != NULL)
      envelope_receive(waiting);
  }
  CHECK_EQ(atomic_load(&corruptions), 0);
  zk_collect(true);
  zk_stats_t stats;
  zk_stats_get(&stats);
  uint64_t live = 0;
  for (size_t c = 0; c < stats.class_count; c++)
    live += stats.classes[c].live;
  printf("after the run: %llu small blocks live, %llu large, %llu huge\n",
         (unsigned long long)live, (unsigned long long)stats.large_live,
         (unsigned long long)stats.huge_live);
  CHECK_EQ(live, 0);
  CHECK_EQ(stats.large_live, 0);
  CHECK_EQ(stats.huge_live, 0);
  return 0;
}
