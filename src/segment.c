/* Segments and spans: the global layer under every heap and pool.
 *
 * A span of n slices is taken from the smallest non-empty size bin >= n and
 * split; a freed span merges with free neighbours on both sides, so free
 * memory of any size class can serve any other (cross-size reuse).
 * Segments whose slices are all free are unmapped after a longer delay.
 *
 * Lock: segment_lock guards the bins, the segment list and every free span
 * descriptor. Used spans belong to whoever allocated them. */
#include "internal.h"
#include "os.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

/* One byte per 4 MiB of a 48-bit address space: 64 MiB of zero pages, of
 * which only the 4 KiB pages covering mapped segments are ever written. A
 * byte rather than a bit: the free path tests it in one load (a bitmap
 * cost two instructions more per free). */
uint8_t segment_owned_map[SEGMENT_MAP_ENTRIES];

pthread_mutex_t segment_lock = PTHREAD_MUTEX_INITIALIZER;
static page_t *span_bins[SLICES_PER_SEGMENT]; /* free spans by slice count */
static segment_t *segments;                   /* NORMAL segments */
static uintptr_t segment_secret;
static size_t segments_mapped, bytes_mapped, bytes_huge_backed;
/* Of segments_mapped and bytes_mapped: the mappings of huge blocks. */
static size_t huge_blocks_mapped, bytes_huge_blocks_mapped;

/* Freed huge mappings, cut into pieces: kept mapped with their pages
 * committed, so that a later huge block is assembled from them (a piece
 * split, or several moved side by side with mremap, which moves pages
 * without copying or faulting them) instead of faulting every page in
 * again; the purge delay unmaps them. Under segment_lock. */
typedef struct huge_piece {
  uint8_t *base; /* on a HUGE_PIECE_CUT boundary */
  size_t size;   /* a multiple of OS_PAGE_SIZE */
  uint64_t free_since_ms;
  bool several_mappings; /* of a block assembled, or of neighbours joined */
} huge_piece_t;
#define HUGE_CACHE_PIECES  32
#define HUGE_PIECE_CUT     ((size_t)2 << 20) /* a page table's reach */
#define HUGE_CACHE_FLOOR   ((size_t)128 << 20)
#define HUGE_CACHE_CEILING ((size_t)512 << 20)
static huge_piece_t huge_pieces[HUGE_CACHE_PIECES];
static unsigned huge_piece_count;
static size_t huge_cache_bytes;
static size_t bytes_purged_total, bytes_free_committed;

static bool segment_room_for(size_t bytes);

static void owned_map_set(const void *segment, uint8_t state) {
  uintptr_t index =
      ((uintptr_t)segment >> SEGMENT_SHIFT) & (SEGMENT_MAP_ENTRIES - 1);
  __atomic_store_n(&segment_owned_map[index], state, __ATOMIC_RELEASE);
}

page_t *segment_lookup(const void *p) {
  segment_t *segment = segment_of(p);
  switch (segment_map_state(segment)) {
  case SEGMENT_MAP_HEADER:
    return segment_page_of(segment, p);
  case SEGMENT_MAP_AFTER_HEADER:
    return &segment_pages(
        (segment_t *)((uint8_t *)segment - SEGMENT_SIZE))[SEGMENT_FIRST_SLICE];
  default:
    return NULL;
  }
}

static size_t slice_index(const page_t *page) {
  segment_t *segment = segment_of(page);
  return (size_t)(page - segment_pages(segment));
}

static uint8_t *slice_address(const page_t *page) {
  return (uint8_t *)segment_of(page) + (slice_index(page) << SLICE_SHIFT);
}

/* Every slice of a span points back to the span head, and has no owner
 * until page_set_owner gives it one. */
static void span_mark(page_t *head, size_t slices) {
  head->slice_count = (uint32_t)slices;
  head->slice_offset = 0;
  for (size_t i = 1; i < slices; i++) {
    head[i].slice_offset = (uint32_t)i;
    head[i].slice_count = 0;
    head[i].kind = head->kind;
    atomic_store_explicit(&head[i].owner, NULL, memory_order_relaxed);
    atomic_store_explicit(&head[i].keep_mask, 0, memory_order_relaxed);
  }
}

static void bin_insert(page_t *span) {
  page_t **bin = &span_bins[span->slice_count];
  span->prev = NULL;
  span->next = *bin;
  if (*bin)
    (*bin)->prev = span;
  *bin = span;
}

static void bin_remove(page_t *span) {
  if (span->prev)
    span->prev->next = span->next;
  else
    span_bins[span->slice_count] = span->next;
  if (span->next)
    span->next->prev = span->prev;
  span->next = span->prev = NULL;
}

static size_t span_bytes(const page_t *span) {
  return (size_t)span->slice_count << SLICE_SHIFT;
}

/* A merged span counts as purged only if both parts were; the purged part
 * of a mixed merge is counted as committed from now on (conservative). */
static void span_merge_purge_state(page_t *into, const page_t *other) {
  if (into->purged && !other->purged)
    bytes_free_committed += span_bytes(into);
  else if (!into->purged && other->purged)
    bytes_free_committed += span_bytes(other);
  into->purged = into->purged && other->purged;
  into->is_zero = into->is_zero && other->is_zero;
}

/* Put a free span (not in any bin) into its bin, merged with neighbours.
 * A merged span is purged only if all its parts were. */
static void span_insert_free(page_t *span) {
  segment_t *segment = segment_of(span);
  size_t index = slice_index(span);
  size_t end = index + span->slice_count;
  if (end < SLICES_PER_SEGMENT) {
    page_t *after = &segment_pages(segment)[end];
    if (page_kind(after) == PAGE_FREE_SPAN && after->slice_offset == 0) {
      bin_remove(after);
      span_merge_purge_state(span, after);
      span->slice_count += after->slice_count;
      if (after->free_since_ms > span->free_since_ms)
        span->free_since_ms = after->free_since_ms;
    }
  }
  if (index > SEGMENT_FIRST_SLICE) {
    page_t *before = &segment_pages(segment)[index - 1];
    before -= before->slice_offset;
    if (page_kind(before) == PAGE_FREE_SPAN) {
      bin_remove(before);
      span_merge_purge_state(before, span);
      before->slice_count += span->slice_count;
      if (span->free_since_ms > before->free_since_ms)
        before->free_since_ms = span->free_since_ms;
      span = before;
    }
  }
  span->kind = PAGE_FREE_SPAN;
  span_mark(span, span->slice_count);
  bin_insert(span);
}

