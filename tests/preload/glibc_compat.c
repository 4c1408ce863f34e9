/* glibc compatibility of the exported malloc family, as a program sees it.
 *
 * Built twice: run under LD_PRELOAD=libzkmem.so, and (ZKMEM_TEST_STATIC)
 * linked with a libzkmem.a that overrides malloc, exporting its symbols
 * (-rdynamic). Every entry point is looked up with dlsym(RTLD_DEFAULT) and
 * must resolve into zkmem, not glibc: glibc 2.36's headers do not declare
 * the C23 sized frees, and a program that calls them resolves them the same
 * way at load time. Then:
 *   - free_sized and free_aligned_sized give back blocks of every kind
 *     (small, large, huge, over-aligned): zkmem's live counts return to
 *     where they were; NULL is a no-op;
 *   - malloc_info writes glibc's XML shape with the huge block in "mmap",
 *     and rejects options != 0 with EINVAL, writing nothing;
 *   - memalign rounds a non-power-of-two alignment up and fails with EINVAL
 *     above SIZE_MAX / 2 + 1 (__libc_memalign too);
 *   - mallinfo2, mallinfo and __libc_mallinfo count a 64 MiB block in
 *     hblkhd and not in arena, and mallinfo's ints stop at INT_MAX;
 *   - with --secure (run with ZKMEM_SECURE=1): a sized free claiming more
 *     than the block, or an alignment the block lacks, is reported, and
 *     aborts or, with ZKMEM_ON_ERROR=warn, leaks the block. */
#define _GNU_SOURCE
#include "test_util.h"
#include "zkmem.h"

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <malloc.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define MIB ((size_t)1 << 20)

typedef void *malloc_fn(size_t);
typedef void free_fn(void *);
typedef void *aligned_alloc_fn(size_t, size_t);
typedef void free_sized_fn(void *, size_t);
typedef void free_aligned_sized_fn(void *, size_t, size_t);
typedef int malloc_info_fn(int, FILE *);
typedef struct mallinfo mallinfo_fn(void);
typedef struct mallinfo2 mallinfo2_fn(void);
typedef void stats_get_fn(zk_stats_t *);
typedef int option_set_fn(zk_option_t, long);
typedef long option_get_fn(zk_option_t);

static const void *zkmem_base; /* where zkmem's code is loaded */

static const char *const entry_points[] = {
    "malloc",
    "free",
    "calloc",
    "realloc",
    "reallocarray",
    "memalign",
    "aligned_alloc",
    "posix_memalign",
    "valloc",
    "pvalloc",
    "malloc_usable_size",
    "cfree",
    "mallinfo",
    "mallinfo2",
    "malloc_stats",
    "malloc_trim",
    "mallopt",
    "malloc_info",
    "free_sized",
    "free_aligned_sized",
    "__libc_malloc",
    "__libc_free",
    "__libc_calloc",
    "__libc_realloc",
    "__libc_memalign",
    "__libc_valloc",
    "__libc_pvalloc",
    "__libc_mallinfo",
    "__libc_mallopt",
    "__libc_reallocarray",
};

/* The definition the dynamic linker gives the program, if it is zkmem's. */
static void *zkmem_symbol(const char *name) {
  void *symbol = dlsym(RTLD_DEFAULT, name);
  if (symbol == NULL) {
    fprintf(stderr, "%s: not found by dlsym: %s\n", name, dlerror());
    exit(1);
  }
  Dl_info info;
  if (dladdr(symbol, &info) == 0 || info.dli_fbase != zkmem_base) {
    fprintf(stderr, "%s: resolves into %s, not into zkmem\n", name,
            info.dli_fname != NULL ? info.dli_fname : "(unknown)");
    exit(1);
  }
  return symbol;
}

static malloc_fn *sys_malloc;
static free_fn *sys_free;
static aligned_alloc_fn *sys_aligned_alloc;
static free_sized_fn *sys_free_sized;
static free_aligned_sized_fn *sys_free_aligned_sized;
static malloc_info_fn *sys_malloc_info;
static aligned_alloc_fn *sys_memalign;
static aligned_alloc_fn *sys_libc_memalign;
static mallinfo_fn *sys_mallinfo;
static mallinfo_fn *sys_libc_mallinfo;
static mallinfo2_fn *sys_mallinfo2;
static stats_get_fn *stats_get;
static option_set_fn *option_set;
static option_get_fn *option_get;

#ifdef ZKMEM_TEST_STATIC
static malloc_fn *volatile linked_malloc = malloc;
#endif

