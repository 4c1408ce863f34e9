/* Decay: free memory goes back to the OS once it has stayed free for the
 * purge delay. There is no background thread: slow paths (a fresh page, a
 * large block, thread exit) call purge_maybe, which does real work at most
 * once per quarter of the delay, and zk_collect does it on demand. */
#include "internal.h"

#include <time.h>

static _Atomic uint64_t last_purge_ms;

uint64_t clock_now_ms(void) {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  return (uint64_t)now.tv_sec * 1000u + (uint64_t)now.tv_nsec / 1000000u;
}

void purge_maybe(void) {
  heap_t *heap = heap_current;
  if (heap->bin_decaying)
    return; /* pages freed by a decay pass: purged once it is done */
  uint64_t now = clock_now_ms();
  heap_bins_decay(heap, now); /* may free pages for this purge */
  uint64_t last = atomic_load_explicit(&last_purge_ms, memory_order_relaxed);
  uint64_t interval = (uint64_t)option(ZK_OPTION_PURGE_DELAY_MS) / 4;
  if (now - last < interval)
    return;
  /* One thread purges; the others go on allocating. */
  if (!atomic_compare_exchange_strong(&last_purge_ms, &last, now))
    return;
  heap_reclaim_abandoned();
  task_collect_orphans();
  segment_purge(now, false);
}

ZK_EXPORT void zk_collect(bool force) {
  heap_collect(heap_current, force);
  heap_reclaim_abandoned();
  task_collect_orphans();
  uint64_t now = clock_now_ms();
  atomic_store_explicit(&last_purge_ms, now, memory_order_relaxed);
  segment_purge(now, force);
}
