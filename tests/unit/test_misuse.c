/* Misuse and exhaustion. Each misuse runs in a forked child: the child must
 * die of SIGABRT after printing exactly one line, "zkmem: error: <what>:
 * pointer <p>[ (block size <n>)]", with the pointer it misused. With
 * ZKMEM_ON_ERROR=warn (or the option) the same misuses are logged and the
 * program goes on. Out of address space (RLIMIT_AS), every allocation call
 * returns NULL with ENOMEM, and allocation works again once memory is
 * freed.
 *
 * The parent process itself never allocates from zkmem: a child's secure
 * mode applies only to pages set up after it is turned on, so the children
 * must not inherit pages. */
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- running a case in a child ---- */

/* The child's stdout: it announces the line zkmem must print there (the
 * pointer is only known in the child), then misuses the pointer. */
static void expect_report(const char *what, const void *pointer, size_t size) {
  if (size != 0)
    printf("zkmem: error: %s: pointer %p (block size %zu)\n", what, pointer,
           size);
  else
    printf("zkmem: error: %s: pointer %p\n", what, pointer);
  fflush(stdout);
}

typedef struct child_result {
  int status;
  char out[4096]; /* stdout: what the child announced */
  char err[4096]; /* stderr: what zkmem printed */
} child_result_t;

static void read_all(int fd, char *buffer, size_t capacity) {
  size_t used = 0;
  ssize_t got;
  while (used < capacity - 1 &&
         (got = read(fd, buffer + used, capacity - 1 - used)) > 0)
    used += (size_t)got;
  buffer[used] = '\0';
}

/* Runs body in a child with stdout and stderr captured separately. The
 * outputs are small, so reading one pipe to its end before the other
 * cannot block the child. */
static void run_child(void (*body)(void), child_result_t *result) {
  int out_fds[2], err_fds[2];
  CHECK(pipe(out_fds) == 0 && pipe(err_fds) == 0);
  fflush(stdout);
  fflush(stderr);
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    dup2(out_fds[1], 1);
    dup2(err_fds[1], 2);
    close(out_fds[0]);
    close(err_fds[0]);
    body();
    fflush(stdout);
    _exit(0);
  }
  close(out_fds[1]);
  close(err_fds[1]);
  read_all(out_fds[0], result->out, sizeof(result->out));
  read_all(err_fds[0], result->err, sizeof(result->err));
  close(out_fds[0]);
  close(err_fds[0]);
  CHECK(waitpid(child, &result->status, 0) == child);
}

/* The child aborts, and its stderr is exactly the line it announced. */
static void expect_abort(const char *name, void (*body)(void)) {
  child_result_t result;
  run_child(body, &result);
  bool aborted =
      WIFSIGNALED(result.status) && WTERMSIG(result.status) == SIGABRT;
  bool one_line = result.out[0] != '\0' && strchr(result.out, '\n') != NULL &&
                  strchr(result.out, '\n')[1] == '\0';
  if (!aborted || !one_line || strcmp(result.out, result.err) != 0) {
    fprintf(stderr,
            "%s: expected SIGABRT after \"%s\", got status %#x and stderr "
            "\"%s\"\n",
            name, result.out, result.status, result.err);
    exit(1);
  }
  printf("%-28s %s", name, result.err);
}

/* ---- the misuses ---- */

static void double_free_small(void) {
  void *p = zk_malloc(64);
  zk_free(p);
  expect_report("double free", p, 64);
  zk_free(p); /* the head of its thread's bin */
}

/* Another class, with blocks freed around it: the one freed last is still
 * caught. */
static void double_free_small_other_class(void) {
  void *blocks[8];
  for (int i = 0; i < 8; i++)
    blocks[i] = zk_malloc(3000);
  size_t block_size = zk_usable_size(blocks[7]);
  for (int i = 0; i < 8; i++)
    zk_free(blocks[i]);
  expect_report("double free", blocks[7], block_size);
  zk_free(blocks[7]);
}

/* Another thread's block, freed twice on a thread that allocates from its
 * class: the first free keeps it in this thread's bin, the second finds it
 * at the bin's head. The owner stays alive, so the block stays foreign. */
