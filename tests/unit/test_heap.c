/* Task heaps: accounting that follows blocks across threads, entering a
 * heap, limits that fail one heap and nest, destroy, and misuse. Checks of
 * live bytes run once the threads that used the heap are quiet, as the
 * statistics promise. Also the bins every heap keeps: a thread heap's bin
 * grows when its class swings past it, a task heap's does not. */
#include "internal.h" /* heap_t: a list corrupted on purpose */
#include "sizeclass.h"
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static zk_heap_stats_t stats_of(const zk_heap_t *heap) {
  zk_heap_stats_t stats;
  CHECK_EQ(zk_heap_stats(heap, &stats), 0);
  return stats;
}

#define BLOCKS 3000

/* Sizes across small, large (64 KiB - 2 MiB) and huge blocks. */
static size_t size_for(unsigned i) {
  if (i % 500 == 7)
    return (size_t)3 << 20;
  if (i % 100 == 3)
    return (size_t)(70 + i % 400) << 10;
  return 1 + (i * 2654435761u) % 3000;
}

static void test_accounting(void) {
  zk_heap_t *heap = zk_heap_create(&(zk_heap_options_t){.name = "request"});
  CHECK(heap != NULL);
  static void *blocks[BLOCKS];
  size_t usable = 0;
  for (unsigned i = 0; i < BLOCKS; i++) {
    void *p = i % 3 == 0   ? zk_heap_malloc(heap, size_for(i))
              : i % 3 == 1 ? zk_heap_calloc(heap, 1, size_for(i))
                           : zk_heap_aligned_alloc(heap, 64, size_for(i));
    CHECK(p != NULL);
    if (i % 3 == 2)
      CHECK(((uintptr_t)p & 63) == 0);
    memset(p, 0x5a, size_for(i));
    usable += zk_usable_size(p);
    blocks[i] = p;
  }
  zk_heap_stats_t stats = stats_of(heap);
  CHECK_EQ(stats.live_bytes, usable);
  CHECK(stats.peak_bytes >= usable);
  CHECK_EQ(stats.allocations - stats.frees, BLOCKS);
  CHECK(strcmp(stats.name, "request") == 0);
  /* realloc keeps the contents; a block that moves comes from the heap. */
  for (unsigned i = 0; i < BLOCKS; i += 10) {
    usable -= zk_usable_size(blocks[i]);
    blocks[i] = zk_heap_realloc(heap, blocks[i], size_for(i) * 2 + 100);
    CHECK(blocks[i] != NULL && ((unsigned char *)blocks[i])[0] == 0x5a);
    usable += zk_usable_size(blocks[i]);
  }
  CHECK_EQ(stats_of(heap).live_bytes, usable);
  for (unsigned i = 0; i < BLOCKS; i++)
    zk_free(blocks[i]);
  zk_thread_idle();
  stats = stats_of(heap);
  CHECK_EQ(stats.live_bytes, 0);
  CHECK_EQ(stats.allocations, stats.frees);
  zk_heap_destroy(heap);
  printf("accounting: %u blocks, %zu usable bytes, back to 0\n", BLOCKS,
         usable);
}

/* Blocks allocated in a heap on one thread and freed on others: they count
 * in their heap until freed, wherever that happens. */
static zk_heap_t *shared_heap;
static void *handed[BLOCKS];

static void *allocate_in_shared(void *arg) {
  unsigned from = (unsigned)(uintptr_t)arg;
  for (unsigned i = from; i < BLOCKS; i += 2) {
    handed[i] = zk_heap_malloc(shared_heap, size_for(i));
    CHECK(handed[i] != NULL);
  }
  return NULL;
}

static void *free_handed(void *arg) {
  unsigned from = (unsigned)(uintptr_t)arg;
  for (unsigned i = from; i < BLOCKS; i += 2)
    zk_free(handed[i]);
  return NULL;
}

static void run_two(void *(*body)(void *)) {
  pthread_t threads[2];
  for (uintptr_t t = 0; t < 2; t++)
    CHECK(pthread_create(&threads[t], NULL, body, (void *)t) == 0);
  for (int t = 0; t < 2; t++)
    CHECK(pthread_join(threads[t], NULL) == 0);
}

static void test_cross_thread(void) {
  shared_heap = zk_heap_create(NULL);
  CHECK(shared_heap != NULL);
  run_two(allocate_in_shared); /* two threads, two sub-heaps, both exited */
  size_t usable = 0;
  for (unsigned i = 0; i < BLOCKS; i++)
    usable += zk_usable_size(handed[i]);
  CHECK_EQ(stats_of(shared_heap).live_bytes, usable);
  /* A quarter freed here, the rest by two other threads. */
  for (unsigned i = 0; i < BLOCKS; i += 4) {
    zk_free(handed[i]);
    handed[i] = NULL;
  }
  run_two(free_handed);
  zk_heap_stats_t stats = stats_of(shared_heap);
  CHECK_EQ(stats.live_bytes, 0);
  CHECK_EQ(stats.allocations, BLOCKS);
  CHECK_EQ(stats.frees, BLOCKS);
  zk_heap_destroy(shared_heap);
  printf("cross-thread: %u blocks of exited threads freed elsewhere\n", BLOCKS);
}

/* A task entered on one worker, then on another (work stealing): its plain
 * mallocs count in its heap on both, and its blocks freed on either. */
static zk_heap_t *task_heap;
static void *task_blocks[BLOCKS];
static atomic_int stage;

static void *worker(void *arg) {
  int me = (int)(uintptr_t)arg;
  while (atomic_load(&stage) != me)
    ;
  zk_heap_t *before = zk_heap_enter(task_heap);
  CHECK(before == NULL);
  for (unsigned i = (unsigned)me; i < BLOCKS; i += 2) {
    /* zk_malloc: the exported malloc of the preloaded library (this test
     * links the library without it) runs the same path. */
    task_blocks[i] = zk_malloc(size_for(i));
    CHECK(task_blocks[i] != NULL);
  }
  if (me == 1) /* the second worker frees the first one's blocks */
    for (unsigned i = 0; i < BLOCKS; i += 2)
      zk_free(task_blocks[i]);
  CHECK(zk_heap_enter(NULL) == task_heap);
  void *outside = zk_malloc(100); /* not the task's */
  zk_free(outside);
  atomic_store(&stage, me + 1);
  return NULL;
}

static void test_enter_across_workers(void) {
  task_heap = zk_heap_create(NULL);
  CHECK(task_heap != NULL);
  atomic_store(&stage, 0);
  run_two(worker);
  size_t usable = 0;
  for (unsigned i = 1; i < BLOCKS; i += 2)
    usable += zk_usable_size(task_blocks[i]);
  CHECK_EQ(stats_of(task_heap).live_bytes, usable);
  for (unsigned i = 1; i < BLOCKS; i += 2)
    zk_free(task_blocks[i]);
  zk_heap_stats_t stats = stats_of(task_heap);
  CHECK_EQ(stats.live_bytes, 0);
  CHECK_EQ(stats.allocations, BLOCKS);
  zk_heap_destroy(task_heap);
  printf("a task on two workers: its mallocs counted on both\n");
}

/* A limit fails the heap's allocations, not the process; freeing makes
 * room again; parents cap their children. */
static int limit_calls;

static bool make_room(zk_heap_t *heap, size_t size, void *arg) {
  (void)size;
  void **keep = arg;
  limit_calls++;
  zk_heap_stats_t stats;
  CHECK_EQ(zk_heap_stats(heap, &stats), 0); /* no lock held */
  if (*keep == NULL)
    return false;
  zk_free(*keep);
  *keep = NULL;
  return true;
}

