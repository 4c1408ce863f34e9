/* Size classes: 8, 16, 32, 48, ..., 128 (16-byte steps), then eight classes
 * per doubling up to 8 KiB and four per doubling up to SMALL_MAX. From 128 B
 * to 8 KiB the step is base/8, so a block wastes at most 12.5% of the size
 * asked for; below, the 16-byte alignment malloc owes its callers sets the
 * step. Above 8 KiB the step is base/4 (at most 25%): the unused tail of
 * such a block is whole OS pages, which stay out of RSS unless written,
 * while fewer classes leave fewer partly used pages (memory benchmark:
 * 2.5% less RSS). Every class is a multiple of 16 except the first, and
 * every power of two is a class, which aligned allocation relies on. */
#ifndef ZKMEM_SIZECLASS_H
#define ZKMEM_SIZECLASS_H

#include "internal.h"

extern const uint32_t class_block_size[CLASS_COUNT];
/* Slices of a page of this class: enough for several blocks. */
extern const uint8_t class_page_slices[CLASS_COUNT];

/* The fast path's size -> bin table, one load: by 8-byte granule up to
 * SMALL_MAX, the offset of the size's class's bin in a heap's bins (the
 * class index times the bin's size, no shift to do; 16 KiB of table, of
 * which a program touches the lines of the sizes it asks for). A second,
 * coarser table above 1 KiB cost the sizes there a second branch and two
 * taken jumps: 1-5 KB blocks allocated and freed in a loop ran 16% slower
 * than smaller ones. Filled by sizeclass_init before any heap exists; all
 * zero before, which sends malloc to its slow path (the first bin of
 * heap_empty). */
#define CLASS_BY_8_COUNT (SMALL_MAX / 8 + 1)
extern uint16_t bin_offset_by_8[CLASS_BY_8_COUNT];
void sizeclass_init(void);
/* The table's entry for a size up to SMALL_MAX. A relaxed atomic load (the
 * same single load): another thread's first malloc reads the table while
 * the first thread's initialisation fills it, and uses what it read only
 * once its own wait for that initialisation is over. */
ZK_INLINE unsigned bin_offset_of_small(size_t size) {
  return __atomic_load_n(&bin_offset_by_8[(size + 7) >> 3], __ATOMIC_RELAXED);
}

/* size (<= SMALL_MAX) -> class index, in a few shifts. */
ZK_INLINE unsigned size_to_class(size_t size) {
  if (size <= 128) {
    /* 0..8 -> 0, 9..16 -> 1, 17..32 -> 2, then one class per 16 B. */
    return size <= 8 ? 0 : (unsigned)((size + 15) >> 4);
  }
  unsigned top_bit =
      63u - (unsigned)__builtin_clzll((unsigned long long)(size - 1));
  if (top_bit < 13) {
    unsigned eighth = (unsigned)(((size - 1) >> (top_bit - 3)) & 7u);
    return 9 + (top_bit - 7) * 8 + eighth;
  }
  unsigned quarter = (unsigned)(((size - 1) >> (top_bit - 2)) & 3u);
  return 57 + (top_bit - 13) * 4 + quarter;
}

#endif /* ZKMEM_SIZECLASS_H */