static pthread_barrier_t foreign_allocated;
enum { KEPT_SIZE = 256 }; /* a size another thread's bin keeps */

static void *foreign_owner(void *out) {
  *(void **)out = zk_malloc(KEPT_SIZE);
  pthread_barrier_wait(&foreign_allocated);
  for (;;)
    pause(); /* until the child aborts or exits */
  return NULL;
}

static void double_free_foreign(void) {
  static void *held[600];
  void *p = NULL;
  pthread_t thread;
  CHECK(pthread_barrier_init(&foreign_allocated, NULL, 2) == 0);
  CHECK(pthread_create(&thread, NULL, foreign_owner, &p) == 0);
  pthread_barrier_wait(&foreign_allocated);
  for (int i = 0; i < 600; i++) /* the bin runs empty, ends under half */
    CHECK((held[i] = zk_malloc(KEPT_SIZE)) != NULL);
  zk_free(p);
  expect_report("double free", p, KEPT_SIZE);
  zk_free(p);
}

/* 300 KiB: the freed span waits in the heap's cache. */
static void double_free_large_cached(void) {
  void *p = zk_malloc(300 << 10);
  zk_free(p);
  expect_report("double free or free of an invalid pointer", p, 0);
  zk_free(p);
}

/* 1.5 MiB: too large for the cache, the span goes back to its segment. */
static void double_free_large(void) {
  void *p = zk_malloc(1536 << 10);
  zk_free(p);
  expect_report("double free or free of an invalid pointer", p, 0);
  zk_free(p);
}

/* The second free of B lands inside a free span merged into A. */
static void double_free_large_merged(void) {
  char *a = zk_malloc(1536 << 10);
  char *b = zk_malloc(1536 << 10);
  CHECK(b == a + (1536 << 10)); /* a fresh process: spans in order */
  zk_free(a);
  zk_free(b);
  expect_report("double free or free of an invalid pointer", b, 0);
  zk_free(b);
}

/* A freed huge block's mapping is no block any more (unmapped, or kept as
 * a piece for later huge blocks): the second free is of a pointer zkmem
 * does not own. */
static void double_free_huge(void) {
  void *p = zk_malloc((size_t)8 << 20);
  zk_free(p);
  expect_report("free of a pointer zkmem does not own", p, 0);
  zk_free(p);
}

static void foreign_stack(void) {
  char local[64];
  char *volatile p = local;
  expect_report("free of a pointer zkmem does not own", p, 0);
  zk_free(p);
}

static void foreign_static(void) {
  static char not_ours[64];
  expect_report("free of a pointer zkmem does not own", not_ours + 16, 0);
  zk_free(not_ours + 16);
}

/* A mapping of the same size and alignment as a segment: only the
 * ownership map tells them apart. */
static void foreign_mapping(void) {
  size_t size = (size_t)8 << 20;
  char *raw = mmap(NULL, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  CHECK(raw != MAP_FAILED);
  char *aligned = (char *)(((uintptr_t)raw + ((4u << 20) - 1)) &
                           ~(uintptr_t)((4u << 20) - 1));
  expect_report("free of a pointer zkmem does not own", aligned, 0);
  zk_free(aligned);
}

static void foreign_libc(void) {
  void *p = malloc(100);
  expect_report("free of a pointer zkmem does not own", p, 0);
  zk_free(p);
}

static void foreign_realloc(void) {
  static char not_ours[64];
  expect_report("free of a pointer zkmem does not own", not_ours, 0);
  zk_realloc(not_ours, 128);
}

/* Slice 0 of a segment holds its header and descriptors, never a block. */
static void segment_header(void) {
  char *p = zk_malloc(64);
  char *header = (char *)((uintptr_t)p & ~(uintptr_t)((4u << 20) - 1)) + 256;
  expect_report("double free or free of an invalid pointer", header, 0);
  zk_free(header);
}

/* Interior pointers: the free fast path leaves this check to secure mode
 * (the owner's frees, and other threads' frees into a bin that keeps
 * them); other frees from other threads and of large and huge blocks
 * always check. */
static void interior_small_secure(void) {
  CHECK(zk_option_set(ZK_OPTION_SECURE, 1) == 0);
  char *p = zk_malloc(64);
  expect_report("free of a pointer inside a block (not its start)", p + 16, 64);
  zk_free(p + 16);
}

static void *free_in_thread(void *p) {
  zk_free(p);
  return NULL;
}

static void interior_remote(size_t size) {
  char *p = zk_malloc(size);
  expect_report("free of a pointer inside a block (not its start)", p + 16,
                size);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, free_in_thread, p + 16) == 0);
  pthread_join(thread, NULL);
}

