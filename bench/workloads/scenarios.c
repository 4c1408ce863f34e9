/* The benchmark scenarios. One op is one allocation or one free.
 *
 * Each timed loop is an always_inline function taking the backend kind; the
 * scenario function instantiates it once per supported backend with a
 * constant kind (see backend.h). Every loop runs a short warm-up first so the
 * figures describe the steady state, not the allocator's first page faults. */
#define _GNU_SOURCE
#include "backend.h"
#include "bench.h"

#include <dlfcn.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#define unlikely(condition) __builtin_expect(!!(condition), 0)

/* Random inputs are drawn into tables of this many entries before timing and
 * read cyclically; 64 Ki entries are far more than any allocator can learn. */
#define TABLE_LENGTH 65536u
#define TABLE_MASK   (TABLE_LENGTH - 1)

static uint64_t warmup_count(uint64_t count) {
  return count / 16 + 1;
}

static uint32_t *size_table_uniform(struct prng *prng, uint32_t low,
                                    uint32_t high) {
  uint32_t *table = scaffold_alloc(TABLE_LENGTH * sizeof(uint32_t));
  for (uint32_t index = 0; index < TABLE_LENGTH; index++)
    table[index] = (uint32_t)prng_range(prng, low, high);
  return table;
}

/* Log-uniform by octave: an octave 2^k (first <= k <= last) is picked
 * uniformly, then a size uniformly inside it, giving 2^first .. 2^(last+1) - 1
 * bytes with as many blocks in the smallest octave as in the largest, the
 * shape of real programs' size histograms. */
static uint32_t *size_table_octaves(struct prng *prng, unsigned first,
                                    unsigned last) {
  uint32_t *table = scaffold_alloc(TABLE_LENGTH * sizeof(uint32_t));
  for (uint32_t index = 0; index < TABLE_LENGTH; index++) {
    unsigned octave = (unsigned)prng_range(prng, first, last);
    uint32_t base = 1u << octave;
    table[index] = base + (uint32_t)prng_range(prng, 0, base - 1);
  }
  return table;
}

/* 8 B .. 64 KiB - 1. */
static uint32_t *size_table_log_uniform(struct prng *prng) {
  return size_table_octaves(prng, 3, 15);
}

static void free_table(uint32_t *table) {
  scaffold_free(table, TABLE_LENGTH * sizeof(uint32_t));
}

static void check_block(void *block, size_t size) {
  if (unlikely(block == NULL))
    bench_fail("allocation of %zu bytes failed", size);
}

static int unsupported(const struct bench_options *options) {
  (void)options;
  return 2;
}

/* ---- 1. fixed: alloc + free pairs of 64 B ------------------------------ */

#define FIXED_SIZE 64

static ALWAYS_INLINE void fixed_loop(struct backend *backend,
                                     enum backend_kind kind, uint64_t pairs) {
  for (uint64_t pair = 0; pair < pairs; pair++) {
    void *block = backend_alloc(backend, kind, FIXED_SIZE);
    check_block(block, FIXED_SIZE);
    touch_first(block, pair);
    escape(block);
    backend_free(backend, kind, block);
  }
}

static ALWAYS_INLINE double
fixed_timed(struct backend *backend, enum backend_kind kind, uint64_t pairs) {
  fixed_loop(backend, kind, warmup_count(pairs));
  double start = now_seconds();
  fixed_loop(backend, kind, pairs);
  return now_seconds() - start;
}

static int scenario_fixed(const struct bench_options *options,
                          struct bench_result *result) {
  uint64_t pairs = options->ops / 2;
  struct backend backend;
  backend_open(&backend, options->backend, FIXED_SIZE);
  switch (options->backend) {
  case BACKEND_MALLOC:
    result->seconds = fixed_timed(&backend, BACKEND_MALLOC, pairs);
    break;
  case BACKEND_SEED:
    result->seconds = fixed_timed(&backend, BACKEND_SEED, pairs);
    break;
  case BACKEND_POOL:
    result->seconds = fixed_timed(&backend, BACKEND_POOL, pairs);
    break;
  }
  backend_close(&backend);
  result->ops = pairs * 2;
  result_add_u64(result, "object_size", FIXED_SIZE);
  return 0;
}

/* ---- 2. stress: batches of 1,000 random 8-256 B, freed in reverse ------- */

#define STRESS_BATCH    1000
#define STRESS_MIN_SIZE 8
#define STRESS_MAX_SIZE 256

struct stress_state {
  const uint32_t *sizes;
  void **blocks; /* STRESS_BATCH entries */
  uint32_t cursor;
};

static ALWAYS_INLINE void stress_loop(struct backend *backend,
                                      enum backend_kind kind,
                                      struct stress_state *state,
                                      uint64_t batches) {
  void **blocks = state->blocks;
  uint32_t cursor = state->cursor;
  for (uint64_t batch = 0; batch < batches; batch++) {
    for (unsigned index = 0; index < STRESS_BATCH; index++) {
      uint32_t size = state->sizes[cursor++ & TABLE_MASK];
      void *block = backend_alloc(backend, kind, size);
      check_block(block, size);
      touch_first(block, size);
      escape(block);
      blocks[index] = block;
    }
    for (unsigned index = STRESS_BATCH; index > 0; index--)
      backend_free(backend, kind, blocks[index - 1]);
  }
  state->cursor = cursor;
}

static ALWAYS_INLINE double stress_timed(struct backend *backend,
                                         enum backend_kind kind,
                                         struct stress_state *state,
                                         uint64_t batches) {
  stress_loop(backend, kind, state, warmup_count(batches));
  double start = now_seconds();
  stress_loop(backend, kind, state, batches);
  return now_seconds() - start;
}

static uint64_t stress_batches(uint64_t ops) {
  uint64_t batches = ops / (2 * STRESS_BATCH);
  return batches > 0 ? batches : 1;
}

static int scenario_stress(const struct bench_options *options,
                           struct bench_result *result) {
  struct prng prng;
  prng_seed(&prng, options->seed);
  struct stress_state state = {
      .sizes = size_table_uniform(&prng, STRESS_MIN_SIZE, STRESS_MAX_SIZE),
      .blocks = scaffold_alloc(STRESS_BATCH * sizeof(void *)),
  };
  uint64_t batches = stress_batches(options->ops);
  struct backend backend;
  /* Fixed-size backends get one pool of the largest size in the range. */
  backend_open(&backend, options->backend, STRESS_MAX_SIZE);
  switch (options->backend) {
  case BACKEND_MALLOC:
    result->seconds = stress_timed(&backend, BACKEND_MALLOC, &state, batches);
    break;
  case BACKEND_SEED:
    result->seconds = stress_timed(&backend, BACKEND_SEED, &state, batches);
    break;
  case BACKEND_POOL:
    result->seconds = stress_timed(&backend, BACKEND_POOL, &state, batches);
    break;
  }
  backend_close(&backend);
  result->ops = batches * STRESS_BATCH * 2;
  result_add_u64(result, "batch", STRESS_BATCH);
  scaffold_free(state.blocks, STRESS_BATCH * sizeof(void *));
  free_table((uint32_t *)state.sizes);
  return 0;
}

/* ---- 3. reuse: one 128 B object allocated and freed repeatedly ---------- */

#define REUSE_SIZE 128

/* Returns how many allocations got the same address as the one before. */
static ALWAYS_INLINE uint64_t reuse_loop(struct backend *backend,
                                         enum backend_kind kind,
                                         uint64_t pairs) {
  uint64_t same_address = 0;
  uintptr_t previous = 0;
  for (uint64_t pair = 0; pair < pairs; pair++) {
    void *block = backend_alloc(backend, kind, REUSE_SIZE);
    check_block(block, REUSE_SIZE);
    same_address += (uintptr_t)block == previous;
    previous = (uintptr_t)block;
    touch_first(block, pair);
    escape(block);
    backend_free(backend, kind, block);
  }
  return same_address;
}

