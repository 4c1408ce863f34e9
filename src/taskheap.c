/* Task heaps: memory per task or request, limits that fail one task, and
 * free-all, usable from any thread.
 *
 * A task heap (zk_heap_t) owns one sub-heap per thread that allocates from
 * it: an ordinary heap_t whose `task` names it. A thread that enters the
 * task heap makes that sub-heap current, so its plain malloc and free run
 * the usual fast paths on the sub-heap's bins and pages; zk_heap_malloc
 * allocates from the calling thread's sub-heap without entering. A block
 * freed anywhere else goes back as any remote free does, to its page.
 *
 * Accounting costs the fast paths nothing. A task heap is charged for the
 * bytes of its blocks that are live or wait in a sub-heap's bin: a block is
 * charged when a bin takes it from its page (a refill, a whole remote
 * list), when it is carved from an arena (16 KiB charged ahead at a time,
 * heap.c) and when a large block is made; uncharged when a bin gives it
 * back, when another thread frees it (last, after its push), and when a
 * large block is freed. Live bytes are the charge less what the sub-heaps'
 * bins and advance charges hold, exact once the threads are quiet. Limits
 * are checked where a charge grows; a refused malloc first gives this
 * thread's bins and charge back, then asks on_limit, and fails with ENOMEM.
 *
 * zk_heap_destroy releases every page, arena and large block of every
 * sub-heap, in time proportional to pages. A sub-heap whose thread still
 * lives keeps one reset arena and goes back to that thread through its
 * stack of dead sub-heaps; the thread keeps it as a spare for the next
 * task heap it runs, and recycles spares beyond its quota and at exit.
 *
 * Locks: tasks_lock guards the list of live task heaps, their large blocks
 * and the life of sub-heaps (destroy, orphaning at thread exit); it is
 * outermost, taken before the heap and segment locks, and never held
 * around user code (on_limit runs with no lock held). A task heap's list
 * of sub-heaps only grows while it lives (CAS pushes) and is read without
 * the lock by the threads that look for their own. */
#include "internal.h"
#include "os.h"
#include "sizeclass.h"

#include <errno.h>
#include <string.h>

#define TASK_HEAP_MAGIC UINT64_C(0x7a6b686561702121) /* "zkheap!!" */

struct zk_heap {
  uint64_t magic; /* TASK_HEAP_MAGIC while alive */
  char name[48];
  size_t limit;
  zk_heap_t *parent;
  bool (*on_limit)(zk_heap_t *heap, size_t size, void *arg);
  void *on_limit_arg;
  /* Hot: every charge of this heap or a child's. */
  _Atomic uint64_t charged __attribute__((aligned(64)));
  _Atomic uint64_t peak;
  _Atomic uint64_t remote_frees;
  _Atomic uint64_t limit_refusals;
  _Atomic int children;             /* task heaps with this one as parent */
  zk_heap_t *next_live, *prev_live; /* all live task heaps (tasks_lock) */
  /* Written under tasks_lock; read without it by the task's threads
   * looking for their own sub-heap (task_subheap). */
  heap_t *_Atomic subheaps;
  page_t *large; /* large and huge blocks, by next/prev (tasks_lock) */
  uint64_t large_allocations, large_frees; /* tasks_lock */
};

/* Guards every task heap's lists and the life of sub-heaps (orphaned at
 * thread exit, released at destroy): one lock, so that a thread exiting
 * while another destroys the task heap agree on who recycles a sub-heap,
 * and so that fork can hold it. Taken before the pool, heap and segment
 * locks; never around user code. */
static pthread_mutex_t tasks_lock = PTHREAD_MUTEX_INITIALIZER;
static zk_heap_t *tasks_live; /* tasks_lock */

/* Destroyed heaps wait here before their memory is reused, so that a
 * second destroy (or any call) through a stale handle is reported rather
 * than acting on a newer heap at the same address, until this many more
 * heaps have been destroyed. tasks_lock. */
