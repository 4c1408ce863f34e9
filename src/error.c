/* Misuse reports: one line on stderr, then abort (or carry on, leaking the
 * block, with ZKMEM_ON_ERROR=warn). Formats on the stack: no allocation
 * while the heap may be corrupt. */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static void write_line(const char *line, size_t length) {
  int saved_errno = errno; /* ZKMEM_ON_ERROR=warn carries on */
  while (length > 0) {
    ssize_t written = write(STDERR_FILENO, line, length);
    if (written <= 0)
      break;
    line += written;
    length -= (size_t)written;
  }
  errno = saved_errno;
}

void error_report(const char *what, const void *pointer, size_t size) {
  char line[256];
  int length;
  if (size != 0)
    length = snprintf(line, sizeof(line),
                      "zkmem: error: %s: pointer %p (block size %zu)\n", what,
                      pointer, size);
  else
    length = snprintf(line, sizeof(line), "zkmem: error: %s: pointer %p\n",
                      what, pointer);
  if (length > 0)
    write_line(line, (size_t)length < sizeof(line) ? (size_t)length
                                                   : sizeof(line) - 1);
  if (option(ZK_OPTION_ON_ERROR) == 0)
    abort();
}

void error_warning(const char *format, ...) {
  char line[256];
  va_list args;
  va_start(args, format);
  int length = vsnprintf(line, sizeof(line), format, args);
  va_end(args);
  if (length > 0)
    write_line(line, (size_t)length < sizeof(line) ? (size_t)length
                                                   : sizeof(line) - 1);
}