static void interior_small_remote(void) {
  interior_remote(64);
}

/* The same for a class other threads' bins keep, freed by a thread whose
 * bin does not (a new thread's): heap_free_foreign's checks, before the
 * full path reports. */
static void interior_kept_class_remote(void) {
  interior_remote(512);
}

/* A block of a page that was never carved was never handed out: with
 * pages carving from a colour onwards, that can be the block before the
 * first one carved. */
static void uncarved_small_remote(void) {
  char *p = zk_malloc(64);
  uintptr_t slice = (uintptr_t)p & ~(uintptr_t)(64 * 1024 - 1);
  char *before = (uintptr_t)p > slice ? p - 64 : (char *)slice + 64 * 1024 - 64;
  expect_report("free of a block zkmem never handed out", before, 64);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, free_in_thread, before) == 0);
  pthread_join(thread, NULL);
}

/* Another thread frees the main thread's block twice: the block links to
 * itself in the page's remote list. The owner's walk of that list is
 * bounded by the blocks the page has out, and reports. alarm: a walk that
 * spins would end the child with SIGALRM, not the report. */
static void *free_twice_in_thread(void *block) {
  zk_free(block);
  zk_free(block);
  return NULL;
}

static void double_free_remote(void) {
  alarm(10);
  char *p = zk_malloc(64);
  expect_report("double free or corrupted free list (a block freed twice by "
                "another thread, or written after free)",
                p, 64);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, free_twice_in_thread, p) == 0);
  pthread_join(thread, NULL);
  for (int i = 0; i < 100000; i++) /* until the page's lists are collected */
    CHECK(zk_malloc(64) != NULL);
}

/* A thread that frees another heap's blocks chains them per class and
 * page: free(a), a free of another page's block (a's chain pushed), then
 * free(a) and free(b) chain b -> a, and the push would link a to itself
 * at the head of the page's remote list, which the owner takes without
 * walking it. The push compares the chain's both ends with the list's
 * head. */
enum { CHAIN_HELD = 2000 };
static void *chain_held[CHAIN_HELD], *chain_other;

static void *chain_other_owner(void *unused) {
  (void)unused;
  CHECK((chain_other = zk_malloc(64)) != NULL);
  return NULL;
}

static void *chain_double_freer(void *unused) {
  (void)unused;
  void *a = chain_held[CHAIN_HELD - 2], *b = chain_held[CHAIN_HELD - 1];
  zk_free(a);
  zk_free(chain_other); /* another page of the class: a's chain pushed */
  zk_free(a);
  zk_free(b);
  zk_thread_idle(); /* pushes b -> a */
  return NULL;
}

static void double_free_remote_chain_tail(void) {
  alarm(10);
  for (int i = 0; i < CHAIN_HELD; i++) /* the page full, the bin empty */
    CHECK((chain_held[i] = zk_malloc(64)) != NULL);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, chain_other_owner, NULL) == 0);
  pthread_join(thread, NULL);
  expect_report("double free or corrupted free list (a block freed twice by "
                "another thread, or written after free)",
                chain_held[CHAIN_HELD - 2], 64);
  CHECK(pthread_create(&thread, NULL, chain_double_freer, NULL) == 0);
  pthread_join(thread, NULL);
}

/* free(a), free(b), free(a): outside secure mode only a free of the
 * bin's head is caught, and this one links a and b into a cycle in the
 * bin. Whatever follows may go wrong, but nothing may hang: giving the bin
 * back to its pages stops after the bin's count. */