/* Secure mode: a guard page between the header and the first slice, and the
 * last slice kept as a guard (a header-kind span, so free spans never merge
 * into it). False, and nothing protected, when the kernel refuses. */
static bool segment_guard(segment_t *segment) {
  uint8_t *header_end = (uint8_t *)segment + SLICE_SIZE;
  uint8_t *last_slice = (uint8_t *)segment + SEGMENT_SIZE - SLICE_SIZE;
  if (!os_protect(header_end - OS_PAGE_SIZE, OS_PAGE_SIZE, false))
    return false;
  if (!os_protect(last_slice, SLICE_SIZE, false)) {
    os_protect(header_end - OS_PAGE_SIZE, OS_PAGE_SIZE, true);
    return false;
  }
  page_t *guard = &segment_pages(segment)[SLICES_PER_SEGMENT - 1];
  guard->kind = PAGE_HEADER;
  guard->slice_count = 1;
  return true;
}

/* ---- dense halves: ZKMEM_HUGE_PAGES=dense ----
 *
 * A 2 MiB half of a segment at least 7/8 of which dense pages have carved
 * into blocks is advised for transparent huge pages (MADV_HUGEPAGE) by the
 * purge pass (halves_review; every quarter purge delay at most), and
 * the kernel's khugepaged collapses it in the background, off the
 * program's threads: one TLB entry then covers what took 512. Dense pages
 * are thread heaps' small pages of blocks no larger than an OS page
 * (page_dense): a block is carved when it is first handed out, and each OS
 * page of such blocks is touched once its blocks are, so a collapse, which
 * fills the holes of the range, adds at most an eighth of the half to the
 * RSS. What else a half holds keeps it in 4 KiB pages: a large block, or
 * one of a 64 KiB class, may be touched only in part (advising halves at
 * their first touch took the mixed scenario's RSS from 24 to 64 MiB), and
 * so may a page just begun (advising once a half's spans were merely taken
 * grew the RSS of 16 threads with a block of each small class by 33 MiB).
 * Collapsing the half at once instead (MADV_COLLAPSE, in the thread whose
 * carving crossed the mark) copied 2 MiB in about 2 ms: the server scenario
 * ran 1.07x, but a heap growing by a million 64 B blocks 0.39x and the
 * producer/consumer batches 0.90x. A purge in an advised half withdraws the
 * advice (MADV_NOHUGEPAGE) before it returns the pages, so that the
 * background collapse does not bring them back, and so does a pass that
 * finds the half carved below half (its pages gone, the span reused for
 * something else); it is advised again when dense again, but not within
 * four purge delays of the withdrawal, and never with a delay of 0. A
 * purge of part of a collapsed half leaves the kernel holding the whole
 * 2 MiB page until it splits its queue of such pages under memory
 * pressure, though the RSS falls at once. Only where
 * transparent huge pages are "madvise": "always" gives them everywhere
 * anyway, "never" nowhere; not for secure segments (guard pages split the
 * half). The advice is a flag on the kernel's mapping, given and withdrawn
 * under segment_lock like the purges it orders with; it takes the
 * kernel's mapping lock for writing, so it is given in the pass, not in
 * the carving that allocations do. The counts are kept in every mode (an
 * atomic add per 4 KiB carved), so that the mode may be switched on at run
 * time.
 *
 * Opt-in, not the default: khugepaged scans 16 MiB every 10 s by default,
 * so a run of seconds gains nothing (the benchmark's server runs last 0.1
 * s), and in 30 s server runs, where it had collapsed 10 MiB by the 20th
 * second, two runs measured +15% and -14% against 4 KiB pages, within this
 * machine's noise; each advised half is also a kernel mapping of its own.
 * Huge pages themselves pay here: the server scenario with every segment
 * in huge pages from the start (ZKMEM_HUGE_PAGES=transparent) ran 1.04x to
 * 1.20x tcmalloc where 4 KiB pages ran 0.97x to 1.00x, at 18.9 MiB of RSS
 * against 15.1. */
#define HALF_BYTES       (SEGMENT_SIZE / 2)
#define HALF_DENSE_BYTES (HALF_BYTES - HALF_BYTES / 8)

/* -1 unknown, 0 no, 1 yes: whether advising is worth trying here. */
static _Atomic int advice_useful = -1;

static bool advice_allowed(void) {
  int known = atomic_load_explicit(&advice_useful, memory_order_relaxed);
  if (known >= 0)
    return known != 0;
  int allowed = 0;
  int fd =
      open("/sys/kernel/mm/transparent_hugepage/enabled", O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    char text[128] = {0};
    ssize_t got = read(fd, text, sizeof(text) - 1);
    close(fd);
    allowed = got > 0 && strstr(text, "[madvise]") != NULL;
  }
  atomic_store_explicit(&advice_useful, allowed, memory_order_relaxed);
  return allowed != 0;
}

/* Counts carved bytes [start, start + bytes) in or out of the halves they
 * lie in. */
static void halves_count_carved(segment_t *segment, const uint8_t *start,
                                size_t bytes, bool carved) {
  const uint8_t *middle = (const uint8_t *)segment + HALF_BYTES;
  for (unsigned half = 0; half < 2; half++) {
    const uint8_t *low = half == 0 ? start : (start > middle ? start : middle);
    const uint8_t *high =
        half == 0 ? (start + bytes < middle ? start + bytes : middle)
                  : start + bytes;
    if (low >= high)
      continue;
    uint32_t part = (uint32_t)(high - low);
    if (carved)
      atomic_fetch_add_explicit(&segment->half_carved[half], part,
                                memory_order_relaxed);
    else
      atomic_fetch_sub_explicit(&segment->half_carved[half], part,
                                memory_order_relaxed);
  }
}

void segment_carved(page_t *page, uint8_t *start, size_t bytes) {
  halves_count_carved(segment_of(page), start, bytes, true);
}

/* No advice for the half before four purge delays from now (0 in
 * half_split_ms: never withdrawn). */
static void half_wait(segment_t *segment, unsigned half, uint64_t now_ms) {
  segment->half_split_ms[half] = now_ms != 0 ? now_ms : 1;
}

/* Withdraws a half's advice (segment_lock held); where the kernel refuses,
 * the advice stays, to be withdrawn at the next try. */
