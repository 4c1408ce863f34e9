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
 * on every new and delete of a C++ program: here the forms are zkmem's fast
 * paths themselves, as every peer allocator exports them. Each form is a
 * function of its own (valgrind tells new from new[] and delete from free
 * by address). What the language asks beyond the fast paths:
 *   - A failed new calls the new-handler until there is none, then throws
 *     std::bad_alloc; a nothrow new returns NULL, also when the handler
 *     throws. zkmem's C cannot throw or catch: it calls the C++ runtime's
 *     functions for that (cxx_runtime_function), found when a new fails, so
 *     a runtime loaded later (a C program's dlopen of a C++ plugin) counts.
 *   - A program may replace some forms only, and the others must reach its
 *     replacements as the runtime's defaults do (sized delete calls
 *     delete(void *), new[] calls new, ...). When any form in the process's
 *     scope is not zkmem's, the forms not replaced follow those defaults
 *     (cxx_delegate), at the cost of a call.
 * size_t is unsigned long in these names (m), so only where it is; not in
 * libzkmem.a, where no dynamic lookup finds the runtime. */
#if __SIZEOF_SIZE_T__ == 8 && __SIZEOF_LONG__ == 8 &&                          \
    !defined(ZKMEM_NO_CXX_OPERATORS)

#include <dlfcn.h>

typedef void (*cxx_new_handler_t)(void);
typedef void *(*cxx_new_t)(size_t);
typedef void *(*cxx_new_aligned_t)(size_t, size_t);
typedef void *(*cxx_new_nothrow_t)(size_t, const void *);
typedef void *(*cxx_new_aligned_nothrow_t)(size_t, size_t, const void *);
typedef void (*cxx_delete_t)(void *);
typedef void (*cxx_delete_aligned_t)(void *, size_t);

/* `name` from the C++ runtime: in the process's scope, else in a runtime
 * loaded into a scope of its own; never `own` (zkmem's form of that name:
 * the runtime's is wanted). NULL where no runtime has it. */
static void *cxx_runtime_function(const char *name, const void *own) {
  void *function = dlsym(RTLD_DEFAULT, name);
  if (function != NULL && function != own)
    return function;
  static const char *const runtimes[] = {"libstdc++.so.6", "libc++.so.1"};
  for (size_t i = 0; i < sizeof(runtimes) / sizeof(runtimes[0]); i++) {
    void *runtime = dlopen(runtimes[i], RTLD_LAZY | RTLD_NOLOAD);
    if (runtime == NULL)
      continue;
    function = dlsym(runtime, name);
    dlclose(runtime);
    if (function != NULL && function != own)
      return function;
  }
  return NULL;
}

/* After the new-handlers gave up: std::bad_alloc thrown through these
 * frames (built with unwind tables: CMakeLists.txt). */
static ZK_COLD __attribute__((noreturn)) void cxx_throw_bad_alloc(size_t size) {
  void (*throw_bad_alloc)(void) =
      (void (*)(void))cxx_runtime_function("_ZSt17__throw_bad_allocv", NULL);
  if (throw_bad_alloc != NULL)
    throw_bad_alloc();
  error_warning("zkmem: error: operator new of %zu bytes failed, and no C++ "
                "runtime is loaded to throw std::bad_alloc\n",
                size);
  abort();
}

/* A throwing new that found no memory: the new-handler loop, then
 * std::bad_alloc. The handler is the program's code, called with no lock
 * of zkmem's held; what it throws passes through to the caller. An
 * alignment that is not a power of two is refused at once, as the C++
 * runtime does. */
static ZK_COLD void *cxx_new_failed(size_t size, size_t alignment,
                                    bool aligned) {
  if (aligned && (alignment == 0 || (alignment & (alignment - 1)) != 0))
    cxx_throw_bad_alloc(size);
  cxx_new_handler_t (*get_new_handler)(void) =
      (cxx_new_handler_t(*)(void))cxx_runtime_function("_ZSt15get_new_handlerv",
                                                       NULL);
  for (;;) {
    cxx_new_handler_t handler =
        get_new_handler != NULL ? get_new_handler() : NULL;
    if (handler == NULL)
      cxx_throw_bad_alloc(size);
    handler();
    void *p = aligned ? zk_aligned_alloc(alignment, size) : alloc_malloc(size);
    if (p != NULL)
      return p;
  }
}

/* ---- the forms a program may replace, and who follows whom ---- */

/* -1: not looked at yet; 0: every form in scope is zkmem's; 1: some are
 * not, and cxx_targets holds what the defaults call. */
static _Atomic int cxx_delegate = -1;
static struct {
  cxx_new_t new_single;
  cxx_new_aligned_t new_aligned;
  cxx_delete_t delete_single, delete_array;
  cxx_delete_aligned_t delete_aligned, delete_array_aligned;
} cxx_targets;

