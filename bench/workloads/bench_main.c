/* Allocation workload driver: runs one scenario against one allocator and
 * prints one line of results.
 *
 *   bench_malloc --scenario fixed [--ops N] [--threads 1,2,4] [--json]
 *   bench_malloc --scenario fixed --alloc seed
 *   bench_pool   --scenario fixed            (zk_pool_*, built with BENCH_POOL)
 *
 * bench_malloc calls only malloc/free, so the allocator under test is chosen
 * from outside with LD_PRELOAD (none: glibc). See bench/README.md. */
#define _GNU_SOURCE
#include "bench.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifdef BENCH_POOL
#define PROGRAM_NAME    "bench_pool"
#define DEFAULT_BACKEND BACKEND_POOL
#else
#define PROGRAM_NAME    "bench_malloc"
#define DEFAULT_BACKEND BACKEND_MALLOC
#endif

static const char *const backend_names[] = {
    [BACKEND_MALLOC] = "malloc",
    [BACKEND_SEED] = "seed",
    [BACKEND_POOL] = "pool",
};

/* ---- shared utilities declared in bench.h ------------------------------ */

void bench_fail(const char *format, ...) {
  va_list arguments;
  va_start(arguments, format);
  fprintf(stderr, PROGRAM_NAME ": ");
  vfprintf(stderr, format, arguments);
  fputc('\n', stderr);
  va_end(arguments);
  exit(1);
}

double now_seconds(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

uint64_t rss_now_kib(void) {
  FILE *statm = fopen("/proc/self/statm", "r");
  unsigned long long size_pages = 0, resident_pages = 0;
  if (statm == NULL)
    return 0;
  if (fscanf(statm, "%llu %llu", &size_pages, &resident_pages) != 2)
    resident_pages = 0;
  fclose(statm);
  return resident_pages * (uint64_t)sysconf(_SC_PAGESIZE) / 1024;
}

/* VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so
 * a workload started by a large parent (the Python driver) would report the
 * parent's peak instead of its own. */
uint64_t rss_peak_kib(void) {
  FILE *status = fopen("/proc/self/status", "r");
  char line[256];
  unsigned long long peak = 0;
  if (status == NULL)
    return 0;
  while (fgets(line, sizeof line, status) != NULL)
    if (sscanf(line, "VmHWM: %llu kB", &peak) == 1)
      break;
  fclose(status);
  return peak;
}

void *scaffold_alloc(size_t bytes) {
  void *memory = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED)
    bench_fail("mmap of %zu bytes failed: %s", bytes, strerror(errno));
  return memory;
}

void scaffold_free(void *memory, size_t bytes) {
  munmap(memory, bytes);
}

static void result_append(struct bench_result *result, const char *format,
                          ...) {
  va_list arguments;
  va_start(arguments, format);
  size_t room = sizeof result->extra - result->extra_length;
  int written =
      vsnprintf(result->extra + result->extra_length, room, format, arguments);
  va_end(arguments);
  if (written < 0 || (size_t)written >= room)
    bench_fail("result fields exceed %d bytes", BENCH_EXTRA_CAPACITY);
  result->extra_length += (size_t)written;
}

void result_add_u64(struct bench_result *result, const char *name,
                    uint64_t value) {
  result_append(result, ",\"%s\":%" PRIu64, name, value);
}

void result_add_double(struct bench_result *result, const char *name,
                       double value) {
  result_append(result, ",\"%s\":%.6g", name, value);
}

void result_add_null(struct bench_result *result, const char *name) {
  result_append(result, ",\"%s\":null", name);
}

void result_add_raw(struct bench_result *result, const char *name,
                    const char *json) {
  result_append(result, ",\"%s\":%s", name, json);
}

/* ---- command line ------------------------------------------------------ */

static void usage(FILE *out) {
  fprintf(out,
          "usage: " PROGRAM_NAME " --scenario NAME [options]\n"
          "  --scenario NAME     one of the scenarios below\n"
          "  --ops N             allocations + frees (per thread for scaling)\n"
          "  --alloc KIND        malloc (default), seed (fixed-size reference)"
          "\n                      or pool (bench_pool only)\n"
          "  --threads LIST      thread counts for scaling, e.g. 1,2,4\n"
          "  --task-heaps        tasks: a zkmem task heap per task, destroyed "
          "at its end\n"
          "  --workers N         batches: producers and consumers each; "
          "server:\n                      threads (default 2)\n"
          "  --seed N            PRNG seed (default 1)\n"
          "  --purge-wait-ms N   memory: sleep before the second reading "
          "(1500)\n"
          "  --json              one JSON line instead of text\n"
          "scenarios:\n");
  for (size_t index = 0; index < scenario_count; index++)
    fprintf(out, "  %-10s %s (default %" PRIu64 " ops)\n",
            scenario_table[index].name, scenario_table[index].summary,
            scenario_table[index].default_ops);
}

static uint64_t parse_count(const char *text, const char *option) {
  char *end;
  errno = 0;
  unsigned long long value = strtoull(text, &end, 10);
  if (errno != 0 || end == text || *end != '\0')
    bench_fail("%s wants a number, got '%s'", option, text);
  return value;
}

/* Powers of two up to the number of online CPUs, plus that number itself. */
static void default_thread_counts(struct bench_options *options) {
  long cpus = sysconf(_SC_NPROCESSORS_ONLN);
  unsigned limit = cpus > 0 ? (unsigned)cpus : 1;
  options->thread_count = 0;
  for (unsigned threads = 1; threads < limit && options->thread_count < 15;
       threads *= 2)
    options->threads[options->thread_count++] = threads;
  options->threads[options->thread_count++] = limit;
}