static void half_withdraw(segment_t *segment, unsigned half, uint64_t now_ms) {
  if (!os_advise_huge((uint8_t *)segment + half * HALF_BYTES, HALF_BYTES,
                      false))
    return;
  bytes_huge_backed -= HALF_BYTES;
  segment->half_advised[half] = 0;
  half_wait(segment, half, now_ms);
}

/* The purge pass's look at a segment's halves (segment_lock held): advice
 * for a half carved past the mark whose wait is over, withdrawn from one
 * carved below half (its pages freed, the span reused for other things),
 * and from all when the mode is no longer dense. In the pass, not on the
 * carve that crosses the mark: the advice takes the kernel's mapping lock
 * for writing, which the program's page faults wait for, and the pass
 * also catches a crossing made while the half was waiting. */
static void halves_review(segment_t *segment, uint64_t now_ms, uint64_t delay) {
  bool dense = option(ZK_OPTION_HUGE_PAGES) == ZK_HUGE_PAGES_DENSE &&
               delay != 0 && segment->huge_pages == 0 && !segment->guarded;
  for (unsigned half = 0; half < 2; half++) {
    uint32_t carved =
        atomic_load_explicit(&segment->half_carved[half], memory_order_relaxed);
    if (segment->half_advised[half]) {
      if (!dense || carved < HALF_BYTES / 2)
        half_withdraw(segment, half, now_ms);
      continue;
    }
    if (!dense || carved < HALF_DENSE_BYTES || !advice_allowed() ||
        (segment->half_split_ms[half] != 0 &&
         now_ms - segment->half_split_ms[half] < 4 * delay))
      continue;
    if (os_advise_huge((uint8_t *)segment + half * HALF_BYTES, HALF_BYTES,
                       true)) {
      segment->half_advised[half] = 1;
      bytes_huge_backed += HALF_BYTES;
    } else {
      half_wait(segment, half, now_ms);
    }
  }
}

/* A dense page leaving its span: its carved blocks no longer count. They
 * run from carve_first to the end of the span, then from its start. */
static void halves_uncount_page(page_t *page) {
  if (!page_dense(page) || page->capacity == 0)
    return;
  segment_t *segment = segment_of(page);
  uint32_t to_end = page->reserved - page->carve_first;
  uint32_t first = page->capacity < to_end ? page->capacity : to_end;
  halves_count_carved(
      segment, page->start + (size_t)page->carve_first * page->block_size,
      (size_t)first * page->block_size, false);
  if (page->capacity > first)
    halves_count_carved(segment, page->start,
                        (size_t)(page->capacity - first) * page->block_size,
                        false);
}

/* Before a purge of [first, first + count): the advice of the halves it
 * touches withdrawn, so that the kernel's background collapse does not
 * bring back the pages (segment_lock held). */
static void halves_before_purge(segment_t *segment, size_t first, size_t count,
                                uint64_t now_ms) {
  unsigned low = first >= SLICES_PER_SEGMENT / 2;
  unsigned high = first + count - 1 >= SLICES_PER_SEGMENT / 2;
  for (unsigned half = low; half <= high; half++)
    if (segment->half_advised[half])
      half_withdraw(segment, half, now_ms);
}

static segment_t *segment_map_new(void) {
  int got_huge = 0;
  int huge_mode = (int)option(ZK_OPTION_HUGE_PAGES);
  if (huge_mode == ZK_HUGE_PAGES_DENSE)
    huge_mode = 0; /* see "dense halves" */
  segment_t *segment =
      os_reserve_aligned(SEGMENT_SIZE, SEGMENT_SIZE, huge_mode, &got_huge);
  if (segment == NULL)
    return NULL;
  track_header(segment, SLICE_SIZE);
  segment->cookie = (uintptr_t)segment ^ segment_secret;
  segment->kind = SEGMENT_NORMAL;
  segment->huge_pages = got_huge;
  segment->mapped_size = SEGMENT_SIZE;
  segment_pages(segment)[0].kind = PAGE_HEADER;
  segment_pages(segment)[0].slice_count = 1;
  size_t usable = SEGMENT_USABLE_SLICES;
  if (option(ZK_OPTION_SECURE) && segment_guard(segment)) {
    segment->guarded = 1;
    usable--;
  }
  page_t *span = &segment_pages(segment)[SEGMENT_FIRST_SLICE];
  span->slice_count = (uint32_t)usable;
  span->is_zero = 1;
  span->huge_pages = got_huge;
  span->free_since_ms = 0;
  span->purged = 1; /* never touched: nothing resident */
  span_insert_free(span);
  segment->next = segments;
  if (segments)
    segments->prev = segment;
  segments = segment;
  segments_mapped++;
  bytes_mapped += SEGMENT_SIZE;
  if (got_huge)
    bytes_huge_backed += SEGMENT_SIZE;
  owned_map_set(segment, SEGMENT_MAP_HEADER);
  return segment;
}

static void segment_unmap(segment_t *segment) {
  page_t *span = &segment_pages(segment)[SEGMENT_FIRST_SLICE];
  bin_remove(span);
  if (!span->purged)
    bytes_free_committed -= span_bytes(span);
  if (segment->prev)
    segment->prev->next = segment->next;
  else
    segments = segment->next;
  if (segment->next)
    segment->next->prev = segment->prev;
  owned_map_set(segment, SEGMENT_MAP_NONE); /* before the range is free */
  segments_mapped--;
  if (segment->huge_pages)
    bytes_huge_backed -= SEGMENT_SIZE;
  for (unsigned half = 0; half < 2; half++)
    if (segment->half_advised[half])
      bytes_huge_backed -= SEGMENT_SIZE / 2;
  track_header_gone(segment, SLICE_SIZE);
  if (os_release(segment, SEGMENT_SIZE))
    bytes_mapped -= SEGMENT_SIZE; /* else still mapped, if by no one */
}

/* A free span of at least `slices` in `home`, looking at a bounded number
 * of candidates (the lock is held). */
static page_t *bins_find_in(size_t slices, const segment_t *home) {
  unsigned looked = 0;
  for (size_t bin = slices; bin < SLICES_PER_SEGMENT; bin++) {
    for (page_t *span = span_bins[bin]; span != NULL; span = span->next) {
      if (segment_of(span) == home)
        return span;
      if (++looked == 64)
        return NULL;
    }
  }
  return NULL;
}

