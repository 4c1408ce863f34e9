/* Linux implementation of os.h. */
#define _GNU_SOURCE /* mremap */
#include "os.h"
#include "internal.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>

#ifndef MAP_HUGETLB
#define MAP_HUGETLB 0x40000
#endif
#ifndef MADV_FREE
#define MADV_FREE 8
#endif

static void *os_map(void *hint, size_t size, int extra_flags) {
  int saved_errno = errno;
  void *address =
      mmap(hint, size, PROT_READ | PROT_WRITE,
           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | extra_flags, -1, 0);
  if (address == MAP_FAILED) {
    errno = ENOMEM;
    return NULL;
  }
  errno = saved_errno;
  return address;
}

/* Unmap both ends of an over-sized mapping so what is left is aligned. */
/* Keeps `size` bytes of an over-sized mapping, from the first address
 * whose sum with `offset` is a multiple of `alignment` (less than
 * `alignment` past raw), and unmaps both ends. */
static void *os_trim(uint8_t *raw, size_t oversize, size_t size,
                     size_t alignment, size_t offset) {
  int saved_errno = errno;
  uintptr_t aligned =
      (((uintptr_t)raw + offset + alignment - 1) & ~(alignment - 1)) - offset;
  size_t before = aligned - (uintptr_t)raw;
  size_t after = oversize - before - size;
  if (before)
    munmap(raw, before);
  if (after)
    munmap((uint8_t *)aligned + size, after);
  errno = saved_errno;
  return (void *)aligned;
}

static void *os_map_trimmed(size_t size, size_t alignment) {
  size_t oversize = size + alignment;
  if (oversize < size)
    return NULL;
  uint8_t *raw = os_map(NULL, oversize, 0);
  return raw != NULL ? os_trim(raw, oversize, size, alignment, 0) : NULL;
}

