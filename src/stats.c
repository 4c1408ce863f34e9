/* Statistics: counters kept per thread (heaps, pages, magazines) and merged
 * on read, so counting costs the fast paths nothing beyond the page
 * bookkeeping they already do. */
#include "internal.h"
#include "os.h"
#include "sizeclass.h"

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

size_t stats_rss(size_t *peak) {
  int saved_errno = errno;
  size_t rss = 0;
  char text[128];
  int fd = open("/proc/self/statm", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ssize_t length = read(fd, text, sizeof(text) - 1);
    close(fd);
    if (length > 0) {
      text[length] = '\0';
      char *field = strchr(text, ' ');
      if (field != NULL)
        rss = (size_t)strtoull(field + 1, NULL, 10) * OS_PAGE_SIZE;
    }
  }
  if (peak != NULL) {
    struct rusage usage;
    *peak = getrusage(RUSAGE_SELF, &usage) == 0
                ? (size_t)usage.ru_maxrss * 1024u
                : 0;
  }
  errno = saved_errno;
  return rss;
}

ZK_EXPORT void zk_stats_get(zk_stats_t *out) {
  memset(out, 0, sizeof(*out));
  process_init();
  out->class_count = CLASS_COUNT;
  heap_collect_stats(out);
  /* Read while other threads allocate, the sums are a moment's estimate:
   * a page that moves between queues while they are walked, or blocks
   * that move from a page to a bin between two reads, can make the frees
   * read outnumber the allocations. They never read below zero. */
  for (unsigned c = 0; c < CLASS_COUNT; c++) {
    zk_class_stats_t *cls = &out->classes[c];
    cls->block_size = class_block_size[c];
    if ((int64_t)(cls->allocations - cls->frees) < 0) /* modulo 2^64 */
      cls->allocations = cls->frees;
    cls->live = cls->allocations - cls->frees;
  }
  segment_collect_stats(out);
  large_collect_stats(out);
  if ((ptrdiff_t)out->bytes_live < 0)
    out->bytes_live = 0;
  out->rss = stats_rss(&out->peak_rss);
  out->fragmentation = out->bytes_live != 0
                           ? (double)out->bytes_committed / out->bytes_live
                           : 0.0;
}

ZK_EXPORT void zk_stats_print(FILE *out) {
  zk_stats_t stats;
  zk_stats_get(&stats);
  fprintf(out, "zkmem statistics\n");
  fprintf(out, "%10s %14s %14s %12s %8s\n", "class", "allocations", "frees",
          "live", "pages");
  for (size_t c = 0; c < stats.class_count; c++) {
    const zk_class_stats_t *cls = &stats.classes[c];
    if (cls->allocations == 0 && cls->pages == 0)
      continue;
    fprintf(out, "%10zu %14llu %14llu %12llu %8llu\n", cls->block_size,
            (unsigned long long)cls->allocations,
            (unsigned long long)cls->frees, (unsigned long long)cls->live,
            (unsigned long long)cls->pages);
  }
  fprintf(out, "large: %llu allocations, %llu live; huge: %llu, %llu live\n",
          (unsigned long long)stats.large_allocations,
          (unsigned long long)stats.large_live,
          (unsigned long long)stats.huge_allocations,
          (unsigned long long)stats.huge_live);
  fprintf(out,
          "live %zu B, committed %zu B, purged %zu B (total), huge-page "
          "backed %zu B\n",
          stats.bytes_live, stats.bytes_committed, stats.bytes_purged,
          stats.bytes_huge_pages);
  fprintf(out,
          "segments %zu (%zu B mapped), rss %zu B, peak rss %zu B, "
          "fragmentation %.3f\n",
          stats.segments_mapped, stats.bytes_mapped, stats.rss, stats.peak_rss,
          stats.fragmentation);
}

ZK_EXPORT void zk_stats_json(FILE *out) {
  zk_stats_t stats;
  zk_stats_get(&stats);
  fprintf(out, "{\"classes\":[");
  bool first = true;
  for (size_t c = 0; c < stats.class_count; c++) {
    const zk_class_stats_t *cls = &stats.classes[c];
    if (cls->allocations == 0 && cls->pages == 0)
      continue;
    fprintf(out,
            "%s{\"block_size\":%zu,\"allocations\":%llu,\"frees\":%llu,"
            "\"live\":%llu,\"pages\":%llu}",
            first ? "" : ",", cls->block_size,
            (unsigned long long)cls->allocations,
            (unsigned long long)cls->frees, (unsigned long long)cls->live,
            (unsigned long long)cls->pages);
    first = false;
  }
  fprintf(out,
          "],\"large_allocations\":%llu,\"large_live\":%llu,"
          "\"huge_allocations\":%llu,\"huge_live\":%llu,\"bytes_live\":%zu,"
          "\"bytes_committed\":%zu,\"bytes_purged\":%zu,"
          "\"bytes_huge_pages\":%zu,\"segments_mapped\":%zu,"
          "\"bytes_mapped\":%zu,\"rss\":%zu,\"peak_rss\":%zu,"
          "\"fragmentation\":%.4f}\n",
          (unsigned long long)stats.large_allocations,
          (unsigned long long)stats.large_live,
          (unsigned long long)stats.huge_allocations,
          (unsigned long long)stats.huge_live, stats.bytes_live,
          stats.bytes_committed, stats.bytes_purged, stats.bytes_huge_pages,
          stats.segments_mapped, stats.bytes_mapped, stats.rss, stats.peak_rss,
          stats.fragmentation);
}

__attribute__((destructor)) static void stats_show_at_exit(void) {
  if (option(ZK_OPTION_SHOW_STATS))
    zk_stats_print(stderr);
}