static void test_limits(void) {
  void *room = NULL;
  const size_t limit = 1 << 20;
  zk_heap_t *heap = zk_heap_create(&(zk_heap_options_t){
      .limit_bytes = limit, .on_limit = make_room, .on_limit_arg = &room});
  CHECK(heap != NULL);
  static void *blocks[100000];
  unsigned count = 0, under_limit;
  size_t usable = 0;
  for (;;) {
    void *p = zk_heap_malloc(heap, 1000);
    if (p == NULL)
      break;
    usable += zk_usable_size(p);
    blocks[count++] = p;
  }
  CHECK_EQ(errno, ENOMEM);
  under_limit = count;
  zk_heap_stats_t stats = stats_of(heap);
  CHECK(stats.live_bytes <= limit && stats.live_bytes == usable);
  CHECK(usable > limit - 64 * 1024); /* the limit, not much less */
  CHECK_EQ(stats.limit_refusals, 1);
  CHECK_EQ(limit_calls, 1);
  /* Large blocks too; the rest of the process is unaffected. */
  CHECK(zk_heap_malloc(heap, 300 << 10) == NULL);
  void *elsewhere = zk_malloc((size_t)8 << 20);
  CHECK(elsewhere != NULL);
  zk_free(elsewhere);
  /* on_limit makes room: the allocation is retried once and succeeds. */
  room = blocks[--count];
  usable -= zk_usable_size(room);
  void *retried = zk_heap_malloc(heap, 1000);
  CHECK(retried != NULL && room == NULL);
  blocks[count++] = retried;
  for (unsigned i = 0; i < count; i++)
    zk_free(blocks[i]);
  CHECK(zk_heap_malloc(heap, 300 << 10) != NULL); /* room again */
  zk_heap_destroy(heap);

  /* Nesting: a request inside a tenant. */
  zk_heap_t *tenant =
      zk_heap_create(&(zk_heap_options_t){.limit_bytes = limit});
  zk_heap_t *request = zk_heap_create(&(zk_heap_options_t){.parent = tenant});
  CHECK(tenant && request);
  void *own = zk_heap_malloc(tenant, 200 << 10);
  CHECK(own != NULL);
  count = 0;
  while ((blocks[count] = zk_heap_malloc(request, 4000)) != NULL)
    count++;
  zk_heap_stats_t tenant_stats = stats_of(tenant),
                  request_stats = stats_of(request);
  CHECK(tenant_stats.live_bytes <= limit);
  CHECK_EQ(tenant_stats.live_bytes,
           request_stats.live_bytes + zk_usable_size(own));
  CHECK_EQ(request_stats.limit_refusals, 1);
  CHECK_EQ(tenant_stats.limit_refusals, 1); /* its limit refused it */
  /* The parent cannot go before its child. */
  zk_heap_destroy(request); /* frees its blocks */
  zk_thread_idle();
  CHECK_EQ(stats_of(tenant).live_bytes, zk_usable_size(own));
  zk_free(own);
  zk_heap_destroy(tenant);
  printf("limits: %u blocks of 1000 B under 1 MiB, then refused; %u of "
         "4000 B in a request under a 1 MiB tenant\n",
         under_limit, count);
}

/* Destroy frees every block at once, also blocks of threads that exited
 * and large and huge blocks, and returns the memory. */
static zk_heap_t *doomed;

static void *fill_doomed(void *arg) {
  (void)arg;
  for (unsigned i = 0; i < 20000; i++)
    CHECK(zk_heap_malloc(doomed, size_for(i)) != NULL);
  return NULL;
}

static void test_destroy(void) {
  zk_collect(true);
  zk_stats_t before;
  zk_stats_get(&before);
  doomed = zk_heap_create(NULL);
  CHECK(doomed != NULL);
  run_two(fill_doomed);
  CHECK(zk_heap_enter(doomed) == NULL);
  for (unsigned i = 0; i < 20000; i++)
    CHECK(zk_malloc(size_for(i)) != NULL);
  CHECK(zk_heap_enter(NULL) == doomed);
  zk_stats_t filled;
  zk_stats_get(&filled);
  zk_heap_destroy(doomed);
  zk_collect(true);
  zk_stats_t after;
  zk_stats_get(&after);
  printf("destroy: 60,000 blocks of 3 threads; mapped %zu MiB before, %zu "
         "MiB filled, %zu MiB after\n",
         before.bytes_mapped >> 20, filled.bytes_mapped >> 20,
         after.bytes_mapped >> 20);
  CHECK(filled.bytes_mapped > before.bytes_mapped + (32 << 20));
  CHECK(after.bytes_mapped <= before.bytes_mapped + (8 << 20));
  CHECK_EQ(after.large_live, before.large_live);
  CHECK_EQ(after.huge_live, before.huge_live);
  /* The memory serves the default heap again. */
  void *p = zk_malloc(1000);
  CHECK(p != NULL);
  zk_free(p);
}

/* ---- found by review ---- */

/* A parent's live bytes are its children's live blocks, not the free ones
 * their threads cache; a sibling's cached blocks do not make a parent's
 * limit refuse. */
static void test_parent_and_siblings(void) {
  zk_heap_t *parent =
      zk_heap_create(&(zk_heap_options_t){.limit_bytes = 256 << 10});
  zk_heap_t *child = zk_heap_create(&(zk_heap_options_t){.parent = parent});
  zk_heap_t *sibling = zk_heap_create(&(zk_heap_options_t){.parent = parent});
  void *p = zk_heap_malloc(child, 1024);
  CHECK(p != NULL);
  CHECK_EQ(stats_of(child).live_bytes, 1024);
  CHECK_EQ(stats_of(parent).live_bytes, 1024);
  void *big = zk_heap_malloc(sibling, 60 << 10); /* child's cache in the way */
  CHECK(big != NULL);
  zk_free(big);
  zk_free(p);
  zk_heap_destroy(child);
  zk_heap_destroy(sibling);
  zk_heap_destroy(parent);
}

/* on_limit may allocate (seeing other heaps' limits as usual) or destroy
 * the heap it was called for. */
static zk_heap_t *other_heap;
static int other_calls;

static bool count_other(zk_heap_t *heap, size_t size, void *arg) {
  (void)heap, (void)size, (void)arg;
  other_calls++;
  return false;
}

static bool allocate_elsewhere(zk_heap_t *heap, size_t size, void *arg) {
  (void)heap, (void)size, (void)arg;
  errno = 0;
  void *p = zk_heap_malloc(other_heap, 1 << 20); /* over its limit too */
  CHECK(p == NULL && errno == ENOMEM);
  return false;
}

static bool destroy_myself(zk_heap_t *heap, size_t size, void *arg) {
  (void)size, (void)arg;
  zk_heap_destroy(heap);
  return true;
}

static void test_on_limit_callbacks(void) {
  other_heap = zk_heap_create(
      &(zk_heap_options_t){.limit_bytes = 64 << 10, .on_limit = count_other});
  zk_heap_t *heap = zk_heap_create(&(zk_heap_options_t){
      .limit_bytes = 64 << 10, .on_limit = allocate_elsewhere});
  CHECK(zk_heap_malloc(heap, 1 << 20) == NULL && errno == ENOMEM);
  CHECK_EQ(other_calls, 1);
  CHECK_EQ(stats_of(other_heap).limit_refusals, 1);
  CHECK_EQ(stats_of(heap).limit_refusals, 1);
  zk_heap_destroy(heap);
  zk_heap_destroy(other_heap);
  zk_heap_t *doomed_by_callback = zk_heap_create(&(zk_heap_options_t){
      .limit_bytes = 64 << 10, .on_limit = destroy_myself});
  CHECK(zk_heap_malloc(doomed_by_callback, 32 << 10) != NULL);
  errno = 0;
  CHECK(zk_heap_malloc(doomed_by_callback, 1 << 20) == NULL && errno == ENOMEM);
  zk_heap_t *next = zk_heap_create(NULL); /* may reuse its sub-heap */
  void *q = zk_heap_malloc(next, 100);
  CHECK(q != NULL);
  zk_free(q);
  CHECK_EQ(stats_of(next).live_bytes, 0);
  zk_heap_destroy(next);
}

/* A worker that left a heap calls zk_thread_idle while another thread
 * destroys that heap (both used to walk the same sub-heap's bins with no
 * common lock). One worker for every round, so its list of sub-heaps also
 * holds dead ones. */
#define IDLE_ROUNDS 2000
static zk_heap_t *_Atomic racing;
static atomic_int turn; /* 0: the worker's; 1: the destroyer's */

static void *leave_then_idle(void *arg) {
  (void)arg;
  for (int round = 0; round < IDLE_ROUNDS; round++) {
    zk_heap_t *heap;
    while ((heap = atomic_load(&racing)) == NULL || atomic_load(&turn) != 0)
      ;
    zk_heap_enter(heap);
    void *blocks[64];
    for (int pass = 0; pass < 4; pass++) {
      for (int i = 0; i < 64; i++)
        blocks[i] = zk_malloc(16 + 48 * (size_t)i);
      for (int i = 0; i < 64; i++)
        zk_free(blocks[i]); /* into the sub-heap's bins */
    }
    zk_heap_enter(NULL);
    atomic_store(&turn, 1); /* left: the heap may go */
    zk_thread_idle();
    while (atomic_load(&turn) != 0)
      ;
  }
  return NULL;
}

static void idle_while_destroyed(void) {
  alarm(60);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, leave_then_idle, NULL) == 0);
  for (int round = 0; round < IDLE_ROUNDS; round++) {
    zk_heap_t *heap = zk_heap_create(NULL);
    CHECK(heap != NULL);
    atomic_store(&racing, heap);
    while (atomic_load(&turn) != 1)
      ;
    atomic_store(&racing, NULL);
    zk_heap_destroy(heap);
    atomic_store(&turn, 0);
  }
  CHECK(pthread_join(thread, NULL) == 0);
  for (int i = 0; i < 100000; i++) { /* the allocator is still whole */
    char *p = zk_malloc(16 + (size_t)i % 3000);
    CHECK(p != NULL);
    memset(p, 1, 16);
    zk_free(p);
  }
}