static ALWAYS_INLINE double reuse_timed(struct backend *backend,
                                        enum backend_kind kind, uint64_t pairs,
                                        uint64_t *same_address) {
  reuse_loop(backend, kind, warmup_count(pairs));
  double start = now_seconds();
  *same_address = reuse_loop(backend, kind, pairs);
  return now_seconds() - start;
}

static int scenario_reuse(const struct bench_options *options,
                          struct bench_result *result) {
  uint64_t pairs = options->ops / 2;
  uint64_t same_address = 0;
  struct backend backend;
  backend_open(&backend, options->backend, REUSE_SIZE);
  switch (options->backend) {
  case BACKEND_MALLOC:
    result->seconds =
        reuse_timed(&backend, BACKEND_MALLOC, pairs, &same_address);
    break;
  case BACKEND_SEED:
    result->seconds = reuse_timed(&backend, BACKEND_SEED, pairs, &same_address);
    break;
  case BACKEND_POOL:
    result->seconds = reuse_timed(&backend, BACKEND_POOL, pairs, &same_address);
    break;
  }
  result->ops = pairs * 2;
  /* The first timed allocation has no predecessor in the timed loop. */
  uint64_t comparable = pairs > 1 ? pairs - 1 : 1;
  double rate = (double)same_address / (double)comparable;
  result_add_double(result, "reuse_rate", rate > 1.0 ? 1.0 : rate);
#ifdef BENCH_POOL
  if (options->backend == BACKEND_POOL) {
    zk_pool_stats_t stats;
    if (zk_pool_stats(backend.pool, &stats) == 0)
      result_add_double(result, "pool_reuse_rate", stats.reuse_rate);
  }
#endif
  backend_close(&backend);
  return 0;
}

/* ---- 4. large: batches of 100 random 1-5 KB, freed in random order ------ */

#define LARGE_BATCH        100
#define LARGE_MIN_SIZE     1024
#define LARGE_MAX_SIZE     5120
#define LARGE_PERMUTATIONS 64

struct large_state {
  const uint32_t *sizes;
  uint8_t (*free_orders)[LARGE_BATCH]; /* LARGE_PERMUTATIONS shuffles */
  void **blocks;
  uint32_t cursor;
};

static void large_loop(struct large_state *state, uint64_t batches) {
  void **blocks = state->blocks;
  uint32_t cursor = state->cursor;
  for (uint64_t batch = 0; batch < batches; batch++) {
    for (unsigned index = 0; index < LARGE_BATCH; index++) {
      uint32_t size = state->sizes[cursor++ & TABLE_MASK];
      void *block = malloc(size);
      check_block(block, size);
      touch_first(block, size);
      escape(block);
      blocks[index] = block;
    }
    const uint8_t *order = state->free_orders[batch % LARGE_PERMUTATIONS];
    for (unsigned index = 0; index < LARGE_BATCH; index++)
      free(blocks[order[index]]);
  }
  state->cursor = cursor;
}

static int scenario_large(const struct bench_options *options,
                          struct bench_result *result) {
  struct prng prng;
  prng_seed(&prng, options->seed);
  struct large_state state = {
      .sizes = size_table_uniform(&prng, LARGE_MIN_SIZE, LARGE_MAX_SIZE),
      .free_orders = scaffold_alloc(LARGE_PERMUTATIONS * LARGE_BATCH),
      .blocks = scaffold_alloc(LARGE_BATCH * sizeof(void *)),
  };
  for (unsigned permutation = 0; permutation < LARGE_PERMUTATIONS;
       permutation++) {
    uint8_t *order = state.free_orders[permutation];
    for (unsigned index = 0; index < LARGE_BATCH; index++)
      order[index] = (uint8_t)index;
    for (unsigned index = LARGE_BATCH - 1; index > 0; index--) {
      unsigned other = (unsigned)prng_range(&prng, 0, index);
      uint8_t swap = order[index];
      order[index] = order[other];
      order[other] = swap;
    }
  }
  uint64_t batches = options->ops / (2 * LARGE_BATCH);
  batches = batches > 0 ? batches : 1;
  large_loop(&state, warmup_count(batches));
  double start = now_seconds();
  large_loop(&state, batches);
  result->seconds = now_seconds() - start;
  result->ops = batches * LARGE_BATCH * 2;
  result_add_u64(result, "batch", LARGE_BATCH);
  scaffold_free(state.blocks, LARGE_BATCH * sizeof(void *));
  scaffold_free(state.free_orders, LARGE_PERMUTATIONS * LARGE_BATCH);
  free_table((uint32_t *)state.sizes);
  return 0;
}

/* ---- 5. mixed: 10,000 live objects, log-uniform 8 B-64 KB, replaced ----- */

#define MIXED_LIVE 10000

struct mixed_state {
  const uint32_t *sizes;
  const uint32_t *slots; /* which live object each step replaces */
  void **blocks;         /* MIXED_LIVE entries */
  uint32_t *block_sizes; /* MIXED_LIVE entries */
  uint32_t cursor;
  uint64_t live_bytes;
  uint64_t live_bytes_peak;
  bool touch_every_page; /* the memory scenario wants RSS to mean bytes */
};

static void mixed_touch(const struct mixed_state *state, char *block,
                        uint32_t size) {
  touch_first(block, size);
  if (state->touch_every_page) {
    for (uint32_t offset = 4096; offset < size; offset += 4096)
      ((volatile char *)block)[offset] = 1;
    ((volatile char *)block)[size - 1] = 1;
  }
  escape(block);
}

static void mixed_fill(struct mixed_state *state) {
  for (unsigned slot = 0; slot < MIXED_LIVE; slot++) {
    uint32_t size = state->sizes[state->cursor++ & TABLE_MASK];
    void *block = malloc(size);
    check_block(block, size);
    mixed_touch(state, block, size);
    state->blocks[slot] = block;
    state->block_sizes[slot] = size;
    state->live_bytes += size;
  }
  state->live_bytes_peak = state->live_bytes;
}

static void mixed_loop(struct mixed_state *state, uint64_t steps) {
  uint32_t cursor = state->cursor;
  for (uint64_t step = 0; step < steps; step++, cursor++) {
    uint32_t slot = state->slots[cursor & TABLE_MASK];
    uint32_t size = state->sizes[cursor & TABLE_MASK];
    free(state->blocks[slot]);
    void *block = malloc(size);
    check_block(block, size);
    mixed_touch(state, block, size);
    state->blocks[slot] = block;
    state->live_bytes += (uint64_t)size - state->block_sizes[slot];
    state->block_sizes[slot] = size;
    if (state->live_bytes > state->live_bytes_peak)
      state->live_bytes_peak = state->live_bytes;
  }
  state->cursor = cursor;
}

static void mixed_free_all(struct mixed_state *state) {
  for (unsigned slot = 0; slot < MIXED_LIVE; slot++) {
    free(state->blocks[slot]);
    state->blocks[slot] = NULL;
  }
  state->live_bytes = 0;
}

static void mixed_init(struct mixed_state *state, uint64_t seed,
                       bool touch_every_page) {
  struct prng prng;
  prng_seed(&prng, seed);
  uint32_t *slots = scaffold_alloc(TABLE_LENGTH * sizeof(uint32_t));
  for (uint32_t index = 0; index < TABLE_LENGTH; index++)
    slots[index] = (uint32_t)prng_range(&prng, 0, MIXED_LIVE - 1);
  *state = (struct mixed_state){
      .sizes = size_table_log_uniform(&prng),
      .slots = slots,
      .blocks = scaffold_alloc(MIXED_LIVE * sizeof(void *)),
      .block_sizes = scaffold_alloc(MIXED_LIVE * sizeof(uint32_t)),
      .touch_every_page = touch_every_page,
  };
}

static void mixed_release(struct mixed_state *state) {
  free_table((uint32_t *)state->sizes);
  free_table((uint32_t *)state->slots);
  scaffold_free(state->blocks, MIXED_LIVE * sizeof(void *));
  scaffold_free(state->block_sizes, MIXED_LIVE * sizeof(uint32_t));
}

