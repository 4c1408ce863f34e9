/* Pages: a span serving blocks of one size class.
 *
 * Two free lists per page keep the owner's paths free of atomics: `free`
 * (the owner's: its bins refill from it and flush into it, heap.c) and
 * `thread_free` (other threads push with one CAS). The owner takes the
 * whole `thread_free` list with one exchange when it looks for blocks in
 * the page. Blocks are carved lazily, 4 KiB at a time, so a fresh page
 * costs RSS only as it is used. */
#include "internal.h"
#include "os.h"
#include "sizeclass.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define KIB(n) ((uint32_t)(n)*1024u)
#define DOUBLING(base)                                                         \
  (base) + (base) / 8, (base) + 2 * (base) / 8, (base) + 3 * (base) / 8,       \
      (base) + 4 * (base) / 8, (base) + 5 * (base) / 8,                        \
      (base) + 6 * (base) / 8, (base) + 7 * (base) / 8, 2 * (base)
#define QUARTERS(base)                                                         \
  (base) + (base) / 4, (base) + 2 * (base) / 4, (base) + 3 * (base) / 4,       \
      2 * (base)

const uint32_t class_block_size[CLASS_COUNT] = {
    8,
    16,
    32,
    48,
    64,
    80,
    96,
    112,
    128,
    DOUBLING(128),
    DOUBLING(256),
    DOUBLING(512),
    DOUBLING(KIB(1)),
    DOUBLING(KIB(2)),
    DOUBLING(KIB(4)),
    QUARTERS(KIB(8)),
    QUARTERS(KIB(16)),
    QUARTERS(KIB(32)),
};

/* One slice (64 KiB) holds >= 8 blocks up to 8 KiB; larger classes take
 * enough slices for 8 blocks, so a page never wastes more than one block. */
#define PAGE_SLICES(size) ((size) <= KIB(8) ? 1 : ((size)*8 + 65535) / 65536)
#define DOUBLING_SLICES(base)                                                  \
  PAGE_SLICES((base) + (base) / 8), PAGE_SLICES((base) + 2 * (base) / 8),      \
      PAGE_SLICES((base) + 3 * (base) / 8),                                    \
      PAGE_SLICES((base) + 4 * (base) / 8),                                    \
      PAGE_SLICES((base) + 5 * (base) / 8),                                    \
      PAGE_SLICES((base) + 6 * (base) / 8),                                    \
      PAGE_SLICES((base) + 7 * (base) / 8), PAGE_SLICES(2 * (base))
#define QUARTERS_SLICES(base)                                                  \
  PAGE_SLICES((base) + (base) / 4), PAGE_SLICES((base) + 2 * (base) / 4),      \
      PAGE_SLICES((base) + 3 * (base) / 4), PAGE_SLICES(2 * (base))

const uint8_t class_page_slices[CLASS_COUNT] = {
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
    DOUBLING_SLICES(128),
    DOUBLING_SLICES(256),
    DOUBLING_SLICES(512),
    DOUBLING_SLICES(KIB(1)),
    DOUBLING_SLICES(KIB(2)),
    DOUBLING_SLICES(KIB(4)),
    QUARTERS_SLICES(KIB(8)),
    QUARTERS_SLICES(KIB(16)),
    QUARTERS_SLICES(KIB(32)),
};

uint16_t bin_offset_by_8[CLASS_BY_8_COUNT];

void sizeclass_init(void) {
  for (size_t i = 0; i < CLASS_BY_8_COUNT; i++)
    __atomic_store_n(&bin_offset_by_8[i],
                     (uint16_t)(size_to_class(i * 8) * sizeof(bin_t)),
                     __ATOMIC_RELAXED);
}

_Static_assert(sizeof(class_block_size) / sizeof(class_block_size[0]) ==
                   CLASS_COUNT,
               "class table size");

uint64_t random_next(uint64_t *state) {
  /* splitmix64: cheap, and good enough for keys and shuffles. */
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* Every seed is the OS's own entropy, independent of every other (a key
 * that leaks tells nothing of the rest), read with getrandom: one system
 * call and no file. Opening, reading and closing /dev/urandom, three
 * calls, cost a program that starts 5,000 threads each allocating one
 * block (mleak) 6% of its time. /dev/urandom where getrandom fails (a
 * kernel before 3.17, a seccomp filter); the clock and a stack address are
 * mixed in in any case, so that seeds differ even where both fail. */
uint64_t random_seed(void) {
  int saved_errno = errno; /* a new heap must not change the caller's */
  uint64_t seed = 0;
  if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed)) {
    seed = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      if (read(fd, &seed, sizeof(seed)) != (ssize_t)sizeof(seed))
        seed = 0;
      close(fd);
    }
  }
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  seed ^=
      (uint64_t)now.tv_nsec * 0x9e3779b97f4a7c15ull ^ (uint64_t)(uintptr_t)&now;
  errno = saved_errno;
  return seed;
}