void *_Znwm(size_t size);
void *_Znam(size_t size);
void *_ZnwmRKSt9nothrow_t(size_t size, const void *nothrow);
void *_ZnamRKSt9nothrow_t(size_t size, const void *nothrow);
void *_ZnwmSt11align_val_t(size_t size, size_t alignment);
void *_ZnamSt11align_val_t(size_t size, size_t alignment);
void *_ZnwmSt11align_val_tRKSt9nothrow_t(size_t size, size_t alignment,
                                         const void *nothrow);
void *_ZnamSt11align_val_tRKSt9nothrow_t(size_t size, size_t alignment,
                                         const void *nothrow);
void _ZdlPv(void *p);
void _ZdaPv(void *p);
void _ZdlPvm(void *p, size_t size);
void _ZdaPvm(void *p, size_t size);
void _ZdlPvRKSt9nothrow_t(void *p, const void *nothrow);
void _ZdaPvRKSt9nothrow_t(void *p, const void *nothrow);
void _ZdlPvSt11align_val_t(void *p, size_t alignment);
void _ZdaPvSt11align_val_t(void *p, size_t alignment);
void _ZdlPvmSt11align_val_t(void *p, size_t size, size_t alignment);
void _ZdaPvmSt11align_val_t(void *p, size_t size, size_t alignment);
void _ZdlPvSt11align_val_tRKSt9nothrow_t(void *p, size_t alignment,
                                         const void *nothrow);
void _ZdaPvSt11align_val_tRKSt9nothrow_t(void *p, size_t alignment,
                                         const void *nothrow);

