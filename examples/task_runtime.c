/* A small task runtime on task heaps: worker threads take tasks from a
 * shared queue, each task runs in several polls (yielding back to the
 * queue between them, so it moves between workers), and every task has a
 * heap of its own, entered while it runs. Whatever a task allocates with
 * plain malloc is counted in its heap, wherever it runs; a task that
 * outgrows its limit sees NULL and fails alone; a finished task's heap is
 * destroyed with whatever the task left live.
 *
 * Linked with libzkmem.so, so malloc is zkmem's.
 *
 * Usage: task_runtime [workers] [tasks] */
#include "zkmem.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define POLLS 8

typedef struct task {
  int id;
  int polls_done;
  zk_heap_t *heap;
  char **kept; /* buffers the task keeps across polls */
  int kept_count;
  size_t peak_seen;
  int workers_seen_mask;
  bool failed;
  struct task *next;
} task_t;

static pthread_mutex_t queue_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t queue_ready = PTHREAD_COND_INITIALIZER;
static task_t *queue_head, *queue_tail;
static int tasks_left;

static void queue_push(task_t *task) {
  pthread_mutex_lock(&queue_lock);
  task->next = NULL;
  if (queue_tail != NULL)
    queue_tail->next = task;
  else
    queue_head = task;
  queue_tail = task;
  pthread_cond_signal(&queue_ready);
  pthread_mutex_unlock(&queue_lock);
}

static task_t *queue_pop(void) {
  pthread_mutex_lock(&queue_lock);
  while (queue_head == NULL && tasks_left > 0)
    pthread_cond_wait(&queue_ready, &queue_lock);
  task_t *task = queue_head;
  if (task != NULL) {
    queue_head = task->next;
    if (queue_head == NULL)
      queue_tail = NULL;
  }
  pthread_mutex_unlock(&queue_lock);
  return task;
}

/* One poll: a burst of temporary work, and a buffer kept for later polls.
 * Task 3 asks for more than its limit and must fail alone. */
static void poll_task(task_t *task) {
  size_t scale = task->id % 4 == 3 ? 4 << 20 : 16 << 10;
  char *scratch[32];
  for (int i = 0; i < 32; i++) {
    scratch[i] = malloc(64 + (size_t)(i * 131 + task->id) % 2048);
    if (scratch[i] != NULL)
      memset(scratch[i], task->id, 64);
  }
  char *keep = malloc(scale + (size_t)task->polls_done * 1024);
  if (keep == NULL) {
    task->failed = true; /* over the limit: this task only */
  } else {
    snprintf(keep, 64, "task %d poll %d", task->id, task->polls_done);
    char **grown =
        realloc(task->kept, sizeof(char *) * (size_t)(task->kept_count + 1));
    if (grown != NULL) {
      task->kept = grown;
      task->kept[task->kept_count++] = keep;
    } else {
      free(keep);
      task->failed = true;
    }
  }
  for (int i = 0; i < 32; i++)
    free(scratch[i]);
  zk_heap_stats_t stats;
  if (zk_heap_stats(task->heap, &stats) == 0 &&
      stats.live_bytes > task->peak_seen)
    task->peak_seen = stats.live_bytes;
}

static void *worker(void *arg) {
  int me = (int)(intptr_t)arg;
  task_t *task;
  while ((task = queue_pop()) != NULL) {
    task->workers_seen_mask |= 1 << me;
    zk_heap_t *previous = zk_heap_enter(task->heap);
    poll_task(task);
    zk_heap_enter(previous);
    if (++task->polls_done < POLLS && !task->failed) {
      queue_push(task); /* yield: another worker may take it */
      continue;
    }
    zk_heap_stats_t stats;
    zk_heap_stats(task->heap, &stats);
    int workers = __builtin_popcount((unsigned)task->workers_seen_mask);
    printf("task %3d: %s after %d polls on %d worker%s, peak %zu KiB (charged "
           "%zu KiB), %zu KiB live at the end, %llu allocations, %llu over "
           "the limit\n",
           task->id, task->failed ? "failed" : "done", task->polls_done,
           workers, workers == 1 ? "" : "s", task->peak_seen >> 10,
           stats.peak_bytes >> 10, stats.live_bytes >> 10,
           (unsigned long long)stats.allocations,
           (unsigned long long)stats.limit_refusals);
    zk_heap_destroy(task->heap); /* frees the kept buffers at once */
    pthread_mutex_lock(&queue_lock);
    if (--tasks_left == 0)
      pthread_cond_broadcast(&queue_ready);
    pthread_mutex_unlock(&queue_lock);
  }
  zk_thread_idle();
  return NULL;
}

int main(int argc, char **argv) {
  int workers = argc > 1 ? atoi(argv[1]) : 4;
  int count = argc > 2 ? atoi(argv[2]) : 16;
  if (workers < 1 || workers > 31 || count < 1) {
    fprintf(stderr, "usage: task_runtime [workers 1-31] [tasks]\n");
    return 2;
  }
  static task_t tasks[4096];
  if (count > 4096)
    count = 4096;
  tasks_left = count;
  for (int i = 0; i < count; i++) {
    tasks[i].id = i;
    tasks[i].heap = zk_heap_create(
        &(zk_heap_options_t){.name = "task", .limit_bytes = (size_t)8 << 20});
    if (tasks[i].heap == NULL) {
      perror("zk_heap_create");
      return 1;
    }
    queue_push(&tasks[i]);
  }
  pthread_t threads[31];
  for (intptr_t w = 0; w < workers; w++)
    pthread_create(&threads[w], NULL, worker, (void *)w);
  for (int w = 0; w < workers; w++)
    pthread_join(threads[w], NULL);
  int failed = 0;
  for (int i = 0; i < count; i++)
    failed += tasks[i].failed;
  printf("%d tasks on %d workers: %d failed at their limit\n", count, workers,
         failed);
  return 0;
}
