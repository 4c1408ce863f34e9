/* fork() while other threads allocate, then allocate in the child.
 *
 * Worker threads allocate, fill, check and free blocks of mixed sizes in a
 * loop and trade blocks through a shared array, so blocks are freed by other
 * threads than their owners. Meanwhile the main thread forks repeatedly (and
 * one worker forks too). Each child frees blocks it inherited from threads
 * that do not exist in the child, allocates and frees with malloc, calloc and
 * realloc, starts a thread that does the same and frees the child's main
 * thread blocks, and exits 0. The parent checks every child's exit status; a
 * child that deadlocks in the allocator is killed by alarm() after a while.
 *
 * Meant to run with the allocator under test in LD_PRELOAD. Prints one line,
 * the same for every correct allocator. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum {
  WORKERS = 3,
  MAIN_FORKS = 16,
  WORKER_FORKS = 4,
  LOCAL_BLOCKS = 512,
  SHARED_SLOTS = 256,
  CHILD_ROUNDS = 2000,
  CHILD_SECONDS = 20,
};

/* Every block starts with this header; the rest is filled with `fill`. */
typedef struct block {
  size_t size;
  unsigned char fill;
} block_t;

static atomic_bool stop_workers;
static _Atomic(block_t *) shared_slots[SHARED_SLOTS];
static atomic_int failures;

static uint64_t next_random(uint64_t *state) {
  uint64_t x = *state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  *state = x;
  return x;
}

static size_t random_size(uint64_t *state) {
  uint64_t pick = next_random(state) % 100;
  if (pick < 70)
    return sizeof(block_t) + next_random(state) % 256;
  if (pick < 99)
    return sizeof(block_t) + next_random(state) % 16384;
  return sizeof(block_t) + next_random(state) % (512 * 1024);
}

static void fail(const char *what, const block_t *block) {
  fprintf(stderr, "fork_threads: %s (block %p, pid %d)\n", what,
          (const void *)block, (int)getpid());
  atomic_fetch_add(&failures, 1);
}

static void fill_block(block_t *block, size_t size, unsigned char fill) {
  block->size = size;
  block->fill = fill;
  memset((unsigned char *)block + sizeof(block_t), fill,
         size - sizeof(block_t));
}

static block_t *new_block(uint64_t *state) {
  size_t size = random_size(state);
  block_t *block;
  if (next_random(state) % 8 == 0) {
    block = calloc(1, size);
    if (block == NULL) {
      fail("calloc returned NULL", NULL);
      return NULL;
    }
    const unsigned char *bytes = (const unsigned char *)block;
    for (size_t i = 0; i < size; i += 61) {
      if (bytes[i] != 0) {
        fail("calloc memory not zeroed", block);
        break;
      }
    }
  } else {
    block = malloc(size);
    if (block == NULL) {
      fail("malloc returned NULL", NULL);
      return NULL;
    }
  }
  fill_block(block, size, (unsigned char)next_random(state));
  return block;
}

static void check_block(const block_t *block) {
  const unsigned char *bytes = (const unsigned char *)block;
  for (size_t i = sizeof(block_t); i < block->size; i++) {
    if (bytes[i] != block->fill) {
      fail("block contents changed", block);
      return;
    }
  }
}

static void free_block(block_t *block) {
  if (block != NULL) {
    check_block(block);
    free(block);
  }
}

/* Grows or shrinks a block with realloc; the kept prefix must survive. */
static block_t *resize_block(block_t *block, uint64_t *state) {
  size_t size = random_size(state);
  check_block(block);
  unsigned char fill = block->fill;
  size_t kept = block->size < size ? block->size : size;
  block_t *moved = realloc(block, size);
  if (moved == NULL) {
    fail("realloc returned NULL", block);
    return block;
  }
  const unsigned char *bytes = (const unsigned char *)moved;
  for (size_t i = sizeof(block_t); i < kept; i++) {
    if (bytes[i] != fill) {
      fail("realloc lost contents", moved);
      break;
    }
  }
  fill_block(moved, size, fill);
  return moved;
}

/* One round of allocation work on a private array of blocks. */
static void churn(block_t **blocks, size_t count, uint64_t *state,
                  int use_shared) {
  size_t slot = next_random(state) % count;
  uint64_t action = next_random(state) % 16;
  if (action == 0 && blocks[slot] != NULL) {
    blocks[slot] = resize_block(blocks[slot], state);
  } else if (action == 1 && use_shared && blocks[slot] != NULL) {
    /* hand the block to whichever thread takes this shared slot */
    size_t shared = next_random(state) % SHARED_SLOTS;
    free_block(atomic_exchange(&shared_slots[shared], blocks[slot]));
    blocks[slot] = NULL;
  } else {
    free_block(blocks[slot]);
    blocks[slot] = new_block(state);
  }
}

