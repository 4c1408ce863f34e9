/* The process around the allocator: fork while other threads allocate,
 * errno left alone by every call that succeeds (and by free), statistics
 * read while other threads change what they count.
 *
 * Linked with the static library, without the malloc override: what holds
 * here holds for every program that links libzkmem.a. */
#include "internal.h"
#include "sizeclass.h"
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static atomic_int stop_churn;

/* Huge blocks (mapped and unmapped under the segment lock's statistics),
 * large and small ones, and forced collections: every allocator lock is
 * taken over and over while the main thread forks. */
static void *churn(void *arg) {
  (void)arg;
  unsigned i = 0;
  while (!atomic_load(&stop_churn)) {
    void *huge = zk_malloc((size_t)(5 + i % 4) << 20);
    void *large = zk_malloc((size_t)(100 + i % 300) << 10);
    void *small[16];
    for (int j = 0; j < 16; j++)
      small[j] = zk_malloc(16 + (size_t)(i * 7 + j) % 2000);
    CHECK(huge && large);
    for (int j = 0; j < 16; j++)
      zk_free(small[j]);
    zk_free(large);
    zk_free(huge);
    if (i++ % 8 == 0)
      zk_collect(true);
  }
  return NULL;
}

/* Large blocks only, in and out of the thread's large cache: a fork can
 * catch a cached span claimed but still listed. */
static void *churn_large(void *arg) {
  (void)arg;
  unsigned seed = 1;
  void *blocks[10];
  while (!atomic_load(&stop_churn)) {
    for (int i = 0; i < 10; i++)
      blocks[i] = zk_malloc((size_t)(65 + rand_r(&seed) % 200) * 1024);
    for (int i = 0; i < 10; i++)
      zk_free(blocks[i]);
  }
  return NULL;
}

/* The child allocates from every layer and exits; a lock left held by the
 * churning thread at the fork would hang it, and the alarm turns a hang
 * into a failure. */
static void child_allocates(void) {
  alarm(10);
  void *blocks[64];
  for (int i = 0; i < 64; i++) {
    blocks[i] = zk_malloc((size_t)1 << (3 + i % 21));
    CHECK(blocks[i] != NULL);
  }
  for (int i = 0; i < 64; i++)
    zk_free(blocks[i]);
  zk_collect(true);
  _exit(0);
}

/* A fork while another thread initializes zkmem: the child must not wait
 * for that thread, which is not in the child (a child of the main test
 * below deadlocked at its first fork in about 1 run in 8 this way). Each
 * round is a fresh process in which zkmem has not started: a thread's
 * first allocation starts it while the process forks. */
static void *first_allocation(void *arg) {
  (void)arg;
  zk_free(zk_malloc(32));
  return NULL;
}

static void fork_during_start_up(void) {
  pthread_t thread;
  CHECK_EQ(pthread_create(&thread, NULL, first_allocation, NULL), 0);
  pid_t child = fork();
  if (child == 0) {
    alarm(10);
    void *p = zk_malloc(64);
    _exit(p != NULL ? 0 : 1);
  }
  int status = 0;
  CHECK(child > 0 && waitpid(child, &status, 0) == child);
  CHECK_EQ(pthread_join(thread, NULL), 0);
  _exit(WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 2);
}

static void test_fork_during_start_up(void) {
  for (int round = 0; round < 1000; round++) {
    pid_t fresh = fork();
    CHECK(fresh >= 0);
    if (fresh == 0)
      fork_during_start_up();
    int status = 0;
    CHECK(waitpid(fresh, &status, 0) == fresh);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
      fprintf(stderr,
              "round %d: status %#x (2: the child of a fork during "
              "start-up deadlocked)\n",
              round, status);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  printf("1,000 forks while another thread started zkmem\n");
}

static void test_fork_while_churning(void *(*churner)(void *)) {
  atomic_store(&stop_churn, 0);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, churner, NULL) == 0);
  int forks = 300;
  for (int i = 0; i < forks; i++) {
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0)
      child_allocates();
    int status;
    CHECK(waitpid(child, &status, 0) == child);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fprintf(stderr, "fork %d: child status %#x (SIGALRM: deadlocked)\n", i,
              status);
      exit(1);
    }
  }
  atomic_store(&stop_churn, 1);
  CHECK(pthread_join(thread, NULL) == 0);
  printf("%d forks while another thread churned: every child ran\n", forks);
}