void *os_reserve_aligned(size_t size, size_t alignment, int huge_pages,
                         int *got_huge) {
  int saved_errno = errno;
  *got_huge = 0;
  if (huge_pages == 2 && (size & ((2u << 20) - 1)) == 0 &&
      alignment >= (2u << 20)) {
    /* Reserved 2 MiB pages: over-map and trim at 2 MiB boundaries. When the
     * system has none, mmap fails and the plain path below runs. */
    size_t oversize = size + alignment;
    uint8_t *raw = mmap(NULL, oversize, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
    if (raw != MAP_FAILED) {
      *got_huge = 2;
      return os_trim(raw, oversize, size, alignment, 0);
    }
    errno = saved_errno; /* none reserved: the plain path below */
  }
  void *address = os_map_trimmed(size, alignment);
  if (address != NULL && huge_pages >= 1) {
    *got_huge = madvise(address, size, MADV_HUGEPAGE) == 0 ? 1 : 0;
    errno = saved_errno;
  }
  return address;
}

void *os_reserve_aligned_at(size_t size, size_t alignment, size_t offset) {
  size_t oversize = size + alignment;
  if (oversize < size || offset > size) {
    errno = ENOMEM;
    return NULL;
  }
  uint8_t *raw = os_map(NULL, oversize, 0);
  return raw != NULL ? os_trim(raw, oversize, size, alignment, offset) : NULL;
}

bool os_release(void *address, size_t size) {
  int saved_errno = errno;
  bool released = munmap(address, size) == 0;
  /* Unmapping the middle of a kernel mapping splits it, which fails at
   * vm.max_map_count: the pages go back all the same. */
  if (!released)
    madvise(address, size, MADV_DONTNEED);
  errno = saved_errno;
  return released;
}

bool os_purge(void *address, size_t size, bool decommit) {
  int saved_errno = errno;
  bool purged = (!decommit && madvise(address, size, MADV_FREE) == 0) ||
                madvise(address, size, MADV_DONTNEED) == 0;
  errno = saved_errno;
  return purged;
}

bool os_advise_huge(void *address, size_t size, bool huge) {
  int saved_errno = errno;
  bool done =
      madvise(address, size, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) == 0;
  errno = saved_errno;
  return done;
}

bool os_protect(void *address, size_t size, bool accessible) {
  int saved_errno = errno;
  bool done = mprotect(address, size,
                       accessible ? PROT_READ | PROT_WRITE : PROT_NONE) == 0;
  errno = saved_errno;
  return done;
}

bool os_resize_in_place(void *address, size_t old_size, size_t new_size) {
  int saved_errno = errno;
  void *moved = mremap(address, old_size, new_size, 0);
  errno = saved_errno;
  return moved != MAP_FAILED;
}

bool os_move_to(void *from, size_t size, void *to) {
  int saved_errno = errno;
  bool moved =
      mremap(from, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, to) != MAP_FAILED;
  errno = saved_errno;
  return moved;
}

/* A range whose pages sit in two mappings (the first page's flags
 * differ), moved with one call into a range of the probe's own: 2 if it
 * moved, 1 if the kernel refused the range (EFAULT; EINVAL), 0 if the
 * probe could not tell (no memory or no mapping to spare: ENOMEM,
 * EAGAIN). */
static int os_probe_moves_mappings(void) {
  int saved_errno = errno;
  uint8_t *area = mmap(NULL, 4 * OS_PAGE_SIZE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  int answer = 0;
  if (area != MAP_FAILED) {
    area[0] = area[OS_PAGE_SIZE] = 1;
    if (madvise(area, OS_PAGE_SIZE, MADV_DONTFORK) == 0) {
      if (mremap(area, 2 * OS_PAGE_SIZE, 2 * OS_PAGE_SIZE,
                 MREMAP_MAYMOVE | MREMAP_FIXED,
                 area + 2 * OS_PAGE_SIZE) != MAP_FAILED)
        answer = 2;
      else if (errno == EFAULT || errno == EINVAL)
        answer = 1;
    }
    munmap(area, 4 * OS_PAGE_SIZE);
  }
  errno = saved_errno;
  return answer;
}

/* A probe that could not tell answers no for now and runs again at the
 * next call: one refused call must not turn moves off for good. */
bool os_moves_mappings(void) {
  static int known; /* 0: not known yet, 1: no, 2: yes */
  int state = __atomic_load_n(&known, __ATOMIC_RELAXED);
  if (state == 0) { /* two threads may both probe: same answer */
    state = os_probe_moves_mappings();
    if (state != 0)
      __atomic_store_n(&known, state, __ATOMIC_RELAXED);
  }
  return state == 2;
}

void *os_move_aligned(void *address, size_t old_size, size_t new_size,
                      size_t alignment) {
  int saved_errno = errno;
  void *target = os_map_trimmed(new_size, alignment);
  void *moved = MAP_FAILED;
  if (target != NULL) {
    moved = mremap(address, old_size, new_size, MREMAP_MAYMOVE | MREMAP_FIXED,
                   target);
    /* Several mappings (an assembled huge block): no kernel resizes them in
     * one call, but one that moves them (os_moves_mappings, which also
     * checks before it unmaps the destination) moves them as they are
     * into the target's front, the rest of the target staying fresh. */
    if (moved == MAP_FAILED && errno == EFAULT && old_size < new_size &&
        os_moves_mappings())
      moved = mremap(address, old_size, old_size, MREMAP_MAYMOVE | MREMAP_FIXED,
                     target);
    if (moved == MAP_FAILED)
      munmap(target, new_size);
  }
  errno = saved_errno;
  return moved != MAP_FAILED ? moved : NULL;
}

/* ---- metadata ---- */

/* Free lists by power-of-two size class, 64 B .. 64 KiB; carved from
 * 1 MiB chunks. Metadata is small and rare (a heap per thread, a pool). */
#define META_MIN_SHIFT 6
#define META_MAX_SHIFT 16
#define META_CHUNK     ((size_t)1 << 20)

typedef struct meta_free_block {
  struct meta_free_block *next;
} meta_free_block_t;

static pthread_mutex_t meta_lock = PTHREAD_MUTEX_INITIALIZER;
static meta_free_block_t *meta_free_lists[META_MAX_SHIFT + 1];
static uint8_t *meta_chunk_next, *meta_chunk_end;

static unsigned meta_shift(size_t size) {
  unsigned shift = META_MIN_SHIFT;
  while (((size_t)1 << shift) < size)
    shift++;
  return shift;
}

void *os_meta_alloc(size_t size) {
  unsigned shift = meta_shift(size);
  if (shift > META_MAX_SHIFT) {
    int huge;
    return os_reserve_aligned((size + OS_PAGE_SIZE - 1) & ~(OS_PAGE_SIZE - 1),
                              OS_PAGE_SIZE, 0, &huge);
  }
  size_t rounded = (size_t)1 << shift;
  pthread_mutex_lock(&meta_lock);
  meta_free_block_t *block = meta_free_lists[shift];
  if (block != NULL) {
    meta_free_lists[shift] = block->next;
    pthread_mutex_unlock(&meta_lock);
    memset(block, 0, rounded);
    return block;
  }
  /* Blocks are naturally aligned up to a page: keeps hot structs on their
   * own cache lines. */
  uintptr_t aligned_mask =
      (rounded < OS_PAGE_SIZE ? rounded : OS_PAGE_SIZE) - 1;
  uint8_t *aligned =
      (uint8_t *)(((uintptr_t)meta_chunk_next + aligned_mask) & ~aligned_mask);
  if (meta_chunk_next == NULL || aligned + rounded > meta_chunk_end) {
    int huge;
    uint8_t *chunk = os_reserve_aligned(META_CHUNK, OS_PAGE_SIZE, 0, &huge);
    if (chunk == NULL) {
      pthread_mutex_unlock(&meta_lock);
      return NULL;
    }
    meta_chunk_end = chunk + META_CHUNK;
    aligned = chunk;
  }
  meta_chunk_next = aligned + rounded;
  pthread_mutex_unlock(&meta_lock);
  return aligned; /* fresh mapping: already zero */
}

void os_meta_lock(void) {
  pthread_mutex_lock(&meta_lock);
}
void os_meta_unlock(void) {
  pthread_mutex_unlock(&meta_lock);
}

void os_meta_free(void *block, size_t size) {
  if (block == NULL)
    return;
  unsigned shift = meta_shift(size);
  if (shift > META_MAX_SHIFT) {
    os_release(block, (size + OS_PAGE_SIZE - 1) & ~(OS_PAGE_SIZE - 1));
    return;
  }
  pthread_mutex_lock(&meta_lock);
  meta_free_block_t *free_block = block;
  free_block->next = meta_free_lists[shift];
  meta_free_lists[shift] = free_block;
  pthread_mutex_unlock(&meta_lock);
}