static void resolve(void) {
  Dl_info info;
#ifdef ZKMEM_TEST_STATIC
  /* zkmem is linked into this program. Referring to malloc pulls the
   * override's object out of the archive: lookups alone would not. */
  CHECK(dlsym(RTLD_DEFAULT, "malloc") == (void *)linked_malloc);
  CHECK(dladdr((void *)resolve, &info) != 0);
  zkmem_base = info.dli_fbase;
  stats_get = zk_stats_get;
  option_set = zk_option_set;
  option_get = zk_option_get;
#else
  /* Only zkmem defines zk_stats_get: found, it shows where zkmem is. */
  stats_get = (stats_get_fn *)dlsym(RTLD_DEFAULT, "zk_stats_get");
  if (stats_get == NULL) {
    fprintf(stderr,
            "zk_stats_get not found: run with LD_PRELOAD=libzkmem.so\n");
    exit(1);
  }
  CHECK(dladdr((void *)stats_get, &info) != 0);
  zkmem_base = info.dli_fbase;
  option_set = (option_set_fn *)zkmem_symbol("zk_option_set");
  option_get = (option_get_fn *)zkmem_symbol("zk_option_get");
#endif
  for (size_t i = 0; i < sizeof(entry_points) / sizeof(entry_points[0]); i++)
    zkmem_symbol(entry_points[i]);
  /* Calls through pointers: the compiler cannot pair and drop them. */
  sys_malloc = (malloc_fn *)zkmem_symbol("malloc");
  sys_free = (free_fn *)zkmem_symbol("free");
  sys_aligned_alloc = (aligned_alloc_fn *)zkmem_symbol("aligned_alloc");
  sys_free_sized = (free_sized_fn *)zkmem_symbol("free_sized");
  sys_free_aligned_sized =
      (free_aligned_sized_fn *)zkmem_symbol("free_aligned_sized");
  sys_malloc_info = (malloc_info_fn *)zkmem_symbol("malloc_info");
  sys_memalign = (aligned_alloc_fn *)zkmem_symbol("memalign");
  sys_libc_memalign = (aligned_alloc_fn *)zkmem_symbol("__libc_memalign");
  sys_mallinfo = (mallinfo_fn *)zkmem_symbol("mallinfo");
  sys_libc_mallinfo = (mallinfo_fn *)zkmem_symbol("__libc_mallinfo");
  sys_mallinfo2 = (mallinfo2_fn *)zkmem_symbol("mallinfo2");
}

/* Blocks of every kind that zkmem counts as live. */
static uint64_t live_blocks(void) {
  zk_stats_t stats;
  stats_get(&stats);
  uint64_t live = stats.large_live + stats.huge_live;
  for (size_t c = 0; c < stats.class_count; c++)
    live += stats.classes[c].live;
  return live;
}

static void test_free_sized(void) {
  static const size_t sizes[] = {1,      8,       24,      100,
                                 1000,   4097,    65536,   65537,
                                 300000, 2 * MIB, 3 * MIB, 9 * MIB + 5};
  enum { COUNT = sizeof(sizes) / sizeof(sizes[0]) };
  void *blocks[COUNT];
  uint64_t before = live_blocks();
  for (size_t i = 0; i < COUNT; i++) {
    blocks[i] = sys_malloc(sizes[i]);
    CHECK(blocks[i] != NULL);
    memset(blocks[i], (int)i, sizes[i]);
  }
  CHECK(live_blocks() == before + COUNT);
  for (size_t i = 0; i < COUNT; i++)
    sys_free_sized(blocks[i], sizes[i]);
  CHECK(live_blocks() == before);

  static const size_t alignments[] = {16, 64, 4096, 65536, 2 * MIB, 4 * MIB};
  enum { ALIGNED = sizeof(alignments) / sizeof(alignments[0]) };
  void *aligned[ALIGNED];
  for (size_t i = 0; i < ALIGNED; i++) {
    size_t size = alignments[i] * 3; /* aligned_alloc: a multiple */
    aligned[i] = sys_aligned_alloc(alignments[i], size);
    CHECK(aligned[i] != NULL);
    CHECK(((uintptr_t)aligned[i] & (alignments[i] - 1)) == 0);
    memset(aligned[i], 0x5a, size);
  }
  CHECK(live_blocks() == before + ALIGNED);
  for (size_t i = 0; i < ALIGNED; i++)
    sys_free_aligned_sized(aligned[i], alignments[i], alignments[i] * 3);
  CHECK(live_blocks() == before);

  sys_free_sized(NULL, 0);
  sys_free_sized(NULL, 123);
  sys_free_aligned_sized(NULL, 64, 0);
  sys_free_aligned_sized(NULL, 4096, 8192);
  CHECK(live_blocks() == before);
}

