/* Huge blocks while the kernel refuses calls: malloc, calloc, aligned_alloc,
 * realloc and free of 2-42 MiB blocks at random, with one munmap in four,
 * one mremap in six and one mmap in sixteen failing as the kernel fails
 * them (ENOMEM: a mapping split at vm.max_map_count, no address space),
 * the first of each kind among them. Linked with --wrap=munmap,mremap,mmap,
 * which reaches zkmem's own calls. Every block keeps its bytes, a
 * calloc'd one is zero, every usable byte is mapped, a failed call returns
 * NULL with ENOMEM and loses nothing, zkmem never counts a byte the kernel
 * does not map (and counts every byte it maps, where every munmap is
 * answered), and with the kernel answering again zkmem counts no huge
 * mapping and nothing more mapped than the kernel refused to unmap. In
 * each option mode that shapes huge mappings: default, secure (guard
 * pages), transparent huge pages, and a limit. */
#define _GNU_SOURCE
#include "os.h"
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/mman.h>

int __real_munmap(void *address, size_t size);
void *__real_mremap(void *address, size_t old_size, size_t new_size, int flags,
                    ...);
void *__real_mmap(void *address, size_t size, int protection, int flags, int fd,
                  off_t offset);

static bool injecting;
static uint32_t injection_state = 7;
static unsigned long refused_munmap, refused_mremap, refused_mmap;
static size_t refused_munmap_bytes;
static bool munmap_answered; /* no munmap refused: the counts are exact */

/* The first call of each kind is refused, then one in `one_in`. */
static bool refuse(uint32_t one_in, unsigned long refused_so_far) {
  injection_state = injection_state * 1664525u + 1013904223u;
  return injecting &&
         (refused_so_far == 0 || (injection_state >> 16) % one_in == 0);
}

int __wrap_munmap(void *address, size_t size) {
  if (!munmap_answered && refuse(4, refused_munmap)) {
    refused_munmap++;
    refused_munmap_bytes += size;
    errno = ENOMEM;
    return -1;
  }
  return __real_munmap(address, size);
}