/* fork while another thread is inside a heap and churns large blocks in
 * it: the child can destroy the heap (not "entered"), and does not hang on
 * the other thread's large cache. */
static zk_heap_t *forked_heap;
static atomic_int stop_worker;

static void *work_in_heap(void *arg) {
  (void)arg;
  zk_heap_enter(forked_heap);
  unsigned seed = 1;
  while (!atomic_load(&stop_worker)) {
    void *blocks[8];
    for (int i = 0; i < 8; i++)
      blocks[i] = zk_malloc((size_t)(65 + rand_r(&seed) % 200) * 1024);
    for (int i = 0; i < 8; i++)
      zk_free(blocks[i]);
  }
  zk_heap_enter(NULL);
  return NULL;
}

static void test_fork_with_heap_entered(void) {
  forked_heap = zk_heap_create(NULL);
  atomic_store(&stop_worker, 0);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, work_in_heap, NULL) == 0);
  for (int i = 0; i < 200; i++) {
    pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
      alarm(10);
      zk_heap_destroy(forked_heap);
      _exit(0);
    }
    int status;
    CHECK(waitpid(child, &status, 0) == child);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fprintf(stderr, "fork %d: child status %#x\n", i, status);
      exit(1);
    }
  }
  atomic_store(&stop_worker, 1);
  CHECK(pthread_join(thread, NULL) == 0);
  zk_heap_destroy(forked_heap);
}

/* Many heaps with a block each share their thread's segments. */
static void test_heaps_share_segments(void) {
  zk_collect(true);
  static zk_heap_t *heaps[1000];
  for (int i = 0; i < 1000; i++) {
    heaps[i] = zk_heap_create(NULL);
    CHECK(zk_heap_malloc(heaps[i], 64) != NULL);
  }
  zk_stats_t stats;
  zk_stats_get(&stats);
  printf("1,000 heaps with a block each: %zu segments mapped\n",
         stats.segments_mapped);
  CHECK(stats.segments_mapped < 40);
  for (int i = 0; i < 1000; i++)
    zk_heap_destroy(heaps[i]);
}

/* A fork child destroys a task heap whose sub-heap on another thread has
 * a page queue torn in the middle of a removal, as a fork can freeze it:
 * the queue's first page moved on, its successor still naming it as prev.
 * The release hands each page back once (it gave the same span back twice
 * and crashed) and returns. Made by hand, so the run is deterministic. */
static zk_heap_t *torn_heap;
static pthread_barrier_t torn_ready;

static void *tear_a_queue(void *arg) {
  (void)arg;
  CHECK(zk_heap_enter(torn_heap) == NULL);
  for (int i = 0; i < 64; i++) /* 8 KiB blocks: pages, not arenas */
    CHECK(zk_malloc(8192) != NULL);
  heap_t *sub = heap_current;
  page_queue_t *queue = NULL;
  if (sub->full.first != NULL && sub->full.first->next != NULL)
    queue = &sub->full;
  for (unsigned c = 0; queue == NULL && c < CLASS_COUNT; c++)
    if (sub->queues[c].first != NULL && sub->queues[c].first->next != NULL)
      queue = &sub->queues[c];
  CHECK(queue != NULL);
  queue->first = queue->first->next; /* queue_remove's first store only */
  CHECK(zk_heap_enter(NULL) == torn_heap);
  pthread_barrier_wait(&torn_ready);
  for (;;)
    pause(); /* frozen, as a thread a fork left behind */
  return NULL;
}

static void test_fork_with_torn_queue(void) {
  torn_heap = zk_heap_create(NULL);
  CHECK(pthread_barrier_init(&torn_ready, NULL, 2) == 0);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, tear_a_queue, NULL) == 0);
  pthread_barrier_wait(&torn_ready);
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    alarm(10);
    zk_heap_destroy(torn_heap);
    CHECK(zk_malloc(8192) != NULL); /* the allocator still works */
    _exit(0);
  }
  int status;
  CHECK(waitpid(child, &status, 0) == child);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "torn queue: child status %#x\n", status);
    exit(1);
  }
  /* The thread stays parked; its heap stays in this process. */
}

/* The purge collecting an orphaned sub-heap (its thread gone) moves each
 * page's counters under the lock the statistics hold: a reader never sees
 * a class's allocations or frees below an earlier reading, with nothing
 * allocating meanwhile (before, a few percent of readings did). */
enum { ORPHAN_ROUNDS = 40, ORPHAN_BLOCKS = 2000 };
static zk_heap_t *orphan_heap;
static void *orphan_blocks[ORPHAN_BLOCKS];
static atomic_int orphan_phase; /* 1: read a baseline, 2: collecting, 3: done */
static atomic_long orphan_reads, orphan_below;

static void *orphan_worker(void *arg) {
  (void)arg;
  CHECK(zk_heap_enter(orphan_heap) == NULL);
  for (int i = 0; i < ORPHAN_BLOCKS; i++)
    CHECK((orphan_blocks[i] = zk_malloc(8192)) != NULL);
  CHECK(zk_heap_enter(NULL) == orphan_heap);
  return NULL; /* its sub-heap is an orphan from here */
}

static void *orphan_reader(void *arg) {
  (void)arg;
  static zk_stats_t before, seen;
  for (int round = 0; round < ORPHAN_ROUNDS; round++) {
    while (atomic_load(&orphan_phase) != 1)
      ;
    zk_stats_get(&before);
    atomic_store(&orphan_phase, 2);
    while (atomic_load(&orphan_phase) == 2) {
      zk_stats_get(&seen);
      atomic_fetch_add(&orphan_reads, 1);
      for (size_t c = 0; c < seen.class_count; c++)
        if (seen.classes[c].allocations < before.classes[c].allocations ||
            seen.classes[c].frees < before.classes[c].frees) {
          atomic_fetch_add(&orphan_below, 1);
          break;
        }
    }
    atomic_store(&orphan_phase, 0);
  }
  return NULL;
}

static void test_orphan_collection_statistics(void) {
  pthread_t reader;
  CHECK(pthread_create(&reader, NULL, orphan_reader, NULL) == 0);
  for (int round = 0; round < ORPHAN_ROUNDS; round++) {
    orphan_heap = zk_heap_create(NULL);
    pthread_t worker;
    CHECK(pthread_create(&worker, NULL, orphan_worker, NULL) == 0);
    CHECK(pthread_join(worker, NULL) == 0);
    for (int i = 0; i < ORPHAN_BLOCKS; i++)
      zk_free(orphan_blocks[i]); /* onto the orphan's pages' remote lists */
    atomic_store(&orphan_phase, 1);
    while (atomic_load(&orphan_phase) != 2)
      ;
    task_collect_orphans();
    atomic_store(&orphan_phase, 3);
    while (atomic_load(&orphan_phase) != 0)
      ;
    zk_heap_destroy(orphan_heap);
  }
  CHECK(pthread_join(reader, NULL) == 0);
  printf("orphan collection: %ld statistics read while collecting, %ld with "
         "a counter below an earlier reading\n",
         atomic_load(&orphan_reads), atomic_load(&orphan_below));
  CHECK_EQ(atomic_load(&orphan_below), 0);
}

/* A destroy's release moves its pages' and bins' counters under the lock
 * the statistics hold, and hands the spans back after: statistics read as
 * each span goes back (this program is linked with
 * -Wl,--wrap=page_span_free) show each class's allocations and frees
 * between their values before and after the destroy. (Moved a class and a
 * page at a time, 22 of 128 readings had a class outside them.) */
void __real_page_span_free(page_t *page, uint64_t free_since_ms);
enum { SPAN_FREE_READS = 128 };
static bool read_at_span_free;
static zk_stats_t span_free_seen[SPAN_FREE_READS];
static int span_free_reads;

void __wrap_page_span_free(page_t *page, uint64_t free_since_ms) {
  if (read_at_span_free && span_free_reads < SPAN_FREE_READS)
    zk_stats_get(&span_free_seen[span_free_reads++]);
  __real_page_span_free(page, free_since_ms);
}

static bool between(uint64_t low, uint64_t value, uint64_t high) {
  return low <= value && value <= high;
}

static size_t destroy_size(int i) {
  switch (i % 4) {
  case 0:
    return 16 + (size_t)(i * 37 % 2033);
  case 1:
    return 4097 + (size_t)(i * 7919 % 60000);
  case 2:
    return 48;
  default:
    return 16 + (size_t)(i * 131 % 4081);
  }
}

