/* Every process-wide entry point at once, against workers that allocate
 * and free (small, large, huge, task heaps, a pool) and hand blocks to each
 * other (remote frees), as an attacker would time them:
 *   - first allocations of eight threads together, nothing allocated
 *     before (one thread initialises the process while the others' fast
 *     paths read its tables);
 *   - mode bit 1: zk_stats_get, zk_heap_stats, zk_pool_stats in a loop;
 *   - mode bit 2: zk_collect(true / false) in a loop;
 *   - mode bit 4: a thread that allocates, enters task heaps, then calls
 *     zk_thread_idle;
 *   - mode bit 8: task heaps created, filled, their blocks freed by other
 *     threads, destroyed once zk_heap_stats shows them empty;
 *   - mode bit 16: workers exit and are replaced (abandoned pages);
 *   - last, remote frees racing the reuse of their pages: a thread without
 *     a heap frees a batch, the owner collects, and new pages of every
 *     class take the released spans (a remote free must not touch its page
 *     after its push).
 * Every block carries a pattern checked when it is freed.
 * Usage: stress_concurrent [threads [ops [mode]]] */
#include "test_util.h"
#include "zkmem.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define LIVE_SLOTS     256
#define EXCHANGE_SLOTS 512
#define TASKS          4
#define TASK_SLOTS     128

typedef struct tagged {
  unsigned char *data;
  size_t size;
  unsigned tag;
} tagged_t;

typedef struct envelope {
  tagged_t block;
  zk_pool_t *pool; /* non-NULL: a pool object */
} envelope_t;

static _Atomic(envelope_t *) exchange[EXCHANGE_SLOTS];
static atomic_ullong corruptions;
static atomic_int stop;
static size_t ops = 20000;
static unsigned mode = 31;
static zk_pool_t *pool;
static int limited; /* ZKMEM_LIMIT set: ENOMEM tolerated */

typedef struct task {
  zk_heap_t *heap;
  pthread_mutex_t lock;
  unsigned char *blocks[TASK_SLOTS];
  size_t sizes[TASK_SLOTS];
  unsigned tags[TASK_SLOTS];
} task_t;
static task_t tasks[TASKS];