#define TASK_QUARANTINE 256
static zk_heap_t *task_quarantine[TASK_QUARANTINE];
static unsigned task_quarantine_next;
/* Out of quarantine, kept for the next creates (by next_live; tasks_lock):
 * a short task's create and destroy then take tasks_lock once each and the
 * metadata lock not at all (two lock round trips in four, a fifth of a
 * 100-block task's fixed cost). At most TASK_STRUCTS_KEPT: the rest go back
 * to the metadata allocator. */
#define TASK_STRUCTS_KEPT 64
static zk_heap_t *task_structs_kept;
static unsigned task_structs_kept_count;

/* A heap struct no handle may reach any more onto the kept list (tasks_lock
 * held); false when the list is full and the caller frees it. */
static bool task_struct_keep(zk_heap_t *heap) {
  if (task_structs_kept_count >= TASK_STRUCTS_KEPT)
    return false;
  heap->next_live = task_structs_kept; /* zeroed again on its reuse */
  task_structs_kept = heap;
  task_structs_kept_count++;
  return true;
}

/* Lists of sub-heaps that other threads push onto (a task heap's, a
 * thread's dead ones) are walked with a bound: no such list holds more
 * heaps than were ever made, and a longer one is corrupted. The next one,
 * or NULL (reported) past the bound. */
static ZK_COLD void task_list_corrupted(const heap_t *sub) {
  error_report("corrupted list of task sub-heaps", sub, sizeof(heap_t));
}

static heap_t *subheap_next(const heap_t *sub, size_t *left) {
  if (unlikely(*left == 0)) {
    task_list_corrupted(sub);
    return NULL;
  }
  --*left;
  return sub->task_next;
}

#define FOR_EACH_SUBHEAP(task, sub)                                            \
  for (size_t left_ = heap_count_made(); left_ != 0; left_ = 0)                \
    for (heap_t *sub = (task)->subheaps; sub != NULL;                          \
         sub = subheap_next(sub, &left_))

/* The heap an over-limit charge stopped at (this heap or a parent). */
static __thread zk_heap_t *task_refused_by;

/* A fork child: only the forking thread can be in a task heap now, and
 * the other threads' sub-heaps may be torn (heap.c, heap_drop_caches):
 * their bins and large caches are dropped without waiting. */
void task_fork_child(heap_t *self_home) {
  pthread_mutex_lock(&tasks_lock);
  for (zk_heap_t *heap = tasks_live; heap != NULL; heap = heap->next_live) {
    FOR_EACH_SUBHEAP(heap, sub) {
      if (sub->home == self_home)
        continue; /* the forking thread's: it keeps its flag */
      atomic_store_explicit(&sub->entered, false, memory_order_relaxed);
      sub->home = NULL;
      heap_drop_caches(sub);
    }
  }
  pthread_mutex_unlock(&tasks_lock);
}

void task_collect_orphans(void) {
  if (pthread_mutex_trylock(&tasks_lock) != 0)
    return; /* the thread holds it (releasing pages), or another does */
  for (zk_heap_t *heap = tasks_live; heap != NULL; heap = heap->next_live)
    FOR_EACH_SUBHEAP(heap, sub)
  if (sub->home == NULL)
    heap_collect_orphan(sub);
  pthread_mutex_unlock(&tasks_lock);
}

void task_lock_all(void) {
  pthread_mutex_lock(&tasks_lock);
}

void task_unlock_all(void) {
  pthread_mutex_unlock(&tasks_lock);
}

static bool task_is_live(const zk_heap_t *heap) {
  return heap != NULL &&
         __atomic_load_n(&heap->magic, __ATOMIC_ACQUIRE) == TASK_HEAP_MAGIC;
}

/* A pointer that is not a live task heap: reported, or NULL + EINVAL. */
static ZK_COLD void task_invalid(const zk_heap_t *heap, const char *call) {
  char what[96];
  snprintf(what, sizeof(what), "%s of a destroyed task heap or not one", call);
  error_report(what, heap, 0);
  errno = EINVAL;
}

/* ---- charges ---- */

static void task_peak_raise(zk_heap_t *heap, uint64_t charged) {
  uint64_t peak = atomic_load_explicit(&heap->peak, memory_order_relaxed);
  while (charged > peak && !atomic_compare_exchange_weak_explicit(
                               &heap->peak, &peak, charged,
                               memory_order_relaxed, memory_order_relaxed))
    ;
}