static int scenario_mixed(const struct bench_options *options,
                          struct bench_result *result) {
  struct mixed_state state;
  mixed_init(&state, options->seed, false);
  mixed_fill(&state);
  uint64_t steps = options->ops / 2;
  mixed_loop(&state, warmup_count(steps));
  double start = now_seconds();
  mixed_loop(&state, steps);
  result->seconds = now_seconds() - start;
  result->ops = steps * 2;
  mixed_free_all(&state);
  result_add_u64(result, "live_objects", MIXED_LIVE);
  result_add_u64(result, "live_peak_kib", state.live_bytes_peak / 1024);
  mixed_release(&state);
  return 0;
}

/* ---- 6. handoff: one thread allocates, another frees ------------------- */

#define HANDOFF_MIN_SIZE 64
#define HANDOFF_MAX_SIZE 1024
#define RING_CAPACITY    1024u /* power of two */

static void cpu_relax(unsigned *spins) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ volatile("yield");
#endif
  /* On a machine with fewer cores than threads the peer needs our core. */
  if (++*spins % 256 == 0)
    sched_yield();
}

/* Single-producer single-consumer ring of pointers, built once: the handoff
 * itself allocates nothing. Positions only grow; the slot is pos % capacity. */
struct handoff_ring {
  _Alignas(64) _Atomic uint64_t head; /* next slot the consumer reads */
  _Alignas(64) _Atomic uint64_t tail; /* next slot the producer writes */
  _Alignas(64) void *slots[RING_CAPACITY];
};

/* Written into each object so the consumer can check that what it frees is
 * what the producer built: the handoff moves real, initialised memory. */
struct handoff_header {
  uint32_t size;
  uint32_t sequence;
};

struct handoff_shared {
  struct handoff_ring *ring;
  struct backend *backend;
  const uint32_t *sizes;
  uint64_t objects;
  _Atomic bool consumer_ready;
  /* The producer starts the clock once the consumer runs, and the consumer
   * stops it: neither thread start-up nor join is timed. */
  double started;
  double finished;
  uint64_t corrupt; /* objects whose marks did not survive the handoff */
};

static ALWAYS_INLINE void handoff_consume(struct handoff_shared *shared,
                                          enum backend_kind kind) {
  struct handoff_ring *ring = shared->ring;
  uint64_t head = 0;
  uint64_t tail_seen = 0;
  uint64_t corrupt = 0;
  unsigned spins = 0;
  atomic_store_explicit(&shared->consumer_ready, true, memory_order_release);
  while (head < shared->objects) {
    while (head == tail_seen) {
      tail_seen = atomic_load_explicit(&ring->tail, memory_order_acquire);
      if (head == tail_seen)
        cpu_relax(&spins);
    }
    struct handoff_header *header = ring->slots[head & (RING_CAPACITY - 1)];
    uint32_t size = header->size;
    if (size < HANDOFF_MIN_SIZE || size > HANDOFF_MAX_SIZE ||
        header->sequence != (uint32_t)head ||
        ((unsigned char *)header)[size - 1] != (unsigned char)head)
      corrupt++;
    backend_free(shared->backend, kind, header);
    head++;
    atomic_store_explicit(&ring->head, head, memory_order_release);
  }
  shared->finished = now_seconds();
  shared->corrupt = corrupt;
}

static ALWAYS_INLINE void handoff_produce(struct handoff_shared *shared,
                                          enum backend_kind kind) {
  struct handoff_ring *ring = shared->ring;
  uint64_t head_seen = 0;
  unsigned spins = 0;
  while (!atomic_load_explicit(&shared->consumer_ready, memory_order_acquire))
    cpu_relax(&spins);
  shared->started = now_seconds();
  for (uint64_t tail = 0; tail < shared->objects; tail++) {
    uint32_t size = shared->sizes[tail & TABLE_MASK];
    struct handoff_header *header = backend_alloc(shared->backend, kind, size);
    check_block(header, size);
    header->size = size;
    header->sequence = (uint32_t)tail;
    ((unsigned char *)header)[size - 1] = (unsigned char)tail;
    while (tail - head_seen == RING_CAPACITY) {
      head_seen = atomic_load_explicit(&ring->head, memory_order_acquire);
      if (tail - head_seen == RING_CAPACITY)
        cpu_relax(&spins);
    }
    ring->slots[tail & (RING_CAPACITY - 1)] = header;
    atomic_store_explicit(&ring->tail, tail + 1, memory_order_release);
  }
}

static void *handoff_consumer_malloc(void *shared) {
  handoff_consume(shared, BACKEND_MALLOC);
  return NULL;
}

static void *handoff_consumer_pool(void *shared) {
  handoff_consume(shared, BACKEND_POOL);
  return NULL;
}

/* Runs one full handoff of `objects` objects; returns its wall time. */
static double handoff_run(struct handoff_shared *shared, uint64_t objects) {
  struct handoff_ring *ring = shared->ring;
  atomic_store(&ring->head, 0);
  atomic_store(&ring->tail, 0);
  atomic_store(&shared->consumer_ready, false);
  shared->objects = objects;
  shared->corrupt = 0;
  enum backend_kind kind = shared->backend->kind;
  pthread_t consumer;
  if (pthread_create(&consumer, NULL,
                     kind == BACKEND_POOL ? handoff_consumer_pool
                                          : handoff_consumer_malloc,
                     shared) != 0)
    bench_fail("pthread_create failed");
  if (kind == BACKEND_POOL)
    handoff_produce(shared, BACKEND_POOL);
  else
    handoff_produce(shared, BACKEND_MALLOC);
  pthread_join(consumer, NULL);
  double seconds = shared->finished - shared->started;
  if (shared->corrupt != 0)
    bench_fail("handoff: %" PRIu64 " objects arrived corrupted",
               shared->corrupt);
  return seconds;
}

static int scenario_handoff(const struct bench_options *options,
                            struct bench_result *result) {
  if (options->backend == BACKEND_SEED)
    return unsupported(options); /* the seed pool is single-threaded */
  struct prng prng;
  prng_seed(&prng, options->seed);
  struct backend backend;
  backend_open(&backend, options->backend, HANDOFF_MAX_SIZE);
  struct handoff_shared shared = {
      .ring = scaffold_alloc(sizeof(struct handoff_ring)),
      .backend = &backend,
      .sizes = size_table_uniform(&prng, HANDOFF_MIN_SIZE, HANDOFF_MAX_SIZE),
  };
  uint64_t objects = options->ops / 2;
  handoff_run(&shared, warmup_count(objects));
  result->seconds = handoff_run(&shared, objects);
  result->ops = objects * 2;
  result_add_u64(result, "ring_capacity", RING_CAPACITY);
  result_add_u64(result, "corrupt", shared.corrupt);
  backend_close(&backend);
  free_table((uint32_t *)shared.sizes);
  scaffold_free(shared.ring, sizeof(struct handoff_ring));
  return 0;
}

/* ---- 7. scaling: scenario 2 on 1, 2, 4 ... N threads at once ----------- */

struct scaling_worker {
  pthread_t thread;
  pthread_barrier_t *start_line;
  struct stress_state state;
  uint64_t batches;
  /* Each worker reads the clock itself: the barrier's last arrival may run
   * long before the main thread is woken. */
  double started;
  double finished;
};

static void *scaling_worker_main(void *argument) {
  struct scaling_worker *worker = argument;
  struct backend backend = {.kind = BACKEND_MALLOC};
  stress_loop(&backend, BACKEND_MALLOC, &worker->state,
              warmup_count(worker->batches));
  pthread_barrier_wait(worker->start_line);
  worker->started = now_seconds();
  stress_loop(&backend, BACKEND_MALLOC, &worker->state, worker->batches);
  worker->finished = now_seconds();
  return NULL;
}

/* Weak scaling: every thread does the same amount of work, so the ideal is
 * throughput growing linearly with the thread count. */