size_t segment_span_max_slices(void) {
  return option(ZK_OPTION_SECURE) ? SEGMENT_USABLE_SLICES - 1
                                  : SEGMENT_USABLE_SLICES;
}

page_t *segment_span_alloc(size_t slices, page_kind_t kind, segment_t **home) {
  if (slices == 0 || slices > SEGMENT_USABLE_SLICES) {
    errno = ENOMEM;
    return NULL;
  }
  int saved_errno = errno; /* a fresh segment refused, a span found */
  pthread_mutex_lock(&segment_lock);
  if (segment_secret == 0)
    segment_secret = (uintptr_t)random_seed() | 1;
  page_t *span = NULL;
  if (home != NULL && *home != NULL)
    span = bins_find_in(slices, *home);
  if (span == NULL && home != NULL && *home == NULL) {
    /* A heap's first span: a segment of its own, so that threads do not
     * write to neighbouring descriptors and blocks (measured: two threads
     * ran at 1.56x one thread when their pages shared segments). */
    segment_t *fresh = segments;
    while (fresh != NULL && fresh->used_slices != 0)
      fresh = fresh->next; /* an empty one: left by an exited thread */
    if (fresh == NULL && segment_room_for(SEGMENT_SIZE))
      fresh = segment_map_new();
    if (fresh != NULL &&
        segment_pages(fresh)[SEGMENT_FIRST_SLICE].slice_count >= slices)
      span = &segment_pages(fresh)[SEGMENT_FIRST_SLICE];
  }
  for (size_t bin = slices; span == NULL && bin < SLICES_PER_SEGMENT; bin++)
    span = span_bins[bin];
  if (span == NULL) {
    segment_t *fresh =
        segment_room_for(SEGMENT_SIZE) ? segment_map_new() : NULL;
    if (fresh == NULL ||
        segment_pages(fresh)[SEGMENT_FIRST_SLICE].slice_count < slices) {
      pthread_mutex_unlock(&segment_lock);
      errno = ENOMEM; /* only a guarded segment is one slice short */
      return NULL;
    }
    span = &segment_pages(fresh)[SEGMENT_FIRST_SLICE];
  }
  bin_remove(span);
  if (!span->purged)
    bytes_free_committed -= span_bytes(span);
  if (span->slice_count > slices) {
    page_t *rest = span + slices;
    rest->slice_count = span->slice_count - (uint32_t)slices;
    rest->purged = span->purged;
    rest->is_zero = span->is_zero;
    rest->huge_pages = span->huge_pages;
    rest->free_since_ms = span->free_since_ms;
    rest->kind = PAGE_FREE_SPAN;
    span_mark(rest, rest->slice_count);
    bin_insert(rest);
    if (!rest->purged)
      bytes_free_committed += span_bytes(rest);
  }
  segment_t *segment = segment_of(span);
  segment->used_slices += (uint32_t)slices;
  if (home != NULL)
    *home = segment;
  /* Reset the descriptor under the lock: neighbours being freed read its
   * kind to decide whether to merge. */
  uint8_t is_zero = span->is_zero;
  uint8_t huge_pages = span->huge_pages;
  memset(span, 0, sizeof(*span));
  span->kind = (uint8_t)kind;
  span->is_zero = is_zero;
  span->huge_pages = huge_pages;
  span->start = slice_address(span);
  span_mark(span, slices);
  pthread_mutex_unlock(&segment_lock);
  errno = saved_errno;
  return span;
}

void segment_span_free(page_t *span) {
  segment_span_free_since(span, clock_now_ms());
}

/* A span whose memory the program stopped using before now: purge counts
 * its delay from then. */
void segment_span_free_since(page_t *span, uint64_t now) {
  size_t slices = span->slice_count;
  halves_uncount_page(span);
  if (span->secure) /* its last OS page was a guard (page.c, large.c) */
    os_protect(slice_address(span) + (slices << SLICE_SHIFT) - OS_PAGE_SIZE,
               OS_PAGE_SIZE, true);
  /* A used span is purged only where a purge returned its memory while it
   * sat in a large cache (segment_purge), and nothing touched it since. */
  bool purged = span->purged;
  pthread_mutex_lock(&segment_lock);
  segment_t *segment = segment_of(span);
  segment->used_slices -= (uint32_t)slices;
  span->kind = PAGE_FREE_SPAN;
  span->purged = purged;
  span->is_zero = purged && span->is_zero;
  span->free_since_ms = now;
  atomic_store_explicit(&span->owner, NULL, memory_order_relaxed);
  atomic_store_explicit(&span->keep_mask, 0, memory_order_relaxed);
  span->pool = NULL;
  if (!purged)
    bytes_free_committed += slices << SLICE_SHIFT;
  span_insert_free(span);
  if (segment->used_slices == 0)
    segment->free_since_ms = now;
  pthread_mutex_unlock(&segment_lock);
}

/* ---- huge blocks: a segment of their own ---- */

/* The address where the huge block of `segment` starts, as the owned map
 * knows it: its header's, or the segment after it. */
static void *huge_map_address(const segment_t *segment) {
  return segment->block_after_header ? (uint8_t *)segment + SEGMENT_SIZE
                                     : (uint8_t *)segment;
}

static uint8_t huge_map_state(const segment_t *segment) {
  return segment->block_after_header ? SEGMENT_MAP_AFTER_HEADER
                                     : SEGMENT_MAP_HEADER;
}

/* Grows or shrinks a huge segment's mapping to new_total, in place or by
 * moving its pages (no copy, no fault) to a fresh aligned range; NULL, and
 * the mapping intact, if neither works. segment_lock held. */