static void double_free_bin_cycle_body(void) {
  alarm(10);
  void *a = zk_malloc(64);
  void *b = zk_malloc(64);
  zk_free(a);
  zk_free(b);
  zk_free(a);
  for (int i = 0; i < 3; i++) {
    zk_collect(true);
    for (int j = 0; j < 2000; j++)
      zk_free(zk_malloc(64));
  }
}

/* The same by a thread that allocates from the class, of another
 * thread's blocks: its bin keeps them, and checks only its head. */
static void *free_aba_in_thread(void *blocks) {
  static void *held[600];
  for (int i = 0; i < 600; i++) /* the bin runs empty, ends under half */
    CHECK((held[i] = zk_malloc(KEPT_SIZE)) != NULL);
  void **ab = blocks;
  zk_free(ab[0]);
  zk_free(ab[1]);
  zk_free(ab[0]);
  for (int i = 0; i < 3; i++) {
    zk_collect(true);
    for (int j = 0; j < 2000; j++)
      zk_free(zk_malloc(KEPT_SIZE));
  }
  return NULL;
}

static void double_free_foreign_cycle_body(void) {
  alarm(10);
  void *ab[2] = {zk_malloc(KEPT_SIZE), zk_malloc(KEPT_SIZE)};
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, free_aba_in_thread, ab) == 0);
  pthread_join(thread, NULL);
  for (int j = 0; j < 100000; j++) /* the owner collects what came back */
    zk_free(zk_malloc(KEPT_SIZE));
}

static void expect_no_hang(const char *name, void (*body)(void)) {
  char message[512];
  int status = test_run_child(body, message, sizeof(message));
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM) {
    fprintf(stderr, "%s: the child hung\n", name);
    exit(1);
  }
  printf("%-28s no hang (status %#x)\n", name, status);
}

/* free(a), free(b), free(a) by another thread, of 64 B blocks (freed
 * remotely, not kept): the page's remote list holds a cycle and counts
 * three blocks. An owner with an empty bin takes such a list without
 * walking it, as its bin, and may hand a and b out more than once, as
 * after the same frees by the owner itself; it is reported at the latest
 * when the bin is given back (zk_collect), whose walk stops at the count.
 * A list that meets a non-empty bin is walked and reported at once. */
static void *free_aba_remote_in_thread(void *blocks) {
  void **ab = blocks;
  zk_free(ab[0]);
  zk_free(ab[1]);
  zk_free(ab[0]);
  return NULL;
}

static void double_free_remote_cycle_body(void) {
  alarm(10);
  enum { COUNT = 2000 };
  static void *held[COUNT];
  for (int i = 0; i < COUNT; i++) /* the page of a and b full, the bin empty */
    CHECK((held[i] = zk_malloc(64)) != NULL);
  void *ab[2] = {held[COUNT - 2], held[COUNT - 1]};
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, free_aba_remote_in_thread, ab) == 0);
  pthread_join(thread, NULL);
  for (int i = 0; i < 3; i++) {
    for (int j = 0; j < 5000; j++)
      zk_free(zk_malloc(64));
    zk_collect(true);
  }
}

static void double_free_bin_cycle(void) {
  expect_no_hang("double free, bin cycle", double_free_bin_cycle_body);
  expect_no_hang("double free, foreign cycle", double_free_foreign_cycle_body);
  child_result_t result;
  run_child(double_free_remote_cycle_body, &result);
  bool aborted =
      WIFSIGNALED(result.status) && WTERMSIG(result.status) == SIGABRT;
  if (!aborted || (strstr(result.err, "zkmem: error: double free") == NULL &&
                   strstr(result.err, "corrupted free list") == NULL)) {
    fprintf(stderr,
            "double free, remote cycle: expected a report and SIGABRT, got "
            "status %#x and stderr \"%s\"\n",
            result.status, result.err);
    exit(1);
  }
  printf("%-28s %s", "double free, remote cycle", result.err);
}

static void interior_large(void) {
  char *p = zk_malloc(300 << 10);
  expect_report("free of a pointer inside a block (not its start)", p + 4096,
                zk_usable_size(p));
  zk_free(p + 4096);
}