static double scaling_run(const uint32_t *sizes, unsigned threads,
                          uint64_t batches) {
  struct scaling_worker *workers =
      scaffold_alloc(threads * sizeof(struct scaling_worker));
  pthread_barrier_t start_line;
  pthread_barrier_init(&start_line, NULL, threads + 1);
  for (unsigned index = 0; index < threads; index++) {
    struct scaling_worker *worker = &workers[index];
    worker->start_line = &start_line;
    worker->batches = batches;
    /* Each thread starts at its own place in the shared size table. */
    worker->state = (struct stress_state){
        .sizes = sizes,
        .blocks = scaffold_alloc(STRESS_BATCH * sizeof(void *)),
        .cursor = index * (TABLE_LENGTH / 16 + 7),
    };
    if (pthread_create(&worker->thread, NULL, scaling_worker_main, worker) != 0)
      bench_fail("pthread_create failed");
  }
  pthread_barrier_wait(&start_line);
  double first_start = 0, last_finish = 0;
  for (unsigned index = 0; index < threads; index++) {
    pthread_join(workers[index].thread, NULL);
    if (index == 0 || workers[index].started < first_start)
      first_start = workers[index].started;
    if (workers[index].finished > last_finish)
      last_finish = workers[index].finished;
  }
  double seconds = last_finish - first_start;
  pthread_barrier_destroy(&start_line);
  for (unsigned index = 0; index < threads; index++)
    scaffold_free(workers[index].state.blocks, STRESS_BATCH * sizeof(void *));
  scaffold_free(workers, threads * sizeof(struct scaling_worker));
  return seconds;
}

static int scenario_scaling(const struct bench_options *options,
                            struct bench_result *result) {
  struct prng prng;
  prng_seed(&prng, options->seed);
  uint32_t *sizes = size_table_uniform(&prng, STRESS_MIN_SIZE, STRESS_MAX_SIZE);
  uint64_t batches = stress_batches(options->ops);
  uint64_t ops_per_thread = batches * STRESS_BATCH * 2;
  char points[2048];
  size_t length = 0;
  double single_thread_rate = 0;
  length += (size_t)snprintf(points + length, sizeof points - length, "[");
  for (unsigned index = 0; index < options->thread_count; index++) {
    unsigned threads = options->threads[index];
    double seconds = scaling_run(sizes, threads, batches);
    uint64_t ops = ops_per_thread * threads;
    double rate = (double)ops / seconds;
    if (index == 0)
      single_thread_rate = rate / threads;
    length += (size_t)snprintf(
        points + length, sizeof points - length,
        "%s{\"threads\":%u,\"ops\":%" PRIu64
        ",\"seconds\":%.6f,\"ops_per_s\":%.1f,\"speedup\":%.3f}",
        index ? "," : "", threads, ops, seconds, rate,
        rate / single_thread_rate);
    /* The headline figures are those of the largest thread count. */
    result->ops = ops;
    result->seconds = seconds;
  }
  snprintf(points + length, sizeof points - length, "]");
  result_add_u64(result, "threads",
                 options->threads[options->thread_count - 1]);
  result_add_raw(result, "points", points);
  free_table(sizes);
  return 0;
}

/* ---- 8. memory: RSS of scenario 5 at peak and after everything is freed - */

typedef void (*collect_function)(bool force);

static int scenario_memory(const struct bench_options *options,
                           struct bench_result *result) {
  uint64_t rss_baseline = rss_now_kib();
  struct mixed_state state;
  /* Every page of every object is written, so RSS follows the bytes asked. */
  mixed_init(&state, options->seed, true);
  mixed_fill(&state);
  uint64_t steps = options->ops / 2;
  double start = now_seconds();
  mixed_loop(&state, steps);
  result->seconds = now_seconds() - start;
  result->ops = steps * 2;
  uint64_t rss_live = rss_now_kib();
  mixed_free_all(&state);
  uint64_t rss_after_free = rss_now_kib();

  /* Past the purge delay, the program goes on working a little: allocators
   * that decay without a background thread (zkmem, jemalloc's default)
   * return memory on such activity. 1,000 pairs, 16 B to 256 KiB. */
  struct timespec wait = {
      .tv_sec = options->purge_wait_ms / 1000,
      .tv_nsec = (long)(options->purge_wait_ms % 1000) * 1000000L,
  };
  nanosleep(&wait, NULL);
  for (unsigned i = 0; i < 1000; i++) {
    size_t size = (size_t)16 << (i % 15);
    void *poke = malloc(size);
    check_block(poke, size);
    escape(poke);
    free(poke);
  }
  uint64_t rss_after_wait = rss_now_kib();

  result_add_u64(result, "rss_baseline_kib", rss_baseline);
  result_add_u64(result, "live_peak_kib", state.live_bytes_peak / 1024);
  result_add_u64(result, "rss_live_kib", rss_live);
  result_add_u64(result, "rss_after_free_kib", rss_after_free);
  result_add_u64(result, "rss_after_wait_kib", rss_after_wait);
  result_add_u64(result, "purge_wait_ms", options->purge_wait_ms);

  /* Looked up at run time so one binary serves every allocator: only an
   * allocator that exports zk_collect (zkmem) gets the third reading. */
  collect_function collect;
  void *symbol = dlsym(RTLD_DEFAULT, "zk_collect");
  memcpy(&collect, &symbol, sizeof collect);
  if (collect != NULL) {
    collect(true);
    result_add_u64(result, "rss_after_collect_kib", rss_now_kib());
  } else {
    result_add_null(result, "rss_after_collect_kib");
  }
  mixed_release(&state);
  return 0;
}

/* ---- 9. live: many small objects alive at once, RSS over payload ------- */

#define LIVE_SIZE 64

static int scenario_live(const struct bench_options *options,
                         struct bench_result *result) {
  uint64_t count = options->ops;
  void **blocks = scaffold_alloc(count * sizeof(void *));
  memset(blocks, 0xff, count * sizeof(void *)); /* resident before baseline */
  struct backend backend;
  backend_open(&backend, options->backend, LIVE_SIZE);
  uint64_t rss_baseline = rss_now_kib();
  double start = now_seconds();
  for (uint64_t i = 0; i < count; i++) {
    void *block = backend_alloc(&backend, options->backend, LIVE_SIZE);
    memset(block, (int)i, LIVE_SIZE);
    blocks[i] = block;
  }
  result->seconds = now_seconds() - start;
  uint64_t rss_live = rss_now_kib();
  for (uint64_t i = 0; i < count; i++)
    backend_free(&backend, options->backend, blocks[i]);
  backend_close(&backend);
  scaffold_free(blocks, count * sizeof(void *));
  result->ops = count;
  uint64_t payload_kib = count * LIVE_SIZE / 1024;
  result_add_u64(result, "live_rss_kib", rss_live - rss_baseline);
  result_add_u64(result, "live_payload_kib", payload_kib);
  result_add_double(result, "live_rss_ratio",
                    (double)(rss_live - rss_baseline) / (double)payload_kib);
  return 0;
}

/* ---- 10. batches: blocks made on producer threads, freed on consumers --- */

/* The async-runtime pattern: a worker builds a batch of objects, hands the
 * whole batch to another worker through a locked queue, and that worker
 * drops them all, so every block is freed by another thread than the one
 * that allocated it, thousands at a time. */

#define BATCH_BLOCKS       4096
#define BATCH_DEPTH        4  /* full batches the queue holds */
#define BATCH_FIRST_OCTAVE 3  /* 8 B */
#define BATCH_LAST_OCTAVE  10 /* .. 2 KiB - 1 */
#define BATCH_TAG_SHIFT    13 /* block index bits, BATCH_BLOCKS <= 2^13 */

struct batch {
  uint64_t tag; /* block i's first word is tag + i */
  void *blocks[BATCH_BLOCKS];
};

/* A bounded queue behind one mutex and two condition variables, as a runtime
 * without lock-free queues would have: a producer sleeps when consumers fall
 * behind, a consumer sleeps when there is nothing to free. */
struct batch_queue {
  pthread_mutex_t lock;
  pthread_cond_t not_empty;
  pthread_cond_t not_full;
  struct batch **ring;
  unsigned capacity;
  unsigned head;
  unsigned count;
  uint64_t pops_left; /* pops still to come; 0 sends the poppers home */
};

