/* The allocators a scenario can drive, behind one inline interface.
 *
 * Scenario loops are written once, as always_inline functions taking the
 * backend kind as a parameter, and instantiated with a constant kind for each
 * backend. The switch below therefore folds away: the malloc loop calls
 * malloc, the pool loop calls zk_pool_alloc, with no indirect call between. */
#ifndef BACKEND_H
#define BACKEND_H

#include "bench.h"
#include "seed_pool.h"

#include <stdlib.h>

#ifdef BENCH_POOL
#include <zkmem.h>
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))

struct backend {
  enum backend_kind kind;
  struct seed_pool seed;
#ifdef BENCH_POOL
  zk_pool_t *pool;
#endif
};

/* Fixed-size backends (seed, pool) serve every request with one object size,
 * the largest the scenario asks for; malloc ignores it. */
static inline void backend_open(struct backend *backend, enum backend_kind kind,
                                size_t object_size) {
  backend->kind = kind;
  switch (kind) {
  case BACKEND_MALLOC:
    break;
  case BACKEND_SEED:
    if (seed_pool_init(&backend->seed, object_size, SEED_POOL_PREALLOCATE) != 0)
      bench_fail("seed pool: out of memory");
    break;
  case BACKEND_POOL:
#ifdef BENCH_POOL
    backend->pool = zk_pool_create(object_size, NULL);
    if (backend->pool == NULL)
      bench_fail("zk_pool_create(%zu) failed", object_size);
#endif
    break;
  }
}

static inline void backend_close(struct backend *backend) {
  switch (backend->kind) {
  case BACKEND_MALLOC:
    break;
  case BACKEND_SEED:
    seed_pool_destroy(&backend->seed);
    break;
  case BACKEND_POOL:
#ifdef BENCH_POOL
    zk_pool_destroy(backend->pool);
#endif
    break;
  }
}

static ALWAYS_INLINE void *backend_alloc(struct backend *backend,
                                         enum backend_kind kind, size_t size) {
  switch (kind) {
  case BACKEND_MALLOC:
    return malloc(size);
  case BACKEND_SEED:
    return seed_pool_alloc(&backend->seed);
  case BACKEND_POOL:
#ifdef BENCH_POOL
    return zk_pool_alloc(backend->pool);
#endif
    break;
  }
  return NULL;
}

static ALWAYS_INLINE void backend_free(struct backend *backend,
                                       enum backend_kind kind, void *block) {
  switch (kind) {
  case BACKEND_MALLOC:
    free(block);
    break;
  case BACKEND_SEED:
    seed_pool_free(&backend->seed, block);
    break;
  case BACKEND_POOL:
#ifdef BENCH_POOL
    zk_pool_free(backend->pool, block);
#endif
    break;
  }
}

#endif /* BACKEND_H */