static void interior_huge(void) {
  char *p = zk_malloc((size_t)8 << 20);
  expect_report("free of a pointer inside a block (not its start)",
                p + (1 << 20), zk_usable_size(p));
  zk_free(p + (1 << 20));
}

/* Secure mode checks every pool free against its pool. */
static void pool_mismatch(void) {
  CHECK(zk_option_set(ZK_OPTION_SECURE, 1) == 0);
  zk_pool_t *a = zk_pool_create(64, NULL);
  zk_pool_t *b = zk_pool_create(64, NULL);
  CHECK(a && b);
  void *object = zk_pool_alloc(a);
  expect_report("object freed to a pool that does not own it", object, 64);
  zk_pool_free(b, object);
}

static void pool_malloc_block(void) {
  CHECK(zk_option_set(ZK_OPTION_SECURE, 1) == 0);
  zk_pool_t *pool = zk_pool_create(48, NULL);
  CHECK(pool != NULL);
  void *block = zk_malloc(48);
  expect_report("object freed to a pool that does not own it", block, 48);
  zk_pool_free(pool, block);
}

static void pool_interior(void) {
  CHECK(zk_option_set(ZK_OPTION_SECURE, 1) == 0);
  zk_pool_t *pool = zk_pool_create(64, NULL);
  CHECK(pool != NULL);
  char *object = zk_pool_alloc(pool);
  expect_report("object freed to a pool that does not own it", object + 8, 64);
  zk_pool_free(pool, object + 8);
}

/* ---- warn mode ---- */

/* Every misuse above that leaves the process usable, one after another:
 * each is logged once, the allocator keeps working, and a block freed
 * twice is not handed out twice. */
static void misuse_and_go_on(void) {
  void *p = zk_malloc(64);
  zk_free(p);
  expect_report("double free", p, 64);
  zk_free(p);
  void *first = zk_malloc(64);
  void *second = zk_malloc(64);
  CHECK(first != second);

  void *large = zk_malloc(300 << 10);
  zk_free(large);
  expect_report("double free or free of an invalid pointer", large, 0);
  zk_free(large);

  static char not_ours[64];
  expect_report("free of a pointer zkmem does not own", not_ours, 0);
  zk_free(not_ours);

  char *block = zk_malloc(64);
  expect_report("free of a pointer inside a block (not its start)", block + 16,
                64);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, free_in_thread, block + 16) == 0);
  pthread_join(thread, NULL);

  errno = 0;
  expect_report("free of a pointer zkmem does not own", not_ours, 0);
  CHECK(zk_realloc(not_ours, 100) == NULL && errno == EINVAL);

  CHECK(zk_option_set(ZK_OPTION_SECURE, 1) == 0);
  zk_pool_t *pool_a = zk_pool_create(80, NULL);
  zk_pool_t *pool_b = zk_pool_create(80, NULL);
  CHECK(zk_option_set(ZK_OPTION_SECURE, 0) == 0);
  void *object = zk_pool_alloc(pool_a);
  expect_report("object freed to a pool that does not own it", object, 80);
  zk_pool_free(pool_b, object);
  zk_pool_destroy(pool_a);
  zk_pool_destroy(pool_b);

  /* Still an allocator. */
  void *blocks[1000];
  for (int i = 0; i < 1000; i++) {
    blocks[i] = zk_malloc((size_t)(i % 50) * 100 + 1);
    CHECK(blocks[i] != NULL);
    memset(blocks[i], 1, (size_t)(i % 50) * 100 + 1);
  }
  for (int i = 0; i < 1000; i++)
    zk_free(blocks[i]);
  zk_free(first);
  zk_free(second);
  zk_free(block);
}

static void warn_by_option(void) {
  CHECK(zk_option_set(ZK_OPTION_ON_ERROR, 1) == 0);
  misuse_and_go_on();
}

static void check_warned(const char *name, const child_result_t *result) {
  if (!WIFEXITED(result->status) || WEXITSTATUS(result->status) != 0 ||
      strcmp(result->out, result->err) != 0) {
    fprintf(stderr,
            "%s: expected exit 0 with these lines:\n%s\ngot status %#x "
            "and:\n%s\n",
            name, result->out, result->status, result->err);
    exit(1);
  }
}

