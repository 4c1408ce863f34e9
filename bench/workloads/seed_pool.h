/* The seed report's object pool, rebuilt as a reference point: one chunk of
 * `preallocate` objects carved up front, a stack of free pointers, allocation
 * pops, free pushes and never releases, and a fresh object from malloc when the
 * stack is empty. Single-threaded and fixed-size, as in the report.
 *
 * The report inlined its fast path; here alloc and free stay behind real calls
 * (noinline) so the comparison with zk_pool_alloc/zk_pool_free, which are
 * library calls, is call against call. */
#ifndef SEED_POOL_H
#define SEED_POOL_H

#include <stddef.h>
#include <stdint.h>

/* The report preallocates 10,000 objects per pool. */
#define SEED_POOL_PREALLOCATE 10000

struct seed_pool {
  size_t object_size;
  char *chunk; /* the preallocated objects, contiguous */
  size_t chunk_objects;
  void **free_stack;
  size_t free_count;
  size_t free_capacity;
  uint64_t allocations;
  uint64_t reused; /* allocations served from the free stack */
};

/* Returns 0, or -1 when the base allocator fails. */
int seed_pool_init(struct seed_pool *pool, size_t object_size,
                   size_t preallocate);
void *seed_pool_alloc(struct seed_pool *pool);
void seed_pool_free(struct seed_pool *pool, void *object);
/* Releases the chunk, the stack and every object allocated after the chunk
 * that is back on the stack; objects still live are leaked, as in the report.
 */
void seed_pool_destroy(struct seed_pool *pool);

#endif /* SEED_POOL_H */
