/* Minimal assertions for zkmem's tests: stop at the first failure with the
 * file, line and expression. */
#ifndef ZKMEM_TEST_UTIL_H
#define ZKMEM_TEST_UTIL_H

#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define CHECK(condition)                                                       \
  do {                                                                         \
    if (!(condition)) {                                                        \
      fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__,         \
              #condition);                                                     \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

#define CHECK_EQ(actual, expected)                                             \
  do {                                                                         \
    long long check_actual = (long long)(actual);                              \
    long long check_expected = (long long)(expected);                          \
    if (check_actual != check_expected) {                                      \
      fprintf(stderr, "%s:%d: %s == %lld, expected %s == %lld\n", __FILE__,    \
              __LINE__, #actual, check_actual, #expected, check_expected);     \
      exit(1);                                                                 \
    }                                                                          \
  } while (0)

/* A pattern derived from the block's address and a seed: a block holding
 * another block's pattern, or a stale one, fails the check. */
static inline unsigned char test_pattern_byte(const void *block, size_t index,
                                              unsigned seed) {
  size_t mixed = ((size_t)block >> 4) * 2654435761u + index * 40503u + seed;
  return (unsigned char)(mixed ^ (mixed >> 13));
}

static inline void test_fill(void *block, size_t size, unsigned seed) {
  unsigned char *bytes = (unsigned char *)block;
  for (size_t i = 0; i < size; i++)
    bytes[i] = test_pattern_byte(block, i, seed);
}

static inline int test_verify(const void *block, size_t size, unsigned seed) {
  const unsigned char *bytes = (const unsigned char *)block;
  for (size_t i = 0; i < size; i++)
    if (bytes[i] != test_pattern_byte(block, i, seed))
      return 0;
  return 1;
}

/* Options are read once at start-up and tests expect the defaults: when
 * any ZKMEM_* variable is set, run this program again without them. */
static inline void test_reexec_without_zkmem_environment(const char *self) {
  extern char **environ;
  bool clean = true;
  for (char **variable = environ; *variable != NULL;) {
    if (strncmp(*variable, "ZKMEM_", 6) == 0) {
      char name[64] = {0};
      size_t length = strcspn(*variable, "=");
      memcpy(name, *variable, length < 63 ? length : 63);
      unsetenv(name); /* shifts the rest of environ down */
      clean = false;
    } else {
      variable++;
    }
  }
  if (!clean) {
    execl("/proc/self/exe", self, (char *)NULL);
    perror("execl");
    exit(1);
  }
}

/* Runs body in a forked child with its stderr read into message (up to
 * capacity - 1 bytes, NUL-terminated); returns the wait status. */
static inline int test_run_child(void (*body)(void), char *message,
                                 size_t capacity) {
  int pipe_fds[2];
  CHECK(pipe(pipe_fds) == 0);
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    dup2(pipe_fds[1], 2);
    body();
    _exit(0);
  }
  close(pipe_fds[1]);
  size_t used = 0;
  ssize_t got;
  while (used + 1 < capacity &&
         (got = read(pipe_fds[0], message + used, capacity - 1 - used)) > 0)
    used += (size_t)got;
  message[used] = '\0';
  close(pipe_fds[0]);
  int status;
  waitpid(child, &status, 0);
  return status;
}

/* The child must die of `signal_number` after printing `expected`. */
static inline void test_expect_signal(void (*body)(void), int signal_number,
                                      const char *expected) {
  char message[512];
  int status = test_run_child(body, message, sizeof(message));
  if (!(WIFSIGNALED(status) && WTERMSIG(status) == signal_number &&
        strstr(message, expected) != NULL)) {
    fprintf(stderr, "expected signal %d with \"%s\", got status %d: %s\n",
            signal_number, expected, status, message);
    exit(1);
  }
}

/* The child must exit with status 0; a hang ends in the body's alarm(). */
static inline void test_expect_success(const char *name, void (*body)(void)) {
  char message[4096];
  int status = test_run_child(body, message, sizeof(message));
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    fprintf(stderr, "%s: child status %#x%s%s: %s\n", name, status,
            WIFSIGNALED(status) ? ", signal " : "",
            WIFSIGNALED(status) ? strsignal(WTERMSIG(status)) : "", message);
    exit(1);
  }
}

static inline void test_expect_abort(void (*body)(void), const char *expected) {
  test_expect_signal(body, SIGABRT, expected);
}

#endif