static void test_destroy_statistics(void) {
  enum { DESTROY_BLOCKS = 2000 };
  static void *blocks[DESTROY_BLOCKS];
  static zk_stats_t before, after;
  zk_heap_t *heap = zk_heap_create(NULL);
  CHECK(zk_heap_enter(heap) == NULL);
  /* Arena classes, a class that goes hot (pages after 64 owner frees) and
   * page classes above 4 KiB; half freed into the bins and a quarter
   * allocated again, so bins hold pushed and refilled blocks when the
   * spans go back, a smaller class's before a larger one's. */
  for (int i = 0; i < DESTROY_BLOCKS; i++)
    CHECK((blocks[i] = zk_malloc(destroy_size(i))) != NULL);
  for (int i = 0; i < DESTROY_BLOCKS; i += 2)
    zk_free(blocks[i]);
  for (int i = 0; i < DESTROY_BLOCKS; i += 4)
    CHECK((blocks[i] = zk_malloc(destroy_size(i))) != NULL);
  CHECK(zk_heap_enter(NULL) == heap);
  zk_stats_get(&before);
  read_at_span_free = true;
  zk_heap_destroy(heap);
  read_at_span_free = false;
  zk_stats_get(&after);
  int outside = 0;
  for (int r = 0; r < span_free_reads; r++)
    for (size_t c = 0; c < after.class_count; c++)
      if (!between(before.classes[c].allocations,
                   span_free_seen[r].classes[c].allocations,
                   after.classes[c].allocations) ||
          !between(before.classes[c].frees, span_free_seen[r].classes[c].frees,
                   after.classes[c].frees)) {
        outside++;
        break;
      }
  printf("destroy: %d statistics read as spans went back, %d with a class "
         "counter outside its values before and after\n",
         span_free_reads, outside);
  CHECK(span_free_reads > 0);
  CHECK_EQ(outside, 0);
}

static void stale_handle(void) {
  zk_heap_t *first = zk_heap_create(NULL);
  zk_heap_destroy(first);
  zk_heap_t *second = zk_heap_create(NULL); /* may reuse first's memory */
  CHECK(zk_heap_malloc(second, 10) != NULL);
  zk_heap_destroy(first);
}

static void test_review_findings(void) {
  test_parent_and_siblings();
  test_on_limit_callbacks();
  test_expect_success("idle while destroyed", idle_while_destroyed);
  test_fork_with_heap_entered();
  test_heaps_share_segments();
  test_fork_with_torn_queue();
  test_orphan_collection_statistics();
  test_destroy_statistics();
  test_expect_abort(stale_handle, "zkmem: error: zk_heap_destroy of a "
                                  "destroyed task heap or not one");
  printf("review findings: parents, callbacks, idle vs destroy, fork, "
         "segments, stale handles\n");
}

/* ---- misuse ---- */

static void destroy_entered(void) {
  zk_heap_t *heap = zk_heap_create(NULL);
  zk_heap_enter(heap);
  zk_heap_destroy(heap);
}

static void destroy_twice(void) {
  zk_heap_t *heap = zk_heap_create(NULL);
  zk_heap_destroy(heap);
  zk_heap_destroy(heap);
}

static void destroy_parent_first(void) {
  zk_heap_t *parent = zk_heap_create(NULL);
  zk_heap_t *child = zk_heap_create(&(zk_heap_options_t){.parent = parent});
  (void)child;
  zk_heap_destroy(parent);
}

static void malloc_destroyed(void) {
  zk_heap_t *heap = zk_heap_create(NULL);
  zk_heap_destroy(heap);
  zk_heap_malloc(heap, 10);
}

static void destroy_default(void) {
  zk_heap_destroy(NULL);
}

/* A class freed often by its owner returns its blocks to their arena at
 * once; the second free of one is reported, not counted again. */
static void double_free_hot_arena_class(void) {
  zk_heap_t *heap = zk_heap_create(NULL);
  zk_heap_enter(heap);
  void *blocks[80];
  for (int i = 0; i < 80; i++)
    blocks[i] = zk_malloc(48);
  for (int i = 0; i < 71; i++)
    zk_free(blocks[i]);
  zk_free(blocks[70]);
}

static void *free_twice(void *block) {
  zk_free(block);
  zk_free(block);
  return NULL;
}

/* Another thread's free of an arena block only counts it: the second is
 * reported. */
static void remote_double_free_arena_block(void) {
  zk_heap_t *heap = zk_heap_create(NULL);
  void *block = zk_heap_malloc(heap, 32);
  pthread_t thread;
  pthread_create(&thread, NULL, free_twice, block);
  pthread_join(thread, NULL);
}

/* A block of the thread's own heap freed twice inside a task heap. */
static void double_free_own_block_inside(void) {
  void *p = zk_malloc(40);
  zk_heap_enter(zk_heap_create(NULL));
  zk_free(p);
  zk_free(p);
}

/* A task heap's list of sub-heaps made into a cycle: the walk stops and
 * says so instead of going round for ever. */
static void corrupted_subheap_list(void) {
  zk_heap_t *heap = zk_heap_create(NULL);
  zk_heap_enter(heap);
  heap_t *sub = heap_current;
  zk_heap_enter(NULL);
  sub->task_next = sub;
  zk_heap_destroy(heap);
}

static void free_inside_arena_block(void) {
  zk_heap_t *heap = zk_heap_create(NULL);
  char *p = zk_heap_malloc(heap, 100);
  zk_free(p + 16);
}

/* Secure mode: a block freed after its heap was destroyed lands in a span
 * that is free again (or reused), and is reported. */
static void free_after_destroy(void) {
  zk_option_set(ZK_OPTION_SECURE, 1);
  zk_heap_t *heap = zk_heap_create(NULL);
  void *small = zk_heap_malloc(heap, 100);
  void *large = zk_heap_malloc(heap, 300 << 10);
  CHECK(small && large);
  zk_heap_destroy(heap);
  zk_free(small);
}

static void free_large_after_destroy(void) {
  zk_option_set(ZK_OPTION_SECURE, 1);
  zk_heap_t *heap = zk_heap_create(NULL);
  void *large = zk_heap_malloc(heap, 300 << 10);
  CHECK(large != NULL);
  zk_heap_destroy(heap);
  zk_free(large);
}

/* A task heap's small blocks come from arenas: blocks of any class side by
 * side, counted exactly wherever they are freed, reused once all are back;
 * a class freed often moves to pages; more than the arenas hold goes to
 * pages too. */
static void *free_odd_blocks(void *arg) {
  void **blocks = arg;
  for (unsigned i = 1; i < 2000; i += 2)
    zk_free(blocks[i]);
  return NULL;
}