/* Spans start on 64 KiB boundaries, and so would every page's first blocks
 * (the hot ones: bins are LIFO), all in the same sets of a 512 KiB 8-way L2
 * cache, whose sets repeat every 64 KiB. A heap's pages start carving at
 * one of 16 colours 4 KiB apart instead, each five on from the last. */
#define PAGE_COLOUR_BYTES 4096u
#define PAGE_COLOUR_STEP  5u /* odd: visits every colour of a slice */

static uint32_t page_colour_first_block(const page_t *page, heap_t *heap,
                                        size_t span_bytes) {
  uint32_t colours = (uint32_t)(span_bytes / PAGE_COLOUR_BYTES);
  uint32_t colour = heap->page_colour % colours;
  heap->page_colour += PAGE_COLOUR_STEP;
  return (uint32_t)(((size_t)colour * PAGE_COLOUR_BYTES / page->block_size) %
                    page->reserved);
}

bool page_init_small(page_t *page, heap_t *heap, unsigned class_index) {
  uint32_t block_size = class_block_size[class_index];
  page->class_index = (uint8_t)class_index;
  page->bin_offset = (uint16_t)(class_index * sizeof(bin_t));
  page->block_size = block_size;
  size_t span_bytes = (size_t)page->slice_count << SLICE_SHIFT;
  page->secure = option(ZK_OPTION_SECURE) != 0;
  if (page->secure) {
    /* The span's last OS page becomes a guard: an overflow off the end of
     * the page's last block faults. segment_span_free lifts it. */
    span_bytes -= OS_PAGE_SIZE;
    os_protect(page->start + span_bytes, OS_PAGE_SIZE, false);
  }
  page->reserved = (uint32_t)(span_bytes / block_size);
  if (page->secure && !page_free_bits_init(page))
    return false; /* segment_span_free lifts the guard */
  page->carve_first = page_colour_first_block(page, heap, span_bytes);
  track_noaccess(page->start, span_bytes);
  page->capacity = 0;
  page->used = 0;
  page->free = NULL;
  page->frees = 0;
  /* A bin takes a page's list whole: one key for both. A secure page's
   * blocks go out one at a time, checked, never through a bin: a key of its
   * own. */
  page->key = page->secure ? random_next(&heap->random_state) : heap->bin_key;
  page->task = atomic_load_explicit(&heap->task, memory_order_relaxed);
  atomic_store_explicit(&page->thread_free, 0, memory_order_relaxed);
  page_set_owner(page, page_owner_word(page, heap), memory_order_relaxed);
  return true;
}

/* The free fast path reads the descriptor of the block's own slice (one
 * load less than going back to the span head): every slice of a small page
 * carries the owner word, the class, its bin offset and the keep mask. The
 * head's owner store comes last, with the caller's ordering; the slow paths
 * read only the head's. */
void page_set_owner(page_t *page, heap_t *owner_word, memory_order order) {
  uint32_t size = page->block_size;
  uint16_t keep_mask = owner_word != NULL && !page->secure &&
                               page->task == NULL && size >= FOREIGN_KEEP_MIN &&
                               size <= FOREIGN_KEEP_MAX
                           ? BIN_KEEP_MASK
                           : 0;
  atomic_store_explicit(&page->keep_mask, keep_mask, memory_order_relaxed);
  for (uint32_t i = 1; i < page->slice_count; i++) {
    atomic_store_explicit(&page[i].keep_mask, keep_mask, memory_order_relaxed);
    /* Written only where it changes: the free fast path reads it on any
     * thread, and an abandoned or reclaimed page has blocks out. */
    if (page[i].class_index != page->class_index) {
      page[i].class_index = page->class_index;
      page[i].bin_offset = page->bin_offset;
    }
    atomic_store_explicit(&page[i].owner, owner_word, memory_order_relaxed);
  }
  atomic_store_explicit(&page->owner, owner_word, order);
}

/* Secure mode: free blocks hold this byte after their link, checked when
 * they are handed out again, so a write after free is caught. */
#define SECURE_FILL_BYTE 0xdf

void page_secure_fill(const page_t *page, block_t *block) {
  uint8_t *fill = (uint8_t *)block + sizeof(block_t);
  track_undefined(fill, page->block_size - sizeof(block_t));
  memset(fill, SECURE_FILL_BYTE, page->block_size - sizeof(block_t));
  track_noaccess(fill, page->block_size - sizeof(block_t));
}

bool page_secure_intact(const page_t *page, const block_t *block) {
  const uint8_t *bytes = (const uint8_t *)block;
  bool intact = true;
  track_defined(bytes, page->block_size);
  for (size_t i = sizeof(block_t); i < page->block_size && intact; i++)
    intact = bytes[i] == SECURE_FILL_BYTE;
  track_noaccess(bytes, page->block_size);
  return intact;
}