static void batch_queue_init(struct batch_queue *queue, unsigned capacity,
                             uint64_t pops) {
  pthread_mutex_init(&queue->lock, NULL);
  pthread_cond_init(&queue->not_empty, NULL);
  pthread_cond_init(&queue->not_full, NULL);
  queue->ring = scaffold_alloc(capacity * sizeof(struct batch *));
  queue->capacity = capacity;
  queue->head = 0;
  queue->count = 0;
  queue->pops_left = pops;
}

static void batch_queue_destroy(struct batch_queue *queue) {
  pthread_mutex_destroy(&queue->lock);
  pthread_cond_destroy(&queue->not_empty);
  pthread_cond_destroy(&queue->not_full);
  scaffold_free(queue->ring, queue->capacity * sizeof(struct batch *));
}

static void batch_queue_push(struct batch_queue *queue, struct batch *batch) {
  pthread_mutex_lock(&queue->lock);
  while (queue->count == queue->capacity)
    pthread_cond_wait(&queue->not_full, &queue->lock);
  queue->ring[(queue->head + queue->count) % queue->capacity] = batch;
  queue->count++;
  pthread_cond_signal(&queue->not_empty);
  pthread_mutex_unlock(&queue->lock);
}

/* Returns NULL once every batch the queue will ever carry has been taken. */
static struct batch *batch_queue_pop(struct batch_queue *queue) {
  struct batch *batch = NULL;
  pthread_mutex_lock(&queue->lock);
  while (queue->count == 0 && queue->pops_left > 0)
    pthread_cond_wait(&queue->not_empty, &queue->lock);
  if (queue->pops_left > 0) {
    batch = queue->ring[queue->head];
    queue->head = (queue->head + 1) % queue->capacity;
    queue->count--;
    queue->pops_left--;
    pthread_cond_signal(&queue->not_full);
    if (queue->pops_left == 0) /* the other poppers must see the end too */
      pthread_cond_broadcast(&queue->not_empty);
  }
  pthread_mutex_unlock(&queue->lock);
  return batch;
}

struct batches_shared {
  struct batch_queue full;  /* producers -> consumers */
  struct batch_queue empty; /* consumers -> producers: pointer arrays back */
  const uint32_t *sizes;
  pthread_barrier_t start_line;
  _Atomic uint64_t corrupt;
};

struct batches_worker {
  pthread_t thread;
  struct batches_shared *shared;
  unsigned index;
  uint64_t batches; /* producers: how many to make */
  /* Each thread reads the clock itself, as in scaling. */
  double started;
  double finished;
};

static void *batches_producer(void *argument) {
  struct batches_worker *worker = argument;
  struct batches_shared *shared = worker->shared;
  /* Each producer starts at its own place in the shared size table. */
  uint32_t cursor = worker->index * (TABLE_LENGTH / 16 + 7);
  pthread_barrier_wait(&shared->start_line);
  worker->started = now_seconds();
  for (uint64_t number = 0; number < worker->batches; number++) {
    struct batch *batch = batch_queue_pop(&shared->empty);
    batch->tag =
        ((uint64_t)(worker->index + 1) << 48) | (number << BATCH_TAG_SHIFT);
    for (unsigned index = 0; index < BATCH_BLOCKS; index++) {
      uint32_t size = shared->sizes[cursor++ & TABLE_MASK];
      void *block = malloc(size);
      check_block(block, size);
      touch_first(block, batch->tag + index);
      escape(block);
      batch->blocks[index] = block;
    }
    batch_queue_push(&shared->full, batch);
  }
  worker->finished = now_seconds();
  return NULL;
}

static void *batches_consumer(void *argument) {
  struct batches_worker *worker = argument;
  struct batches_shared *shared = worker->shared;
  uint64_t corrupt = 0;
  pthread_barrier_wait(&shared->start_line);
  worker->started = now_seconds();
  struct batch *batch;
  while ((batch = batch_queue_pop(&shared->full)) != NULL) {
    for (unsigned index = 0; index < BATCH_BLOCKS; index++) {
      void *block = batch->blocks[index];
      corrupt += *(volatile uint64_t *)block != batch->tag + index;
      free(block);
    }
    batch_queue_push(&shared->empty, batch);
  }
  worker->finished = now_seconds();
  atomic_fetch_add(&shared->corrupt, corrupt);
  return NULL;
}

/* Moves `batches` batches from `workers` producers to as many consumers;
 * returns the wall time from the first thread's start to the last block
 * freed. */
static double batches_run(const uint32_t *sizes, unsigned workers,
                          uint64_t batches) {
  /* Enough pointer arrays that a producer never waits for one unless the
   * full queue is full: the queue's depth is the only back-pressure. */
  unsigned arrays = BATCH_DEPTH + 2 * workers;
  struct batch *storage = scaffold_alloc(arrays * sizeof(struct batch));
  struct batches_shared shared = {.sizes = sizes};
  batch_queue_init(&shared.full, BATCH_DEPTH, batches);
  batch_queue_init(&shared.empty, arrays, batches);
  for (unsigned index = 0; index < arrays; index++)
    batch_queue_push(&shared.empty, &storage[index]);
  pthread_barrier_init(&shared.start_line, NULL, 2 * workers);

  struct batches_worker *threads =
      scaffold_alloc(2 * workers * sizeof(struct batches_worker));
  for (unsigned index = 0; index < 2 * workers; index++) {
    struct batches_worker *worker = &threads[index];
    bool producer = index < workers;
    worker->shared = &shared;
    worker->index = producer ? index : index - workers;
    worker->batches =
        producer ? batches / workers + (worker->index < batches % workers) : 0;
    if (pthread_create(&worker->thread, NULL,
                       producer ? batches_producer : batches_consumer,
                       worker) != 0)
      bench_fail("pthread_create failed");
  }
  double first_start = 0, last_finish = 0;
  for (unsigned index = 0; index < 2 * workers; index++) {
    pthread_join(threads[index].thread, NULL);
    if (index == 0 || threads[index].started < first_start)
      first_start = threads[index].started;
    if (threads[index].finished > last_finish)
      last_finish = threads[index].finished;
  }
  if (atomic_load(&shared.corrupt) != 0)
    bench_fail("batches: %" PRIu64 " blocks arrived corrupted",
               atomic_load(&shared.corrupt));
  pthread_barrier_destroy(&shared.start_line);
  batch_queue_destroy(&shared.full);
  batch_queue_destroy(&shared.empty);
  scaffold_free(threads, 2 * workers * sizeof(struct batches_worker));
  scaffold_free(storage, arrays * sizeof(struct batch));
  return last_finish - first_start;
}

static int scenario_batches(const struct bench_options *options,
                            struct bench_result *result) {
  struct prng prng;
  prng_seed(&prng, options->seed);
  uint32_t *sizes =
      size_table_octaves(&prng, BATCH_FIRST_OCTAVE, BATCH_LAST_OCTAVE);
  unsigned workers = options->workers;
  uint64_t batches = options->ops / (2 * BATCH_BLOCKS);
  if (batches < workers)
    batches = workers; /* every producer makes at least one */
  batches_run(sizes, workers, warmup_count(batches));
  result->seconds = batches_run(sizes, workers, batches);
  result->ops = batches * BATCH_BLOCKS * 2;
  result_add_u64(result, "producers", workers);
  result_add_u64(result, "consumers", workers);
  result_add_u64(result, "batch", BATCH_BLOCKS);
  result_add_u64(result, "queue_depth", BATCH_DEPTH);
  free_table(sizes);
  return 0;
}

/* ---- 11. bigblocks: 5-25 MiB blocks, replaced and zero-filled ---------- */

/* Blocks far above every allocator's small-object range, so each one comes
 * from the system or from a cache of large spans; the program zero-fills
 * what it gets, as real programs do, which makes page faults and the reuse
 * (or not) of already-resident memory the whole cost. */

#define BIG_SLOTS    20
#define BIG_MIN_SIZE (5u << 20)
#define BIG_MAX_SIZE (25u << 20)