bool task_charge(zk_heap_t *task, size_t bytes) {
  for (zk_heap_t *heap = task; heap != NULL; heap = heap->parent) {
    uint64_t charged =
        atomic_fetch_add_explicit(&heap->charged, bytes, memory_order_relaxed) +
        bytes;
    if (heap->limit != 0 && charged > heap->limit) {
      task_refused_by = heap;
      /* Undo this level and the ones below it. */
      for (zk_heap_t *undo = task;; undo = undo->parent) {
        atomic_fetch_sub_explicit(&undo->charged, bytes, memory_order_relaxed);
        if (undo == heap)
          break;
      }
      return false;
    }
    task_peak_raise(heap, charged);
  }
  return true;
}

void task_uncharge(zk_heap_t *task, size_t bytes) {
  for (zk_heap_t *heap = task; heap != NULL; heap = heap->parent)
    atomic_fetch_sub_explicit(&heap->charged, bytes, memory_order_relaxed);
}

/* The last step of another thread's free: release, so that a charge read
 * with acquire (zk_heap_stats) that no longer holds the block also sees
 * the free done with its page. */
void task_remote_free(zk_heap_t *task, size_t bytes) {
  atomic_fetch_add_explicit(&task->remote_frees, 1, memory_order_relaxed);
  for (zk_heap_t *heap = task; heap != NULL; heap = heap->parent)
    atomic_fetch_sub_explicit(&heap->charged, bytes, memory_order_release);
}

/* ---- large and huge blocks ---- */

bool task_large_add(zk_heap_t *task, page_t *page) {
  if (!task_charge(task, page->large_size))
    return false;
  page->task = task;
  pthread_mutex_lock(&tasks_lock);
  page_list_push(&task->large, page);
  task->large_allocations++;
  pthread_mutex_unlock(&tasks_lock);
  return true;
}

void task_large_remove(page_t *page) {
  zk_heap_t *task = page->task;
  pthread_mutex_lock(&tasks_lock);
  page_list_unlink(&task->large, page);
  task->large_frees++;
  pthread_mutex_unlock(&tasks_lock);
  page->task = NULL;
  task_uncharge(task, page->large_size);
}

/* ---- sub-heaps ---- */

/* A thread's sub-heaps: its home's list, doubly linked (owner only). */
static void home_link(heap_t *home, heap_t *sub) {
  sub->subheap_prev = NULL;
  sub->subheap_next = home->subheaps;
  if (home->subheaps != NULL)
    home->subheaps->subheap_prev = sub;
  home->subheaps = sub;
}

static void home_unlink(heap_t *home, heap_t *sub) {
  if (sub->subheap_prev != NULL)
    sub->subheap_prev->subheap_next = sub->subheap_next;
  else
    home->subheaps = sub->subheap_next;
  if (sub->subheap_next != NULL)
    sub->subheap_next->subheap_prev = sub->subheap_prev;
  sub->subheap_next = sub->subheap_prev = NULL;
}

/* A thread keeps up to this many sub-heaps of destroyed task heaps for the
 * task heaps it runs next, the first few with the arena their destroy kept,
 * reset: a short task then costs no sub-heap set-up and no span. (With 16
 * spares the tasks benchmark still made sub-heaps; with an arena on every
 * spare its peak RSS grew by a sixth.) */
#define TASK_SPARE_SUBHEAPS       64
#define TASK_SPARE_SUBHEAPS_ARENA 8

static __thread heap_t *task_last_subheap; /* the last one found */

/* A sub-heap this thread gives up (recycled: another thread may get it):
 * not in the cache any more. */
static void task_forget(heap_t *sub) {
  if (task_last_subheap == sub)
    task_last_subheap = NULL;
}

static void task_spare_push(heap_t **stack, heap_t *sub) {
  sub->subheap_next = *stack;
  *stack = sub;
}

/* Sub-heaps of task heaps destroyed by other threads (task_push_dead)
 * leave this thread's list for its spares: the first
 * TASK_SPARE_SUBHEAPS_ARENA with the arena their destroy kept, on a stack
 * of their own that the next task heaps take from first (on one stack, a
 * burst of task heaps buried those under bare ones for good). */