/* Secure free bits: `reserved` bits in a metadata block, set with atomic
 * operations since remote frees set them from any thread. */
static size_t page_free_bits_bytes(const page_t *page) {
  return ((size_t)page->reserved + 63) / 64 * sizeof(uint64_t);
}

bool page_free_bits_init(page_t *page) {
  page->free_bits = os_meta_alloc(page_free_bits_bytes(page));
  return page->free_bits != NULL;
}

static void page_free_bits_release(page_t *page) {
  if (page->free_bits != NULL)
    os_meta_free((void *)page->free_bits, page_free_bits_bytes(page));
  page->free_bits = NULL;
}

void page_span_free(page_t *page, uint64_t free_since_ms) {
  page_free_bits_release(page); /* before the word holds a timestamp */
  if (free_since_ms != 0)
    segment_span_free_since(page, free_since_ms);
  else
    segment_span_free(page);
}

bool page_free_bit_set(page_t *page, size_t index) {
  uint64_t bit = UINT64_C(1) << (index & 63);
  uint64_t old = atomic_fetch_or_explicit(&page->free_bits[index >> 6], bit,
                                          memory_order_acq_rel);
  return (old & bit) == 0;
}

void page_free_bit_clear(page_t *page, size_t index) {
  uint64_t bit = UINT64_C(1) << (index & 63);
  atomic_fetch_and_explicit(&page->free_bits[index >> 6], ~bit,
                            memory_order_acq_rel);
}