static uint64_t rnd(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static size_t random_size(uint64_t *s) {
  uint64_t r = rnd(s);
  switch (r % 32) {
  case 0:
    return 65537 + (r >> 8) % (400 * 1024); /* large */
  case 1:
    return (r >> 8) % 16 == 0 ? (2u << 20) + (r >> 16) % (2u << 20)
                              : 1 + (r >> 8) % 16384;
  default:
    return 1 + (r >> 8) % 1024;
  }
}

static void fill(unsigned char *d, size_t n, unsigned tag) {
  size_t lim = n < 64 ? n : 64;
  for (size_t i = 0; i < lim; i++)
    d[i] = test_pattern_byte(d, i, tag);
  for (size_t i = n - lim; i < n; i++)
    d[i] = test_pattern_byte(d, i, tag);
}

static void verify_free(unsigned char *d, size_t n, unsigned tag) {
  size_t lim = n < 64 ? n : 64;
  for (size_t i = 0; i < lim; i++)
    if (d[i] != test_pattern_byte(d, i, tag)) {
      atomic_fetch_add(&corruptions, 1);
      break;
    }
  zk_free(d);
}

static void envelope_receive(envelope_t *e) {
  if (e->pool != NULL)
    zk_pool_free(e->pool, e->block.data);
  else
    verify_free(e->block.data, e->block.size, e->block.tag);
  zk_free(e);
}

static void hand_off(uint64_t *s, unsigned char *d, size_t n, unsigned tag,
                     zk_pool_t *p) {
  _Atomic(envelope_t *) *entry = &exchange[rnd(s) % EXCHANGE_SLOTS];
  envelope_t *waiting = atomic_exchange(entry, NULL);
  if (waiting != NULL)
    envelope_receive(waiting);
  envelope_t *e = zk_malloc(sizeof(*e));
  if (e == NULL && limited) {
    if (p != NULL)
      zk_pool_free(p, d);
    else
      verify_free(d, n, tag);
    return;
  }
  CHECK(e != NULL);
  e->block = (tagged_t){d, n, tag};
  e->pool = p;
  envelope_t *expected = NULL;
  if (!atomic_compare_exchange_strong(entry, &expected, e))
    envelope_receive(e);
}

static void task_step(uint64_t *s) {
  task_t *t = &tasks[rnd(s) % TASKS];
  CHECK(zk_heap_enter(t->heap) == NULL);
  for (int i = 0; i < 3; i++) {
    unsigned slot = (unsigned)(rnd(s) % TASK_SLOTS);
    size_t n = 1 + rnd(s) % ((rnd(s) % 64 == 0) ? 100000 : 2048);
    unsigned tag = (unsigned)rnd(s);
    unsigned char *d = zk_malloc(n);
    if (d == NULL && limited)
      continue;
    CHECK(d != NULL);
    fill(d, n, tag);
    pthread_mutex_lock(&t->lock);
    unsigned char *old = t->blocks[slot];
    size_t old_n = t->sizes[slot];
    unsigned old_tag = t->tags[slot];
    t->blocks[slot] = d;
    t->sizes[slot] = n;
    t->tags[slot] = tag;
    pthread_mutex_unlock(&t->lock);
    if (old != NULL)
      verify_free(old, old_n, old_tag);
  }
  CHECK(zk_heap_enter(NULL) == t->heap);
}

static void *worker(void *arg) {
  uint64_t s = 0x9e3779b97f4a7c15ull * ((uintptr_t)arg + 1);
  tagged_t live[LIVE_SLOTS];
  memset(live, 0, sizeof(live));
  size_t n_ops = (mode & 16) ? ops / 4 : ops;
  for (size_t op = 0; op < n_ops; op++) {
    uint64_t r = rnd(&s);
    if (r % 16 == 0) {
      task_step(&s);
      continue;
    }
    if (r % 16 == 1) {
      void *o = zk_pool_alloc(pool);
      if (o == NULL && limited)
        continue;
      CHECK(o != NULL);
      memset(o, 0x11, 48);
      if ((r >> 8) % 2)
        hand_off(&s, o, 48, 0, pool);
      else
        zk_pool_free(pool, o);
      continue;
    }
    tagged_t *b = &live[(r >> 8) % LIVE_SLOTS];
    if (b->data != NULL) {
      if ((r >> 20) % 3 == 0)
        hand_off(&s, b->data, b->size, b->tag, NULL);
      else
        verify_free(b->data, b->size, b->tag);
      b->data = NULL;
      continue;
    }
    size_t n = random_size(&s);
    unsigned char *d;
    switch ((r >> 32) % 6) {
    case 0:
      d = zk_calloc(1, n);
      if (d == NULL && limited)
        continue;
      CHECK(d != NULL && d[0] == 0 && d[n - 1] == 0);
      break;
    case 1: {
      d = zk_malloc(n / 2 + 1);
      if (d == NULL && limited)
        continue;
      CHECK(d != NULL);
      void *moved = zk_realloc(d, n);
      if (moved == NULL && limited) {
        zk_free(d);
        continue;
      }
      d = moved;
      break;
    }
    case 2:
      d = zk_aligned_alloc((size_t)64 << ((r >> 40) % 4), n);
      break;
    default:
      d = zk_malloc(n);
    }
    if (d == NULL && limited)
      continue;
    CHECK(d != NULL);
    CHECK(zk_usable_size(d) >= n);
    b->data = d;
    b->size = n;
    b->tag = (unsigned)(r >> 8);
    fill(d, n, b->tag);
  }
  for (size_t i = 0; i < LIVE_SLOTS; i++)
    if (live[i].data != NULL)
      verify_free(live[i].data, live[i].size, live[i].tag);
  return NULL;
}

/* A worker slot: with bit 16, four short-lived threads in a row. */
static void *worker_slot(void *arg) {
  unsigned lives = (mode & 16) ? 4 : 1;
  for (unsigned i = 0; i < lives; i++) {
    pthread_t t;
    CHECK(pthread_create(&t, NULL, worker, (void *)((uintptr_t)arg * 16 + i)) ==
          0);
    pthread_join(t, NULL);
  }
  return NULL;
}

static void *stats_thread(void *arg) {
  (void)arg;
  while (!atomic_load(&stop)) {
    zk_stats_t st;
    zk_stats_get(&st);
    for (int i = 0; i < TASKS; i++) {
      zk_heap_stats_t hs;
      CHECK(zk_heap_stats(tasks[i].heap, &hs) == 0);
    }
    zk_pool_stats_t ps;
    CHECK(zk_pool_stats(pool, &ps) == 0);
  }
  return NULL;
}

static void *collect_thread(void *arg) {
  (void)arg;
  unsigned i = 0;
  while (!atomic_load(&stop)) {
    zk_collect(i++ % 2 == 0);
    sched_yield();
  }
  return NULL;
}

static void *idle_thread(void *arg) {
  uint64_t s = (uintptr_t)arg;
  while (!atomic_load(&stop)) {
    for (int i = 0; i < 64; i++) {
      size_t n = random_size(&s);
      unsigned char *d = zk_malloc(n);
      if (d == NULL && limited)
        continue;
      CHECK(d != NULL);
      fill(d, n, 7);
      if (i % 2)
        hand_off(&s, d, n, 7, NULL);
      else
        zk_free(d);
    }
    task_step(&s);
    zk_thread_idle();
  }
  return NULL;
}

/* Task heap churn following zk_heap_destroy's protocol. */
static _Atomic(envelope_t *) task_exchange[64];
static void *churn_thread(void *arg) {
  uint64_t s = (uintptr_t)arg;
  while (!atomic_load(&stop)) {
    zk_heap_t *h = zk_heap_create(&(zk_heap_options_t){.name = "churn"});
    CHECK(h != NULL);
    CHECK(zk_heap_enter(h) == NULL);
    unsigned char *mine[64];
    size_t sizes[64];
    for (int i = 0; i < 64; i++) {
      sizes[i] = 1 + rnd(&s) % ((i % 16 == 0) ? 200000 : 4096);
      mine[i] = zk_malloc(sizes[i]);
      while (mine[i] == NULL && limited)
        mine[i] = zk_malloc(sizes[i] = 64);
      CHECK(mine[i] != NULL);
      fill(mine[i], sizes[i], 3);
    }
    CHECK(zk_heap_enter(NULL) == h);
    /* Half freed here (outside the task: remote frees), half by workers. */
    for (int i = 0; i < 64; i++) {
      if (i % 2) {
        verify_free(mine[i], sizes[i], 3);
        continue;
      }
      envelope_t *e = zk_malloc(sizeof(*e));
      if (e == NULL && limited) {
        verify_free(mine[i], sizes[i], 3);
        continue;
      }
      CHECK(e != NULL);
      e->block = (tagged_t){mine[i], sizes[i], 3};
      e->pool = NULL;
      envelope_t *old = atomic_exchange(&task_exchange[i], e);
      if (old != NULL)
        envelope_receive(old);
    }
    /* Workers do not drain task_exchange: a helper below does, as
     * another thread. Wait for every free to complete. */
    for (;;) {
      zk_heap_stats_t hs;
      CHECK(zk_heap_stats(h, &hs) == 0);
      if (hs.live_bytes == 0)
        break;
      if (atomic_load(&stop)) {
        /* drain ourselves */
        for (int i = 0; i < 64; i++) {
          envelope_t *e = atomic_exchange(&task_exchange[i], NULL);
          if (e != NULL)
            envelope_receive(e);
        }
      }
      sched_yield();
    }
    zk_heap_destroy(h);
  }
  return NULL;
}

static void *drain_thread(void *arg) {
  (void)arg;
  while (!atomic_load(&stop)) {
    for (int i = 0; i < 64; i++) {
      envelope_t *e = atomic_exchange(&task_exchange[i], NULL);
      if (e != NULL)
        envelope_receive(e);
    }
    sched_yield();
  }
  return NULL;
}

/* First allocations, all at once. */
#define FIRST_THREADS 8
static pthread_barrier_t first_barrier;
static void *first_allocation(void *arg) {
  pthread_barrier_wait(&first_barrier);
  size_t size = 16 + (uintptr_t)arg * 40;
  unsigned char *d = zk_malloc(size);
  CHECK(d != NULL);
  fill(d, size, 5);
  verify_free(d, size, 5);
  return NULL;
}

static void first_allocations(void) {
  pthread_t ids[FIRST_THREADS];
  CHECK(pthread_barrier_init(&first_barrier, NULL, FIRST_THREADS) == 0);
  for (uintptr_t i = 0; i < FIRST_THREADS; i++)
    CHECK(pthread_create(&ids[i], NULL, first_allocation, (void *)i) == 0);
  for (unsigned i = 0; i < FIRST_THREADS; i++)
    pthread_join(ids[i], NULL);
  pthread_barrier_destroy(&first_barrier);
}

/* Remote frees against the reuse of their pages. Only the allocator
 * orders the two threads: the freer reports each round with a relaxed
 * store, which ThreadSanitizer does not take as synchronisation. The
 * freer links its frees of one page into a chain before pushing them; it
 * pushes its last one with zk_thread_idle, as a thread about to wait
 * should, so that the owner's collect finds every block of the round. */
#define REUSE_BATCH 256
static void *reuse_batch[REUSE_BATCH];
static atomic_uint reuse_ready, reuse_done;
static unsigned reuse_rounds = 200;

static void *reuse_freer(void *arg) {
  (void)arg;
  for (unsigned r = 1; r <= reuse_rounds; r++) {
    while (atomic_load_explicit(&reuse_ready, memory_order_acquire) != r)
      sched_yield();
    for (int i = 0; i < REUSE_BATCH; i++)
      zk_free(reuse_batch[i]); /* remote: another heap's blocks */
    zk_thread_idle();
    atomic_store_explicit(&reuse_done, r, memory_order_relaxed);
  }
  return NULL;
}

static void remote_frees_against_reuse(void) {
  atomic_store(&reuse_ready, 0);
  atomic_store(&reuse_done, 0);
  pthread_t freer;
  CHECK(pthread_create(&freer, NULL, reuse_freer, NULL) == 0);
  for (unsigned r = 1; r <= reuse_rounds; r++) {
    size_t size = 1024 + 512 * (r % 8); /* a few classes, one-slice pages */
    for (int i = 0; i < REUSE_BATCH; i++) {
      reuse_batch[i] = zk_malloc(size);
      CHECK(reuse_batch[i] != NULL || limited); /* free(NULL) is fine */
    }
    atomic_store_explicit(&reuse_ready, r, memory_order_release);
    while (atomic_load_explicit(&reuse_done, memory_order_relaxed) != r)
      sched_yield();
    zk_collect(true); /* the emptied pages go back to the span layer */
    /* New pages of every class up to 8 KiB take those spans, each
     * descriptor reset; freed again at once. */
    void *sweep[64];
    int n = 0;
    for (size_t s = 8; s <= 8192 && n < 64; s += s / 8 + 8)
      sweep[n++] = zk_malloc(s);
    for (int i = 0; i < n; i++)
      zk_free(sweep[i]);
  }
  pthread_join(freer, NULL);
}

int main(int argc, char **argv) {
  first_allocations();
  unsigned threads = argc > 1 ? (unsigned)atoi(argv[1]) : 4;
  if (argc > 2)
    ops = (size_t)atoll(argv[2]);
  if (argc > 3)
    mode = (unsigned)strtoul(argv[3], NULL, 0);
  limited = getenv("ZKMEM_LIMIT") != NULL;
  pool = zk_pool_create(48, NULL);
  CHECK(pool != NULL);
  for (int i = 0; i < TASKS; i++) {
    tasks[i].heap = zk_heap_create(&(zk_heap_options_t){.name = "task"});
    CHECK(tasks[i].heap != NULL);
    pthread_mutex_init(&tasks[i].lock, NULL);
  }
  pthread_t side[8];
  unsigned nside = 0;
  if (mode & 1)
    CHECK(pthread_create(&side[nside++], NULL, stats_thread, NULL) == 0);
  if (mode & 2)
    CHECK(pthread_create(&side[nside++], NULL, collect_thread, NULL) == 0);
  if (mode & 4)
    CHECK(pthread_create(&side[nside++], NULL, idle_thread, (void *)77) == 0);
  if (mode & 8) {
    CHECK(pthread_create(&side[nside++], NULL, churn_thread, (void *)99) == 0);
    CHECK(pthread_create(&side[nside++], NULL, drain_thread, NULL) == 0);
  }
  pthread_t ids[64];
  for (uintptr_t i = 0; i < threads && i < 64; i++)
    CHECK(pthread_create(&ids[i], NULL, worker_slot, (void *)(i + 1)) == 0);
  for (unsigned i = 0; i < threads && i < 64; i++)
    pthread_join(ids[i], NULL);
  atomic_store(&stop, 1);
  for (unsigned i = 0; i < nside; i++)
    pthread_join(side[i], NULL);
  for (size_t i = 0; i < EXCHANGE_SLOTS; i++) {
    envelope_t *e = atomic_exchange(&exchange[i], NULL);
    if (e != NULL)
      envelope_receive(e);
  }
  for (int i = 0; i < 64; i++) {
    envelope_t *e = atomic_exchange(&task_exchange[i], NULL);
    if (e != NULL)
      envelope_receive(e);
  }
  for (int i = 0; i < TASKS; i++) {
    for (int j = 0; j < TASK_SLOTS; j++)
      if (tasks[i].blocks[j] != NULL)
        verify_free(tasks[i].blocks[j], tasks[i].sizes[j], tasks[i].tags[j]);
    zk_heap_stats_t hs;
    CHECK(zk_heap_stats(tasks[i].heap, &hs) == 0);
    CHECK_EQ(hs.live_bytes, 0);
    zk_heap_destroy(tasks[i].heap);
  }
  zk_pool_destroy(pool);
  remote_frees_against_reuse();
  /* Again with secure pages: their remote frees take the checked path. */
  CHECK(zk_option_set(ZK_OPTION_SECURE, 1) == 0);
  remote_frees_against_reuse();
  CHECK_EQ(atomic_load(&corruptions), 0);
  zk_collect(true);
  zk_stats_t st;
  zk_stats_get(&st);
  printf("stress_concurrent: %u threads x %zu ops, mode %u: large_live %llu "
         "huge_live %llu, 0 corruptions\n",
         threads, ops, mode, (unsigned long long)st.large_live,
         (unsigned long long)st.huge_live);
  return 0;
}
