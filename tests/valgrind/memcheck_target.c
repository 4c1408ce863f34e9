/* Run under valgrind's memcheck with a ZKMEM_VALGRIND build of zkmem
 * preloaded (run_memcheck.py):
 *   memcheck_target clean   uses every entry point correctly: no error,
 *                           nothing lost
 *   memcheck_target misuse  one of each mistake memcheck must report */
#include <zkmem.h>

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct node {
  struct node *next;
  uint64_t value;
};

static void node_construct(void *object, void *arg) {
  (void)arg;
  memset(object, 0, sizeof(struct node));
}

static void *free_from_other_thread(void *block) {
  free(block);
  return NULL;
}

static int run_clean(void) {
  uint64_t sum = 0;
  /* Every block kind: small, large (64 KiB-2 MiB), huge. */
  for (size_t size = 1; size < (8u << 20); size = size * 3 + 1) {
    unsigned char *p = malloc(size);
    memset(p, 7, size);
    p = realloc(p, size * 2);
    sum += p[size - 1];
    memset(p + size, 1, size);
    unsigned char *zeroed = calloc(1, size);
    sum += zeroed[size - 1];
    free(zeroed);
    free(p);
  }
  void *aligned = aligned_alloc(4096, 10000);
  memset(aligned, 1, 10000);
  free(aligned);
  void *memaligned = NULL;
  if (posix_memalign(&memaligned, 64, 300) != 0)
    return 1;
  memset(memaligned, 2, 300);
  free(memaligned);

  /* A block freed by another thread. */
  pthread_t thread;
  void *shared = malloc(200);
  memset(shared, 3, 200);
  pthread_create(&thread, NULL, free_from_other_thread, shared);
  pthread_join(thread, NULL);

  /* Pools: a constructed object's fields read after reuse are defined;
   * objects left live at destroy are not the program's leaks. */
  zk_pool_options_t options = {.constructor = node_construct};
  zk_pool_t *pool = zk_pool_create(sizeof(struct node), &options);
  struct node *first = zk_pool_alloc(pool);
  sum += first->value;
  first->value = 5;
  zk_pool_free(pool, first);
  struct node *again = zk_pool_alloc(pool);
  sum += again->value;
  zk_pool_alloc(pool); /* live at destroy */
  zk_pool_destroy(pool);

  printf("clean: %llu\n", (unsigned long long)sum);
  return 0;
}

static __attribute__((noinline)) void *leak_100_bytes(void) {
  void *leaked = malloc(100);
  memset(leaked, 0, 100);
  return leaked;
}

static int run_misuse(void) {
  volatile uintptr_t hidden = (uintptr_t)leak_100_bytes() ^ 0x5555;
  (void)hidden; /* no pointer to the block remains: definitely lost */

  char *freed = malloc(64);
  memset(freed, 1, 64);
  free(freed);
  volatile char after_free = freed[10]; /* Invalid read of size 1 */
  (void)after_free;

  char *small = malloc(24);
  memset(small, 0, 24);
  ((volatile char *)small)[24] = 1; /* Invalid write of size 1 */
  free(small);

  int *fresh = malloc(sizeof(int) * 4);
  if (fresh[2] == 42) /* depends on uninitialised value */
    puts("forty-two");
  free(fresh);
  printf("misuse: done\n");
  return 0;
}

int main(int argc, char **argv) {
  if (argc == 2 && strcmp(argv[1], "clean") == 0)
    return run_clean();
  if (argc == 2 && strcmp(argv[1], "misuse") == 0)
    return run_misuse();
  fprintf(stderr, "usage: %s clean|misuse\n", argv[0]);
  return 2;
}