/* ---- errno ---- */

#define CHECK_ERRNO_KEPT(call)                                                 \
  do {                                                                         \
    errno = EDOM;                                                              \
    call;                                                                      \
    if (errno != EDOM) {                                                       \
      fprintf(stderr, "%s:%d: %s changed errno to %d\n", __FILE__, __LINE__,   \
              #call, errno);                                                   \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

/* Every layer's successful calls, and frees. */
static void exercise_errno(void) {
  void *small, *large, *huge, *moved, *aligned, *zeroed;
  CHECK_ERRNO_KEPT(small = zk_malloc(64));
  CHECK_ERRNO_KEPT(large = zk_malloc(300 << 10));
  CHECK_ERRNO_KEPT(huge = zk_malloc((size_t)8 << 20));
  CHECK_ERRNO_KEPT(zeroed = zk_calloc(1000, 1000));
  CHECK_ERRNO_KEPT(aligned = zk_aligned_alloc((size_t)8 << 20, 100));
  CHECK(small && large && huge && zeroed && aligned);
  CHECK_ERRNO_KEPT(moved = zk_realloc(huge, (size_t)64 << 20));
  CHECK(moved != NULL);
  CHECK_ERRNO_KEPT(zk_free(moved));
  CHECK_ERRNO_KEPT(zk_free(aligned));
  CHECK_ERRNO_KEPT(zk_free(zeroed));
  CHECK_ERRNO_KEPT(zk_free(large));
  CHECK_ERRNO_KEPT(zk_free(small));
  void *many[3000];
  for (int i = 0; i < 3000; i++)
    CHECK_ERRNO_KEPT(many[i] = zk_malloc(1000));
  for (int i = 0; i < 3000; i++)
    CHECK_ERRNO_KEPT(zk_free(many[i])); /* pages emptied and released */
  zk_stats_t stats;
  CHECK_ERRNO_KEPT(zk_stats_get(&stats));
  CHECK_ERRNO_KEPT(zk_collect(true));
}

static void *exercise_errno_thread(void *arg) {
  (void)arg;
  exercise_errno(); /* the thread's first call creates its heap */
  return NULL;
}

/* Under mlockall every purge is refused, and a new thread's heap cannot
 * open /dev/urandom: both failures are zkmem's to absorb. */
static void errno_child(void) {
  alarm(20);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 0) == 0);
  struct rlimit unlimited = {RLIM_INFINITY, RLIM_INFINITY};
  setrlimit(RLIMIT_MEMLOCK, &unlimited);
  bool locked = mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0;
  exercise_errno();
  /* No file descriptor left for /dev/urandom. */
  struct rlimit few = {3, 3};
  for (int fd = 3; fd < 1024; fd++)
    close(fd);
  CHECK(setrlimit(RLIMIT_NOFILE, &few) == 0);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, exercise_errno_thread, NULL) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  printf("errno kept%s\n", locked ? " (purges refused under mlockall)" : "");
  _exit(locked || geteuid() != 0 ? 0 : 2);
}

static void test_errno_kept(void) {
  fflush(stdout);
  test_expect_success("errno kept", errno_child);
}

/* A thread's first malloc when no segment can be mapped any more: its
 * heap's first span falls back from a fresh segment (refused, ENOMEM) to a
 * free span of an existing one, and the malloc succeeds with errno kept. */
static pthread_barrier_t limit_set;

static void *first_malloc_under_limit(void *arg) {
  (void)arg;
  pthread_barrier_wait(&limit_set);
  errno = EDOM;
  void *p = zk_malloc(64);
  bool kept = p != NULL && errno == EDOM;
  zk_free(p);
  return kept ? (void *)1 : NULL;
}