static void parse_thread_counts(struct bench_options *options,
                                const char *text) {
  char buffer[256];
  snprintf(buffer, sizeof buffer, "%s", text);
  options->thread_count = 0;
  /* Speed-up is measured against one thread, so 1 always comes first. */
  options->threads[options->thread_count++] = 1;
  for (char *save = NULL, *item = strtok_r(buffer, ",", &save); item != NULL;
       item = strtok_r(NULL, ",", &save)) {
    uint64_t threads = parse_count(item, "--threads");
    if (threads == 0 || threads > 1024)
      bench_fail("--threads: %" PRIu64 " is out of range 1..1024", threads);
    if (threads == 1)
      continue;
    if (options->thread_count == sizeof options->threads / sizeof(unsigned))
      bench_fail("--threads: at most %zu counts",
                 sizeof options->threads / sizeof(unsigned));
    options->threads[options->thread_count++] = (unsigned)threads;
  }
}

static enum backend_kind parse_backend(const char *text) {
  for (unsigned kind = 0; kind < 3; kind++)
    if (strcmp(text, backend_names[kind]) == 0)
      return (enum backend_kind)kind;
  bench_fail("--alloc: unknown allocator '%s' (malloc, seed, pool)", text);
}

int main(int argc, char **argv) {
  struct bench_options options = {
      .backend = DEFAULT_BACKEND,
      .seed = 1,
      .workers = 2,
      .purge_wait_ms = 1500,
  };
  uint64_t ops = 0;
  default_thread_counts(&options);
  for (int index = 1; index < argc; index++) {
    const char *argument = argv[index];
    const char *value = index + 1 < argc ? argv[index + 1] : NULL;
    bool takes_value = true;
    if (strcmp(argument, "--json") == 0) {
      options.json = true;
      takes_value = false;
    } else if (strcmp(argument, "--task-heaps") == 0) {
      options.task_heaps = true;
      takes_value = false;
    } else if (strcmp(argument, "--help") == 0 || strcmp(argument, "-h") == 0) {
      usage(stdout);
      return 0;
    } else if (value == NULL) {
      bench_fail("%s: missing value (see --help)", argument);
    } else if (strcmp(argument, "--scenario") == 0) {
      options.scenario = value;
    } else if (strcmp(argument, "--ops") == 0) {
      ops = parse_count(value, argument);
    } else if (strcmp(argument, "--alloc") == 0) {
      options.backend = parse_backend(value);
    } else if (strcmp(argument, "--threads") == 0) {
      parse_thread_counts(&options, value);
    } else if (strcmp(argument, "--workers") == 0) {
      uint64_t workers = parse_count(value, argument);
      if (workers == 0 || workers > 256)
        bench_fail("--workers: %" PRIu64 " is out of range 1..256", workers);
      options.workers = (unsigned)workers;
    } else if (strcmp(argument, "--seed") == 0) {
      options.seed = parse_count(value, argument);
    } else if (strcmp(argument, "--purge-wait-ms") == 0) {
      options.purge_wait_ms = (unsigned)parse_count(value, argument);
    } else {
      fprintf(stderr, PROGRAM_NAME ": unknown option '%s'\n", argument);
      usage(stderr);
      return 2;
    }
    if (takes_value)
      index++;
  }
  if (options.scenario == NULL) {
    usage(stderr);
    return 2;
  }

  const struct scenario_entry *scenario = NULL;
  for (size_t index = 0; index < scenario_count; index++)
    if (strcmp(scenario_table[index].name, options.scenario) == 0)
      scenario = &scenario_table[index];
  if (scenario == NULL) {
    fprintf(stderr, PROGRAM_NAME ": unknown scenario '%s'\n", options.scenario);
    usage(stderr);
    return 2;
  }
#ifdef BENCH_POOL
  bool backend_built = options.backend == BACKEND_POOL;
#else
  bool backend_built = options.backend != BACKEND_POOL;
#endif
  if (!backend_built || !(scenario->backends & (1u << options.backend))) {
    fprintf(stderr, PROGRAM_NAME ": scenario '%s' has no '%s' variant here\n",
            scenario->name, backend_names[options.backend]);
    return 2;
  }
  options.ops = ops != 0 ? ops : scenario->default_ops;

  struct bench_result result = {0};
  int status = scenario->run(&options, &result);
  if (status != 0) {
    fprintf(stderr, PROGRAM_NAME ": scenario '%s' has no '%s' variant\n",
            scenario->name, backend_names[options.backend]);
    return status;
  }

  double seconds = result.seconds > 0 ? result.seconds : 1e-9;
  double ops_per_second = (double)result.ops / seconds;
  double nanoseconds_per_op = seconds * 1e9 / (double)result.ops;
  if (options.json) {
    printf("{\"scenario\":\"%s\",\"alloc\":\"%s\",\"ops\":%" PRIu64
           ",\"seconds\":%.6f,\"ops_per_s\":%.1f,\"ns_per_op\":%.3f,"
           "\"peak_rss_kib\":%" PRIu64 "%s}\n",
           scenario->name, backend_names[options.backend], result.ops, seconds,
           ops_per_second, nanoseconds_per_op, rss_peak_kib(), result.extra);
  } else {
    printf("%s/%s: %" PRIu64 " ops in %.3f s = %.1f M ops/s, %.2f ns/op, "
           "peak RSS %" PRIu64 " KiB\n  extra: {%s}\n",
           scenario->name, backend_names[options.backend], result.ops, seconds,
           ops_per_second / 1e6, nanoseconds_per_op, rss_peak_kib(),
           result.extra_length > 0 ? result.extra + 1 : "");
  }
  return 0;
}
