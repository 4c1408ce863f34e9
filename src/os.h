/* The OS contract: every call zkmem makes to the kernel goes through here.
 *
 * Rules: addresses and sizes are multiples of the OS page size (4 KiB);
 * functions return NULL/false on failure and never abort; nothing here
 * allocates with malloc. Memory from os_reserve reads as zero.
 *
 * errno: every function leaves it as it found it, except that a failed
 * reservation (os_reserve_aligned, os_meta_alloc) sets ENOMEM. A program's
 * free, and every call that succeeds, must not change errno (POSIX 2024),
 * and most kernel calls here may fail harmlessly: a purge refused for
 * locked memory, huge pages refused, a remap that has to move instead. */
#ifndef ZKMEM_OS_H
#define ZKMEM_OS_H

#include <stdbool.h>
#include <stddef.h>

#define OS_PAGE_SIZE ((size_t)4096)

/* Read-write mapping of `size` bytes aligned to `alignment` (a power of two,
 * >= OS_PAGE_SIZE). huge_pages: 1 = advise transparent huge pages,
 * 2 = try MAP_HUGETLB 2 MiB pages first. *got_huge says what was obtained:
 * 0 none, 1 transparent huge pages advised, 2 reserved (hugetlb) pages,
 * which cannot be purged piecemeal. */
void *os_reserve_aligned(size_t size, size_t alignment, int huge_pages,
                         int *got_huge);
/* Read-write mapping of `size` bytes whose address plus `offset` is a
 * multiple of `alignment` (any power of two the address space allows); no
 * huge pages. */
void *os_reserve_aligned_at(size_t size, size_t alignment, size_t offset);
/* Moves the pages of [from, from + size) to `to`, replacing what was
 * mapped there, without copying them; false (nothing moved) on failure. */
bool os_move_to(void *from, size_t size, void *to);
/* Whether the kernel moves a range that spans several mappings in one
 * mremap call (Linux 6.17 on). Before, it refuses with EFAULT, and before
 * 6.12 only after it has unmapped the destination, so such a range must
 * never be handed to the calls above there. Probed once. */
bool os_moves_mappings(void);
/* Gives the mapping back; false where the kernel refused (a split of a
 * mapping at vm.max_map_count): the range stays mapped, its pages
 * returned, and the caller keeps counting it as mapped. */
bool os_release(void *address, size_t size);
/* Tell the kernel the range's contents are not needed. decommit = true:
 * MADV_DONTNEED (RSS falls now, range reads as zero); false: MADV_FREE
 * (RSS falls when the kernel needs memory; contents undefined). */
bool os_purge(void *address, size_t size, bool decommit);
/* Make a range inaccessible (a guard page) or accessible again. */
bool os_protect(void *address, size_t size, bool accessible);
/* Transparent huge pages for the range, or none (MADV_HUGEPAGE or
 * MADV_NOHUGEPAGE); false where the kernel refuses. */
bool os_advise_huge(void *address, size_t size, bool huge);
/* Grow or shrink a mapping in place; false if the neighbours are taken. */
bool os_resize_in_place(void *address, size_t old_size, size_t new_size);
/* Move a mapping to a fresh region aligned to `alignment` without copying
 * pages; NULL on failure (the old mapping is left intact). */
void *os_move_aligned(void *address, size_t old_size, size_t new_size,
                      size_t alignment);

/* Metadata for zkmem's own structures (heaps, pools, magazines): zeroed
 * blocks carved from OS mappings and recycled by size; blocks up to 64 KiB
 * are never unmapped, so a stale pointer stays readable. */
void *os_meta_alloc(size_t size);
void os_meta_free(void *block, size_t size);
/* Held across fork() so the child never sees the metadata half-updated. */
void os_meta_lock(void);
void os_meta_unlock(void);

#endif /* ZKMEM_OS_H */