static void address_space_child(void) {
  alarm(10);
  void *keep = zk_malloc(16); /* a segment with free spans */
  CHECK(pthread_barrier_init(&limit_set, NULL, 2) == 0);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, first_malloc_under_limit, NULL) == 0);
  FILE *statm = fopen("/proc/self/statm", "r");
  unsigned long pages = 0;
  CHECK(statm != NULL && fscanf(statm, "%lu", &pages) == 1);
  fclose(statm);
  struct rlimit limit = {pages * 4096 + (1 << 20), pages * 4096 + (1 << 20)};
  CHECK(setrlimit(RLIMIT_AS, &limit) == 0); /* no room for a new segment */
  pthread_barrier_wait(&limit_set);
  void *kept;
  CHECK(pthread_join(thread, &kept) == 0);
  zk_free(keep);
  _exit(kept ? 0 : 1);
}

static void test_errno_kept_without_address_space(void) {
  fflush(stdout);
  test_expect_success("errno without address space", address_space_child);
  printf("errno kept by a malloc that fell back to an existing segment\n");
}

/* ---- seeds: the OS's entropy, one system call each ---- */

/* Linked with -Wl,--wrap=open,--wrap=getrandom: counts zkmem's opens of
 * /dev/urandom and its getrandom calls. */
static atomic_uint urandom_opens, getrandom_calls;
int __real_open(const char *path, int flags, ...);
int __wrap_open(const char *path, int flags, ...) {
  if (strcmp(path, "/dev/urandom") == 0)
    atomic_fetch_add(&urandom_opens, 1);
  mode_t mode = 0;
  if (flags & O_CREAT) { /* nothing in this program opens with O_TMPFILE */
    va_list arguments;
    va_start(arguments, flags);
    mode = (mode_t)va_arg(arguments, int);
    va_end(arguments);
  }
  return __real_open(path, flags, mode);
}

ssize_t __real_getrandom(void *buffer, size_t length, unsigned flags);
ssize_t __wrap_getrandom(void *buffer, size_t length, unsigned flags) {
  atomic_fetch_add(&getrandom_calls, 1);
  return __real_getrandom(buffer, length, flags);
}

#define SEED_THREADS 4

static void *first_malloc_of_thread(void *arg) {
  (void)arg;
  zk_free(zk_malloc(32));
  return NULL;
}

static uint64_t parent_random_state;

static void forked_seed_child(void) {
  _exit(heap_current->random_state != parent_random_state ? 0 : 1);
}

/* A new thread's heap takes its seed with one getrandom call and opens no
 * file (it opened, read and closed /dev/urandom); a fork child's heap
 * draws secure keys of its own, not the ones its parent would draw next. */
static void test_seeds(void) {
  zk_free(zk_malloc(16));
  unsigned opens = atomic_load(&urandom_opens);
  unsigned calls = atomic_load(&getrandom_calls);
  pthread_t threads[SEED_THREADS];
  for (int i = 0; i < SEED_THREADS; i++)
    CHECK(pthread_create(&threads[i], NULL, first_malloc_of_thread, NULL) == 0);
  for (int i = 0; i < SEED_THREADS; i++)
    CHECK(pthread_join(threads[i], NULL) == 0);
  CHECK_EQ(atomic_load(&urandom_opens), opens);
  CHECK_EQ(atomic_load(&getrandom_calls), calls + SEED_THREADS);
  parent_random_state = heap_current->random_state;
  fflush(stdout);
  test_expect_success("fork child's seed", forked_seed_child);
  printf("%d threads' heaps seeded with one getrandom call each, no file; a "
         "fork child reseeded\n",
         SEED_THREADS);
}

/* ---- statistics read while other threads change them ---- */