#define CXX_FORM(name)                                                         \
  { #name, (const void *)name }
static const struct {
  const char *name;
  const void *own;
} cxx_forms[] = {
    CXX_FORM(_Znwm),
    CXX_FORM(_Znam),
    CXX_FORM(_ZnwmRKSt9nothrow_t),
    CXX_FORM(_ZnamRKSt9nothrow_t),
    CXX_FORM(_ZnwmSt11align_val_t),
    CXX_FORM(_ZnamSt11align_val_t),
    CXX_FORM(_ZnwmSt11align_val_tRKSt9nothrow_t),
    CXX_FORM(_ZnamSt11align_val_tRKSt9nothrow_t),
    CXX_FORM(_ZdlPv),
    CXX_FORM(_ZdaPv),
    CXX_FORM(_ZdlPvm),
    CXX_FORM(_ZdaPvm),
    CXX_FORM(_ZdlPvRKSt9nothrow_t),
    CXX_FORM(_ZdaPvRKSt9nothrow_t),
    CXX_FORM(_ZdlPvSt11align_val_t),
    CXX_FORM(_ZdaPvSt11align_val_t),
    CXX_FORM(_ZdlPvmSt11align_val_t),
    CXX_FORM(_ZdaPvmSt11align_val_t),
    CXX_FORM(_ZdlPvSt11align_val_tRKSt9nothrow_t),
    CXX_FORM(_ZdaPvSt11align_val_tRKSt9nothrow_t),
};

/* The form of `name` in the process's scope (the program's where it
 * replaced it), else zkmem's. */
static void *cxx_in_scope(const char *name, void *own) {
  void *found = dlsym(RTLD_DEFAULT, name);
  return found != NULL ? found : own;
}

/* Whether the forms must delegate, looked at once (a race only repeats
 * the same answer). */
static ZK_COLD bool cxx_delegating(void) {
  int known = atomic_load_explicit(&cxx_delegate, memory_order_acquire);
  if (known >= 0)
    return known != 0;
  bool replaced = false;
  for (size_t i = 0; i < sizeof(cxx_forms) / sizeof(cxx_forms[0]); i++) {
    void *found = dlsym(RTLD_DEFAULT, cxx_forms[i].name);
    replaced = replaced || (found != NULL && found != cxx_forms[i].own);
  }
  if (replaced) {
    cxx_targets.new_single = (cxx_new_t)cxx_in_scope("_Znwm", (void *)_Znwm);
    cxx_targets.new_aligned = (cxx_new_aligned_t)cxx_in_scope(
        "_ZnwmSt11align_val_t", (void *)_ZnwmSt11align_val_t);
    cxx_targets.delete_single =
        (cxx_delete_t)cxx_in_scope("_ZdlPv", (void *)_ZdlPv);
    cxx_targets.delete_array =
        (cxx_delete_t)cxx_in_scope("_ZdaPv", (void *)_ZdaPv);
    cxx_targets.delete_aligned = (cxx_delete_aligned_t)cxx_in_scope(
        "_ZdlPvSt11align_val_t", (void *)_ZdlPvSt11align_val_t);
    cxx_targets.delete_array_aligned = (cxx_delete_aligned_t)cxx_in_scope(
        "_ZdaPvSt11align_val_t", (void *)_ZdaPvSt11align_val_t);
  }
  atomic_store_explicit(&cxx_delegate, replaced, memory_order_release);
  return replaced;
}

/* One load and a branch on the forms' paths: delegating, or not looked
 * at yet. */
ZK_INLINE bool cxx_may_delegate(void) {
  return unlikely(atomic_load_explicit(&cxx_delegate, memory_order_relaxed) !=
                  0) &&
         cxx_delegating();
}

/* A nothrow new that found no memory: the C++ runtime's nothrow form,
 * which calls the throwing one (zkmem's, or the program's) and catches; or
 * NULL where no runtime is loaded (then no new-handler exists either). */
static ZK_COLD void *cxx_nothrow_failed(const char *name, const void *own,
                                        size_t size, size_t alignment,
                                        bool aligned) {
  void *function = cxx_runtime_function(name, own);
  if (function == NULL)
    return NULL;
  static const char nothrow_tag = 0;
  if (aligned)
    return ((cxx_new_aligned_nothrow_t)function)(size, alignment, &nothrow_tag);
  return ((cxx_new_nothrow_t)function)(size, &nothrow_tag);
}

/* ---- the forms ---- */

/* The new forms' bodies: each form is a function of its own (valgrind),
 * these are inlined into them. */
ZK_INLINE void *cxx_new(size_t size) {
  void *p = alloc_malloc(size);
  if (likely(p != NULL))
    return p;
  return cxx_new_failed(size, 0, false);
}
/* std::align_val_t is a size_t underneath. */
ZK_INLINE void *cxx_new_aligned(size_t size, size_t alignment) {
  void *p = zk_aligned_alloc(alignment, size);
  if (likely(p != NULL))
    return p;
  return cxx_new_failed(size, alignment, true);
}
/* `name` and `own`: the form itself, whose runtime version a failure calls
 * (CXX_SELF). */
ZK_INLINE void *cxx_new_nothrow(const char *name, const void *own, size_t size,
                                size_t alignment, bool aligned) {
  void *p = cxx_may_delegate() ? NULL
            : aligned          ? zk_aligned_alloc(alignment, size)
                               : alloc_malloc(size);
  if (likely(p != NULL))
    return p;
  return cxx_nothrow_failed(name, own, size, alignment, aligned);
}
#define CXX_SELF(form) #form, (const void *)form

ZK_EXPORT __attribute__((aligned(64))) void *_Znwm(size_t size) {
  return cxx_new(size);
}
ZK_EXPORT __attribute__((aligned(64))) void *_Znam(size_t size) {
  if (cxx_may_delegate())
    return cxx_targets.new_single(size);
  return cxx_new(size);
}
ZK_EXPORT void *_ZnwmRKSt9nothrow_t(size_t size, const void *nothrow) {
  (void)nothrow;
  return cxx_new_nothrow(CXX_SELF(_ZnwmRKSt9nothrow_t), size, 0, false);
}
ZK_EXPORT void *_ZnamRKSt9nothrow_t(size_t size, const void *nothrow) {
  (void)nothrow;
  return cxx_new_nothrow(CXX_SELF(_ZnamRKSt9nothrow_t), size, 0, false);
}
ZK_EXPORT void *_ZnwmSt11align_val_t(size_t size, size_t alignment) {
  return cxx_new_aligned(size, alignment);
}
ZK_EXPORT void *_ZnamSt11align_val_t(size_t size, size_t alignment) {
  if (cxx_may_delegate())
    return cxx_targets.new_aligned(size, alignment);
  return cxx_new_aligned(size, alignment);
}
ZK_EXPORT void *_ZnwmSt11align_val_tRKSt9nothrow_t(size_t size,
                                                   size_t alignment,
                                                   const void *nothrow) {
  (void)nothrow;
  return cxx_new_nothrow(CXX_SELF(_ZnwmSt11align_val_tRKSt9nothrow_t), size,
                         alignment, true);
}
ZK_EXPORT void *_ZnamSt11align_val_tRKSt9nothrow_t(size_t size,
                                                   size_t alignment,
                                                   const void *nothrow) {
  (void)nothrow;
  return cxx_new_nothrow(CXX_SELF(_ZnamSt11align_val_tRKSt9nothrow_t), size,
                         alignment, true);
}

/* The deletes other than delete(void *): their paths test one word for
 * delegating (or not looked at yet) and secure mode together, and leave
 * both to cxx_delete_checked, a tail call, so that the fast path keeps no
 * frame. */
enum cxx_delete_form {
  CXX_DELETE_SIZED,
  CXX_DELETE_ARRAY,
  CXX_DELETE_ARRAY_SIZED,
  CXX_DELETE_NOTHROW,
  CXX_DELETE_ARRAY_NOTHROW,
  CXX_DELETE_ALIGNED_ARRAY,
  CXX_DELETE_ALIGNED_SIZED,
  CXX_DELETE_ALIGNED_ARRAY_SIZED,
  CXX_DELETE_ALIGNED_NOTHROW,
  CXX_DELETE_ALIGNED_ARRAY_NOTHROW,
};

static ZK_NOINLINE void cxx_delete_checked(void *p, size_t size,
                                           size_t alignment,
                                           enum cxx_delete_form form) {
  if (cxx_delegating()) {
    switch (form) {
    case CXX_DELETE_SIZED:
    case CXX_DELETE_ARRAY:
    case CXX_DELETE_NOTHROW:
      cxx_targets.delete_single(p);
      return;
    case CXX_DELETE_ARRAY_SIZED:
    case CXX_DELETE_ARRAY_NOTHROW:
      cxx_targets.delete_array(p);
      return;
    case CXX_DELETE_ALIGNED_ARRAY:
    case CXX_DELETE_ALIGNED_SIZED:
    case CXX_DELETE_ALIGNED_NOTHROW:
      cxx_targets.delete_aligned(p, alignment);
      return;
    case CXX_DELETE_ALIGNED_ARRAY_SIZED:
    case CXX_DELETE_ALIGNED_ARRAY_NOTHROW:
      cxx_targets.delete_array_aligned(p, alignment);
      return;
    }
  }
  if (form == CXX_DELETE_SIZED || form == CXX_DELETE_ARRAY_SIZED ||
      form == CXX_DELETE_ALIGNED_SIZED ||
      form == CXX_DELETE_ALIGNED_ARRAY_SIZED)
    alloc_free_sized(p, size, "sized delete with a size larger than the block");
  else
    alloc_free(p);
}

ZK_INLINE bool cxx_delete_needs_checks(void) {
  return unlikely((atomic_load_explicit(&cxx_delegate, memory_order_relaxed) |
                   (int)option(ZK_OPTION_SECURE)) != 0);
}

#define CXX_DELETE(form, size, alignment)                                      \
  if (cxx_delete_needs_checks()) {                                             \
    cxx_delete_checked(p, size, alignment, form);                              \
    return;                                                                    \
  }                                                                            \
  alloc_free(p)

ZK_EXPORT __attribute__((aligned(64))) void _ZdlPv(void *p) {
  alloc_free(p);
}
ZK_EXPORT __attribute__((aligned(64))) void _ZdlPvm(void *p, size_t size) {
  CXX_DELETE(CXX_DELETE_SIZED, size, 0);
}
ZK_EXPORT __attribute__((aligned(64))) void _ZdaPv(void *p) {
  CXX_DELETE(CXX_DELETE_ARRAY, 0, 0);
}
ZK_EXPORT __attribute__((aligned(64))) void _ZdaPvm(void *p, size_t size) {
  CXX_DELETE(CXX_DELETE_ARRAY_SIZED, size, 0);
}
ZK_EXPORT void _ZdlPvRKSt9nothrow_t(void *p, const void *nothrow) {
  (void)nothrow;
  CXX_DELETE(CXX_DELETE_NOTHROW, 0, 0);
}
ZK_EXPORT void _ZdaPvRKSt9nothrow_t(void *p, const void *nothrow) {
  (void)nothrow;
  CXX_DELETE(CXX_DELETE_ARRAY_NOTHROW, 0, 0);
}
ZK_EXPORT void _ZdlPvSt11align_val_t(void *p, size_t alignment) {
  (void)alignment;
  alloc_free(p);
}
ZK_EXPORT void _ZdaPvSt11align_val_t(void *p, size_t alignment) {
  CXX_DELETE(CXX_DELETE_ALIGNED_ARRAY, 0, alignment);
}
ZK_EXPORT void _ZdlPvmSt11align_val_t(void *p, size_t size, size_t alignment) {
  CXX_DELETE(CXX_DELETE_ALIGNED_SIZED, size, alignment);
}
ZK_EXPORT void _ZdaPvmSt11align_val_t(void *p, size_t size, size_t alignment) {
  CXX_DELETE(CXX_DELETE_ALIGNED_ARRAY_SIZED, size, alignment);
}
ZK_EXPORT void _ZdlPvSt11align_val_tRKSt9nothrow_t(void *p, size_t alignment,
                                                   const void *nothrow) {
  (void)nothrow;
  CXX_DELETE(CXX_DELETE_ALIGNED_NOTHROW, 0, alignment);
}
ZK_EXPORT void _ZdaPvSt11align_val_tRKSt9nothrow_t(void *p, size_t alignment,
                                                   const void *nothrow) {
  (void)nothrow;
  CXX_DELETE(CXX_DELETE_ALIGNED_ARRAY_NOTHROW, 0, alignment);
}

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