static void test_arenas(void) {
  zk_stats_t before, after;
  zk_stats_get(&before);
  zk_heap_t *heap = zk_heap_create(NULL);
  char *p = zk_heap_malloc(heap, 100); /* a 112 B block */
  CHECK(p != NULL);
  CHECK_EQ(zk_usable_size(p), 112);
  CHECK_EQ(zk_usable_size(p + 40), 72);
  zk_free(p);
  /* 2,000 blocks of 1 B-4 KiB: about 4 MiB, far more than the arenas. */
  static void *blocks[2000];
  size_t usable = 0;
  for (unsigned i = 0; i < 2000; i++) {
    size_t size = 1 + (i * 7919u) % 4096;
    blocks[i] = zk_heap_malloc(heap, size);
    CHECK(blocks[i] != NULL && ((uintptr_t)blocks[i] & 15) == 0);
    memset(blocks[i], (int)(i & 0xff), size);
    usable += zk_usable_size(blocks[i]);
  }
  CHECK_EQ(stats_of(heap).live_bytes, usable);
  for (unsigned i = 0; i < 2000; i++) {
    size_t size = 1 + (i * 7919u) % 4096;
    CHECK(((unsigned char *)blocks[i])[size - 1] == (i & 0xff));
  }
  for (unsigned i = 0; i < 2000; i += 2)
    zk_free(blocks[i]); /* not entered: as any other thread's free */
  pthread_t thread;
  CHECK_EQ(pthread_create(&thread, NULL, free_odd_blocks, blocks), 0);
  CHECK_EQ(pthread_join(thread, NULL), 0);
  CHECK_EQ(stats_of(heap).live_bytes, 0);
  /* Entered: blocks freed by their owner go to its bins and back to their
   * arena (pages, once the class is freed often); the same 40 KiB a
   * hundred times over commits nothing more once those classes moved. */
  CHECK(zk_heap_enter(heap) == NULL);
  zk_stats_t first, last;
  for (int round = 0; round < 100; round++) {
    for (unsigned i = 0; i < 400; i++)
      CHECK((blocks[i] = zk_malloc(16 + i % 200)) != NULL);
    for (unsigned i = 0; i < 400; i++)
      zk_free(blocks[i]);
    zk_thread_idle();
    if (round == 10)
      zk_stats_get(&first);
  }
  zk_stats_get(&last);
  /* A class that turns hot late takes its page then: a slice at most. */
  CHECK(last.bytes_committed <= first.bytes_committed + (64 << 10));
  /* An aligned block of a class whose bin holds arena blocks (aligned to
   * 16 only) comes from a page. */
  for (size_t alignment = 32; alignment <= 4096; alignment *= 2) {
    void *small = zk_malloc(16);
    void *same_class = zk_malloc(alignment);
    CHECK(small != NULL && same_class != NULL);
    zk_free(same_class); /* onto the bin of the aligned request's class */
    void *aligned = zk_aligned_alloc(alignment, alignment);
    CHECK(aligned != NULL && ((uintptr_t)aligned & (alignment - 1)) == 0);
    void *posix = NULL;
    CHECK_EQ(zk_posix_memalign(&posix, alignment, 8), 0);
    CHECK(((uintptr_t)posix & (alignment - 1)) == 0);
    zk_free(posix);
    zk_free(aligned);
    zk_free(small);
  }
  /* One class allocated and freed in a loop: it leaves the arenas. */
  for (int i = 0; i < 1000; i++) {
    void *q = zk_malloc(48);
    CHECK(q != NULL);
    zk_free(q);
  }
  CHECK(zk_heap_enter(NULL) == heap);
  zk_thread_idle();
  zk_heap_stats_t stats = stats_of(heap);
  CHECK_EQ(stats.live_bytes, 0);
  CHECK_EQ(stats.allocations, stats.frees);
  /* Live blocks at destroy are freed by it, in the process's figures too. */
  for (unsigned i = 0; i < 100; i++)
    CHECK(zk_heap_malloc(heap, 24 + i * 30) != NULL);
  zk_heap_destroy(heap);
  zk_thread_idle();
  zk_stats_get(&after);
  CHECK_EQ(after.bytes_live, before.bytes_live);
  printf("arenas: exact across threads, reused, hot classes to pages\n");
}

/* The process's statistics by class through task heaps destroyed with
 * blocks live: every block a task took, carved from an arena or popped
 * from its bin after its owner freed one, counts once as allocated and
 * once as freed, and nothing stays live. Twice: the second task heap
 * reuses the sub-heap the first one released. */
static void test_arena_class_statistics(void) {
  enum { TASK_BLOCKS = 300 };
  static void *blocks[TASK_BLOCKS];
  uint64_t made[ZK_STATS_CLASSES];
  for (int round = 0; round < 2; round++) {
    zk_collect(true);
    zk_stats_t before, after;
    zk_stats_get(&before);
    memset(made, 0, sizeof(made));
    zk_heap_t *heap = zk_heap_create(NULL);
    CHECK(heap != NULL);
    zk_heap_t *previous = zk_heap_enter(heap);
    for (int i = 0; i < TASK_BLOCKS; i++) {
      size_t size = 16 + (size_t)(i * 37 % 2033);
      CHECK((blocks[i] = zk_malloc(size)) != NULL);
      made[size_to_class(size)]++;
    }
    for (int i = 0; i < TASK_BLOCKS; i += 2) /* to the bins, by their owner */
      zk_free(blocks[i]);
    for (int i = 0; i < TASK_BLOCKS; i += 2) {
      size_t size = 16 + (size_t)(i * 37 % 2033);
      CHECK((blocks[i] = zk_malloc(size)) != NULL);
      made[size_to_class(size)]++;
    }
    CHECK(zk_heap_enter(previous) == heap);
    zk_heap_destroy(heap);
    zk_stats_get(&after);
    for (unsigned c = 0; c < ZK_STATS_CLASSES; c++) {
      CHECK_EQ(after.classes[c].live, before.classes[c].live);
      CHECK_EQ(after.classes[c].allocations - before.classes[c].allocations,
               made[c]);
      CHECK_EQ(after.classes[c].frees - before.classes[c].frees, made[c]);
    }
  }
}

/* Classes 0 and 1 (8 and 16 B; class 0 carves class 1's blocks) turned
 * hot by 200 owner frees, in two task heaps one after the other on this
 * thread, the second on the sub-heap the first released: the heap's and
 * the process's counts stay exact, the hot classes go to pages, and the
 * release lets the next task carve them again. */
static void test_hot_classes_across_tasks(void) {
  enum { LIVE = 50 };
  static void *live[LIVE];
  for (int round = 0; round < 2; round++) {
    zk_stats_t before, after;
    zk_stats_get(&before);
    zk_heap_t *heap = zk_heap_create(NULL);
    CHECK(zk_heap_enter(heap) == NULL);
    heap_t *sub = heap_current;
    /* Carved again: round 1's hot classes were reset by its release. */
    CHECK(sub->bins[0].arena_carve == class_block_size[1]);
    CHECK(sub->bins[1].arena_carve == class_block_size[1]);
    size_t live_bytes = 0;
    for (int i = 0; i < LIVE; i++) {
      CHECK((live[i] = zk_malloc(i % 2 ? 16 : 8)) != NULL);
      live_bytes += zk_usable_size(live[i]);
    }
    for (int i = 0; i < 200; i++) {
      void *p = zk_malloc(i % 3 ? 12 : 5);
      CHECK(p != NULL);
      zk_free(p);
    }
    /* Hot: both bins' carves refused, class 0's with class 1's. */
    CHECK(sub->bins[0].arena_carve > SLICE_SIZE);
    CHECK(sub->bins[1].arena_carve > SLICE_SIZE);
    CHECK(zk_heap_enter(NULL) == heap);
    zk_heap_stats_t stats = stats_of(heap);
    CHECK_EQ(stats.live_bytes, live_bytes);
    CHECK_EQ(stats.allocations, LIVE + 200);
    CHECK_EQ(stats.frees, 200);
    for (int i = 0; i < LIVE; i += 2) /* a bin holds some at the destroy */
      zk_heap_enter(heap), zk_free(live[i]), zk_heap_enter(NULL);
    stats = stats_of(heap);
    CHECK_EQ(stats.frees, 200 + LIVE / 2);
    zk_heap_destroy(heap);
    zk_stats_get(&after);
    CHECK_EQ(after.classes[1].live, before.classes[1].live);
    CHECK_EQ(after.classes[1].allocations - before.classes[1].allocations,
             after.classes[1].frees - before.classes[1].frees);
  }
  printf("hot classes: exact counts, carved again after a release\n");
}

/* Inside a task heap, blocks of the thread's own heap (allocated before
 * entering) go back to that heap's bins, as outside: reused after leaving,
 * nothing charged to the task heap. */
static void test_own_blocks_freed_inside(void) {
  enum { COUNT = 1000 };
  static char *blocks[COUNT];
  zk_stats_t before, after;
  zk_stats_get(&before);
  for (int i = 0; i < COUNT; i++) {
    CHECK((blocks[i] = zk_malloc(24 + (size_t)i % 300)) != NULL);
    memset(blocks[i], 0x33, 24);
  }
  zk_heap_t *heap = zk_heap_create(NULL);
  CHECK(zk_heap_enter(heap) == NULL);
  for (int i = 0; i < COUNT; i++)
    zk_free(blocks[i]);
  CHECK(zk_heap_enter(NULL) == heap);
  CHECK_EQ(stats_of(heap).live_bytes, 0);
  CHECK_EQ(stats_of(heap).frees, 0);
  /* The thread's own bins got them: the same sizes come back from them. */
  int reused = 0;
  char *again[COUNT];
  for (int i = 0; i < COUNT; i++) {
    CHECK((again[i] = zk_malloc(24 + (size_t)i % 300)) != NULL);
    for (int j = 0; j < COUNT && !reused; j++)
      reused = again[i] == blocks[j];
  }
  CHECK(reused);
  for (int i = 0; i < COUNT; i++)
    zk_free(again[i]);
  /* More of one class than its bin holds: the frees that fill it take the
   * short path, the one that would flush it the full one. */
  enum { ONE_CLASS = 1500 };
  static void *same[ONE_CLASS];
  for (int i = 0; i < ONE_CLASS; i++)
    CHECK((same[i] = zk_malloc(32)) != NULL);
  CHECK(zk_heap_enter(heap) == NULL);
  for (int i = 0; i < ONE_CLASS; i++)
    zk_free(same[i]);
  CHECK(zk_heap_enter(NULL) == heap);
  CHECK_EQ(stats_of(heap).frees, 0);
  zk_heap_destroy(heap);
  zk_collect(false);
  zk_stats_get(&after);
  CHECK_EQ(after.bytes_live, before.bytes_live);
  unsigned class32 = size_to_class(32);
  CHECK_EQ(after.classes[class32].allocations -
               before.classes[class32].allocations,
           after.classes[class32].frees - before.classes[class32].frees);
  printf("own blocks freed inside a task heap: back to the thread's bins\n");
}

