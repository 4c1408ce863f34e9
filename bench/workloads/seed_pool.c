#include "seed_pool.h"

#include <stdio.h>
#include <stdlib.h>

int seed_pool_init(struct seed_pool *pool, size_t object_size,
                   size_t preallocate) {
  /* Objects must hold a pointer-aligned word, like the report's slots. */
  size_t rounded = (object_size + sizeof(void *) - 1) & ~(sizeof(void *) - 1);
  *pool = (struct seed_pool){.object_size = rounded};
  pool->chunk = malloc(rounded * preallocate);
  pool->free_stack = malloc(sizeof(void *) * (preallocate ? preallocate : 1));
  if (pool->chunk == NULL || pool->free_stack == NULL) {
    free(pool->chunk);
    free(pool->free_stack);
    return -1;
  }
  pool->chunk_objects = preallocate;
  pool->free_capacity = preallocate ? preallocate : 1;
  /* Pushed in reverse so the first allocations walk the chunk upwards. */
  for (size_t index = preallocate; index > 0; index--)
    pool->free_stack[pool->free_count++] = pool->chunk + (index - 1) * rounded;
  return 0;
}

__attribute__((noinline)) void *seed_pool_alloc(struct seed_pool *pool) {
  pool->allocations++;
  if (pool->free_count > 0) {
    pool->reused++;
    return pool->free_stack[--pool->free_count];
  }
  return malloc(pool->object_size);
}

/* Growing the stack is the rare path: it only happens once more objects are
 * live than the chunk held, and then the stack doubles. */
static __attribute__((noinline)) void seed_pool_grow(struct seed_pool *pool) {
  size_t capacity = pool->free_capacity * 2;
  void **stack = realloc(pool->free_stack, sizeof(void *) * capacity);
  if (stack == NULL) {
    fprintf(stderr, "seed_pool: out of memory growing the free stack\n");
    abort();
  }
  pool->free_stack = stack;
  pool->free_capacity = capacity;
}

__attribute__((noinline)) void seed_pool_free(struct seed_pool *pool,
                                              void *object) {
  if (pool->free_count == pool->free_capacity)
    seed_pool_grow(pool);
  pool->free_stack[pool->free_count++] = object;
}

void seed_pool_destroy(struct seed_pool *pool) {
  uintptr_t chunk_start = (uintptr_t)pool->chunk;
  uintptr_t chunk_bytes = pool->chunk_objects * pool->object_size;
  for (size_t index = 0; index < pool->free_count; index++) {
    void *object = pool->free_stack[index];
    if ((uintptr_t)object - chunk_start >= chunk_bytes)
      free(object);
  }
  free(pool->chunk);
  free(pool->free_stack);
  *pool = (struct seed_pool){0};
}