static void task_take_dead(heap_t *home) {
  heap_t *dead = atomic_exchange_explicit(&home->dead_subheaps, NULL,
                                          memory_order_acquire);
  for (size_t left = heap_count_made(); dead != NULL; left--) {
    if (unlikely(left == 0)) {
      task_list_corrupted(dead);
      return;
    }
    heap_t *next = dead->dead_next;
    home_unlink(home, dead);
    if (home->spare_arena_count < TASK_SPARE_SUBHEAPS_ARENA) {
      task_spare_push(&home->spare_subheaps, dead);
      home->spare_arena_count++;
      home->spare_count++;
    } else if (home->spare_count < TASK_SPARE_SUBHEAPS) {
      heap_release_arenas(dead);
      task_spare_push(&home->spare_subheaps_bare, dead);
      home->spare_count++;
    } else {
      task_forget(dead);
      heap_recycle(dead);
    }
    dead = next;
  }
}

static heap_t *task_spare_pop(heap_t *home) {
  heap_t **stack = home->spare_subheaps != NULL ? &home->spare_subheaps
                                                : &home->spare_subheaps_bare;
  heap_t *sub = *stack;
  if (sub == NULL)
    return NULL;
  *stack = sub->subheap_next;
  home->spare_count--;
  if (stack == &home->spare_subheaps)
    home->spare_arena_count--;
  return sub;
}

/* An idle thread's spares give their arenas back. */
static void task_spares_strip(heap_t *home) {
  heap_t *spare;
  while ((spare = home->spare_subheaps) != NULL) {
    home->spare_subheaps = spare->subheap_next;
    heap_release_arenas(spare);
    task_spare_push(&home->spare_subheaps_bare, spare);
  }
  home->spare_arena_count = 0;
}

/* Destroy (tasks_lock held): a released sub-heap whose thread lives goes
 * back to that thread, which alone touches its list. */
static void task_push_dead(heap_t *sub) {
  heap_t *home = sub->home;
  heap_t *head =
      atomic_load_explicit(&home->dead_subheaps, memory_order_relaxed);
  do
    sub->dead_next = head;
  while (!atomic_compare_exchange_weak_explicit(&home->dead_subheaps, &head,
                                                sub, memory_order_release,
                                                memory_order_relaxed));
}

/* The calling thread's sub-heap for `task`: found in the task's list (as
 * long as threads that ran the task), else a spare or a new one. */

/* The last sub-heap this thread found, when it serves `task` for `home`'s
 * thread; else NULL. */
ZK_INLINE heap_t *task_last_subheap_of(const zk_heap_t *task,
                                       const heap_t *home) {
  heap_t *last = task_last_subheap;
  if (last != NULL &&
      atomic_load_explicit(&last->task, memory_order_relaxed) == task &&
      __atomic_load_n(&last->home, __ATOMIC_RELAXED) == home)
    return last;
  return NULL;
}

static heap_t *task_subheap(zk_heap_t *task, heap_t *home) {
  if (home == NULL)
    return NULL;
  /* A runtime enters the same few heaps over and over. A sub-heap serves
   * one task heap at a time, and only its own thread: checked, the last
   * one found is the answer when it serves `task` for this thread. */
  heap_t *last = task_last_subheap_of(task, home);
  if (last != NULL)
    return last;
  FOR_EACH_SUBHEAP(task, sub)
  if (__atomic_load_n(&sub->home, __ATOMIC_RELAXED) == home)
    return task_last_subheap = sub;
  task_take_dead(home);
  heap_t *sub = task_spare_pop(home);
  if (sub == NULL) {
    sub = heap_create();
    if (sub == NULL)
      return NULL;
    sub->home = home;
  }
  home_link(home, sub);
  heap_adopt_task(sub, task);
  task_last_subheap = sub;
  /* Pushed without the lock: while the task heap lives its list only
   * grows at the front, so readers (here, and statistics under the lock)
   * follow links that never change. */
  heap_t *head = atomic_load_explicit(&task->subheaps, memory_order_relaxed);
  do
    sub->task_next = head;
  while (!atomic_compare_exchange_weak_explicit(
      &task->subheaps, &head, sub, memory_order_release, memory_order_relaxed));
  return sub;
}