struct big_state {
  const uint32_t *sizes;
  const uint32_t *slots;
  void *blocks[BIG_SLOTS];
  uint32_t cursor;
};

static void big_place(struct big_state *state, unsigned slot, uint32_t size,
                      uint64_t mark) {
  void *block = malloc(size);
  check_block(block, size);
  escape(block);
  memset(block, 0, size);
  touch_first(block, mark);
  escape(block);
  state->blocks[slot] = block;
}

static void big_loop(struct big_state *state, uint64_t replacements) {
  for (uint64_t step = 0; step < replacements; step++, state->cursor++) {
    uint32_t slot = state->slots[state->cursor & TABLE_MASK];
    free(state->blocks[slot]);
    big_place(state, slot, state->sizes[state->cursor & TABLE_MASK], step);
  }
}

static uint64_t minor_faults(void) {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return (uint64_t)usage.ru_minflt;
}

static int scenario_bigblocks(const struct bench_options *options,
                              struct bench_result *result) {
  struct prng prng;
  prng_seed(&prng, options->seed);
  uint32_t *slots = scaffold_alloc(TABLE_LENGTH * sizeof(uint32_t));
  for (uint32_t index = 0; index < TABLE_LENGTH; index++)
    slots[index] = (uint32_t)prng_range(&prng, 0, BIG_SLOTS - 1);
  struct big_state state = {
      .sizes = size_table_uniform(&prng, BIG_MIN_SIZE, BIG_MAX_SIZE),
      .slots = slots,
  };
  for (unsigned slot = 0; slot < BIG_SLOTS; slot++)
    big_place(&state, slot, state.sizes[state.cursor++ & TABLE_MASK], slot);
  uint64_t replacements = options->ops / 2;
  replacements = replacements > 0 ? replacements : 1;
  big_loop(&state, warmup_count(replacements));
  uint64_t faults_before = minor_faults();
  double start = now_seconds();
  big_loop(&state, replacements);
  result->seconds = now_seconds() - start;
  uint64_t faults = minor_faults() - faults_before;
  result->ops = replacements * 2;
  for (unsigned slot = 0; slot < BIG_SLOTS; slot++)
    free(state.blocks[slot]);
  result_add_u64(result, "live_blocks", BIG_SLOTS);
  result_add_u64(result, "minor_faults", faults);
  result_add_double(result, "faults_per_replacement",
                    (double)faults / (double)replacements);
  free_table((uint32_t *)state.sizes);
  free_table(slots);
  return 0;
}

/* ---- 12. server: larson-style, blocks freed by any thread -------------- */

/* After larson (Larson and Krishnan's server benchmark): every thread
 * replaces blocks in slots shared by all threads, so most frees are of
 * another thread's blocks, and memory an allocator keeps per thread may
 * never come back to the thread that wants it. */

#define SERVER_SLOTS_PER_THREAD 10000
#define SERVER_MIN_SIZE         10
#define SERVER_MAX_SIZE         1000

struct server_shared {
  _Atomic(void *) *slots;
  uint32_t slot_count;
  const uint32_t *sizes;
  const uint32_t *picks; /* slot indices over every thread's slots */
  uint64_t steps;        /* per thread */
  pthread_barrier_t filled;
  pthread_barrier_t start_line;
  pthread_barrier_t finish_line; /* the main thread reads RSS in between */
  pthread_barrier_t release;
  _Atomic uint64_t corrupt;
};

struct server_worker {
  pthread_t thread;
  struct server_shared *shared;
  unsigned index;
  double started;
  double finished;
};

/* Every block's first word is its size: the check on free, and the sum of
 * the live bytes at the end. */
static void *server_block(uint32_t size) {
  void *block = malloc(size);
  check_block(block, size);
  touch_first(block, size);
  escape(block);
  return block;
}

static uint64_t server_loop(struct server_shared *shared, uint32_t *cursor,
                            uint64_t steps) {
  uint64_t corrupt = 0;
  uint32_t position = *cursor;
  for (uint64_t step = 0; step < steps; step++, position++) {
    uint32_t slot = shared->picks[position & TABLE_MASK];
    void *block = server_block(shared->sizes[position & TABLE_MASK]);
    /* acq_rel: the old block's first word was written by whichever thread
     * put it there. */
    void *old = atomic_exchange_explicit(&shared->slots[slot], block,
                                         memory_order_acq_rel);
    uint64_t size = *(volatile uint64_t *)old;
    corrupt += size < SERVER_MIN_SIZE || size > SERVER_MAX_SIZE;
    free(old);
  }
  *cursor = position;
  return corrupt;
}

static void *server_worker_main(void *argument) {
  struct server_worker *worker = argument;
  struct server_shared *shared = worker->shared;
  uint32_t cursor = worker->index * (TABLE_LENGTH / 16 + 7);
  /* Each thread allocates its own share of the slots. */
  for (uint32_t slot = worker->index * SERVER_SLOTS_PER_THREAD;
       slot < (worker->index + 1) * SERVER_SLOTS_PER_THREAD; slot++)
    atomic_store_explicit(&shared->slots[slot],
                          server_block(shared->sizes[cursor++ & TABLE_MASK]),
                          memory_order_release);
  pthread_barrier_wait(&shared->filled);
  uint64_t corrupt = server_loop(shared, &cursor, warmup_count(shared->steps));
  pthread_barrier_wait(&shared->start_line);
  worker->started = now_seconds();
  corrupt += server_loop(shared, &cursor, shared->steps);
  worker->finished = now_seconds();
  atomic_fetch_add(&shared->corrupt, corrupt);
  /* Still running while the main thread reads RSS: a server's threads do not
   * exit, and an exiting thread may hand its caches back. */
  pthread_barrier_wait(&shared->finish_line);
  pthread_barrier_wait(&shared->release);
  return NULL;
}

static int scenario_server(const struct bench_options *options,
                           struct bench_result *result) {
  unsigned threads = options->workers;
  struct prng prng;
  prng_seed(&prng, options->seed);
  struct server_shared shared = {
      .slot_count = threads * SERVER_SLOTS_PER_THREAD,
      .sizes = size_table_uniform(&prng, SERVER_MIN_SIZE, SERVER_MAX_SIZE),
  };
  shared.slots = scaffold_alloc(shared.slot_count * sizeof(void *));
  uint32_t *picks = scaffold_alloc(TABLE_LENGTH * sizeof(uint32_t));
  for (uint32_t index = 0; index < TABLE_LENGTH; index++)
    picks[index] = (uint32_t)prng_range(&prng, 0, shared.slot_count - 1);
  shared.picks = picks;
  uint64_t steps = options->ops / (2 * (uint64_t)threads);
  shared.steps = steps > 0 ? steps : 1;
  pthread_barrier_init(&shared.filled, NULL, threads);
  pthread_barrier_init(&shared.start_line, NULL, threads);
  pthread_barrier_init(&shared.finish_line, NULL, threads + 1);
  pthread_barrier_init(&shared.release, NULL, threads + 1);

  struct server_worker *workers =
      scaffold_alloc(threads * sizeof(struct server_worker));
  for (unsigned index = 0; index < threads; index++) {
    workers[index].shared = &shared;
    workers[index].index = index;
    if (pthread_create(&workers[index].thread, NULL, server_worker_main,
                       &workers[index]) != 0)
      bench_fail("pthread_create failed");
  }
  pthread_barrier_wait(&shared.finish_line);
  uint64_t rss_live = rss_now_kib();
  /* VmHWM can trail the RSS just read by a few pages: the kernel folds
   * per-thread counters into it lazily. */
  uint64_t rss_peak = rss_peak_kib();
  rss_peak = rss_peak > rss_live ? rss_peak : rss_live;
  uint64_t live_bytes = 0;
  for (uint32_t slot = 0; slot < shared.slot_count; slot++)
    live_bytes += *(uint64_t *)atomic_load(&shared.slots[slot]);
  pthread_barrier_wait(&shared.release);

  double first_start = 0, last_finish = 0;
  for (unsigned index = 0; index < threads; index++) {
    pthread_join(workers[index].thread, NULL);
    if (index == 0 || workers[index].started < first_start)
      first_start = workers[index].started;
    if (workers[index].finished > last_finish)
      last_finish = workers[index].finished;
  }
  if (atomic_load(&shared.corrupt) != 0)
    bench_fail("server: %" PRIu64 " blocks found corrupted",
               atomic_load(&shared.corrupt));
  result->seconds = last_finish - first_start;
  result->ops = shared.steps * threads * 2;
  result_add_u64(result, "threads", threads);
  result_add_u64(result, "live_objects", shared.slot_count);
  result_add_u64(result, "live_kib", live_bytes / 1024);
  result_add_u64(result, "rss_live_kib", rss_live);
  result_add_u64(result, "rss_peak_kib", rss_peak);

  for (uint32_t slot = 0; slot < shared.slot_count; slot++)
    free(atomic_load(&shared.slots[slot]));
  pthread_barrier_destroy(&shared.filled);
  pthread_barrier_destroy(&shared.start_line);
  pthread_barrier_destroy(&shared.finish_line);
  pthread_barrier_destroy(&shared.release);
  scaffold_free(workers, threads * sizeof(struct server_worker));
  scaffold_free(shared.slots, shared.slot_count * sizeof(void *));
  free_table(picks);
  free_table((uint32_t *)shared.sizes);
  return 0;
}

