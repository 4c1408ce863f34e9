/* Fuzz target: the input is a program of allocator calls (malloc, calloc,
 * realloc, aligned_alloc, free, pool alloc/free) over a table of live
 * blocks. Every block carries a pattern derived from its slot and
 * generation; a block whose pattern changed while live, a misaligned or
 * overlapping result, or a calloc block that is not zero fails at once.
 *
 * Built with clang's libFuzzer when clang is available (make fuzz runs it
 * for ten minutes); otherwise with a small driver that feeds random
 * programs, so ctest always runs it. */
#include "zkmem.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS       64
#define POOL_OBJECT 48

typedef struct slot {
  unsigned char *data;
  size_t size;
  unsigned char seed;
  int from_pool;
} slot_t;

static zk_pool_t *pool;

static void fail(const char *what, size_t slot) {
  fprintf(stderr, "fuzz_alloc: %s (slot %zu)\n", what, slot);
  abort();
}

static unsigned char pattern(size_t index, unsigned char seed) {
  return (unsigned char)(index * 31u + seed);
}

/* Ends and a stride through the middle: enough to catch overlap. */
static void fill(slot_t *s) {
  for (size_t i = 0; i < s->size; i += (i < 64 || s->size - i < 64) ? 1 : 61)
    s->data[i] = pattern(i, s->seed);
}

static void verify(const slot_t *s, size_t index) {
  for (size_t i = 0; i < s->size; i += (i < 64 || s->size - i < 64) ? 1 : 61)
    if (s->data[i] != pattern(i, s->seed))
      fail("block contents changed while live", index);
}

/* A fresh block in the slot: remember it and write its pattern. */
static void adopt(slot_t *s, size_t size, unsigned char seed, int from_pool) {
  s->size = size;
  s->seed = seed;
  s->from_pool = from_pool;
  fill(s);
}

static void release(slot_t *s, size_t index) {
  if (s->data == NULL)
    return;
  verify(s, index);
  if (s->from_pool)
    zk_pool_free(pool, s->data);
  else
    zk_free(s->data);
  s->data = NULL;
  s->size = 0;
}

static size_t read_size(const uint8_t **input, const uint8_t *end) {
  uint32_t raw = 0;
  for (int i = 0; i < 3 && *input < end; i++)
    raw = raw << 8 | *(*input)++;
  /* Mostly small, sometimes large, rarely huge. */
  switch (raw & 3) {
  case 0:
  case 1:
    return (raw >> 2) % 512;
  case 2:
    return (raw >> 2) % 70000;
  default: /* huge blocks cost a mapping each: one in eight */
    return (raw >> 5) % 8 == 0 ? (raw >> 2) % (5u << 20) : (raw >> 2) % 4096;
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t length);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t length) {
  if (pool == NULL)
    pool = zk_pool_create(POOL_OBJECT, NULL);
  slot_t slots[SLOTS];
  memset(slots, 0, sizeof(slots));
  const uint8_t *input = data, *end = data + length;
  unsigned char generation = 0;
  while (input + 2 <= end) {
    uint8_t op = *input++;
    size_t index = *input++ % SLOTS;
    slot_t *s = &slots[index];
    generation++;
    switch (op % 7) {
    case 0: /* malloc */
    case 1: {
      release(s, index);
      size_t size = read_size(&input, end);
      s->data = zk_malloc(size);
      if (s->data == NULL)
        fail("malloc returned NULL", index);
      if (zk_usable_size(s->data) < size)
        fail("usable size below the size asked for", index);
      adopt(s, size, generation, 0);
      break;
    }
    case 2: { /* calloc */
      release(s, index);
      size_t size = read_size(&input, end);
      s->data = zk_calloc(1, size);
      if (s->data == NULL)
        fail("calloc returned NULL", index);
      for (size_t i = 0; i < size; i++)
        if (s->data[i] != 0)
          fail("calloc block not zero", index);
      adopt(s, size, generation, 0);
      break;
    }
    case 3: { /* realloc keeps the common prefix */
      if (s->from_pool)
        break;
      size_t size = read_size(&input, end);
      if (size == 0)
        size = 1;
      size_t keep = s->size < size ? s->size : size;
      if (s->data != NULL)
        verify(s, index);
      unsigned char *grown = zk_realloc(s->data, size);
      if (grown == NULL)
        fail("realloc returned NULL", index);
      /* The indices fill() wrote for the old size, below the kept size. */
      for (size_t i = 0; i < keep; i += (i < 64 || s->size - i < 64) ? 1 : 61)
        if (grown[i] != pattern(i, s->seed))
          fail("realloc lost contents", index);
      s->data = grown;
      adopt(s, size, generation, 0);
      break;
    }
    case 4: { /* aligned */
      release(s, index);
      size_t alignment = (size_t)8 << (input < end ? *input++ % 16 : 0);
      size_t size = read_size(&input, end);
      s->data = zk_aligned_alloc(alignment, size);
      if (s->data == NULL)
        fail("aligned_alloc returned NULL", index);
      if ((uintptr_t)s->data % alignment != 0)
        fail("misaligned block", index);
      adopt(s, size, generation, 0);
      break;
    }
    case 5: /* pool */
      release(s, index);
      s->data = zk_pool_alloc(pool);
      if (s->data == NULL)
        fail("pool alloc returned NULL", index);
      adopt(s, POOL_OBJECT, generation, 1);
      break;
    default:
      release(s, index);
      break;
    }
  }
  for (size_t i = 0; i < SLOTS; i++)
    release(&slots[i], i);
  return 0;
}

#ifdef ZKMEM_FUZZ_STANDALONE
/* Without libFuzzer: random programs for a bounded number of rounds. */
int main(int argc, char **argv) {
  unsigned rounds = argc > 1 ? (unsigned)atoi(argv[1]) : 300;
  uint64_t state = 0x853c49e6748fea9bull;
  uint8_t program[4096];
  for (unsigned round = 0; round < rounds; round++) {
    size_t length = 16 + (size_t)(state % (sizeof(program) - 16));
    for (size_t i = 0; i < length; i++) {
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      program[i] = (uint8_t)state;
    }
    LLVMFuzzerTestOneInput(program, length);
  }
  printf("fuzz_alloc: %u random programs, no failure\n", rounds);
  return 0;
}
#endif