void task_thread_exit(heap_t *home, heap_t *current) {
  if (current != NULL && current != home)
    atomic_store_explicit(&current->entered, false, memory_order_relaxed);
  task_last_subheap = NULL; /* its sub-heaps go to other threads */
  pthread_mutex_lock(&tasks_lock);
  task_take_dead(home);
  heap_t *spare;
  while ((spare = task_spare_pop(home)) != NULL)
    heap_recycle(spare);
  heap_t *sub = home->subheaps;
  home->subheaps = NULL;
  while (sub != NULL) {
    heap_t *next = sub->subheap_next;
    /* Orphaned: its pages with live blocks stay with it (other threads
     * free into them, uncharging as they go) until the task heap is
     * destroyed; empty ones go back now. */
    pool_heap_exit(sub);
    heap_collect(sub, true);
    __atomic_store_n(&sub->home, NULL, __ATOMIC_RELAXED);
    sub->subheap_next = sub->subheap_prev = NULL;
    sub = next;
  }
  pthread_mutex_unlock(&tasks_lock);
}

/* ---- allocation ---- */

/* A malloc of a sub-heap refused by a limit: this thread's bins of the
 * sub-heap go back to their pages (their blocks are charged) and the
 * malloc is retried; then the refusing heap's on_limit (this heap or a
 * parent) may make room, with no lock held, for one more retry. The guard
 * covers the retries only: a callback's own allocations see limits as
 * usual. */
static __thread int task_retrying;

static void *task_retry(heap_t *heap, size_t size, size_t alignment) {
  task_retrying = 1;
  void *p = heap_malloc_generic(heap, size, alignment);
  task_retrying = 0;
  return p;
}

void *task_limit_reached(heap_t *heap, size_t size, size_t alignment) {
  if (task_retrying)
    return NULL; /* the retry's own refusal: handled by the caller */
  zk_heap_t *task = heap->task;
  /* Every sub-heap of this thread gives its cached blocks back: a sibling
   * heap's are charged to a parent whose limit may be the one in the way. */
  zk_thread_idle();
  void *p = task_retry(heap, size, alignment);
  if (p != NULL)
    return p;
  zk_heap_t *refusing = task_refused_by != NULL ? task_refused_by : task;
  task_refused_by = NULL;
  bool retry = refusing->on_limit != NULL &&
               refusing->on_limit(refusing, size, refusing->on_limit_arg);
  /* The callback may have destroyed the heap (its sub-heaps then have no
   * task): nothing to allocate from, nothing to count. */
  if (atomic_load_explicit(&heap->task, memory_order_acquire) != task) {
    errno = ENOMEM;
    return NULL;
  }
  if (retry && (p = task_retry(heap, size, alignment)) != NULL)
    return p;
  /* Counted where the allocation was refused and where the limit is. */
  atomic_fetch_add_explicit(&task->limit_refusals, 1, memory_order_relaxed);
  if (refusing != task)
    atomic_fetch_add_explicit(&refusing->limit_refusals, 1,
                              memory_order_relaxed);
  errno = ENOMEM;
  return NULL;
}

static void *task_alloc(heap_t *sub, size_t size, size_t alignment) {
  if (alignment <= 16 && size <= SMALL_MAX) {
    bin_t *bin = heap_bin_at(sub, bin_offset_of_small(size));
    if (bin->head != NULL)
      return bin_pop(sub, bin);
    return heap_malloc_bin_empty(sub, bin, size);
  }
  return heap_malloc_generic(sub, size, alignment);
}