static segment_t *huge_remap(segment_t *segment, size_t new_total) {
  size_t old_total = segment->mapped_size;
  if (new_total > old_total && !segment_room_for(new_total - old_total))
    return NULL; /* realloc then tries a fresh block, and fails */
  if (!os_resize_in_place(segment, old_total, new_total)) {
    /* The move unmaps the old range: its map entry goes first, so that a
     * segment another thread maps there in the meantime keeps its own. */
    owned_map_set(segment, SEGMENT_MAP_NONE);
    segment_t *moved =
        os_move_aligned(segment, old_total, new_total, SEGMENT_SIZE);
    if (moved == NULL) {
      owned_map_set(segment, SEGMENT_MAP_HEADER);
      return NULL;
    }
    track_header_gone(segment, SLICE_SIZE);
    track_header(moved, SLICE_SIZE);
    /* The descriptors moved with the header; their colour is the new
     * address's. */
    page_t *carried =
        (page_t *)((uint8_t *)moved +
                   ((uint8_t *)segment_pages(segment) - (uint8_t *)segment));
    if (carried != segment_pages(moved))
      memmove(segment_pages(moved), carried,
              SLICES_PER_SEGMENT * sizeof(page_t));
    segment = moved;
    segment->cookie = (uintptr_t)segment ^ segment_secret;
    owned_map_set(segment, SEGMENT_MAP_HEADER);
  }
  segment->mapped_size = new_total;
  bytes_mapped += new_total - old_total;
  bytes_huge_blocks_mapped += new_total - old_total;
  if (segment->huge_pages)
    bytes_huge_backed += new_total - old_total;
  return segment;
}

/* segment_lock held. */
static void huge_unmap(segment_t *segment) {
  size_t total = segment->mapped_size;
  segments_mapped--;
  bytes_mapped -= total;
  huge_blocks_mapped--;
  bytes_huge_blocks_mapped -= total;
  if (segment->huge_pages)
    bytes_huge_backed -= total;
  /* Cleared before the range is unmapped: from then on another thread may
   * map a segment of its own there and set the entry. */
  owned_map_set(huge_map_address(segment), SEGMENT_MAP_NONE);
  track_header_gone(segment, SLICE_SIZE);
  if (!os_release(segment, total))
    bytes_mapped += total; /* still mapped, if by no one */
}

/* Peeked without the lock by segment_huge_alloc. */
static void huge_piece_count_set(unsigned count) {
  __atomic_store_n(&huge_piece_count, count, __ATOMIC_RELAXED);
}

static void huge_piece_remove(unsigned index) {
  huge_piece_count_set(huge_piece_count - 1);
  for (unsigned i = index; i < huge_piece_count; i++)
    huge_pieces[i] = huge_pieces[i + 1];
}

/* Takes `size` bytes from the front of piece `index`. */
static uint8_t *huge_piece_take(unsigned index, size_t size) {
  huge_piece_t *piece = &huge_pieces[index];
  uint8_t *base = piece->base;
  huge_cache_bytes -= size;
  if (size == piece->size) {
    huge_piece_remove(index);
  } else {
    piece->base += size;
    piece->size -= size;
  }
  return base;
}

/* Out of the cache in any case: a piece the kernel refused to unmap
 * stays mapped (its pages returned) and counted, or the loop that makes
 * room would try it again and again. */
static void huge_piece_release(unsigned index) {
  size_t size = huge_pieces[index].size;
  if (os_release(huge_piece_take(index, size), size))
    bytes_mapped -= size;
}

/* The smallest piece of at least `size` bytes (that starts a segment, if
 * in_place), or HUGE_CACHE_PIECES. */
static unsigned huge_piece_best_fit(size_t size, bool in_place) {
  unsigned best = HUGE_CACHE_PIECES;
  for (unsigned i = 0; i < huge_piece_count; i++)
    if (huge_pieces[i].size >= size &&
        (!in_place || ((uintptr_t)huge_pieces[i].base & SEGMENT_MASK) == 0) &&
        (best == HUGE_CACHE_PIECES ||
         huge_pieces[i].size < huge_pieces[best].size))
      best = i;
  return best;
}

/* A mapping of at least `*total` bytes (a multiple of OS pages), built
 * from cached pieces; *total becomes its size. Every piece starts on a
 * page table's reach (HUGE_PIECE_CUT) and is cut only at one: a block is
 * taken in place from the smallest piece that starts a segment and holds
 * it, whole 2 MiB of it (its last ones may be the piece's partial end);
 * else pieces are moved into a fresh range, whole 2 MiB from the largest
 * until one piece finishes the block, the rest of the range staying fresh,
 * and what the block does not reach is unmapped. So mremap moves whole
 * page tables, not their entries one by one (16 MiB: 24 us against 92),
 * and pieces stay a few kernel mappings (cut at any page, 12 blocks
 * replaced 3,000 times left 1,092 mappings more, against 103); and as a
 * mapping ends at its block's last page, a block built from pieces holds
 * no page that a block before it left untouched, pieces first and fresh
 * pages after. NULL when the cache is empty. segment_lock held. */
static segment_t *huge_pieces_assemble(size_t *total, bool *several_mappings) {
  size_t bytes = *total;
  size_t whole = (bytes + HUGE_PIECE_CUT - 1) & ~(HUGE_PIECE_CUT - 1);
  unsigned best = huge_piece_best_fit(bytes, true);
  if (best != HUGE_CACHE_PIECES) {
    size_t taken =
        whole < huge_pieces[best].size ? whole : huge_pieces[best].size;
    *total = taken;
    bytes_huge_blocks_mapped += taken;
    *several_mappings = huge_pieces[best].several_mappings;
    return (segment_t *)huge_piece_take(best, taken);
  }
  size_t limit = (size_t)option(ZK_OPTION_LIMIT);
  if (huge_piece_count == 0 || (limit != 0 && bytes_mapped + whole > limit))
    return NULL; /* the fresh path makes room, or refuses */
  int got_huge;
  uint8_t *target = os_reserve_aligned(whole, SEGMENT_SIZE, 0, &got_huge);
  if (target == NULL)
    return NULL;
  bytes_mapped += whole;
  bytes_huge_blocks_mapped += whole;
  size_t filled = 0;
  while (filled < bytes && huge_piece_count > 0) {
    size_t need = bytes - filled;
    unsigned source = huge_piece_best_fit(need, false);
    size_t move;
    if (source != HUGE_CACHE_PIECES) { /* finishes the block */
      move = (need + HUGE_PIECE_CUT - 1) & ~(HUGE_PIECE_CUT - 1);
      if (move > huge_pieces[source].size)
        move = huge_pieces[source].size;
    } else {
      source = 0;
      for (unsigned i = 1; i < huge_piece_count; i++)
        if (huge_pieces[i].size > huge_pieces[source].size)
          source = i;
      move = huge_pieces[source].size & ~(HUGE_PIECE_CUT - 1);
      if (move == 0) /* pieces under 2 MiB each: the largest, last */
        move = huge_pieces[source].size;
    }
    if (!os_move_to(huge_pieces[source].base, move, target + filled)) {
      /* A piece the program split into several kernel mappings (madvise
       * or mlock of part of its block), which a kernel before 6.17 does
       * not move, and before 6.12 unmaps the target range first: the
       * target may have a hole. It goes, with what moved into it, and so
       * does the piece, which would fail again. */
      if (os_release(target, whole))
        bytes_mapped -= whole;
      bytes_huge_blocks_mapped -= whole;
      huge_piece_release(source);
      return NULL;
    }
    huge_piece_take(source, move); /* its pages now back the target */
    bytes_mapped -= move;
    filled += move;
    if ((move & (HUGE_PIECE_CUT - 1)) != 0)
      break; /* a piece's partial end ends the pieces' part */
  }
  size_t size = filled > bytes ? filled : bytes;
  if (size < whole && os_release(target + size, whole - size)) {
    bytes_mapped -= whole - size;
    bytes_huge_blocks_mapped -= whole - size;
  } else {
    size = whole; /* refused (see os_release): the block keeps it */
  }
  *total = size;
  *several_mappings = true;
  return (segment_t *)target;
}

