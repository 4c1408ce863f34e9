/* The exported malloc family: thin forwarders to zk_*, plus glibc's
 * internal names and harmless versions of its tuning calls, so that no
 * allocation in the process reaches glibc's allocator. Works from the first
 * call: nothing here needs a constructor or dlsym. */
#include "alloc_fast.h"
#include "os.h"

#include <errno.h>
#include <malloc.h>
#include <string.h>
#include <unistd.h>

ZK_EXPORT void *malloc(size_t size) {
  return alloc_malloc(size);
}
ZK_EXPORT void free(void *p) {
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
  /* glibc rounds a non-power-of-two alignment up instead of failing. */
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
static void mallinfo_fill(size_t *arena, size_t *in_use, size_t *free_bytes,
                          size_t *mapped) {
  zk_stats_t stats;
  zk_stats_get(&stats);
  *arena = stats.bytes_mapped;
  *in_use = stats.bytes_live;
  *free_bytes = stats.bytes_committed > stats.bytes_live
                    ? stats.bytes_committed - stats.bytes_live
                    : 0;
  *mapped = stats.bytes_mapped;
}
ZK_EXPORT struct mallinfo2 mallinfo2(void) {
  struct mallinfo2 info;
  memset(&info, 0, sizeof(info));
  mallinfo_fill(&info.arena, &info.uordblks, &info.fordblks, &info.hblkhd);
  return info;
}
ZK_EXPORT struct mallinfo mallinfo(void) {
  struct mallinfo2 wide = mallinfo2();
  struct mallinfo info;
  memset(&info, 0, sizeof(info));
  info.arena = (int)wide.arena;
  info.uordblks = (int)wide.uordblks;
  info.fordblks = (int)wide.fordblks;
  info.hblkhd = (int)wide.hblkhd;
  return info;
}
ZK_EXPORT void malloc_stats(void) {
  zk_stats_print(stderr);
}

/* Initialised at load, before the program's first call: process_init also
 * registers the fork handlers (heap.c), in every build. */
__attribute__((constructor)) static void override_init(void) {
  process_init();
}