static void test_warn_mode(void) {
  child_result_t result;
  run_child(warn_by_option, &result);
  check_warned("ZK_OPTION_ON_ERROR=1", &result);
}

/* ZKMEM_ON_ERROR=warn: this program again, with the variable. */
static void warn_by_environment(void) {
  setenv("ZKMEM_ON_ERROR", "warn", 1);
  execl("/proc/self/exe", "test_misuse", "--warn-child", (char *)NULL);
  _exit(127);
}

static void test_warn_environment(void) {
  child_result_t result;
  run_child(warn_by_environment, &result);
  check_warned("ZKMEM_ON_ERROR=warn", &result);
}

/* ---- out of memory ---- */

static size_t address_space_now(void) {
  FILE *statm = fopen("/proc/self/statm", "r");
  CHECK(statm != NULL);
  unsigned long pages = 0;
  CHECK(fscanf(statm, "%lu", &pages) == 1);
  fclose(statm);
  return (size_t)pages * (size_t)sysconf(_SC_PAGESIZE);
}

static void expect_enomem(void *p) {
  if (p != NULL || errno != ENOMEM) {
    fprintf(stderr, "expected NULL with ENOMEM, got %p, errno %d\n", p, errno);
    exit(1);
  }
}

enum { MAX_BLOCKS = 2 << 20 };

/* Allocates blocks of `size` until NULL (ENOMEM), checks that calloc,
 * aligned_alloc and realloc fail cleanly too, frees everything and checks
 * that the same size and the other kinds can be allocated again. */
static void exhaust(void **blocks, size_t size) {
  size_t count = 0;
  for (;;) {
    errno = 0;
    unsigned char *p = zk_malloc(size);
    if (p == NULL) {
      CHECK_EQ(errno, ENOMEM);
      break;
    }
    p[0] = (unsigned char)count;
    p[size - 1] = (unsigned char)count;
    CHECK(count < MAX_BLOCKS);
    blocks[count++] = p;
  }
  CHECK(count > 0);
  errno = 0;
  expect_enomem(zk_malloc(size));
  errno = 0;
  expect_enomem(zk_calloc(1, size));
  errno = 0;
  expect_enomem(zk_calloc(size, 1));
  errno = 0;
  expect_enomem(zk_aligned_alloc(1 << 20, size));
  void *out = &out;
  CHECK_EQ(zk_posix_memalign(&out, 1 << 20, size), ENOMEM);
  CHECK(out == &out); /* untouched on error */
  /* realloc that needs new memory fails and leaves the block as it was. */
  unsigned char *last = blocks[count - 1];
  errno = 0;
  size_t grown = size < (1 << 20) ? size * 64 : size * 4;
  expect_enomem(zk_realloc(last, grown));
  CHECK(last[0] == (unsigned char)(count - 1));
  CHECK(last[size - 1] == (unsigned char)(count - 1));

  for (size_t i = 0; i < count; i++) {
    unsigned char *p = blocks[i];
    CHECK(p[0] == (unsigned char)i && p[size - 1] == (unsigned char)i);
    zk_free(p);
  }
  zk_collect(true); /* unmaps the free segments: address space back */
  static const size_t kinds[] = {64, 4000, 300 << 10, 1536 << 10, 8 << 20};
  for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
    void *again = zk_malloc(kinds[k]);
    CHECK(again != NULL);
    memset(again, 1, kinds[k]);
    zk_free(again);
  }
  void *zeroed = zk_calloc(1000, 100);
  CHECK(zeroed != NULL);
  zk_free(zeroed);
  zk_collect(true);
  printf("out of memory after %zu blocks of %zu B; recovered\n", count, size);
  fflush(stdout);
}