/* The number in `<element type="TYPE" ATTRIBUTE="N"`, or -1. */
static long long xml_figure(const char *xml, const char *element,
                            const char *type, const char *attribute) {
  char start[128];
  snprintf(start, sizeof(start), "<%s type=\"%s\"", element, type);
  const char *at = strstr(xml, start);
  if (at == NULL)
    return -1;
  const char *end = strchr(at, '>');
  char key[64];
  snprintf(key, sizeof(key), " %s=\"", attribute);
  const char *value = strstr(at, key);
  if (value == NULL || value > end)
    return -1;
  return strtoll(value + strlen(key), NULL, 10);
}

static void test_malloc_info(void) {
  void *huge = sys_malloc(64 * MIB);
  CHECK(huge != NULL);
  memset(huge, 1, 4096);

  char *xml = NULL;
  size_t length = 0;
  FILE *stream = open_memstream(&xml, &length);
  CHECK(stream != NULL);
  CHECK(sys_malloc_info(0, stream) == 0);
  CHECK(fclose(stream) == 0);
  static const char head[] = "<malloc version=\"1\">\n";
  static const char tail[] = "</malloc>\n";
  if (length < sizeof(head) + sizeof(tail) ||
      memcmp(xml, head, sizeof(head) - 1) != 0 ||
      strcmp(xml + length - (sizeof(tail) - 1), tail) != 0) {
    fprintf(stderr, "malloc_info wrote:\n%s\n", xml);
    exit(1);
  }
  CHECK(strstr(xml, "<heap nr=\"0\">") != NULL);
  CHECK(strstr(xml, "</heap>") != NULL);
  CHECK(xml_figure(xml, "total", "mmap", "count") >= 1);
  CHECK(xml_figure(xml, "total", "mmap", "size") >= (long long)(64 * MIB));
  CHECK(xml_figure(xml, "total", "live", "size") >= (long long)(64 * MIB));
  CHECK(xml_figure(xml, "system", "current", "size") >= 0);
  CHECK(xml_figure(xml, "aspace", "total", "size") >= 0);
  sys_free(xml);

  /* glibc has no options yet: anything else is EINVAL, with no output. */
  stream = open_memstream(&xml, &length);
  CHECK(stream != NULL);
  errno = 0;
  CHECK(sys_malloc_info(1, stream) == -1);
  CHECK(errno == EINVAL);
  CHECK(fclose(stream) == 0);
  CHECK(length == 0);
  sys_free(xml);
  sys_free(huge);
}

static void test_memalign(void) {
  aligned_alloc_fn *functions[] = {sys_memalign, sys_libc_memalign};
  for (size_t i = 0; i < 2; i++) {
    aligned_alloc_fn *align = functions[i];
    static const size_t too_large[] = {((size_t)1 << 63) + 1,
                                       ((size_t)1 << 63) + 4096, SIZE_MAX};
    for (size_t j = 0; j < 3; j++) {
      errno = 0;
      CHECK(align(too_large[j], 16) == NULL);
      CHECK(errno == EINVAL);
    }
    void *p = align(24, 16);
    CHECK(p != NULL);
    CHECK(((uintptr_t)p & 31) == 0);
    sys_free(p);
    p = align(3 * 4096, 100); /* rounded up to 16 KiB */
    CHECK(p != NULL);
    CHECK(((uintptr_t)p & (16 * 1024 - 1)) == 0);
    sys_free(p);
    p = align(0, 10);
    CHECK(p != NULL);
    sys_free(p);
  }
}

