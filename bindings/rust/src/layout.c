/* zkmem.h's structures as the C compiler lays them out: the crate's test
 * compares its declarations (src/ffi.rs) with these, so a field added to
 * the header cannot go unnoticed. Nothing else refers to this table, so a
 * program's link leaves it out. */
#include "zkmem.h"

#include <stddef.h>

const size_t zkmem_rust_layout[] = {
    sizeof(zk_pool_options_t),
    offsetof(zk_pool_options_t, constructor_arg),
    sizeof(zk_pool_stats_t),
    offsetof(zk_pool_stats_t, fragmentation),
    sizeof(zk_heap_options_t),
    offsetof(zk_heap_options_t, on_limit_arg),
    sizeof(zk_heap_stats_t),
    offsetof(zk_heap_stats_t, name),
    sizeof(zk_stats_t),
    offsetof(zk_stats_t, large_allocations),
    offsetof(zk_stats_t, fragmentation),
    offsetof(zk_stats_t, bytes_mapped_huge),
};