static void *child_thread(void *argument) {
  block_t **parent_blocks = argument;
  uint64_t state = 0x9e3779b97f4a7c15u ^ (uint64_t)getpid();
  block_t *blocks[64] = {0};
  for (int round = 0; round < CHILD_ROUNDS / 4; round++)
    churn(blocks, 64, &state, 0);
  for (size_t i = 0; i < 64; i++)
    free_block(blocks[i]);
  /* blocks of the child's main thread, freed from this thread */
  for (size_t i = 0; i < 64; i++)
    free_block(parent_blocks[i]);
  return NULL;
}

/* Runs in the child after fork(); returns the exit status. */
static int child_main(block_t **inherited, size_t inherited_count) {
  alarm(CHILD_SECONDS);
  /* blocks allocated by threads that do not exist in this process */
  for (size_t i = 0; i < SHARED_SLOTS; i++)
    free_block(atomic_exchange(&shared_slots[i], NULL));
  for (size_t i = 0; i < inherited_count; i++) {
    free_block(inherited[i]);
    inherited[i] = NULL;
  }
  uint64_t state = 0x2545f4914f6cdd1du ^ (uint64_t)getpid();
  block_t *blocks[256] = {0};
  for (int round = 0; round < CHILD_ROUNDS; round++)
    churn(blocks, 256, &state, 0);
  block_t *handed[64];
  for (size_t i = 0; i < 64; i++)
    handed[i] = new_block(&state);
  pthread_t thread;
  if (pthread_create(&thread, NULL, child_thread, handed) != 0) {
    fail("pthread_create in the child failed", NULL);
    return 1;
  }
  pthread_join(thread, NULL);
  for (size_t i = 0; i < 256; i++)
    free_block(blocks[i]);
  return atomic_load(&failures) == 0 ? 0 : 1;
}

/* Forks, runs child_main in the child, and checks how the child ended. */
static void fork_and_check(block_t **inherited, size_t inherited_count,
                           const char *who) {
  pid_t pid = fork();
  if (pid < 0) {
    perror("fork_threads: fork");
    atomic_fetch_add(&failures, 1);
    return;
  }
  if (pid == 0)
    exit(child_main(inherited, inherited_count));
  int status;
  if (waitpid(pid, &status, 0) != pid) {
    perror("fork_threads: waitpid");
    atomic_fetch_add(&failures, 1);
  } else if (WIFSIGNALED(status)) {
    fprintf(stderr, "fork_threads: child forked by %s killed by signal %d%s\n",
            who, WTERMSIG(status),
            WTERMSIG(status) == SIGALRM ? " (hung: deadlock after fork?)" : "");
    atomic_fetch_add(&failures, 1);
  } else if (WEXITSTATUS(status) != 0) {
    fprintf(stderr, "fork_threads: child forked by %s exited %d\n", who,
            WEXITSTATUS(status));
    atomic_fetch_add(&failures, 1);
  }
}

static void *worker(void *argument) {
  int index = (int)(intptr_t)argument;
  uint64_t state = 0x853c49e6748fea9bu + (uint64_t)index * 0x9e3779b97f4a7c15u;
  block_t *blocks[LOCAL_BLOCKS] = {0};
  int forks = 0;
  unsigned long rounds = 0;
  while (!atomic_load_explicit(&stop_workers, memory_order_relaxed) ||
         (index == 0 && forks < WORKER_FORKS)) {
    churn(blocks, LOCAL_BLOCKS, &state, 1);
    rounds++;
    if (index == 0 && forks < WORKER_FORKS && rounds % 5000 == 0) {
      fork_and_check(blocks, LOCAL_BLOCKS, "a worker");
      forks++;
    }
  }
  for (size_t i = 0; i < LOCAL_BLOCKS; i++)
    free_block(blocks[i]);
  return NULL;
}

int main(void) {
  alarm(120);
  pthread_t threads[WORKERS];
  for (int i = 0; i < WORKERS; i++) {
    if (pthread_create(&threads[i], NULL, worker, (void *)(intptr_t)i) != 0) {
      fprintf(stderr, "fork_threads: pthread_create failed\n");
      return 1;
    }
  }
  uint64_t state = 42;
  block_t *blocks[64] = {0};
  for (int i = 0; i < MAIN_FORKS; i++) {
    for (int round = 0; round < 500; round++)
      churn(blocks, 64, &state, 1);
    struct timespec pause = {0, 2 * 1000 * 1000};
    nanosleep(&pause, NULL);
    fork_and_check(blocks, 64, "the main thread");
  }
  atomic_store(&stop_workers, true);
  for (int i = 0; i < WORKERS; i++)
    pthread_join(threads[i], NULL);
  for (size_t i = 0; i < 64; i++)
    free_block(blocks[i]);
  for (size_t i = 0; i < SHARED_SLOTS; i++)
    free_block(atomic_exchange(&shared_slots[i], NULL));
  if (atomic_load(&failures) != 0) {
    fprintf(stderr, "fork_threads: %d failure(s)\n", atomic_load(&failures));
    return 1;
  }
  printf("fork_threads: %d forks from the main thread and %d from a worker, "
         "%d threads, all children exited 0\n",
         MAIN_FORKS, WORKER_FORKS, WORKERS);
  return 0;
}