/* A task's blocks freed by their own thread outside the task (a request
 * freed by the server task that read it), and inside another task heap:
 * remote frees, as any other thread's, so counted exactly, uncharged at
 * once (another thread then has the room under the limit), and a double
 * free with another free between is reported. */
static void *allocate_16k_from(void *arg) {
  void *p = zk_heap_malloc(arg, 16 << 10);
  zk_free(p);
  return p;
}

static void test_task_blocks_freed_outside(void) {
  enum { COUNT = 600 };
  static void *blocks[COUNT];
  zk_heap_t *task = zk_heap_create(NULL);
  zk_heap_t *other = zk_heap_create(NULL);
  CHECK(zk_heap_enter(task) == NULL);
  size_t live = 0;
  for (int i = 0; i < COUNT; i++) { /* arena classes and page classes */
    CHECK((blocks[i] = zk_malloc(i % 5 == 0 ? 5000 + (size_t)i
                                            : 24 + (size_t)i * 7 % 3000)) !=
          NULL);
    live += zk_usable_size(blocks[i]);
  }
  CHECK(zk_heap_enter(NULL) == task);
  CHECK_EQ(stats_of(task).live_bytes, live);
  for (int i = 0; i < COUNT / 2; i++) { /* outside any task heap */
    live -= zk_usable_size(blocks[i]);
    zk_free(blocks[i]);
  }
  CHECK_EQ(stats_of(task).live_bytes, live);
  CHECK_EQ(stats_of(task).frees, COUNT / 2);
  CHECK(zk_heap_enter(other) == NULL);
  for (int i = COUNT / 2; i < COUNT; i++) { /* inside another one */
    live -= zk_usable_size(blocks[i]);
    zk_free(blocks[i]);
  }
  CHECK(zk_heap_enter(NULL) == other);
  CHECK_EQ(stats_of(task).live_bytes, 0);
  CHECK_EQ(live, 0);
  CHECK_EQ(stats_of(task).frees, COUNT);
  CHECK_EQ(stats_of(other).allocations, 0);
  CHECK_EQ(stats_of(other).frees, 0);
  zk_heap_destroy(other);
  zk_heap_destroy(task);
  /* Under a limit: blocks freed outside no longer count against it. */
  zk_heap_t *limited =
      zk_heap_create(&(zk_heap_options_t){.limit_bytes = 64 << 10});
  void *chunks[7];
  CHECK(zk_heap_enter(limited) == NULL);
  for (int i = 0; i < 7; i++)
    CHECK((chunks[i] = zk_malloc(8192)) != NULL);
  CHECK(zk_heap_enter(NULL) == limited);
  for (int i = 0; i < 7; i++)
    zk_free(chunks[i]);
  CHECK_EQ(stats_of(limited).live_bytes, 0);
  pthread_t thread;
  void *result;
  CHECK_EQ(pthread_create(&thread, NULL, allocate_16k_from, limited), 0);
  CHECK_EQ(pthread_join(thread, &result), 0);
  CHECK(result != NULL);
  CHECK_EQ(stats_of(limited).limit_refusals, 0);
  zk_heap_destroy(limited);
  printf("task blocks freed by their thread outside the task: exact, "
         "uncharged\n");
}

static void double_free_task_block_outside(void) {
  zk_heap_t *task = zk_heap_create(NULL);
  void *p = zk_heap_malloc(task, 32);
  void *q = zk_heap_malloc(task, 32);
  zk_free(p);
  zk_free(q);
  zk_free(p);
}

/* Thousands of heaps, each used and destroyed: nothing accumulates. */
static void test_many_heaps(void) {
  zk_collect(true);
  zk_stats_t before;
  zk_stats_get(&before);
  for (int round = 0; round < 5000; round++) {
    zk_heap_t *heap = zk_heap_create(&(zk_heap_options_t){.name = "short"});
    CHECK(heap != NULL);
    CHECK(zk_heap_enter(heap) == NULL);
    for (int i = 0; i < 20; i++)
      CHECK(zk_malloc(16 + (size_t)(i * 97 + round) % 2000) != NULL);
    CHECK(zk_heap_enter(NULL) == heap);
    if (round % 100 == 0)
      CHECK(zk_heap_malloc(heap, 200 << 10) != NULL);
    zk_heap_destroy(heap);
  }
  zk_collect(true);
  zk_stats_t after;
  zk_stats_get(&after);
  printf("5,000 heaps used and destroyed: mapped %zu -> %zu KiB, rss %zu -> "
         "%zu KiB\n",
         before.bytes_mapped >> 10, after.bytes_mapped >> 10, before.rss >> 10,
         after.rss >> 10);
  CHECK(after.bytes_mapped <= before.bytes_mapped + (4 << 20));
  CHECK(after.rss <= before.rss + (4 << 20));
}

/* Two threads destroy one heap at once: one destroys it, the other's is
 * reported (here with ZKMEM_ON_ERROR=warn), and the parent stays whole
 * (before, both could pass the check: the heap was freed twice, and the
 * parent's child count went wrong or a later charge looped forever). */
static zk_heap_t *contested;
static atomic_int contest_ready, contest_start;

static void *destroy_contested(void *arg) {
  (void)arg;
  atomic_fetch_add(&contest_ready, 1);
  while (!atomic_load(&contest_start))
    ;
  zk_heap_destroy(contested);
  return NULL;
}

static void concurrent_double_destroy(void) {
  zk_option_set(ZK_OPTION_ON_ERROR, 1);
  for (int trial = 0; trial < 300; trial++) {
    zk_heap_t *parent = zk_heap_create(NULL);
    contested = zk_heap_create(&(zk_heap_options_t){.parent = parent});
    CHECK(parent != NULL && contested != NULL);
    zk_free(zk_heap_malloc(contested, 64));
    atomic_store(&contest_ready, 0);
    atomic_store(&contest_start, 0);
    pthread_t first, second;
    CHECK_EQ(pthread_create(&first, NULL, destroy_contested, NULL), 0);
    CHECK_EQ(pthread_create(&second, NULL, destroy_contested, NULL), 0);
    while (atomic_load(&contest_ready) != 2)
      ;
    atomic_store(&contest_start, 1);
    CHECK_EQ(pthread_join(first, NULL), 0);
    CHECK_EQ(pthread_join(second, NULL), 0);
    zk_heap_destroy(parent); /* refused if its child count went wrong */
    zk_heap_stats_t stats;
    CHECK_EQ(zk_heap_stats(parent, &stats), -1);
  }
}

static void test_misuse(void) {
  test_expect_success("two destroys of one heap at once",
                      concurrent_double_destroy);
  test_expect_abort(destroy_entered,
                    "zkmem: error: zk_heap_destroy of a task heap entered on "
                    "a thread");
  test_expect_abort(destroy_twice, "zkmem: error: zk_heap_destroy of a "
                                   "destroyed task heap or not one");
  test_expect_abort(destroy_parent_first,
                    "zkmem: error: zk_heap_destroy of a task heap with child "
                    "heaps");
  test_expect_abort(malloc_destroyed, "zkmem: error: zk_heap_malloc of a "
                                      "destroyed task heap or not one");
  test_expect_abort(destroy_default,
                    "zkmem: error: zk_heap_destroy of the default heap");
  test_expect_abort(double_free_hot_arena_class, "zkmem: error: double free");
  test_expect_abort(remote_double_free_arena_block,
                    "zkmem: error: double free");
  test_expect_abort(double_free_own_block_inside, "zkmem: error: double free");
  test_expect_abort(double_free_task_block_outside,
                    "zkmem: error: double free");
  test_expect_abort(corrupted_subheap_list,
                    "zkmem: error: corrupted list of task sub-heaps");
  test_expect_abort(free_inside_arena_block,
                    "zkmem: error: free of a pointer zkmem never handed out "
                    "(or inside a block)");
  test_expect_abort(free_after_destroy, "zkmem: error: double free or free "
                                        "of an invalid pointer");
  test_expect_abort(free_large_after_destroy,
                    "zkmem: error: double free or free of an invalid pointer");
  /* NULL: the default heap, or EINVAL. */
  void *p = zk_heap_malloc(NULL, 10);
  CHECK(p != NULL);
  p = zk_heap_realloc(NULL, p, 100);
  CHECK(p != NULL);
  zk_free(p);
  zk_heap_stats_t stats;
  errno = 0;
  CHECK(zk_heap_stats(NULL, &stats) == -1 && errno == EINVAL);
  zk_heap_t *heap = zk_heap_create(NULL);
  CHECK(zk_heap_stats(heap, NULL) == -1);
  CHECK(zk_heap_malloc(heap, (size_t)1 << 62) == NULL && errno == ENOMEM);
  CHECK(zk_heap_aligned_alloc(heap, 3, 10) == NULL && errno == EINVAL);
  CHECK(zk_heap_calloc(heap, SIZE_MAX, 2) == NULL && errno == ENOMEM);
  CHECK(zk_heap_enter(NULL) == NULL); /* not entered: stays */
  CHECK(zk_heap_enter(heap) == NULL);
  CHECK(zk_heap_enter(heap) == heap); /* entered again: no change */
  CHECK(zk_heap_enter(NULL) == heap);
  zk_heap_destroy(heap);
  printf("misuse: reported, and NULL is the default heap\n");
}

