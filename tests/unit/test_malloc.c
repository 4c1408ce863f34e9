/* The malloc API: size classes, alignment, calloc, realloc, usable size,
 * bad input. */
#include "sizeclass.h"
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <stdint.h>
#include <string.h>

static void test_size_classes(void) {
  for (size_t size = 0; size <= SMALL_MAX; size++) {
    unsigned c = size_to_class(size);
    CHECK(c < CLASS_COUNT);
    CHECK(class_block_size[c] >= size);
    /* The class is the smallest that fits. */
    if (c > 0)
      CHECK(class_block_size[c - 1] < size);
    /* Waste bound: 12.5% of the size from 128 B up. */
    if (size > 128)
      CHECK((class_block_size[c] - size) * 8 <= size);
    if (class_block_size[c] >= 16)
      CHECK(class_block_size[c] % 16 == 0);
  }
  for (unsigned c = 1; c < CLASS_COUNT; c++)
    CHECK(class_block_size[c] > class_block_size[c - 1]);
  /* The fast path's table for sizes above DIRECT_MAX agrees. */
  zk_free(zk_malloc(1)); /* initializes the process */
  for (size_t size = DIRECT_MAX + 1; size <= SMALL_MAX; size++)
    CHECK_EQ(class_by_128[(size + 127) >> 7], size_to_class(size));
  CHECK_EQ(class_block_size[CLASS_COUNT - 1], SMALL_MAX);
}

static void test_alignment_and_usable_size(void) {
  static const size_t sizes[] = {0,     1,      7,       8,       9,      15,
                                 16,    17,     24,      100,     128,    129,
                                 1000,  1024,   1025,    4096,    5000,   65536,
                                 65537, 100000, 1 << 20, 3 << 20, 9 << 20};
  for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
    size_t size = sizes[i];
    unsigned char *p = zk_malloc(size);
    CHECK(p != NULL);
    size_t alignment = size <= 8 ? 8 : 16;
    CHECK(((uintptr_t)p & (alignment - 1)) == 0);
    CHECK(zk_usable_size(p) >= size);
    memset(p, 0xab, zk_usable_size(p));
    zk_free(p);
  }
  CHECK_EQ(zk_usable_size(NULL), 0);
}

static void test_calloc(void) {
  for (size_t size = 1; size < (1u << 22); size = size * 3 + 1) {
    /* Dirty a block of that size first so calloc must really clear. */
    unsigned char *dirty = zk_malloc(size);
    memset(dirty, 0xff, size);
    zk_free(dirty);
    unsigned char *p = zk_calloc(1, size);
    CHECK(p != NULL);
    for (size_t i = 0; i < size; i++)
      CHECK(p[i] == 0);
    zk_free(p);
  }
  errno = 0;
  CHECK(zk_calloc(SIZE_MAX / 2, 3) == NULL);
  CHECK_EQ(errno, ENOMEM);
}

/* Contents that do not depend on where the block lives. */
static void fill_moving(unsigned char *p, size_t size) {
  for (size_t i = 0; i < size; i++)
    p[i] = (unsigned char)(i * 131 + (i >> 8));
}

static int verify_moving(const unsigned char *p, size_t size) {
  for (size_t i = 0; i < size; i++)
    if (p[i] != (unsigned char)(i * 131 + (i >> 8)))
      return 0;
  return 1;
}

static void test_realloc(void) {
  /* Grow through every kind of block and shrink back, keeping contents. */
  size_t size = 1;
  unsigned char *p = zk_malloc(size);
  fill_moving(p, size);
  while (size < (16u << 20)) {
    size_t next = size * 2 + 3;
    p = zk_realloc(p, next);
    CHECK(p != NULL);
    CHECK(verify_moving(p, size));
    fill_moving(p, next);
    size = next;
  }
  while (size > 4) {
    size_t next = size / 3;
    p = zk_realloc(p, next);
    CHECK(p != NULL);
    CHECK(verify_moving(p, next));
    size = next;
  }
  CHECK(zk_realloc(p, 0) == NULL); /* frees */
  p = zk_realloc(NULL, 10);
  CHECK(p != NULL);
  zk_free(p);
}

static void test_aligned(void) {
  for (size_t alignment = 1; alignment <= (2u << 20); alignment *= 2) {
    for (size_t size = 1; size < 300000; size = size * 7 + 5) {
      void *p = zk_aligned_alloc(alignment, size);
      CHECK(p != NULL);
      CHECK(((uintptr_t)p & (alignment - 1)) == 0);
      CHECK(zk_usable_size(p) >= size);
      memset(p, 1, size);
      zk_free(p);
    }
  }
  /* Documented limit: alignments above 2 MiB are refused. */
  errno = 0;
  CHECK(zk_aligned_alloc(4u << 20, 100) == NULL);
  CHECK_EQ(errno, ENOMEM);
  errno = 0;
  CHECK(zk_aligned_alloc(24, 100) == NULL);
  CHECK_EQ(errno, EINVAL);
  void *p = NULL;
  CHECK_EQ(zk_posix_memalign(&p, 3, 10), EINVAL);
  CHECK_EQ(zk_posix_memalign(&p, 4, 10), EINVAL); /* < sizeof(void *) */
  CHECK_EQ(zk_posix_memalign(&p, 256, 10), 0);
  CHECK(((uintptr_t)p & 255) == 0);
  zk_free(p);
}

static void test_bad_input(void) {
  errno = 0;
  CHECK(zk_malloc(SIZE_MAX) == NULL);
  CHECK_EQ(errno, ENOMEM);
  errno = 0;
  CHECK(zk_malloc(SIZE_MAX / 2) == NULL);
  CHECK_EQ(errno, ENOMEM);
  zk_free(NULL);
  void *p = zk_malloc(100);
  errno = 0;
  CHECK(zk_realloc(p, SIZE_MAX) == NULL);
  CHECK_EQ(errno, ENOMEM);
  CHECK(zk_usable_size(p) >= 100); /* untouched */
  zk_free(p);
}

static void test_reuse_after_free(void) {
  /* A freed block of one size class comes back for the next request. */
  void *first = zk_malloc(48);
  zk_free(first);
  void *second = zk_malloc(48);
  CHECK(first == second);
  zk_free(second);
}

int main(void) {
  test_size_classes();
  test_alignment_and_usable_size();
  test_calloc();
  test_realloc();
  test_aligned();
  test_bad_input();
  test_reuse_after_free();
  printf("test_malloc: ok\n");
  return 0;
}
