/* Linked with a libzkmem.a that overrides malloc: plain malloc/free calls,
 * and glibc's own allocations (stdio), land in zkmem. */
#include "test_util.h"
#include "zkmem.h"

#include <stdlib.h>
#include <string.h>

int main(void) {
  zk_stats_t before;
  zk_stats_get(&before);
  void *blocks[1000];
  for (int i = 0; i < 1000; i++) {
    blocks[i] = malloc(100);
    CHECK(blocks[i] != NULL);
    memset(blocks[i], i, 100);
  }
  zk_stats_t during;
  zk_stats_get(&during);
  uint64_t allocated = 0;
  for (size_t c = 0; c < during.class_count; c++)
    allocated += during.classes[c].allocations - before.classes[c].allocations;
  CHECK(allocated >= 1000);
  CHECK(zk_usable_size(blocks[0]) >= 100); /* zkmem's block */
  for (int i = 0; i < 1000; i++)
    free(blocks[i]);
  char *text = strdup("through malloc"); /* libc allocating for us */
  CHECK(zk_usable_size(text) >= 15);
  free(text);
  printf("static_override: ok\n");
  return 0;
}