/* A refill may take a bin past its limit (a page's remote list is taken
 * whole), leaving its room negative until the next free flushes it. A task
 * sub-heap's bin in that state must not keep another thread heap's block
 * (its floor is BIN_KEEPS_NONE): kept, the task would hand out a block
 * never charged to it, and its flush would give the block back to another
 * heap's page from this thread, uncharging the task below zero. */
#define OVER_SIZE   128
#define OVER_BLOCKS 1100
#define SLICE_OF(p) ((uintptr_t)(p) & ~(uintptr_t)(SLICE_SIZE - 1))
static void *over_blocks[OVER_BLOCKS];
static void *over_foreign;
static zk_heap_t *over_task;
static uintptr_t over_second_page;
static atomic_int over_stage;

static void over_wait(int until) {
  while (atomic_load(&over_stage) < until)
    sched_yield();
}

static void *over_remote_freer(void *unused) {
  (void)unused;
  zk_free(zk_malloc(8)); /* a heap of its own */
  over_wait(1);
  for (int i = 0; i < OVER_BLOCKS; i++)
    if (over_blocks[i] != NULL &&
        SLICE_OF(over_blocks[i]) == over_second_page) {
      zk_free(over_blocks[i]);
      over_blocks[i] = NULL;
    }
  atomic_store(&over_stage, 2);
  return NULL;
}

static void *over_task_thread(void *unused) {
  (void)unused;
  zk_free(zk_malloc(8));
  CHECK(zk_heap_enter(over_task) == NULL);
  bin_t *bin = &heap_current->bins[size_to_class(OVER_SIZE)];
  /* Aligned: from pages, not an arena. */
  for (int i = 0; i < OVER_BLOCKS; i++)
    CHECK((over_blocks[i] = zk_aligned_alloc(OVER_SIZE, OVER_SIZE)) != NULL);
  zk_thread_idle();
  uintptr_t first_page = SLICE_OF(over_blocks[0]);
  for (int i = 0; i < OVER_BLOCKS && over_second_page == 0; i++)
    if (SLICE_OF(over_blocks[i]) != first_page)
      over_second_page = SLICE_OF(over_blocks[i]);
  int freed = 0;
  for (int i = 0; i < OVER_BLOCKS && freed < 10; i++)
    if (SLICE_OF(over_blocks[i]) == first_page) {
      zk_free(over_blocks[i]);
      over_blocks[i] = NULL;
      freed++;
    }
  for (int i = 0; i < OVER_BLOCKS; i++)
    if (SLICE_OF(over_blocks[i]) == over_second_page) {
      zk_free(over_blocks[i]);
      over_blocks[i] = NULL;
      break;
    }
  zk_thread_idle(); /* both pages at the front of the class's queue */
  atomic_store(&over_stage, 1);
  over_wait(2); /* the second page's blocks freed by another thread */
  static void *taken[600];
  int count = 0;
  CHECK((taken[count++] = zk_aligned_alloc(OVER_SIZE, OVER_SIZE)) != NULL);
  CHECK(bin->room < 0); /* the refill went past the limit */
  while (bin->room < -1 && count < 600)
    CHECK((taken[count++] = zk_malloc(OVER_SIZE)) != NULL);
  CHECK_EQ(bin->room, -1);
  zk_free(over_foreign); /* the main thread's: not kept here */
  void *next = zk_malloc(OVER_SIZE);
  CHECK(next != NULL && next != over_foreign);
  taken[count++] = next;
  for (int i = 0; i < count; i++)
    zk_free(taken[i]);
  for (int i = 0; i < OVER_BLOCKS; i++)
    zk_free(over_blocks[i]);
  zk_thread_idle();
  CHECK_EQ(stats_of(over_task).live_bytes, 0);
  CHECK(zk_heap_enter(NULL) == over_task);
  return NULL;
}

/* A thread that allocates a class's blocks past its bin's limit and frees
 * them all, over and over: the bin grows until a swing fits, up to 256 KiB
 * and 4,096 blocks, and every block stays in it instead of going back to
 * its page; a flush of a bin that has not run empty since the last trims
 * instead (zk_thread_idle's and zk_collect's flushes count); decay,
 * zk_collect and zk_thread_idle set the limit back. A grown bin keeps
 * another heap's blocks only while it holds under half its base limit. A
 * task heap's bin keeps its limit: its blocks are charged. */
enum { GROW_SIZE = 16, GROW_SWING = 1600, GROW_BASE = 512, GROW_MOST = 4096 };
enum { KEEP_SIZE = 128, KEEP_MOST = 2048 /* 256 KiB */, KEEP_BLOCKS = 2 };
/* A class whose base limit is odd (409 blocks of 640 B): kept under 205. */
enum { ODD_SIZE = 640, ODD_BASE = 409 };
static void *grow_blocks[3 * GROW_MOST];
static void *grow_foreign[KEEP_BLOCKS], *grow_foreign_odd[KEEP_BLOCKS];
static pthread_barrier_t grow_owner_done;

static void grow_swing(size_t size, unsigned count) {
  for (unsigned i = 0; i < count; i++) {
    CHECK((grow_blocks[i] = zk_malloc(size)) != NULL);
    memset(grow_blocks[i], (int)i, size);
  }
  for (unsigned i = 0; i < count; i++)
    zk_free(grow_blocks[i]);
}

static uint64_t class_live(size_t size) {
  zk_stats_t stats;
  zk_stats_get(&stats);
  return stats.classes[size_to_class(size)].live;
}

/* Holds blocks of KEEP_SIZE and ODD_SIZE of its own heap until the grown
 * bin's thread has freed them. */
static void *grow_owner(void *unused) {
  (void)unused;
  for (int i = 0; i < KEEP_BLOCKS; i++) {
    CHECK((grow_foreign[i] = zk_malloc(KEEP_SIZE)) != NULL);
    CHECK((grow_foreign_odd[i] = zk_malloc(ODD_SIZE)) != NULL);
  }
  pthread_barrier_wait(&grow_owner_done);
  pthread_barrier_wait(&grow_owner_done);
  return NULL;
}

/* Pops the bin of `size` down to `held` blocks, frees another heap's block
 * and says whether the bin took it. */
static bool grow_bin_keeps(size_t size, uint32_t held, void *foreign) {
  bin_t *bin = &heap_current->bins[size_to_class(size)];
  unsigned popped = 0;
  while (bin_count(bin) > held)
    CHECK((grow_blocks[popped++] = zk_malloc(size)) != NULL);
  CHECK_EQ(bin_count(bin), held);
  zk_free(foreign);
  bool kept = bin_count(bin) == held + 1;
  for (unsigned i = 0; i < popped; i++)
    zk_free(grow_blocks[i]);
  return kept;
}