/* The cache holds as many bytes as the huge blocks still live, within a
 * floor and a ceiling: a program that replaces its big blocks finds the
 * pages of the last ones (20 live blocks of 5-25 MiB replaced at random:
 * with a fixed 128 MiB and 16 pieces, evicted pieces were unmapped and
 * their pages faulted in again by the next blocks, 35 faults a replacement
 * against 16), and one that frees them all keeps little. The purge delay
 * returns them in any case. segment_lock held. */
static size_t huge_cache_limit(void) {
  size_t live = bytes_huge_blocks_mapped;
  return live < HUGE_CACHE_FLOOR     ? HUGE_CACHE_FLOOR
         : live > HUGE_CACHE_CEILING ? HUGE_CACHE_CEILING
                                     : live;
}

/* A freed huge block's mapping joins the pieces, the oldest making room;
 * one too large for the cache is unmapped. A piece that lies next to it
 * in memory becomes one piece with it, several mappings side by side,
 * where the kernel moves such ranges in one call (os_moves_mappings): a
 * later block of up to their sum is then taken in place, where kept apart
 * it was assembled from pieces each moved with mremap into a fresh range
 * (20 live blocks of 5-25 MiB replaced 600 times at random: mremap 519
 * calls before, 294 after; mmap 270 and 189; time 1.01x, ahead in 8 of 11
 * rounds). The joined piece counts as freed now: under steady churn its
 * older part waits for the purge longer, within the cache's limit.
 * segment_lock held. */
static void huge_pieces_add(segment_t *segment) {
  size_t size = segment->mapped_size;
  uint8_t *base = (uint8_t *)segment;
  bool several_mappings = segment->several_mappings;
  segments_mapped--;
  huge_blocks_mapped--;
  bytes_huge_blocks_mapped -= size; /* a piece is free mapped memory */
  if (segment->huge_pages)
    bytes_huge_backed -= size;
  /* Not a block any more: a second free of it finds no owner. */
  owned_map_set(segment, SEGMENT_MAP_NONE);
  track_header_gone(segment, SLICE_SIZE);
  size_t limit = huge_cache_limit();
  for (unsigned i = 0; i < huge_piece_count && os_moves_mappings();) {
    huge_piece_t *piece = &huge_pieces[i];
    /* Not into a piece too large to keep: the neighbour would go too. */
    if ((piece->base + piece->size != base && base + size != piece->base) ||
        size + piece->size > limit / 2) {
      i++;
      continue;
    }
    if (piece->base < base)
      base = piece->base;
    size += piece->size;
    huge_cache_bytes -= piece->size;
    huge_piece_remove(i);
    several_mappings = true;
    i = 0; /* the range grew: its other side may have a neighbour too */
  }
  if (size > limit / 2) {
    if (os_release(base, size))
      bytes_mapped -= size;
    return;
  }
  while (huge_piece_count == HUGE_CACHE_PIECES ||
         huge_cache_bytes + size > limit) {
    /* Over the bytes: the oldest piece goes. Out of entries only: the
     * smallest, which holds the fewest pages (the 2 MiB cuts leave small
     * ends, which a block only ends with). */
    bool over_bytes = huge_cache_bytes + size > limit;
    unsigned victim = 0;
    for (unsigned i = 1; i < huge_piece_count; i++)
      if (over_bytes
              ? huge_pieces[i].free_since_ms < huge_pieces[victim].free_since_ms
              : huge_pieces[i].size < huge_pieces[victim].size)
        victim = i;
    huge_piece_release(victim);
  }
  huge_piece_count_set(huge_piece_count + 1);
  huge_pieces[huge_piece_count - 1] = (huge_piece_t){
      .base = base,
      .size = size,
      .free_since_ms = clock_now_ms(),
      .several_mappings = several_mappings,
  };
  huge_cache_bytes += size;
}