static uint32_t gcd_u32(uint32_t a, uint32_t b) {
  while (b != 0) {
    uint32_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

/* The order a fresh batch is linked in: block (i * stride) % batch is the
 * i-th handed out, the stride coprime with the batch so that every block
 * comes once. Secure mode: a random stride from the page key, so that
 * neighbours in memory are not neighbours in time; neither 1 nor batch - 1
 * (the address order and its reverse) where another stride is coprime, as in
 * every batch above 6 (one run of a test in 60 drew 1 and handed batches out
 * in address order). Otherwise the least stride that leaves a whole cache
 * line between two blocks handed out one after the other (blocks of a
 * multiple of the line start on lines and share none). Objects one thread
 * allocates in a row are often handed to different threads: a Tokio
 * runtime's per-worker run queue, parker and core (40, 48 and 40 B, made in
 * a loop by the thread that builds it) lay side by side, one worker's core
 * in the line of the other's queue head, and each worker's every pop missed
 * (a third of the samples of the worker loop sat on that one CAS). Spread,
 * the request/reply program ran 1.08x, the pipeline 1.02x (11 rounds each,
 * side by side). */
static uint32_t page_batch_stride(const page_t *page, uint32_t batch) {
  if (batch < 3)
    return 1;
  uint32_t stride, low = 1, high = batch - 1;
  if (page->secure) {
    stride = (uint32_t)((page->key >> 7) ^ page->capacity) % batch;
    if (batch > 6) { /* another stride is coprime with the batch */
      low = 2;
      high = batch - 2;
    }
  } else {
    uint32_t block_size = page->block_size;
    if (block_size % CACHE_LINE == 0)
      return 1; /* blocks start on lines: neighbours share none */
    stride = (CACHE_LINE + 2 * block_size - 1) / block_size;
    if (stride >= batch)
      return 1;
  }
  while (stride < low || stride > high || gcd_u32(stride, batch) != 1)
    stride = (stride + 1) % batch;
  return stride;
}

/* Carve the next blocks of the span into `free`: up to 4 KiB of them (at
 * least one), from carve_first to the end of the span, then from its start.
 * False when the page is fully carved. */
bool page_extend(page_t *page) {
  if (page->capacity >= page->reserved)
    return false;
  uint32_t carve = page->carve_first + page->capacity;
  if (carve >= page->reserved)
    carve -= page->reserved;
  uint32_t batch = 4096 / page->block_size;
  if (batch == 0)
    batch = 1;
  if (batch > page->reserved - page->capacity)
    batch = page->reserved - page->capacity;
  if (batch > page->reserved - carve) /* the next batch wraps to block 0 */
    batch = page->reserved - carve;
  uint8_t *first = page->start + (size_t)carve * page->block_size;
  uint32_t stride = page_batch_stride(page, batch);
  /* Link block (i * stride) % batch for i = batch-1 down to 0. */
  block_t *next = page->free;
  uint32_t index = (uint32_t)(((uint64_t)(batch - 1) * stride) % batch);
  for (uint32_t i = batch; i-- > 0;
       index = index >= stride ? index - stride : index + batch - stride) {
    block_t *block = (block_t *)(first + (size_t)index * page->block_size);
    if (page->secure) {
      page_secure_fill(page, block);
      page_free_bit_set(page, (size_t)(carve + index));
    }
    block_set_next(page, block, next);
    next = block;
  }
  page->free = next;
  /* Read by other threads' frees to validate pointers. */
  __atomic_store_n(&page->capacity, page->capacity + batch, __ATOMIC_RELAXED);
  if (page_dense(page))
    segment_carved(page, first, (size_t)batch * page->block_size);
  return true;
}

/* A remote list that fails its walk: a block freed twice by other threads
 * links into the list twice (a cycle, or a block also in `free`), an
 * overwritten link leaves the page. ZKMEM_ON_ERROR=warn: the list leaks. */
ZK_COLD void page_remote_list_corrupted(const page_t *page,
                                        const block_t *block) {
  error_report("double free or corrupted free list (a block freed twice by "
               "another thread, or written after free)",
               block, page->block_size);
}

static bool page_holds(const page_t *page, const block_t *block) {
  return (uintptr_t)((const uint8_t *)block - page->start) <
         (uintptr_t)page->reserved * page->block_size;
}

/* The full flag stays as it is (see PAGE_REMOTE_FULL). */
block_t *page_take_remote_unwalked(page_t *page, uint32_t *pushed_out) {
  uintptr_t word =
      atomic_load_explicit(&page->thread_free, memory_order_relaxed);
  if ((word & ~PAGE_REMOTE_FULL) == 0)
    return NULL;
  /* Only the owner takes, so the list stays non-empty. */
  while (!atomic_compare_exchange_weak_explicit(
      &page->thread_free, &word, word & PAGE_REMOTE_FULL, memory_order_acquire,
      memory_order_relaxed))
    ;
  block_t *remote = (block_t *)(word & PAGE_REMOTE_LIST);
  uint32_t pushed = (uint32_t)(word >> PAGE_REMOTE_COUNT_SHIFT);
  if (unlikely(pushed == 0 || pushed > page->used ||
               !page_holds(page, remote))) {
    page_remote_list_corrupted(page, remote);
    return NULL;
  }
  *pushed_out = pushed;
  return remote;
}

/* Owner only: takes the page's remote frees; *tail and *count describe
 * the list, NULL when there is none (or it was corrupted and reported).
 * Other threads wrote the list, so the walk trusts nothing: it holds the
 * count the pushes left, and each block must lie in the page. */
block_t *page_take_remote(page_t *page, block_t **tail_out,
                          uint32_t *count_out) {
  uint32_t pushed;
  block_t *remote = page_take_remote_unwalked(page, &pushed);
  if (remote == NULL)
    return NULL;
  uint32_t count = 1;
  block_t *tail = remote;
  block_t *next;
  while ((next = block_next(page, tail)) != NULL) {
    if (unlikely(count >= pushed || !page_holds(page, next))) {
      page_remote_list_corrupted(page, tail);
      return NULL;
    }
    tail = next;
    count++;
  }
  if (unlikely(count != pushed)) {
    page_remote_list_corrupted(page, tail);
    return NULL;
  }
  *tail_out = tail;
  *count_out = count;
  return remote;
}

void page_splice_free(page_t *page, block_t *remote, block_t *tail,
                      uint32_t count) {
  block_set_next(page, tail, page->free);
  page->free = remote;
  page->used -= count;
  page->frees += count;
}

/* Owner only: move remote frees into `free`. */
void page_collect(page_t *page) {
  block_t *tail;
  uint32_t count;
  block_t *remote = page_take_remote(page, &tail, &count);
  if (remote != NULL)
    page_splice_free(page, remote, tail, count);
}

remote_push_t page_free_remote_chain(page_t *page, block_t *head, block_t *tail,
                                     uint32_t count) {
  uintptr_t word =
      atomic_load_explicit(&page->thread_free, memory_order_relaxed);
  do {
    /* A block freed twice in a row, or a chain's first block freed again
     * after an earlier push of it: the owner takes the list without
     * walking it (page_take_remote_unwalked), so this is where it shows. */
    uintptr_t first = word & PAGE_REMOTE_LIST;
    if (unlikely(first == (uintptr_t)head || first == (uintptr_t)tail)) {
      page_remote_list_corrupted(page, (const block_t *)first);
      return REMOTE_REFUSED;
    }
    block_set_next(page, tail, (block_t *)(word & PAGE_REMOTE_LIST));
  } while (!atomic_compare_exchange_weak_explicit(
      &page->thread_free, &word,
      (uintptr_t)head |
          ((word & ~PAGE_REMOTE_LIST) + (uintptr_t)count * PAGE_REMOTE_ONE),
      memory_order_seq_cst, memory_order_relaxed));
  return (word & PAGE_REMOTE_FULL) != 0 ? REMOTE_PUSHED_TO_FULL : REMOTE_PUSHED;
}
