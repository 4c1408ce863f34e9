/* The exported malloc family: thin forwarders to zk_*, plus glibc's
 * internal names and harmless versions of its tuning calls, so that no
 * allocation in the process reaches glibc's allocator. Works from the first
 * call: nothing here needs a constructor or dlsym. */
#include "alloc_fast.h"
#include "os.h"

#include <errno.h>
#include <limits.h>
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Each starts a cache line: their hot paths (about 120 bytes each) then
 * take two lines wherever other code moves them (side by side, a build
 * whose free started 16 bytes into a line ran the fixed and reuse
 * scenarios 4% slower, with the same instructions). */
ZK_EXPORT __attribute__((aligned(64))) void *malloc(size_t size) {
  return alloc_malloc(size);
}
ZK_EXPORT __attribute__((aligned(64))) void free(void *p) {
  alloc_free(p);
}
ZK_EXPORT void *calloc(size_t count, size_t size) {
  return zk_calloc(count, size);
}
ZK_EXPORT void *realloc(void *p, size_t size) {
  return zk_realloc(p, size);
}
ZK_EXPORT void *reallocarray(void *p, size_t count, size_t size) {
  size_t total;
  if (__builtin_mul_overflow(count, size, &total)) {
    errno = ENOMEM;
    return NULL;
  }
  return zk_realloc(p, total);
}
ZK_EXPORT void *aligned_alloc(size_t alignment, size_t size) {
  return zk_aligned_alloc(alignment, size);
}
ZK_EXPORT void *memalign(size_t alignment, size_t size) {
  /* glibc rounds a non-power-of-two alignment up instead of failing; above
   * SIZE_MAX / 2 + 1 no power of two is left to round up to. */
  if (alignment > SIZE_MAX / 2 + 1) {
    errno = EINVAL;
    return NULL;
  }
  if (alignment != 0 && (alignment & (alignment - 1)) != 0)
    alignment = (size_t)1 << (64 - __builtin_clzll(alignment));
  return zk_aligned_alloc(alignment ? alignment : 1, size);
}
ZK_EXPORT int posix_memalign(void **out, size_t alignment, size_t size) {
  return zk_posix_memalign(out, alignment, size);
}
ZK_EXPORT void *valloc(size_t size) {
  return zk_aligned_alloc((size_t)sysconf(_SC_PAGESIZE), size);
}
ZK_EXPORT void *pvalloc(size_t size) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t rounded = (size + page - 1) & ~(page - 1);
  if (rounded < size) {
    errno = ENOMEM;
    return NULL;
  }
  return zk_aligned_alloc(page, rounded ? rounded : page);
}
ZK_EXPORT size_t malloc_usable_size(void *p) {
  return zk_usable_size(p);
}
ZK_EXPORT void cfree(void *p) {
  zk_free(p);
}

/* C23's sized frees (glibc 2.43): programs built against a newer libc call
 * them, and glibc's own would be handed zkmem's blocks. zk_free_sized
 * (alloc.c) checks the size in secure mode only. */
ZK_EXPORT void free_sized(void *p, size_t size) {
  zk_free_sized(p, size);
}
ZK_EXPORT void free_aligned_sized(void *p, size_t alignment, size_t size) {
  if (unlikely(option(ZK_OPTION_SECURE) != 0) && p != NULL) {
    if (alloc_sized_free_misuse("free_aligned_sized with a size larger than "
                                "the block",
                                p, size))
      return;
    if (alignment != 0 && (alignment & (alignment - 1)) == 0 &&
        ((uintptr_t)p & (alignment - 1)) != 0) {
      error_report("free_aligned_sized with an alignment the block lacks", p,
                   0);
      return;
    }
  }
  alloc_free(p);
}

/* glibc's internal entry points, used by some libraries directly. */
ZK_EXPORT void *__libc_malloc(size_t size) {
  return zk_malloc(size);
}
ZK_EXPORT void __libc_free(void *p) {
  zk_free(p);
}
ZK_EXPORT void *__libc_calloc(size_t count, size_t size) {
  return zk_calloc(count, size);
}
ZK_EXPORT void *__libc_realloc(void *p, size_t size) {
  return zk_realloc(p, size);
}
ZK_EXPORT void *__libc_memalign(size_t alignment, size_t size) {
  return memalign(alignment, size);
}
ZK_EXPORT void *__libc_valloc(size_t size) {
  return valloc(size);
}
ZK_EXPORT void *__libc_pvalloc(size_t size) {
  return pvalloc(size);
}
ZK_EXPORT void *__libc_reallocarray(void *p, size_t count, size_t size) {
  return reallocarray(p, count, size);
}

/* Tuning calls: accepted and answered from zkmem's own state. */
ZK_EXPORT int malloc_trim(size_t pad) {
  (void)pad;
  zk_collect(true);
  return 1;
}
ZK_EXPORT int mallopt(int parameter, int value) {
  (void)parameter;
  (void)value;
  return 1;
}
ZK_EXPORT int __libc_mallopt(int parameter, int value) {
  return mallopt(parameter, value);
}