page_t *segment_huge_alloc(size_t size, size_t alignment, bool zeroed) {
  if (size == 0) /* a block beyond its header must have a byte in its map */
    size = 1;
  int saved_errno = errno; /* a failed reuse falls back to a fresh map */
  size_t offset = alignment > SLICE_SIZE ? alignment : SLICE_SIZE;
  bool after_header = offset >= SEGMENT_SIZE;
  /* Secure mode: the block ends where the mapping's last, inaccessible OS
   * page begins (16-byte alignment at most; huge pages would make the
   * guard 2 MiB). */
  bool guarded = option(ZK_OPTION_SECURE) && alignment <= 16;
  size_t rounded = (size + 15) & ~(size_t)15;
  int huge_mode = guarded ? 0 : (int)option(ZK_OPTION_HUGE_PAGES);
  if (huge_mode == ZK_HUGE_PAGES_DENSE)
    huge_mode = 0; /* see "dense halves" */
  /* Whole OS pages past the block, not a whole segment: a mapping's tail
   * the block does not reach is never touched, and when the mapping is
   * cached and moved into a later block, those pages fault in again
   * inside it (20 live blocks of 5-25 MiB replaced 200 times at random:
   * 134 faults a replacement with segment tails, 100 without, tcmalloc
   * 115). Huge pages keep whole segments. Every mapping covers its first
   * segment, whose entry in the owned map is the block's: where it did
   * not, another mapping could sit in it and its addresses look like the
   * block's (a guarded block, which ends at its guard page, starts later
   * in its segment instead). */
  size_t granule = huge_mode != 0 ? SEGMENT_SIZE : OS_PAGE_SIZE;
  size_t total =
      guarded ? (offset + rounded + 2 * OS_PAGE_SIZE - 1) & ~(OS_PAGE_SIZE - 1)
              : (offset + size + granule - 1) & ~(granule - 1);
  if (total < SEGMENT_SIZE && total >= size)
    total = SEGMENT_SIZE;
  if (total < size || rounded < size ||
      (after_header && size > PTRDIFF_MAX - 2 * SEGMENT_SIZE)) {
    errno = ENOMEM;
    return NULL;
  }
  /* Alignments of a segment or more: the header takes the segment before
   * the block, since masking the block's address finds the block itself.
   * The mapping is that segment and the block, not alignment + size: what
   * the limit is checked against. */
  if (after_header)
    total = SEGMENT_SIZE + ((size + SEGMENT_MASK) & ~SEGMENT_MASK);
  segment_t *segment = NULL;
  int got_huge = 0;
  bool reused = false, several_mappings = false;
  /* A zeroed block wants fresh pages: zero until written, where reused
   * ones would have to be cleared. */
  if (!guarded && !zeroed && offset == SLICE_SIZE &&
      __atomic_load_n(&huge_piece_count, __ATOMIC_RELAXED) != 0) {
    pthread_mutex_lock(&segment_lock);
    segment = huge_pieces_assemble(&total, &several_mappings);
    pthread_mutex_unlock(&segment_lock);
    if (segment != NULL) {
      reused = true;
      /* The old block's bytes: the fields and this segment's descriptors. */
      page_t *pages = segment_pages(segment);
      size_t pages_bytes = SLICES_PER_SEGMENT * sizeof(page_t);
      track_undefined(segment, SEGMENT_PAGES_OFFSET);
      track_undefined(pages, pages_bytes);
      memset(segment, 0, SEGMENT_PAGES_OFFSET);
      memset(pages, 0, pages_bytes);
    }
  }
  if (segment == NULL && option(ZK_OPTION_LIMIT) != 0) {
    pthread_mutex_lock(&segment_lock);
    bool room = segment_room_for(total);
    pthread_mutex_unlock(&segment_lock);
    if (!room) {
      errno = ENOMEM;
      return NULL;
    }
  }
  if (segment == NULL)
    segment =
        after_header
            ? os_reserve_aligned_at(total, alignment, SEGMENT_SIZE)
            : os_reserve_aligned(total, SEGMENT_SIZE, huge_mode, &got_huge);
  if (segment == NULL) {
    errno = ENOMEM;
    return NULL;
  }
  if (guarded) {
    uint8_t *guard = (uint8_t *)segment + total - OS_PAGE_SIZE;
    if (!os_protect(guard, OS_PAGE_SIZE, false)) {
      os_release(segment, total);
      errno = ENOMEM;
      return NULL;
    }
    offset = (size_t)(guard - rounded - (uint8_t *)segment);
  }
  if (after_header)
    offset = SEGMENT_SIZE;
  track_header(segment, SLICE_SIZE);
  pthread_mutex_lock(&segment_lock);
  if (segment_secret == 0)
    segment_secret = (uintptr_t)random_seed() | 1;
  segment->cookie = (uintptr_t)segment ^ segment_secret;
  segments_mapped++;
  huge_blocks_mapped++;
  if (!reused) { /* huge_pieces_assemble counted its mapping */
    bytes_mapped += total;
    bytes_huge_blocks_mapped += total;
  }
  if (got_huge)
    bytes_huge_backed += total;
  pthread_mutex_unlock(&segment_lock);
  segment->kind = SEGMENT_HUGE;
  segment->huge_pages = got_huge;
  segment->block_after_header = after_header;
  segment->several_mappings = several_mappings;
  segment->mapped_size = total;
  segment_pages(segment)[0].kind = PAGE_HEADER;
  size_t index = after_header ? SEGMENT_FIRST_SLICE : offset >> SLICE_SHIFT;
  page_t *page = &segment_pages(segment)[index];
  page->kind = PAGE_HUGE;
  page->is_zero = !reused;
  page->huge_pages = got_huge;
  page->start = (uint8_t *)segment + offset;
  page->large_size = guarded ? rounded : total - offset;
  page->secure = guarded;
  /* Interior slices of the first 4 MiB resolve to the block. */
  for (size_t i = index + 1; !after_header && i < SLICES_PER_SEGMENT; i++)
    segment_pages(segment)[i].slice_offset = (uint32_t)(i - index);
  owned_map_set(huge_map_address(segment), huge_map_state(segment));
  errno = saved_errno;
  return page;
}

/* Whether mremap can move or resize the block's mapping: a block
 * assembled from several pieces is several kernel mappings, which kernels
 * before 6.17 move in no single call (see os_moves_mappings). */
static bool huge_remappable(const segment_t *segment) {
  return segment->huge_pages != 2 &&
         (!segment->several_mappings || os_moves_mappings());
}

/* A mapping the cache can take: no guard page, pages that can move. */
static bool huge_cacheable(const segment_t *segment, const page_t *page) {
  return !page->secure && !segment->block_after_header &&
         huge_remappable(segment);
}

void segment_huge_free(page_t *page) {
  segment_t *segment = segment_of(page);
  pthread_mutex_lock(&segment_lock);
  if (huge_cacheable(segment, page))
    huge_pieces_add(segment);
  else
    huge_unmap(segment);
  pthread_mutex_unlock(&segment_lock);
}

/* Pieces freed longer than the delay ago (all, if force) go back to the
 * OS; returns their bytes. segment_lock held. */
static size_t huge_cache_purge(uint64_t now_ms, uint64_t delay, bool force) {
  size_t released = 0;
  for (unsigned i = 0; i < huge_piece_count;) {
    if (force || now_ms - huge_pieces[i].free_since_ms >= delay) {
      released += huge_pieces[i].size;
      huge_piece_release(i);
    } else {
      i++;
    }
  }
  return released;
}

