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
#include <stdlib.h>
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
  alloc_free_sized(p, size, "free_sized with a size larger than the block");
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

/* ---- C++'s operators new and delete ----
 *
 * The C++ runtime's own call malloc and free through the PLT, a second call
 * on every new and delete of a C++ program: here they are zkmem's fast
 * paths themselves, as every peer allocator exports them. The deletes are
 * free under other names (the sized ones, free_sized: the size is checked
 * in secure mode); the news add what the language asks of a failure
 * (cxx_new_failed). size_t is unsigned long in these names (m), so only
 * where it is. */
#if __SIZEOF_SIZE_T__ == 8 && __SIZEOF_LONG__ == 8

typedef void (*cxx_new_handler_t)(void);
/* The C++ runtime's, resolved when the program has one (weak: a C program
 * has none and never calls these operators). */
extern cxx_new_handler_t _ZSt15get_new_handlerv(void) __attribute__((weak));
extern void _ZSt17__throw_bad_allocv(void) __attribute__((weak, noreturn));

/* What the standard asks of a failed new: call the new-handler and try
 * again while there is one, then throw std::bad_alloc (nothrow forms:
 * return NULL). The handler is the program's code, called with no lock of
 * zkmem's held; an exception it throws passes through these frames (built
 * with unwind tables, see CMakeLists.txt), also out of a nothrow new, where
 * the C++ runtime's own new would catch it. */
static ZK_COLD void *cxx_new_failed(size_t size, size_t alignment,
                                    bool nothrow) {
  for (;;) {
    cxx_new_handler_t handler =
        _ZSt15get_new_handlerv != NULL ? _ZSt15get_new_handlerv() : NULL;
    if (handler == NULL)
      break;
    handler();
    void *p =
        alignment != 0 ? zk_aligned_alloc(alignment, size) : alloc_malloc(size);
    if (p != NULL)
      return p;
  }
  if (nothrow)
    return NULL;
  if (_ZSt17__throw_bad_allocv != NULL)
    _ZSt17__throw_bad_allocv();
  error_warning("zkmem: error: operator new of %zu bytes failed, and no "
                "libstdc++ is loaded to throw std::bad_alloc\n",
                size);
  abort();
}

ZK_EXPORT __attribute__((aligned(64))) void *_Znwm(size_t size) {
  void *p = alloc_malloc(size);
  if (likely(p != NULL))
    return p;
  return cxx_new_failed(size, 0, false);
}
ZK_EXPORT void *_ZnwmRKSt9nothrow_t(size_t size, const void *nothrow) {
  (void)nothrow;
  void *p = alloc_malloc(size);
  if (likely(p != NULL))
    return p;
  return cxx_new_failed(size, 0, true);
}
/* std::align_val_t is a size_t underneath. */
ZK_EXPORT void *_ZnwmSt11align_val_t(size_t size, size_t alignment) {
  void *p = zk_aligned_alloc(alignment, size);
  if (likely(p != NULL))
    return p;
  return cxx_new_failed(size, alignment, false);
}
ZK_EXPORT void *_ZnwmSt11align_val_tRKSt9nothrow_t(size_t size,
                                                   size_t alignment,
                                                   const void *nothrow) {
  (void)nothrow;
  void *p = zk_aligned_alloc(alignment, size);
  if (likely(p != NULL))
    return p;
  return cxx_new_failed(size, alignment, true);
}
ZK_EXPORT __attribute__((aligned(64))) void _ZdlPvm(void *p, size_t size) {
  alloc_free_sized(p, size, "sized delete with a size larger than the block");
}

#define CXX_ALIAS(name, target)                                                \
  ZK_EXPORT __typeof__(target) name __attribute__((alias(#target)))
/* Written with free's attributes as the C library declares it. */
#define CXX_FREE(name)                                                         \
  ZK_EXPORT void name(void *) __attribute__((alias("free"), nothrow, leaf))
/* new[] and delete[]; deletes with a nothrow tag or an alignment (free
 * takes any block; the extra arguments are ignored where they sit). */
CXX_ALIAS(_Znam, _Znwm);
CXX_ALIAS(_ZnamRKSt9nothrow_t, _ZnwmRKSt9nothrow_t);
CXX_ALIAS(_ZnamSt11align_val_t, _ZnwmSt11align_val_t);
CXX_ALIAS(_ZnamSt11align_val_tRKSt9nothrow_t,
          _ZnwmSt11align_val_tRKSt9nothrow_t);
CXX_ALIAS(_ZdaPvm, _ZdlPvm);
CXX_ALIAS(_ZdlPvmSt11align_val_t, _ZdlPvm);
CXX_ALIAS(_ZdaPvmSt11align_val_t, _ZdlPvm);
CXX_FREE(_ZdlPv);
CXX_FREE(_ZdaPv);
CXX_FREE(_ZdlPvRKSt9nothrow_t);
CXX_FREE(_ZdaPvRKSt9nothrow_t);
CXX_FREE(_ZdlPvSt11align_val_t);
CXX_FREE(_ZdaPvSt11align_val_t);
CXX_FREE(_ZdlPvSt11align_val_tRKSt9nothrow_t);
CXX_FREE(_ZdaPvSt11align_val_tRKSt9nothrow_t);

#endif

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