static void exhaust_pool(void **blocks) {
  zk_pool_t *pool = zk_pool_create(256, NULL);
  CHECK(pool != NULL);
  size_t count = 0;
  for (;;) {
    errno = 0;
    void *object = zk_pool_alloc(pool);
    if (object == NULL) {
      CHECK_EQ(errno, ENOMEM);
      break;
    }
    CHECK(count < MAX_BLOCKS);
    blocks[count++] = object;
  }
  CHECK(count > 0);
  for (size_t i = 0; i < count; i++)
    zk_pool_free(pool, blocks[i]);
  zk_pool_destroy(pool);
  zk_collect(true);
  pool = zk_pool_create(256, NULL);
  CHECK(pool != NULL);
  void *object = zk_pool_alloc(pool);
  CHECK(object != NULL);
  zk_pool_free(pool, object);
  zk_pool_destroy(pool);
  printf("pool out of memory after %zu objects of 256 B; recovered\n", count);
  fflush(stdout);
}

static void out_of_memory(void) {
  /* Everything the test itself needs exists before the limit. */
  void **blocks = zk_malloc(MAX_BLOCKS * sizeof(void *));
  CHECK(blocks != NULL);
  zk_free(zk_malloc(64));
  struct rlimit limit;
  CHECK(getrlimit(RLIMIT_AS, &limit) == 0);
  size_t headroom = (size_t)64 << 20;
  limit.rlim_cur = address_space_now() + headroom;
  CHECK(setrlimit(RLIMIT_AS, &limit) == 0);

  static const size_t sizes[] = {64,        4000,       40000,
                                 300 << 10, 1536 << 10, 8 << 20};
  for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++)
    exhaust(blocks, sizes[s]);
  exhaust_pool(blocks);
  /* Requests no address space can satisfy fail at once. */
  errno = 0;
  expect_enomem(zk_malloc(SIZE_MAX));
  errno = 0;
  expect_enomem(zk_malloc((size_t)1 << 40));
  errno = 0;
  expect_enomem(zk_calloc(SIZE_MAX / 8, 16)); /* the product overflows */
  zk_free(blocks);
}

static void test_out_of_memory(void) {
  child_result_t result;
  run_child(out_of_memory, &result);
  printf("%s", result.out);
  if (!WIFEXITED(result.status) || WEXITSTATUS(result.status) != 0) {
    fprintf(stderr, "out of memory: child status %#x, stderr:\n%s\n",
            result.status, result.err);
    exit(1);
  }
  CHECK(result.err[0] == '\0'); /* running out is not misuse */
}

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "--warn-child") == 0) {
    CHECK_EQ(zk_option_get(ZK_OPTION_ON_ERROR), 1);
    misuse_and_go_on();
    return 0;
  }
  /* ZKMEM_ON_ERROR=warn or ZKMEM_SECURE=1 from outside would change every
   * expected outcome: run again without any ZKMEM_* variable. */
  test_reexec_without_zkmem_environment(argv[0]);
  expect_abort("double free, 64 B", double_free_small);
  expect_abort("double free, 3000 B", double_free_small_other_class);
  expect_abort("double free, foreign block", double_free_foreign);
  expect_abort("double free, large cached", double_free_large_cached);
  expect_abort("double free, large", double_free_large);
  expect_abort("double free, large merged", double_free_large_merged);
  expect_abort("double free, huge", double_free_huge);
  expect_abort("foreign, stack", foreign_stack);
  expect_abort("foreign, static", foreign_static);
  expect_abort("foreign, mapping", foreign_mapping);
  expect_abort("foreign, libc malloc", foreign_libc);
  expect_abort("foreign, realloc", foreign_realloc);
  expect_abort("segment header", segment_header);
  expect_abort("interior, secure", interior_small_secure);
  expect_abort("interior, other thread", interior_small_remote);
  expect_abort("interior, other thread, 512 B", interior_kept_class_remote);
  expect_abort("block never handed out, other thread", uncarved_small_remote);
  expect_abort("interior, large", interior_large);
  expect_abort("interior, huge", interior_huge);
  expect_abort("double free, other thread", double_free_remote);
  expect_abort("double free, other thread, a chain's first block",
               double_free_remote_chain_tail);
  double_free_bin_cycle();
  expect_abort("pool, other pool", pool_mismatch);
  expect_abort("pool, malloc block", pool_malloc_block);
  expect_abort("pool, interior", pool_interior);
  test_warn_mode();
  test_warn_environment();
  test_out_of_memory();
  printf("test_misuse: ok\n");
  return 0;
}