/* ---- 13. churn: varied sizes and lifetimes, one thread ----------------- */

/* What a single-threaded program does between its big phases: temporaries
 * freed at once, short-lived blocks freed a few steps later, and long-lived
 * ones that stay about 10,000 steps in the busiest slot and practically the
 * whole run in the quietest, all interleaved, so frees of young and old
 * blocks of every size alternate. */

#define CHURN_SHORT_SLOTS 8
#define CHURN_LONG_SLOTS  4096
#define CHURN_LAST_OCTAVE 13 /* 8 B .. 16 KiB - 1 */
/* Of every 100 steps: 25 temporaries, 55 short-lived, 20 long-lived. */
#define CHURN_TEMPORARY_PERCENT 25
#define CHURN_SHORT_PERCENT     55

enum churn_kind { CHURN_TEMPORARY, CHURN_SHORT, CHURN_LONG };

#define CHURN_KIND_SHIFT 30 /* a step: kind in the top bits, slot below */
#define CHURN_SLOT_MASK  ((1u << CHURN_KIND_SHIFT) - 1)

struct churn_state {
  const uint32_t *sizes;
  const uint32_t *steps;
  void *short_blocks[CHURN_SHORT_SLOTS];
  void **long_blocks; /* CHURN_LONG_SLOTS entries */
  uint32_t cursor;
};

static void *churn_block(uint32_t size, uint64_t mark) {
  void *block = malloc(size);
  check_block(block, size);
  touch_first(block, mark);
  escape(block);
  return block;
}

static void churn_loop(struct churn_state *state, uint64_t steps) {
  uint32_t cursor = state->cursor;
  for (uint64_t step = 0; step < steps; step++, cursor++) {
    uint32_t action = state->steps[cursor & TABLE_MASK];
    uint32_t slot = action & CHURN_SLOT_MASK;
    void *block = churn_block(state->sizes[cursor & TABLE_MASK], step);
    switch ((enum churn_kind)(action >> CHURN_KIND_SHIFT)) {
    case CHURN_TEMPORARY:
      free(block);
      break;
    case CHURN_SHORT:
      free(state->short_blocks[slot]);
      state->short_blocks[slot] = block;
      break;
    case CHURN_LONG:
      free(state->long_blocks[slot]);
      state->long_blocks[slot] = block;
      break;
    }
  }
  state->cursor = cursor;
}

static int scenario_churn(const struct bench_options *options,
                          struct bench_result *result) {
  struct prng prng;
  prng_seed(&prng, options->seed);
  uint32_t *steps = scaffold_alloc(TABLE_LENGTH * sizeof(uint32_t));
  for (uint32_t index = 0; index < TABLE_LENGTH; index++) {
    unsigned percent = (unsigned)prng_range(&prng, 0, 99);
    if (percent < CHURN_TEMPORARY_PERCENT) {
      steps[index] = (uint32_t)CHURN_TEMPORARY << CHURN_KIND_SHIFT;
    } else if (percent < CHURN_TEMPORARY_PERCENT + CHURN_SHORT_PERCENT) {
      steps[index] = (uint32_t)CHURN_SHORT << CHURN_KIND_SHIFT |
                     (uint32_t)prng_range(&prng, 0, CHURN_SHORT_SLOTS - 1);
    } else {
      /* The lower of two uniform draws: low slots are replaced often, the
       * highest almost never, so lifetimes spread over every scale. */
      uint32_t first = (uint32_t)prng_range(&prng, 0, CHURN_LONG_SLOTS - 1);
      uint32_t second = (uint32_t)prng_range(&prng, 0, CHURN_LONG_SLOTS - 1);
      steps[index] = (uint32_t)CHURN_LONG << CHURN_KIND_SHIFT |
                     (first < second ? first : second);
    }
  }
  struct churn_state state = {
      .sizes = size_table_octaves(&prng, 3, CHURN_LAST_OCTAVE),
      .steps = steps,
      .long_blocks = scaffold_alloc(CHURN_LONG_SLOTS * sizeof(void *)),
  };
  /* Full before the clock starts, so every step is one malloc + one free. */
  for (unsigned slot = 0; slot < CHURN_LONG_SLOTS; slot++)
    state.long_blocks[slot] =
        churn_block(state.sizes[state.cursor++ & TABLE_MASK], slot);
  for (unsigned slot = 0; slot < CHURN_SHORT_SLOTS; slot++)
    state.short_blocks[slot] =
        churn_block(state.sizes[state.cursor++ & TABLE_MASK], slot);
  uint64_t count = options->ops / 2;
  count = count > 0 ? count : 1;
  churn_loop(&state, warmup_count(count));
  double start = now_seconds();
  churn_loop(&state, count);
  result->seconds = now_seconds() - start;
  result->ops = count * 2;
  for (unsigned slot = 0; slot < CHURN_LONG_SLOTS; slot++)
    free(state.long_blocks[slot]);
  for (unsigned slot = 0; slot < CHURN_SHORT_SLOTS; slot++)
    free(state.short_blocks[slot]);
  result_add_u64(result, "short_slots", CHURN_SHORT_SLOTS);
  result_add_u64(result, "long_slots", CHURN_LONG_SLOTS);
  scaffold_free(state.long_blocks, CHURN_LONG_SLOTS * sizeof(void *));
  free_table((uint32_t *)state.sizes);
  free_table(steps);
  return 0;
}

/* ---- table ------------------------------------------------------------- */

#define ALL_BACKENDS                                                           \
  ((1u << BACKEND_MALLOC) | (1u << BACKEND_SEED) | (1u << BACKEND_POOL))
#define MALLOC_AND_POOL ((1u << BACKEND_MALLOC) | (1u << BACKEND_POOL))
#define MALLOC_ONLY     (1u << BACKEND_MALLOC)

/* ---- tasks: short tasks polled by worker threads, moving between them --
 *
 * The async-runtime pattern task heaps are for: a shared queue of tasks,
 * each polled TASK_POLLS times by whichever worker takes it (so it moves
 * between workers); a poll allocates TASK_BLOCKS blocks of 16 B-2 KiB,
 * frees most of them at once and keeps TASK_KEPT for the task's later
 * polls. At its end a task frees what it kept; with --task-heaps (zkmem
 * under LD_PRELOAD only, through dlsym) each task instead runs in a heap of
 * its own, entered around every poll, and destroys it at its end. */

#define TASK_POLLS  4
#define TASK_BLOCKS 24
#define TASK_KEPT   6
#define TASKS_IN_FLIGHT                                                        \
  64 /* a runtime's live tasks; the next one starts as one ends */

