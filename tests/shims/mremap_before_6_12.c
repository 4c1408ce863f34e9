/* Linked with -Wl,--wrap=mremap into a second build of test_large: mremap
 * as Linux kernels before 6.12 behave, on any kernel. A move to a fixed
 * address unmaps the destination first; then a source range that is not
 * one mapping is refused with EFAULT (6.17 and later move it), as is the
 * growth of one. The mappings are read from /proc/self/maps, so adjacent
 * ones the kernel merged count as one, as they do for the kernel. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

void *__real_mremap(void *old, size_t old_size, size_t new_size, int flags,
                    ...);

/* Whether [low, high) lies in one line of /proc/self/maps. No allocation:
 * the allocator under test calls this from its own paths. */
static bool one_mapping(uintptr_t low, uintptr_t high) {
  static char text[1 << 20];
  int fd = open("/proc/self/maps", O_RDONLY);
  if (fd < 0)
    abort();
  size_t length = 0;
  ssize_t got;
  while ((got = read(fd, text + length, sizeof(text) - 1 - length)) > 0)
    length += (size_t)got;
  close(fd);
  text[length] = '\0';
  for (char *line = text; *line != '\0';) {
    uintptr_t start = strtoull(line, &line, 16);
    uintptr_t end = strtoull(line + 1, &line, 16);
    if (low >= start && low < end)
      return high <= end;
    while (*line != '\0' && *line++ != '\n')
      ;
  }
  return false;
}

void *__wrap_mremap(void *old, size_t old_size, size_t new_size, int flags,
                    ...) {
  void *target = NULL;
  if (flags & MREMAP_FIXED) {
    va_list arguments;
    va_start(arguments, flags);
    target = va_arg(arguments, void *);
    va_end(arguments);
    munmap(target, new_size);
  }
  bool shrink_in_place = !(flags & MREMAP_FIXED) && new_size <= old_size;
  size_t checked = old_size < new_size ? old_size : new_size;
  if (!shrink_in_place &&
      !one_mapping((uintptr_t)old, (uintptr_t)old + checked)) {
    errno = EFAULT;
    return MAP_FAILED;
  }
  return (flags & MREMAP_FIXED)
             ? __real_mremap(old, old_size, new_size, flags, target)
             : __real_mremap(old, old_size, new_size, flags);
}