static void *churn_for_stats(void *arg) {
  uint64_t state = (uintptr_t)arg;
  void *slots[256] = {0};
  while (!atomic_load(&stop_churn)) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    unsigned slot = (unsigned)(state >> 56);
    zk_free(slots[slot]);
    unsigned kind = (unsigned)(state >> 20) % 64;
    size_t size = kind == 0  ? (size_t)(3 + (state >> 40) % 6) << 20
                  : kind < 8 ? (size_t)(70 + (state >> 40) % 900) << 10
                             : 8 + (size_t)(state >> 40) % 4000;
    slots[slot] = zk_malloc(size);
    CHECK(slots[slot] != NULL);
    if ((state >> 33) % 4096 == 0)
      zk_collect((state >> 45) & 1);
  }
  for (int i = 0; i < 256; i++)
    zk_free(slots[i]);
  return NULL;
}

/* Grows a bin past its base limit and sets it back, over and over: a
 * reader that took the grown limit with the set-back room counted about
 * 2^32 blocks held. */
static heap_t *_Atomic churned_heap;

static void *churn_bin_limits(void *arg) {
  (void)arg;
  static void *blocks[1600];
  zk_free(zk_malloc(16)); /* a heap of its own */
  atomic_store(&churned_heap, heap_current);
  while (!atomic_load(&stop_churn)) {
    for (int round = 0; round < 3; round++) {
      for (int i = 0; i < 1600; i++)
        CHECK((blocks[i] = zk_malloc(16)) != NULL);
      for (int i = 0; i < 1600; i++)
        zk_free(blocks[i]);
    }
    zk_thread_idle();
  }
  return NULL;
}

static void test_stats_while_churning(void) {
  atomic_store(&stop_churn, 0);
  pthread_t threads[4];
  for (uintptr_t i = 0; i < 3; i++)
    CHECK(pthread_create(&threads[i], NULL, churn_for_stats,
                         (void *)(i * 7919 + 1)) == 0);
  CHECK(pthread_create(&threads[3], NULL, churn_bin_limits, NULL) == 0);
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  unsigned reads = 0;
  do {
    zk_stats_t stats;
    zk_stats_get(&stats);
    CHECK(stats.class_count > 0);
    /* Never below zero, wrapped: a page moving between queues while they
     * were walked made the frees read outnumber the allocations. */
    CHECK(stats.bytes_live < ((size_t)1 << 40));
    for (size_t c = 0; c < stats.class_count; c++)
      CHECK(stats.classes[c].live < ((uint64_t)1 << 40));
    /* The churned bin, read as statistics read it: never more than a grown
     * bin holds (heaps are never unmapped). */
    heap_t *churned = atomic_load(&churned_heap);
    if (churned != NULL)
      CHECK(bin_count_racy(&churned->bins[size_to_class(16)]) <= 8192);
    reads++;
    clock_gettime(CLOCK_MONOTONIC, &now);
  } while (now.tv_sec - start.tv_sec < 2);
  atomic_store(&stop_churn, 1);
  for (int i = 0; i < 4; i++)
    CHECK(pthread_join(threads[i], NULL) == 0);
  zk_stats_t stats;
  zk_stats_get(&stats);
  /* The threads exited: every block is accounted for exactly. */
  CHECK_EQ(stats.large_live, 0);
  CHECK_EQ(stats.huge_live, 0);
  uint64_t live = 0;
  for (size_t c = 0; c < stats.class_count; c++)
    live += stats.classes[c].live;
  CHECK_EQ(live, 0);
  printf("%u statistics reads while four threads churned\n", reads);
}

int main(int argc, char **argv) {
  (void)argc;
  test_reexec_without_zkmem_environment(argv[0]);
  setvbuf(stdout, NULL, _IOLBF, 0);
  test_fork_during_start_up(); /* first: zkmem must not have started */
  test_errno_kept();
  test_errno_kept_without_address_space();
  test_fork_while_churning(churn);
  test_fork_while_churning(churn_large);
  test_stats_while_churning();
  test_seeds();
  printf("test_process: ok\n");
  return 0;
}