ZK_EXPORT zk_heap_t *zk_heap_create(const zk_heap_options_t *options) {
  zk_heap_options_t defaults = {0};
  if (options == NULL)
    options = &defaults;
  if (options->parent != NULL && !task_is_live(options->parent)) {
    task_invalid(options->parent, "zk_heap_create with a parent");
    return NULL;
  }
  process_init();
  pthread_mutex_lock(&tasks_lock);
  zk_heap_t *heap = task_structs_kept;
  if (heap != NULL) {
    task_structs_kept = heap->next_live;
    task_structs_kept_count--;
    memset(heap, 0, sizeof(*heap));
  } else {
    pthread_mutex_unlock(&tasks_lock);
    heap = os_meta_alloc(sizeof(zk_heap_t)); /* zeroed */
    if (heap == NULL) {
      errno = ENOMEM;
      return NULL;
    }
    pthread_mutex_lock(&tasks_lock);
  }
  /* Filled under the lock: a statistics walk of tasks_live reads them. */
  if (options->name != NULL)
    strncpy(heap->name, options->name, sizeof(heap->name) - 1);
  else
    memcpy(heap->name, "heap", sizeof("heap"));
  heap->limit = options->limit_bytes;
  heap->parent = options->parent;
  heap->on_limit = options->on_limit;
  heap->on_limit_arg = options->on_limit_arg;
  if (heap->parent != NULL) {
    /* Checked again where a destroy of the parent cannot come between the
     * check and the count it refuses on. */
    if (!task_is_live(heap->parent)) {
      bool kept = task_struct_keep(heap);
      pthread_mutex_unlock(&tasks_lock);
      if (!kept)
        os_meta_free(heap, sizeof(zk_heap_t));
      task_invalid(options->parent, "zk_heap_create with a parent");
      return NULL;
    }
    atomic_fetch_add_explicit(&heap->parent->children, 1, memory_order_relaxed);
  }
  heap->next_live = tasks_live;
  if (tasks_live != NULL)
    tasks_live->prev_live = heap;
  tasks_live = heap;
  pthread_mutex_unlock(&tasks_lock);
  __atomic_store_n(&heap->magic, TASK_HEAP_MAGIC, __ATOMIC_RELEASE);
  return heap;
}