static void test_mallinfo(void) {
  void *huge = sys_malloc(64 * MIB);
  CHECK(huge != NULL);
  memset(huge, 1, 4096);

  struct mallinfo2 wide = sys_mallinfo2();
  zk_stats_t stats;
  stats_get(&stats);
  CHECK(wide.hblks >= 1);
  CHECK(wide.hblkhd >= 64 * MIB);
  CHECK(wide.uordblks >= 64 * MIB);
  /* Nothing counted twice: the two parts fit in what zkmem has mapped. */
  CHECK(wide.arena + wide.hblkhd <= stats.bytes_mapped);

  mallinfo_fn *narrow_functions[] = {sys_mallinfo, sys_libc_mallinfo};
  for (size_t i = 0; i < 2; i++) {
    struct mallinfo narrow = narrow_functions[i]();
    stats_get(&stats);
    CHECK(narrow.arena >= 0);
    CHECK(narrow.hblks >= 1);
    CHECK((size_t)narrow.hblkhd >= 64 * MIB);
    CHECK((size_t)narrow.uordblks >= 64 * MIB);
    CHECK(narrow.fordblks >= 0);
    CHECK((size_t)narrow.arena + (size_t)narrow.hblkhd <= stats.bytes_mapped);
  }
  sys_free(huge);

  /* Past INT_MAX the int fields stop there rather than wrap. Only address
   * space: the block is never touched. Where 3 GiB cannot be had (a limit
   * on address space, overcommit off), there is nothing to check. */
  void *beyond = sys_malloc((size_t)3 << 30);
  if (beyond == NULL) {
    fprintf(stderr, "note: no 3 GiB block, INT_MAX saturation unchecked\n");
    return;
  }
  wide = sys_mallinfo2();
  CHECK(wide.hblkhd >= (size_t)3 << 30);
  for (size_t i = 0; i < 2; i++) {
    struct mallinfo narrow = narrow_functions[i]();
    CHECK(narrow.hblkhd == INT_MAX);
    CHECK(narrow.uordblks == INT_MAX);
    CHECK(narrow.arena >= 0 && narrow.fordblks >= 0);
  }
  sys_free(beyond);
}

enum misuse { SIZE_TOO_LARGE, ALIGNED_SIZE_TOO_LARGE, ALIGNMENT_LACKING };

/* In a child, so that the abort ends only it; its stderr comes back. */
static void expect_report(enum misuse misuse, long on_error,
                          const char *message) {
  int pipe_ends[2];
  CHECK(pipe(pipe_ends) == 0);
  fflush(NULL);
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);
    dup2(pipe_ends[1], STDERR_FILENO);
    close(pipe_ends[0]);
    CHECK(option_set(ZK_OPTION_ON_ERROR, on_error) == 0);
    char *a = sys_malloc(16);
    char *b = sys_malloc(16);
    switch (misuse) {
    case SIZE_TOO_LARGE:
      sys_free_sized(a, 4096);
      break;
    case ALIGNED_SIZE_TOO_LARGE:
      sys_free_aligned_sized(a, 16, 4096);
      break;
    case ALIGNMENT_LACKING:
      /* Of two 16-byte blocks, at most one is 32-aligned. */
      sys_free_aligned_sized(((uintptr_t)a & 31) != 0 ? a : b, 32, 16);
      break;
    }
    _exit(0);
  }
  close(pipe_ends[1]);
  char output[4096];
  size_t length = 0;
  ssize_t got;
  while (length < sizeof(output) - 1 &&
         (got = read(pipe_ends[0], output + length,
                     sizeof(output) - 1 - length)) > 0)
    length += (size_t)got;
  output[length] = '\0';
  close(pipe_ends[0]);
  int status;
  CHECK(waitpid(child, &status, 0) == child);
  bool ended_right = on_error == 0
                         ? WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT
                         : WIFEXITED(status) && WEXITSTATUS(status) == 0;
  if (!ended_right || strstr(output, message) == NULL) {
    fprintf(stderr,
            "misuse %d, on_error %ld: expected \"%s\" and %s; status %#x, "
            "stderr:\n%s\n",
            (int)misuse, on_error, message,
            on_error == 0 ? "an abort" : "exit 0", (unsigned)status, output);
    exit(1);
  }
}

static void test_secure_reports(void) {
  for (long on_error = 0; on_error <= 1; on_error++) {
    expect_report(SIZE_TOO_LARGE, on_error,
                  "free_sized with a size larger than the block");
    expect_report(ALIGNED_SIZE_TOO_LARGE, on_error,
                  "free_aligned_sized with a size larger than the block");
    expect_report(ALIGNMENT_LACKING, on_error,
                  "free_aligned_sized with an alignment the block lacks");
  }
}

int main(int argc, char **argv) {
  bool secure = argc > 1 && strcmp(argv[1], "--secure") == 0;
  resolve();
  if (secure && option_get(ZK_OPTION_SECURE) == 0) {
    fprintf(stderr, "--secure: run with ZKMEM_SECURE=1\n");
    return 1;
  }
  test_free_sized();
  test_malloc_info();
  test_memalign();
  test_mallinfo();
  if (secure)
    test_secure_reports();
  printf("glibc_compat: ok%s\n", secure ? " (secure)" : "");
  return 0;
}
