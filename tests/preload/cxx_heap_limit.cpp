// A task heap's limit seen from C++: `new` in an entered heap throws
// std::bad_alloc at the limit, and only there; containers grown in the heap
// are counted in it and give everything back when they go. Linked with
// libzkmem.so, so operator new's malloc is zkmem's.
#include "zkmem.h"

#include <cstdio>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#define CHECK(condition)                                                       \
  do {                                                                         \
    if (!(condition)) {                                                        \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__,  \
                   #condition);                                                \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

static size_t live(zk_heap_t *heap) {
  zk_heap_stats_t stats;
  CHECK(zk_heap_stats(heap, &stats) == 0);
  return stats.live_bytes;
}

int main() {
  zk_heap_options_t options = {};
  options.name = "request";
  options.limit_bytes = 4 << 20;
  zk_heap_t *heap = zk_heap_create(&options);
  CHECK(heap != nullptr);
  zk_heap_t *previous = zk_heap_enter(heap);
  bool threw = false;
  {
    std::vector<std::string> words;
    for (int i = 0; i < 1000; i++)
      words.push_back(std::string(100, 'a' + i % 26));
    CHECK(live(heap) > 100 * 1000);
    try {
      char *volatile big = new char[8 << 20]; // over the limit
      big[0] = 1; // (and the pair cannot be elided)
      delete[] big;
    } catch (const std::bad_alloc &) {
      threw = true;
    }
    std::vector<int> more(1000, 7); // still fine under the limit
    CHECK(more[999] == 7);
  }
  zk_thread_idle();
  CHECK(live(heap) == 0); // the containers are gone
  zk_heap_enter(previous);
  CHECK(threw);
  char *volatile outside = new char[8 << 20]; // no limit outside the heap
  outside[0] = 1;
  delete[] outside;
  zk_heap_stats_t stats;
  CHECK(zk_heap_stats(heap, &stats) == 0);
  CHECK(stats.limit_refusals >= 1);
  zk_heap_destroy(heap);
  std::printf("new threw std::bad_alloc at the heap's limit (%llu refusal), "
              "and not outside it\n",
              static_cast<unsigned long long>(stats.limit_refusals));
  return 0;
}