ZK_EXPORT void *zk_heap_malloc(zk_heap_t *heap, size_t size) {
  if (heap == NULL)
    return zk_malloc(size);
  if (unlikely(!task_is_live(heap))) {
    task_invalid(heap, "zk_heap_malloc");
    return NULL;
  }
  heap_t *sub = task_subheap(heap, heap_home());
  if (sub == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  void *p = task_alloc(sub, size, 0);
  track_malloc(p, size, 0);
  return p;
}

ZK_EXPORT void *zk_heap_calloc(zk_heap_t *heap, size_t count, size_t size) {
  size_t total;
  if (unlikely(__builtin_mul_overflow(count, size, &total))) {
    errno = ENOMEM;
    return NULL;
  }
  if (heap == NULL)
    return zk_calloc(count, size);
  void *p = zk_heap_malloc(heap, total);
  bool zero = p != NULL && large_block_is_zero(p);
  if (p != NULL && !zero)
    track_quietly(memset(p, 0, total));
  return p;
}

ZK_EXPORT void *zk_heap_aligned_alloc(zk_heap_t *heap, size_t alignment,
                                      size_t size) {
  if (heap == NULL)
    return zk_aligned_alloc(alignment, size);
  if (unlikely(alignment == 0 || (alignment & (alignment - 1)) != 0)) {
    errno = EINVAL;
    return NULL;
  }
  if (unlikely(!task_is_live(heap))) {
    task_invalid(heap, "zk_heap_aligned_alloc");
    return NULL;
  }
  if (alignment <= 16)
    return zk_heap_malloc(heap, size < alignment ? alignment : size);
  if (unlikely(size > PTRDIFF_MAX)) {
    errno = ENOMEM;
    return NULL;
  }
  heap_t *sub = task_subheap(heap, heap_home());
  if (sub == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  void *p = task_alloc(sub, size, alignment);
  track_malloc(p, size, 0);
  return p;
}

ZK_EXPORT void *zk_heap_realloc(zk_heap_t *heap, void *p, size_t size) {
  if (heap != NULL && unlikely(!task_is_live(heap))) {
    task_invalid(heap, "zk_heap_realloc");
    return NULL;
  }
  return alloc_realloc(heap, p, size);
}

/* ---- entering, statistics, destroy ---- */

/* A runtime calls this twice a poll (a Tokio task in Heap::scope, four
 * times a request): the thread's heap is read here rather than through
 * heap_get_initialized and heap_home, two calls and a third of the
 * instructions. */
ZK_EXPORT zk_heap_t *zk_heap_enter(zk_heap_t *heap) {
  heap_t *current = heap_current;
  if (unlikely(current == &heap_empty) &&
      (current = heap_get_initialized()) == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  zk_heap_t *previous = current->task;
  if (heap == previous)
    return previous;
  heap_t *home = current->home != NULL ? current->home : current;
  heap_t *next;
  if (heap == NULL) {
    next = home;
  } else {
    if (unlikely(!task_is_live(heap))) {
      task_invalid(heap, "zk_heap_enter");
      return previous;
    }
    /* task_subheap's first check, without the call: a runtime enters the
     * heap it entered last on this thread again and again. */
    next = task_last_subheap_of(heap, home);
    if (next == NULL)
      next = task_subheap(heap, home);
    if (next == NULL) { /* no memory for a sub-heap: stay */
      errno = ENOMEM;
      return previous;
    }
    atomic_store_explicit(&next->entered, true, memory_order_relaxed);
  }
  if (previous != NULL)
    atomic_store_explicit(&current->entered, false, memory_order_relaxed);
  heap_current = next;
  return previous;
}

/* Blocks a sub-heap handed out and took back: a bin's pops are what it
 * took from pages, plus the frees pushed onto it, less what it gave back
 * and what it holds. Read while the owner runs: exact when it is quiet. */
ZK_STATS_READER static void subheap_counts(const heap_t *sub,
                                           uint64_t *allocations,
                                           uint64_t *frees,
                                           uint64_t *held_bytes) {
  *allocations += STATS_LOAD(sub->bin_taken) - STATS_LOAD(sub->bin_returned);
  heap_bin_counts(sub, allocations, frees, held_bytes);
  /* Charged ahead of use: not live either. */
  *held_bytes += STATS_LOAD(sub->task_credit);
  *allocations += STATS_LOAD(sub->secure_allocs);
  *frees += STATS_LOAD(sub->secure_frees);
}

ZK_EXPORT int zk_heap_stats(const zk_heap_t *heap, zk_heap_stats_t *out) {
  if (heap == NULL || out == NULL || !task_is_live(heap)) {
    errno = EINVAL;
    return -1;
  }
  zk_heap_t *task = (zk_heap_t *)heap;
  memset(out, 0, sizeof(*out));
  uint64_t allocations = 0, frees = 0, held = 0;
  pthread_mutex_lock(&tasks_lock);
  FOR_EACH_SUBHEAP(task, sub)
  subheap_counts(sub, &allocations, &frees, &held);
  /* A parent is charged for its children's blocks, the cached free ones
   * included: those are not live either. */
  /* A parent's descendants: the live heaps are walked only for a heap
   * with children (a request's heap asks for its figures in O(threads)). */
  bool has_children =
      atomic_load_explicit(&task->children, memory_order_relaxed) != 0;
  for (zk_heap_t *other = has_children ? tasks_live : NULL; other != NULL;
       other = other->next_live) {
    bool descendant = false;
    for (zk_heap_t *up = other->parent; up != NULL && !descendant;
         up = up->parent)
      descendant = up == task;
    if (!descendant)
      continue;
    uint64_t ignored_allocations = 0, ignored_frees = 0;
    FOR_EACH_SUBHEAP(other, sub)
    subheap_counts(sub, &ignored_allocations, &ignored_frees, &held);
  }
  allocations += task->large_allocations;
  frees += task->large_frees;
  /* Under the lock, as the bins were read: a flush of another thread's
   * bins (zk_thread_idle, thread exit) takes it, so charge and cached
   * blocks are of one moment, and a live count of 0 cannot come from a
   * flush seen half. */
  uint64_t charged = atomic_load_explicit(&task->charged, memory_order_acquire);
  pthread_mutex_unlock(&tasks_lock);
  frees += atomic_load_explicit(&task->remote_frees, memory_order_relaxed);
  out->name = task->name;
  out->live_bytes = charged > held ? charged - held : 0;
  out->peak_bytes = atomic_load_explicit(&task->peak, memory_order_relaxed);
  out->limit_bytes = task->limit;
  out->allocations = allocations;
  out->frees = frees;
  out->limit_refusals =
      atomic_load_explicit(&task->limit_refusals, memory_order_relaxed);
  return 0;
}

ZK_EXPORT void zk_heap_destroy(zk_heap_t *heap) {
  if (heap == NULL) {
    error_report("zk_heap_destroy of the default heap", NULL, 0);
    return;
  }
  if (unlikely(!task_is_live(heap))) {
    task_invalid(heap, "zk_heap_destroy");
    return;
  }
  /* The checks and the end of the heap's life in one critical section: two
   * destroys of one heap at once find it live only once. */
  pthread_mutex_lock(&tasks_lock);
  const char *refusal = NULL;
  if (!task_is_live(heap))
    refusal = "zk_heap_destroy of a destroyed task heap or not one";
  else if (atomic_load_explicit(&heap->children, memory_order_relaxed) != 0)
    refusal = "zk_heap_destroy of a task heap with child heaps";
  FOR_EACH_SUBHEAP(heap, sub)
  if (refusal == NULL &&
      atomic_load_explicit(&sub->entered, memory_order_relaxed))
    refusal = "zk_heap_destroy of a task heap entered on a thread";
  if (refusal != NULL) {
    pthread_mutex_unlock(&tasks_lock);
    error_report(refusal, heap, 0);
    return;
  }
  __atomic_store_n(&heap->magic, 0, __ATOMIC_RELEASE);
  if (heap->prev_live != NULL)
    heap->prev_live->next_live = heap->next_live;
  else
    tasks_live = heap->next_live;
  if (heap->next_live != NULL)
    heap->next_live->prev_live = heap->prev_live;
  heap_t *sub = heap->subheaps;
  heap->subheaps = NULL;
  page_t *large = heap->large;
  heap->large = NULL;
  for (size_t left = heap_count_made(); sub != NULL;) {
    heap_t *next = subheap_next(sub, &left);
    /* A sub-heap in a living thread's list is reused or recycled by that
     * thread; an orphan now. */
    bool orphan = sub->home == NULL;
    heap_release_all(sub, !orphan);
    atomic_store_explicit(&sub->task, NULL, memory_order_release);
    if (orphan)
      heap_recycle(sub);
    else
      task_push_dead(sub);
    sub = next;
  }
  /* Read before the heap joins the quarantine, whose oldest entries other
   * destroys free. */
  zk_heap_t *parent = heap->parent;
  uint64_t charged = atomic_load_explicit(&heap->charged, memory_order_relaxed);
  zk_heap_t *oldest = task_quarantine[task_quarantine_next];
  task_quarantine[task_quarantine_next] = heap;
  task_quarantine_next = (task_quarantine_next + 1) % TASK_QUARANTINE;
  if (oldest != NULL && task_struct_keep(oldest))
    oldest = NULL;
  pthread_mutex_unlock(&tasks_lock);
  while (large != NULL) {
    page_t *next = large->next;
    large->next = large->prev = NULL;
    large->task = NULL;
    large_free(&heap_empty, large);
    large = next;
  }
  if (parent != NULL) {
    task_uncharge(parent, charged);
    atomic_fetch_sub_explicit(&parent->children, 1, memory_order_relaxed);
  }
  if (oldest != NULL)
    os_meta_free(oldest, sizeof(zk_heap_t));
}

ZK_EXPORT void zk_thread_idle(void) {
  heap_t *current = heap_current;
  if (current == &heap_empty)
    return;
  heap_t *home = current->home != NULL ? current->home : current;
  /* Under the lock: another thread may be destroying one of the task
   * heaps, and releasing the same sub-heap. */
  pthread_mutex_lock(&tasks_lock);
  task_take_dead(home);
  for (heap_t *sub = home->subheaps; sub != NULL; sub = sub->subheap_next)
    heap_flush_bins(sub);
  /* Spares keep the arena their destroy kept: an idle thread returns it. */
  task_spares_strip(home);
  pthread_mutex_unlock(&tasks_lock);
  heap_collect(home, false);
  purge_maybe();
}
