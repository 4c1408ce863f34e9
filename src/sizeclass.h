/* Size classes: 8, 16, 32, 48, ..., 128 (16-byte steps), then eight classes
 * per doubling up to SMALL_MAX. Above 128 B the step is base/8, so a block
 * wastes at most 12.5% of the size asked for; below, the 16-byte alignment
 * malloc owes its callers sets the step. Every class is a multiple of 16
 * except the first, and every power of two is a class, which aligned
 * allocation relies on. */
#ifndef ZKMEM_SIZECLASS_H
#define ZKMEM_SIZECLASS_H

#include "internal.h"

extern const uint32_t class_block_size[CLASS_COUNT];
/* Slices of a page of this class: enough for several blocks. */
extern const uint8_t class_page_slices[CLASS_COUNT];

/* Above DIRECT_MAX every class boundary is a multiple of 128, so a byte
 * table indexed by (size + 127) / 128 gives the class in one load. Filled
 * by sizeclass_init before any heap exists. */
#define CLASS_BY_128_COUNT (SMALL_MAX / 128 + 1)
extern uint8_t class_by_128[CLASS_BY_128_COUNT];
void sizeclass_init(void);

/* size (<= SMALL_MAX) -> class index, in a few shifts. */
ZK_INLINE unsigned size_to_class(size_t size) {
  if (size <= 128) {
    /* 0..8 -> 0, 9..16 -> 1, 17..32 -> 2, then one class per 16 B. */
    return size <= 8 ? 0 : (unsigned)((size + 15) >> 4);
  }
  unsigned top_bit =
      63u - (unsigned)__builtin_clzll((unsigned long long)(size - 1));
  unsigned step_shift = top_bit - 3;
  unsigned step_in_doubling =
      (unsigned)(((size - 1) >> step_shift) & 7u); /* 0..7 */
  return 9 + (top_bit - 7) * 8 + step_in_doubling;
}

#endif /* ZKMEM_SIZECLASS_H */