void *__wrap_mremap(void *address, size_t old_size, size_t new_size, int flags,
                    ...) {
  void *target = NULL;
  if (flags & MREMAP_FIXED) {
    va_list arguments;
    va_start(arguments, flags);
    target = va_arg(arguments, void *);
    va_end(arguments);
  }
  if (refuse(6, refused_mremap)) {
    refused_mremap++;
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return (flags & MREMAP_FIXED)
             ? __real_mremap(address, old_size, new_size, flags, target)
             : __real_mremap(address, old_size, new_size, flags);
}

void *__wrap_mmap(void *address, size_t size, int protection, int flags, int fd,
                  off_t offset) {
  if (refuse(16, refused_mmap)) {
    refused_mmap++;
    errno = ENOMEM;
    return MAP_FAILED;
  }
  return __real_mmap(address, size, protection, flags, fd, offset);
}

/* Bytes of every mapping of the process. */
static size_t kernel_mapped(void) {
  FILE *maps = fopen("/proc/self/maps", "r");
  CHECK(maps != NULL);
  size_t total = 0;
  char line[512];
  while (fgets(line, sizeof(line), maps) != NULL) {
    unsigned long start, end;
    if (sscanf(line, "%lx-%lx", &start, &end) == 2)
      total += end - start;
  }
  fclose(maps);
  return total;
}

#define MB    ((size_t)1 << 20)
#define SLOTS 16

struct slot {
  uint8_t *data;
  size_t size;
  uint8_t tag;
};

static uint32_t random_state = 1;
static uint32_t random_next(void) {
  random_state = random_state * 1103515245u + 12345u;
  return random_state >> 8;
}

/* 2-42 MiB and some bytes, or now and then a whole number of segments
 * less a header slice or two. */
static size_t random_size(void) {
  if (random_next() % 4 == 0)
    return (random_next() % 10 + 1) * 4 * MB - (random_next() % 3) * 65536;
  return 2 * MB + 1 + random_next() % (40 * MB);
}

static void check_slot(const struct slot *slot) {
  for (size_t i = 0; i < slot->size; i += 4093)
    CHECK(slot->data[i] == slot->tag);
  CHECK(slot->data[slot->size - 1] == slot->tag);
  size_t usable = zk_usable_size(slot->data);
  CHECK(usable >= slot->size);
  uintptr_t first = (uintptr_t)slot->data & ~(uintptr_t)4095;
  static unsigned char resident[(64 * MB) / 4096];
  CHECK((uintptr_t)slot->data + usable - first <= 64 * MB);
  /* ENOMEM where a page of the range is not mapped. */
  CHECK(mincore((void *)first, (uintptr_t)slot->data + usable - first,
                resident) == 0);
}

static void fill_slot(struct slot *slot, uint8_t *data, size_t size) {
  slot->data = data;
  slot->size = size;
  slot->tag = (uint8_t)(random_next() | 1);
  memset(data, slot->tag, size);
}

/* What zkmem counts as mapped against what the kernel maps: a refused
 * munmap of a block's or piece's mapping stays counted (its pages
 * returned), one of a reservation's trimmed ends stays mapped, uncounted.
 * So the kernel maps at least what zkmem counts, and at most that and
 * the bytes of the refused munmaps; exactly what it counts when every
 * munmap is answered. */
static void check_counts(const struct slot *slots, long gap) {
  bool was_injecting = injecting;
  injecting = false; /* the reads below map and unmap */
  zk_stats_t stats;
  zk_stats_get(&stats);
  size_t live = 0;
  for (int i = 0; i < SLOTS; i++)
    if (slots[i].data != NULL)
      live += zk_usable_size(slots[i].data);
  CHECK(stats.bytes_mapped_huge >= live);
  CHECK(stats.bytes_mapped >= stats.bytes_mapped_huge);
  long uncounted = (long)kernel_mapped() - (long)stats.bytes_mapped - gap;
  CHECK(uncounted >= 0 && uncounted <= (long)refused_munmap_bytes);
  CHECK(!munmap_answered || uncounted == 0);
  injecting = was_injecting;
}

static void churn(int steps, bool remaps) {
  struct slot slots[SLOTS] = {{0}};
  zk_free(zk_malloc(64)); /* this thread's heap, before the kernel refuses */
  zk_collect(true);
  zk_stats_t before;
  zk_stats_get(&before);
  long gap = (long)kernel_mapped() - (long)before.bytes_mapped;
  unsigned failed = 0;
  (void)os_moves_mappings(); /* probed before the kernel refuses */
  injecting = true;
  for (int step = 0; step < steps; step++) {
    if (step % 25 == 0)
      check_counts(slots, gap);
    struct slot *slot = &slots[random_next() % SLOTS];
    if (slot->data != NULL) {
      check_slot(slot);
      if (random_next() % 3 == 0) {
        zk_free(slot->data);
        slot->data = NULL;
        continue;
      }
      size_t size = random_size();
      errno = 0;
      uint8_t *moved = zk_realloc(slot->data, size);
      if (moved == NULL) { /* the block stays, whole */
        CHECK_EQ(errno, ENOMEM);
        failed++;
        check_slot(slot);
        continue;
      }
      size_t kept = size < slot->size ? size : slot->size;
      for (size_t i = 0; i < kept; i += 4093)
        CHECK(moved[i] == slot->tag);
      CHECK(moved[kept - 1] == slot->tag);
      fill_slot(slot, moved, size);
      continue;
    }
    size_t size = random_size();
    unsigned kind = random_next() % 6;
    errno = 0;
    uint8_t *data =
        kind == 0 ? zk_calloc(1, size)
        : kind == 1
            ? zk_aligned_alloc((size_t)1 << (17 + random_next() % 8), size)
            : zk_malloc(size);
    if (data == NULL) {
      CHECK_EQ(errno, ENOMEM);
      failed++;
      continue;
    }
    if (kind == 0)
      for (size_t i = 0; i < size; i += 4096)
        CHECK(data[i] == 0);
    fill_slot(slot, data, size);
  }
  injecting = false;
  for (int i = 0; i < SLOTS; i++)
    if (slots[i].data != NULL) {
      check_slot(&slots[i]);
      zk_free(slots[i].data);
      slots[i].data = NULL;
    }
  zk_collect(true);
  check_counts(slots, gap);
  zk_stats_t after;
  zk_stats_get(&after);
  printf("%d steps: %u calls failed; munmap refused %lu, mremap %lu, mmap "
         "%lu; huge bytes mapped at the end %zu\n",
         steps, failed, refused_munmap, refused_mremap, refused_mmap,
         after.bytes_mapped_huge);
  CHECK((munmap_answered || refused_munmap > 0) && refused_mmap > 0 &&
        failed > 0);
  CHECK(!remaps || refused_mremap > 0); /* guarded blocks are copied */
  CHECK_EQ(after.bytes_mapped_huge, 0);
  CHECK_EQ(after.huge_live, 0);
  /* Nothing mapped since but what the kernel refused to unmap, counted
   * (a piece's mapping) or not (a reservation's end). */
  CHECK((long)after.bytes_mapped - (long)before.bytes_mapped <=
        (long)refused_munmap_bytes);
}

/* Each mode in a child of its own: options that shape mappings are set
 * before its first huge block. */
static void churn_in_child(const char *mode, zk_option_t option, long value,
                           int steps) {
  fflush(stdout);
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    if (option != ZK_OPTION_COUNT)
      CHECK(zk_option_set(option, value) == 0);
    printf("%s: ", mode);
    churn(steps, option != ZK_OPTION_SECURE);
    fflush(stdout);
    _exit(0);
  }
  int status;
  CHECK(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* The probe of whether one mremap moves several mappings, its mmap
 * refused: no for now, and probed again at the next call, not no for the
 * life of the process (as once, where a refused call turned moves of
 * assembled blocks off for good). Before any probe in this process. */
static void test_probe_refused(void) {
  fflush(stdout);
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    injecting = true; /* the first mmap is refused */
    bool refused = os_moves_mappings();
    injecting = false;
    bool later = os_moves_mappings();
    CHECK_EQ(refused_mmap, 1);
    CHECK(!refused);
    _exit(later ? 2 : 1);
  }
  int status;
  CHECK(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  bool moves = os_moves_mappings();
  printf("the probe with its mmap refused: no; then %s, as here (%s)\n",
         WEXITSTATUS(status) == 2 ? "yes" : "no", moves ? "yes" : "no");
  CHECK_EQ(WEXITSTATUS(status), moves ? 2 : 1);
}

int main(void) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  test_probe_refused();
  churn_in_child("default", ZK_OPTION_COUNT, 0, 800);
  munmap_answered = true;
  churn_in_child("default, every munmap answered", ZK_OPTION_COUNT, 0, 400);
  munmap_answered = false;
  churn_in_child("secure", ZK_OPTION_SECURE, 1, 300);
  churn_in_child("transparent huge pages", ZK_OPTION_HUGE_PAGES,
                 ZK_HUGE_PAGES_TRANSPARENT, 300);
  /* Allocations past the limit fail with ENOMEM like refused mappings. */
  churn_in_child("a 200 MiB limit", ZK_OPTION_LIMIT, (long)(200 * MB), 300);
  printf("test_huge_faults: ok\n");
  return 0;
}