static void *grow_thread(void *unused) {
  (void)unused;
  zk_free(zk_malloc(GROW_SIZE)); /* a heap of its own */
  bin_t *bin = &heap_current->bins[size_to_class(GROW_SIZE)];
  CHECK_EQ(bin->limit, GROW_BASE);
  uint64_t live_before = class_live(GROW_SIZE);
  for (int round = 0; round < 4; round++)
    grow_swing(GROW_SIZE, GROW_SWING);
  CHECK(bin->limit >= GROW_SWING && bin->limit <= GROW_MOST);
  CHECK_EQ(class_live(GROW_SIZE), live_before); /* the bin's blocks: free */
  uint32_t grown = bin->limit;
  grow_swing(GROW_SIZE, GROW_SWING); /* fits: nothing flushed, nothing grows */
  CHECK(bin_count(bin) >= GROW_SWING);
  CHECK_EQ(bin->limit, grown);
  /* Swings past the most a bin may hold: it stops there and flushes. */
  for (int round = 0; round < 6; round++)
    grow_swing(GROW_SIZE, 3 * GROW_MOST);
  CHECK_EQ(bin->limit, GROW_MOST);
  CHECK(bin_count(bin) <= GROW_MOST);
  zk_collect(true);
  CHECK_EQ(bin->limit, GROW_BASE);
  CHECK_EQ(bin_count(bin), 0);
  CHECK_EQ(class_live(GROW_SIZE), live_before);
  /* A free-only run after a flush: every overflow trims. */
  for (unsigned i = 0; i < 3 * GROW_MOST; i++)
    CHECK((grow_blocks[i] = zk_malloc(GROW_SIZE)) != NULL);
  zk_thread_idle();
  CHECK_EQ(bin->limit, GROW_BASE);
  for (unsigned i = 0; i < 3 * GROW_MOST; i++)
    zk_free(grow_blocks[i]);
  CHECK_EQ(bin->limit, GROW_BASE);
  zk_thread_idle();
  CHECK_EQ(bin->limit, GROW_BASE);
  /* A decay pass a whole purge delay after the last: every bin goes, and
   * a grown one shrinks back. */
  for (int round = 0; round < 4; round++)
    grow_swing(GROW_SIZE, GROW_SWING);
  CHECK(bin->limit > GROW_BASE);
  uint64_t delay = (uint64_t)zk_option_get(ZK_OPTION_PURGE_DELAY_MS);
  uint64_t now = clock_now_ms();
  heap_current->bin_decay_ms = now - 2 * delay - 1;
  heap_bins_decay(heap_current, now);
  CHECK_EQ(bin->limit, GROW_BASE);
  CHECK_EQ(bin_count(bin), 0);
  /* 128 B: 256 KiB is the cap, and another heap's blocks are kept while
   * the grown bin holds under half its base limit (256 blocks). */
  bin_t *keep_bin = &heap_current->bins[size_to_class(KEEP_SIZE)];
  for (int round = 0; round < 6; round++)
    grow_swing(KEEP_SIZE, 3 * KEEP_MOST);
  CHECK_EQ(keep_bin->limit, KEEP_MOST);
  CHECK(keep_bin->flags & BIN_REFILLED); /* no decay pass since: keeps */
  CHECK(grow_bin_keeps(KEEP_SIZE, 255, grow_foreign[0]));
  CHECK(!grow_bin_keeps(KEEP_SIZE, 256, grow_foreign[1]));
  /* A bin that does not grow, with an odd base limit: the floor is the one
   * before bins grew, (base + 1) / 2 blocks held stop the keeping. */
  bin_t *odd_bin = &heap_current->bins[size_to_class(ODD_SIZE)];
  grow_swing(ODD_SIZE, 3 * ODD_BASE);
  CHECK_EQ(odd_bin->limit, ODD_BASE);
  CHECK(odd_bin->flags & BIN_REFILLED);
  CHECK(grow_bin_keeps(ODD_SIZE, ODD_BASE / 2, grow_foreign_odd[0]));
  CHECK(!grow_bin_keeps(ODD_SIZE, ODD_BASE / 2 + 1, grow_foreign_odd[1]));
  pthread_barrier_wait(&grow_owner_done);
  /* A task heap's bin: the same swings, the same limit. */
  zk_heap_t *task = zk_heap_create(NULL);
  CHECK(task != NULL);
  CHECK(zk_heap_enter(task) == NULL);
  bin_t *task_bin = &heap_current->bins[size_to_class(GROW_SIZE)];
  CHECK(task_bin != bin);
  uint32_t task_limit = task_bin->limit;
  for (int round = 0; round < 4; round++)
    grow_swing(GROW_SIZE, GROW_SWING);
  CHECK_EQ(task_bin->limit, task_limit);
  CHECK(zk_heap_enter(NULL) == task);
  zk_heap_destroy(task);
  return NULL;
}

static void test_bins_grow(void) {
  /* No decay pass but the test's own: a pass in between (a thread stalled
   * for a quarter delay on a loaded machine) would set a bin back. */
  long delay = zk_option_get(ZK_OPTION_PURGE_DELAY_MS);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 3600 * 1000) == 0);
  pthread_t owner, thread;
  CHECK(pthread_barrier_init(&grow_owner_done, NULL, 2) == 0);
  CHECK(pthread_create(&owner, NULL, grow_owner, NULL) == 0);
  pthread_barrier_wait(&grow_owner_done); /* its blocks are out */
  CHECK(pthread_create(&thread, NULL, grow_thread, NULL) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  CHECK(pthread_join(owner, NULL) == 0);
  pthread_barrier_destroy(&grow_owner_done);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, delay) == 0);
  printf("bins grow: a 16 B bin held %d blocks, up to %d, and shrank back; "
         "128 B up to %d\n",
         GROW_SWING, GROW_MOST, KEEP_MOST);
}

/* A bin's first refill after a decay pass takes BIN_FIRST_REFILL blocks
 * from pages that hold many more; once it runs empty again, half its
 * limit. */
#define FIRST_SIZE   256
#define FIRST_BLOCKS 1000
#define FIRST_KEPT   64 /* one block in this many stays live */
static void *first_blocks[FIRST_BLOCKS];

static void *first_refill_thread(void *arg) {
  (void)arg;
  for (int i = 0; i < FIRST_BLOCKS; i++)
    CHECK((first_blocks[i] = zk_malloc(FIRST_SIZE)) != NULL);
  /* Pages with many free blocks each, kept from release by a live one. */
  for (int i = 0; i < FIRST_BLOCKS; i++)
    if (i % FIRST_KEPT != 0)
      zk_free(first_blocks[i]);
  zk_thread_idle();
  bin_t *bin = &heap_current->bins[size_to_class(FIRST_SIZE)];
  uint64_t delay = (uint64_t)zk_option_get(ZK_OPTION_PURGE_DELAY_MS);
  uint64_t now = clock_now_ms();
  heap_current->bin_decay_ms = now - 2 * delay - 1;
  heap_bins_decay(heap_current, now);
  CHECK_EQ(bin_count(bin), 0);
  CHECK((bin->flags & BIN_REFILLED) == 0);
  void *taken[BIN_FIRST_REFILL + 1];
  CHECK((taken[0] = zk_malloc(FIRST_SIZE)) != NULL);
  CHECK_EQ(bin_count(bin), BIN_FIRST_REFILL - 1);
  for (int i = 1; i < BIN_FIRST_REFILL; i++)
    CHECK((taken[i] = zk_malloc(FIRST_SIZE)) != NULL);
  CHECK_EQ(bin_count(bin), 0);
  CHECK((taken[BIN_FIRST_REFILL] = zk_malloc(FIRST_SIZE)) != NULL);
  CHECK_EQ(bin_count(bin), bin->limit / 2 - 1);
  for (int i = 0; i <= BIN_FIRST_REFILL; i++)
    zk_free(taken[i]);
  for (int i = 0; i < FIRST_BLOCKS; i += FIRST_KEPT)
    zk_free(first_blocks[i]);
  return NULL;
}

static void test_first_refill(void) {
  long delay = zk_option_get(ZK_OPTION_PURGE_DELAY_MS);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, 3600 * 1000) == 0);
  pthread_t thread;
  CHECK(pthread_create(&thread, NULL, first_refill_thread, NULL) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  CHECK(zk_option_set(ZK_OPTION_PURGE_DELAY_MS, delay) == 0);
  printf("a bin's first refill after a decay pass took %d blocks, the next "
         "half its limit\n",
         BIN_FIRST_REFILL);
}

static void test_bin_past_limit_keeps_nothing(void) {
  CHECK((over_foreign = zk_malloc(OVER_SIZE)) != NULL);
  CHECK((over_task = zk_heap_create(NULL)) != NULL);
  pthread_t freer, task;
  CHECK(pthread_create(&freer, NULL, over_remote_freer, NULL) == 0);
  CHECK(pthread_create(&task, NULL, over_task_thread, NULL) == 0);
  CHECK(pthread_join(task, NULL) == 0);
  CHECK(pthread_join(freer, NULL) == 0);
  CHECK_EQ(stats_of(over_task).live_bytes, 0);
  zk_heap_destroy(over_task);
  printf("a task bin past its limit kept no other heap's block\n");
}

int main(int argc, char **argv) {
  (void)argc;
  test_reexec_without_zkmem_environment(argv[0]);
  setvbuf(stdout, NULL, _IOLBF, 0);
  test_accounting();
  test_cross_thread();
  test_enter_across_workers();
  test_limits();
  test_destroy();
  test_arenas();
  test_arena_class_statistics();
  test_hot_classes_across_tasks();
  test_task_blocks_freed_outside();
  test_own_blocks_freed_inside();
  test_many_heaps();
  test_review_findings();
  test_bin_past_limit_keeps_nothing();
  test_bins_grow();
  test_first_refill();
  test_misuse();
  printf("test_heap: ok\n");
  return 0;
}