page_t *segment_huge_resize(page_t *page, size_t new_size) {
  segment_t *segment = segment_of(page);
  size_t offset = (size_t)(page->start - (uint8_t *)segment);
  size_t new_total = (offset + new_size + SEGMENT_MASK) & ~SEGMENT_MASK;
  /* hugetlb mappings cannot be remapped piecewise, nor on older kernels
   * an assembled block (huge_remappable); a guarded block moves
   * (the caller copies it into a fresh guarded one), and so does one
   * aligned beyond a segment (a move would lose the alignment). */
  if (new_total < new_size || !huge_remappable(segment) || page->secure ||
      segment->block_after_header)
    return NULL;
  /* Within the mapping, and shrinking it would return less than a
   * segment: nothing to do. A growing block keeps a segment's room, so
   * that realloc a page at a time seldom remaps (grown to its last OS
   * page, a block grown from 3 to 16 MiB a page at a time moved 3,089
   * times, against 4): its untouched end, cached at its free, can fault
   * in again inside a later block. */
  if (offset + new_size <= segment->mapped_size &&
      new_total >= segment->mapped_size)
    return page;
  pthread_mutex_lock(&segment_lock);
  segment_t *resized = huge_remap(segment, new_total);
  pthread_mutex_unlock(&segment_lock);
  if (resized == NULL)
    return NULL;
  page = &segment_pages(resized)[offset >> SLICE_SHIFT];
  page->start = (uint8_t *)resized + offset;
  page->large_size = new_total - offset;
  return page;
}

/* ---- purge ---- */

/* A free or cached span's memory back to the OS, if it has been unused
 * for the delay (or force); its bytes, or 0. Only a purge the kernel
 * accepted counts: one refused (locked memory) leaves the contents and the
 * span's state, and is tried again a delay later. */
static size_t span_purge_due(page_t *span, uint64_t now_ms, uint64_t delay,
                             bool force, bool decommit) {
  if (span->purged || (!force && now_ms - span->free_since_ms < delay))
    return 0;
  uint8_t *start = slice_address(span);
  halves_before_purge(segment_of(span), slice_index(span), span->slice_count,
                      now_ms);
  if (!os_purge(start, span_bytes(span), decommit)) {
    span->free_since_ms = now_ms;
    return 0;
  }
  span->purged = 1;
  span->is_zero = decommit;
  return span_bytes(span);
}

/* A span in some heap's large cache, cached longer than the delay (or
 * force): its memory goes back to the OS while the span stays cached, so
 * the heap reuses the address range and gets zeroed pages. The CAS keeps
 * the owner from taking it back meanwhile (see PAGE_LARGE_CACHED). */
static size_t span_purge_cached(page_t *span, uint64_t now_ms, uint64_t delay,
                                bool force, bool decommit) {
  uint8_t expected = PAGE_LARGE_CACHED;
  if (!__atomic_compare_exchange_n(&span->kind, &expected, PAGE_LARGE_PURGING,
                                   false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
    return 0;
  size_t purged = span_purge_due(span, now_ms, delay, force, decommit);
  __atomic_store_n(&span->kind, PAGE_LARGE_CACHED, __ATOMIC_RELEASE);
  return purged;
}

/* Returns free spans older than the delay (all, if force) to the OS, and
 * unmaps segments that have been entirely free for four delays. Returns
 * bytes purged. Called with no lock held. */
static size_t segment_purge_locked(uint64_t now_ms, bool force) {
  uint64_t delay = (uint64_t)option(ZK_OPTION_PURGE_DELAY_MS);
  bool decommit = option(ZK_OPTION_PURGE_DECOMMIT) != 0;
  size_t purged = huge_cache_purge(now_ms, delay, force);
  segment_t *segment = segments;
  while (segment != NULL) {
    segment_t *next = segment->next;
    if (segment->used_slices == 0 &&
        (force || now_ms - segment->free_since_ms >= 4 * delay)) {
      page_t *span = &segment_pages(segment)[SEGMENT_FIRST_SLICE];
      if (!span->purged)
        purged += span_bytes(span);
      segment_unmap(segment);
      segment = next;
      continue;
    }
    halves_review(segment, now_ms, delay);
    for (size_t index = SEGMENT_FIRST_SLICE; index < SLICES_PER_SEGMENT;) {
      page_t *span = &segment_pages(segment)[index];
      size_t slices = span->slice_count ? span->slice_count : 1;
      page_kind_t kind = page_kind(span);
      if (kind == PAGE_LARGE_CACHED && segment->huge_pages != 2) {
        purged += span_purge_cached(span, now_ms, delay, force, decommit);
        index += slices;
        continue;
      }
      if (kind == PAGE_FREE_SPAN && segment->huge_pages != 2) {
        size_t bytes = span_purge_due(span, now_ms, delay, force, decommit);
        bytes_free_committed -= bytes;
        purged += bytes;
      }
      index += slices;
    }
    segment = next;
  }
  bytes_purged_total += purged;
  return purged;
}

size_t segment_purge(uint64_t now_ms, bool force) {
  pthread_mutex_lock(&segment_lock);
  size_t purged = segment_purge_locked(now_ms, force);
  pthread_mutex_unlock(&segment_lock);
  return purged;
}

/* ZKMEM_LIMIT: the bytes zkmem maps may not pass it. Free segments and
 * kept huge mappings go back first; false when that is not enough.
 * segment_lock held. */
static bool segment_room_for(size_t bytes) {
  size_t limit = (size_t)option(ZK_OPTION_LIMIT);
  if (limit == 0 || bytes_mapped + bytes <= limit)
    return true;
  segment_purge_locked(clock_now_ms(), true);
  return bytes_mapped + bytes <= limit;
}

size_t segment_slices_mapped(void) {
  return bytes_mapped >> SLICE_SHIFT;
}

void segment_lock_all(void) {
  pthread_mutex_lock(&segment_lock);
}
void segment_unlock_all(void) {
  pthread_mutex_unlock(&segment_lock);
}

void segment_collect_stats(zk_stats_t *out) {
  pthread_mutex_lock(&segment_lock);
  out->segments_mapped = segments_mapped;
  out->bytes_mapped = bytes_mapped;
  out->bytes_huge_pages = bytes_huge_backed;
  out->huge_segments_mapped = huge_blocks_mapped;
  out->bytes_mapped_huge = bytes_huge_blocks_mapped;
  out->bytes_purged = bytes_purged_total;
  out->bytes_committed += bytes_free_committed + huge_cache_bytes;
  pthread_mutex_unlock(&segment_lock);
}