typedef void *(*heap_create_fn)(const void *options);
typedef void *(*heap_enter_fn)(void *heap);
typedef void (*heap_destroy_fn)(void *heap);

struct task {
  void *heap;
  void *kept[TASK_POLLS * TASK_KEPT];
  unsigned kept_count;
  unsigned polls;
  uint32_t cursor;
  struct task *next;
};

struct tasks_shared {
  pthread_mutex_t lock;
  pthread_cond_t ready;
  struct task *head, *tail;
  uint64_t left;        /* tasks not finished */
  uint64_t not_started; /* tasks not yet in the queue */
  struct task *tasks;
  uint64_t count;
  const uint32_t *sizes;
  heap_create_fn create;
  heap_enter_fn enter;
  heap_destroy_fn destroy;
};

static void tasks_push(struct tasks_shared *shared, struct task *task) {
  pthread_mutex_lock(&shared->lock);
  task->next = NULL;
  if (shared->tail != NULL)
    shared->tail->next = task;
  else
    shared->head = task;
  shared->tail = task;
  pthread_cond_signal(&shared->ready);
  pthread_mutex_unlock(&shared->lock);
}

static struct task *tasks_pop(struct tasks_shared *shared) {
  pthread_mutex_lock(&shared->lock);
  while (shared->head == NULL && shared->left > 0)
    pthread_cond_wait(&shared->ready, &shared->lock);
  struct task *task = shared->head;
  if (task != NULL) {
    shared->head = task->next;
    if (shared->head == NULL)
      shared->tail = NULL;
  }
  pthread_mutex_unlock(&shared->lock);
  return task;
}

static void task_poll(struct tasks_shared *shared, struct task *task) {
  void *blocks[TASK_BLOCKS];
  for (unsigned i = 0; i < TASK_BLOCKS; i++) {
    uint32_t size = shared->sizes[task->cursor++ & TABLE_MASK];
    blocks[i] = malloc(size);
    check_block(blocks[i], size);
    touch_first(blocks[i], size);
    escape(blocks[i]);
  }
  for (unsigned i = 0; i < TASK_BLOCKS; i++) {
    if (i < TASK_KEPT)
      task->kept[task->kept_count++] = blocks[i];
    else
      free(blocks[i]);
  }
}

static void *tasks_worker(void *argument) {
  struct tasks_shared *shared = argument;
  struct task *task;
  while ((task = tasks_pop(shared)) != NULL) {
    void *previous = NULL;
    if (shared->enter != NULL) {
      if (task->heap == NULL)
        task->heap = shared->create(NULL);
      if (task->heap == NULL)
        bench_fail("tasks: zk_heap_create failed");
      previous = shared->enter(task->heap);
    }
    task_poll(shared, task);
    if (shared->enter != NULL)
      shared->enter(previous);
    if (++task->polls < TASK_POLLS) {
      tasks_push(shared, task);
      continue;
    }
    if (shared->destroy != NULL) {
      shared->destroy(task->heap); /* everything the task kept, at once */
    } else {
      for (unsigned i = 0; i < task->kept_count; i++)
        free(task->kept[i]);
    }
    pthread_mutex_lock(&shared->lock);
    struct task *next = NULL;
    if (shared->not_started > 0)
      next = &shared->tasks[shared->count - shared->not_started--];
    if (--shared->left == 0)
      pthread_cond_broadcast(&shared->ready);
    pthread_mutex_unlock(&shared->lock);
    if (next != NULL)
      tasks_push(shared, next);
  }
  return NULL;
}

static int scenario_tasks(const struct bench_options *options,
                          struct bench_result *result) {
  uint64_t ops_per_task = (uint64_t)TASK_POLLS * TASK_BLOCKS * 2;
  uint64_t count = options->ops / ops_per_task;
  if (count == 0)
    count = 1;
  struct prng prng;
  prng_seed(&prng, options->seed);
  struct tasks_shared shared = {
      .lock = PTHREAD_MUTEX_INITIALIZER,
      .ready = PTHREAD_COND_INITIALIZER,
      .left = count,
      .sizes = size_table_uniform(&prng, 16, 2048),
  };
  if (options->task_heaps) {
    shared.create = (heap_create_fn)dlsym(RTLD_DEFAULT, "zk_heap_create");
    shared.enter = (heap_enter_fn)dlsym(RTLD_DEFAULT, "zk_heap_enter");
    shared.destroy = (heap_destroy_fn)dlsym(RTLD_DEFAULT, "zk_heap_destroy");
    if (!shared.create || !shared.enter || !shared.destroy)
      bench_fail("tasks: --task-heaps needs zkmem (zk_heap_*) preloaded");
  }
  struct task *tasks = scaffold_alloc(count * sizeof(struct task));
  for (uint64_t i = 0; i < count; i++)
    tasks[i].cursor = (uint32_t)(i * 7919);
  shared.tasks = tasks;
  shared.count = count;
  uint64_t first = count < TASKS_IN_FLIGHT ? count : TASKS_IN_FLIGHT;
  shared.not_started = count - first;
  for (uint64_t i = 0; i < first; i++)
    tasks_push(&shared, &tasks[i]);
  unsigned workers = options->workers;
  pthread_t threads[256];
  double start = now_seconds();
  for (unsigned i = 0; i < workers; i++)
    if (pthread_create(&threads[i], NULL, tasks_worker, &shared) != 0)
      bench_fail("tasks: pthread_create failed");
  for (unsigned i = 0; i < workers; i++)
    pthread_join(threads[i], NULL);
  result->seconds = now_seconds() - start;
  result->ops = count * ops_per_task;
  result_add_u64(result, "tasks", count);
  result_add_u64(result, "workers", workers);
  result_add_u64(result, "task_heaps", options->task_heaps);
  scaffold_free(tasks, count * sizeof(struct task));
  free_table((uint32_t *)shared.sizes);
  return 0;
}

const struct scenario_entry scenario_table[] = {
    {"fixed", "alloc+free pairs of 64 B", 40000000, scenario_fixed,
     ALL_BACKENDS},
    {"stress", "batches of 1,000 random 8-256 B, freed in reverse", 20000000,
     scenario_stress, ALL_BACKENDS},
    {"reuse", "one 128 B object allocated and freed repeatedly", 40000000,
     scenario_reuse, ALL_BACKENDS},
    {"large", "batches of 100 random 1-5 KB, freed in random order", 4000000,
     scenario_large, MALLOC_ONLY},
    {"mixed", "10,000 live objects, log-uniform 8 B-64 KB, replaced at random",
     4000000, scenario_mixed, MALLOC_ONLY},
    {"handoff", "64-1,024 B objects allocated on one thread, freed on another",
     10000000, scenario_handoff, MALLOC_AND_POOL},
    {"scaling", "scenario stress on 1, 2, 4 ... threads (ops per thread)",
     10000000, scenario_scaling, MALLOC_ONLY},
    {"memory", "RSS of scenario mixed at peak, after free, wait, collect",
     400000, scenario_memory, MALLOC_ONLY},
    {"live", "1,000,000 live 64 B objects: RSS over payload", 1000000,
     scenario_live, MALLOC_AND_POOL},
    {"batches",
     "batches of 4,096 blocks of 8 B-2 KiB, made by --workers producers, "
     "freed by as many consumers",
     4000000, scenario_batches, MALLOC_ONLY},
    {"bigblocks", "20 live blocks of 5-25 MiB, replaced and zero-filled", 400,
     scenario_bigblocks, MALLOC_ONLY},
    {"server",
     "larson-style: --workers threads replace 10-1,000 B blocks in slots "
     "shared by all",
     4000000, scenario_server, MALLOC_ONLY},
    {"churn", "8 B-16 KiB blocks, temporary, short- and long-lived, mixed",
     10000000, scenario_churn, MALLOC_ONLY},
    {"tasks",
     "short tasks polled by --workers threads, each keeping blocks across "
     "polls (--task-heaps: a zkmem heap per task)",
     2000000, scenario_tasks, MALLOC_ONLY},
};

const size_t scenario_count = sizeof scenario_table / sizeof scenario_table[0];