/* glibc's meanings: arena is the space not mapped for single blocks, hblkhd
 * the space that is, so that tools adding the two count nothing twice. */
static size_t stats_arena(const zk_stats_t *stats) {
  return stats->bytes_mapped > stats->bytes_mapped_huge
             ? stats->bytes_mapped - stats->bytes_mapped_huge
             : 0;
}
ZK_EXPORT struct mallinfo2 mallinfo2(void) {
  zk_stats_t stats;
  zk_stats_get(&stats);
  struct mallinfo2 info;
  memset(&info, 0, sizeof(info));
  info.arena = stats_arena(&stats);
  info.hblks = stats.huge_segments_mapped;
  info.hblkhd = stats.bytes_mapped_huge;
  info.uordblks = stats.bytes_live;
  info.fordblks = stats.bytes_committed > stats.bytes_live
                      ? stats.bytes_committed - stats.bytes_live
                      : 0;
  return info;
}
/* The int fields of the old interface stop at INT_MAX: a wrapped figure
 * reads as little or negative memory. */
static int mallinfo_saturate(size_t value) {
  return value > INT_MAX ? INT_MAX : (int)value;
}
/* Shared by mallinfo and __libc_mallinfo: glibc's header marks mallinfo
 * deprecated, so calling it would warn. */
static struct mallinfo mallinfo_narrow(void) {
  struct mallinfo2 wide = mallinfo2();
  struct mallinfo info;
  memset(&info, 0, sizeof(info));
  info.arena = mallinfo_saturate(wide.arena);
  info.hblks = mallinfo_saturate(wide.hblks);
  info.hblkhd = mallinfo_saturate(wide.hblkhd);
  info.uordblks = mallinfo_saturate(wide.uordblks);
  info.fordblks = mallinfo_saturate(wide.fordblks);
  return info;
}
ZK_EXPORT struct mallinfo mallinfo(void) {
  return mallinfo_narrow();
}
ZK_EXPORT struct mallinfo __libc_mallinfo(void) {
  return mallinfo_narrow();
}

/* glibc's XML shape with zkmem's figures. glibc's <size> elements are free
 * chunks in its bins, which zkmem does not have, so <sizes> stays empty and
 * the size classes get elements of their own. Totals keep glibc's split:
 * "mmap" is the huge blocks' mappings, "current"/"total" the rest, as in
 * mallinfo2. The statistics are read whole before the first fprintf, which
 * may allocate the stream's buffer. */
ZK_EXPORT int malloc_info(int options, FILE *stream) {
  if (options != 0) {
    errno = EINVAL;
    return -1;
  }
  zk_stats_t stats;
  zk_stats_get(&stats);
  size_t arena = stats_arena(&stats);
  unsigned long long live_blocks = stats.large_live + stats.huge_live;
  for (size_t c = 0; c < stats.class_count; c++)
    live_blocks += stats.classes[c].live;

  fputs("<malloc version=\"1\">\n<heap nr=\"0\">\n<sizes>\n</sizes>\n"
        "<classes>\n",
        stream);
  for (size_t c = 0; c < stats.class_count; c++) {
    const zk_class_stats_t *cls = &stats.classes[c];
    if (cls->allocations == 0 && cls->pages == 0)
      continue;
    fprintf(stream,
            "  <class size=\"%zu\" live=\"%llu\" allocations=\"%llu\" "
            "frees=\"%llu\" pages=\"%llu\"/>\n",
            cls->block_size, (unsigned long long)cls->live,
            (unsigned long long)cls->allocations,
            (unsigned long long)cls->frees, (unsigned long long)cls->pages);
  }
  fprintf(stream,
          "  <large live=\"%llu\" allocations=\"%llu\"/>\n"
          "  <huge live=\"%llu\" allocations=\"%llu\"/>\n"
          "</classes>\n"
          "<total type=\"live\" count=\"%llu\" size=\"%zu\"/>\n"
          "<system type=\"current\" size=\"%zu\"/>\n"
          "<aspace type=\"total\" size=\"%zu\"/>\n"
          "</heap>\n"
          "<total type=\"live\" count=\"%llu\" size=\"%zu\"/>\n"
          "<total type=\"mmap\" count=\"%zu\" size=\"%zu\"/>\n"
          "<system type=\"current\" size=\"%zu\"/>\n"
          "<system type=\"committed\" size=\"%zu\"/>\n"
          "<aspace type=\"total\" size=\"%zu\"/>\n"
          "</malloc>\n",
          (unsigned long long)stats.large_live,
          (unsigned long long)stats.large_allocations,
          (unsigned long long)stats.huge_live,
          (unsigned long long)stats.huge_allocations, live_blocks,
          stats.bytes_live, arena, arena, live_blocks, stats.bytes_live,
          stats.huge_segments_mapped, stats.bytes_mapped_huge, arena,
          stats.bytes_committed, arena);
  return 0;
}
ZK_EXPORT void malloc_stats(void) {
  zk_stats_print(stderr);
}

/* Initialised at load, before the program's first call: process_init also
 * registers the fork handlers (heap.c), in every build. */
__attribute__((constructor)) static void override_init(void) {
  process_init();
}
