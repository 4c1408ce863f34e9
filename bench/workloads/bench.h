/* Shared pieces of the allocation workloads: options, result reporting,
 * timing, RSS probes, the deterministic PRNG and the escape barrier that keeps
 * the compiler from eliding allocation/free pairs.
 *
 * Every scenario measures allocator calls only: random sizes, slot indices and
 * free orders are generated into tables before the clock starts, and the
 * scaffolding (tables, pointer arrays, the handoff ring) is mapped with mmap so
 * it never passes through the allocator under test. */
#ifndef BENCH_H
#define BENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Which allocator a scenario drives. The kind is a compile-time constant in
 * every timed loop (see backend.h), so dispatch costs nothing. */
enum backend_kind {
  BACKEND_MALLOC, /* malloc/free: glibc, or whatever LD_PRELOAD installs */
  BACKEND_SEED,   /* the seed report's fixed-size stack pool (seed_pool.h) */
  BACKEND_POOL,   /* zk_pool_* (bench_pool only) */
};

struct bench_options {
  const char *scenario;
  enum backend_kind backend;
  uint64_t ops;          /* allocations + frees; per thread for scaling */
  uint64_t seed;         /* PRNG seed, identical for every allocator */
  unsigned threads[16];  /* thread counts for the scaling scenario */
  unsigned thread_count; /* entries used in threads[] */
  unsigned workers;      /* threads per side: batches, server (default 2) */
  bool task_heaps;       /* tasks: a zkmem task heap per task (zk_heap_*) */
  unsigned purge_wait_ms;
  bool json;
};

/* Extra, scenario-specific fields, kept as a ready-made JSON fragment so a
 * scenario can report arrays (scaling) as easily as numbers. */
#define BENCH_EXTRA_CAPACITY 4096

struct bench_result {
  uint64_t ops;
  double seconds;
  char extra[BENCH_EXTRA_CAPACITY];
  size_t extra_length;
};

void result_add_u64(struct bench_result *result, const char *name,
                    uint64_t value);
void result_add_double(struct bench_result *result, const char *name,
                       double value);
void result_add_null(struct bench_result *result, const char *name);
/* `json` must already be valid JSON (an array or object). */
void result_add_raw(struct bench_result *result, const char *name,
                    const char *json);

/* Prints the message and exits with status 1: a failed allocation inside a
 * timed loop means the run is worthless, and the driver must see it fail. */
__attribute__((noreturn, format(printf, 1, 2))) void
bench_fail(const char *format, ...);

double now_seconds(void);
/* Resident set size now, from /proc/self/statm, in KiB. */
uint64_t rss_now_kib(void);
/* Highest resident set size of the process so far, in KiB. */
uint64_t rss_peak_kib(void);

/* Anonymous mapping for scaffolding; exits on failure. */
void *scaffold_alloc(size_t bytes);
void scaffold_free(void *memory, size_t bytes);

/* xorshift64*: a few instructions per number, good enough for sizes. */
struct prng {
  uint64_t state;
};

static inline void prng_seed(struct prng *prng, uint64_t seed) {
  /* splitmix64 turns any seed, zero included, into a well-mixed state. */
  uint64_t z = seed + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  prng->state = z != 0 ? z : 1;
}

static inline uint64_t prng_next(struct prng *prng) {
  uint64_t x = prng->state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  prng->state = x;
  return x * 0x2545f4914f6cdd1dull;
}

/* Uniform in [low, high]. The modulo bias is irrelevant at these ranges. */
static inline uint64_t prng_range(struct prng *prng, uint64_t low,
                                  uint64_t high) {
  return low + (prng_next(prng) >> 11) % (high - low + 1);
}

/* Tells the compiler that `pointer` and everything it points to are used, so
 * neither the allocation nor the stores into it can be optimised away. */
static inline void escape(void *pointer) {
  __asm__ volatile("" : : "r"(pointer) : "memory");
}

/* One store at the start of the block: touches its first cache line. */
static inline void touch_first(void *block, uint64_t value) {
  *(volatile uint64_t *)block = value;
}

/* Scenario entry points (scenarios.c). Each returns 0, or 2 when the scenario
 * does not apply to the chosen backend. */
typedef int (*scenario_function)(const struct bench_options *options,
                                 struct bench_result *result);

struct scenario_entry {
  const char *name;
  const char *summary;
  uint64_t default_ops;
  scenario_function run;
  /* Backends the scenario supports, as a bit mask of 1 << backend_kind. */
  unsigned backends;
};

extern const struct scenario_entry scenario_table[];
extern const size_t scenario_count;

#endif /* BENCH_H */
