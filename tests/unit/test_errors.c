/* Misuse and exhaustion: each misuse aborts with one line naming it (or
 * logs and goes on with ZKMEM_ON_ERROR=warn); out of address space, every
 * call returns NULL with ENOMEM and the allocator works again afterwards. */
#include "test_util.h"
#include "zkmem.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/resource.h>

static void double_free_small(void) {
  void *p = zk_malloc(64);
  zk_free(p);
  zk_free(p);
}

static void double_free_large(void) {
  void *p = zk_malloc(300 * 1024);
  zk_free(p);
  zk_free(p);
}

static void foreign_pointer(void) {
  static char not_ours[64];
  zk_free(not_ours + 16);
}

/* The owner's fast path checks neither of these (a division and a list
 * walk); secure mode sends every free through the checked path. */
static void interior_pointer_secure(void) {
  zk_option_set(ZK_OPTION_SECURE, 1);
  char *p = zk_malloc(64);
  zk_free(p + 16);
}

static void double_free_not_head_secure(void) {
  zk_option_set(ZK_OPTION_SECURE, 1);
  void *a = zk_malloc(64);
  void *b = zk_malloc(64);
  zk_free(a);
  zk_free(b);
  zk_free(a); /* b heads the list now */
}

/* Any thread but the owner frees through the checked path. */
static void *free_interior_elsewhere(void *p) {
  zk_free((char *)p + 16);
  return NULL;
}

static void interior_pointer_remote(void) {
  char *p = zk_malloc(64);
  pthread_t thread;
  pthread_create(&thread, NULL, free_interior_elsewhere, p);
  pthread_join(thread, NULL);
}

static void interior_pointer_large(void) {
  char *p = zk_malloc(300 * 1024);
  zk_free(p + 4096);
}

static void test_warn_mode_goes_on(void) {
  int pipe_fds[2];
  CHECK(pipe(pipe_fds) == 0);
  pid_t child = fork();
  if (child == 0) {
    dup2(pipe_fds[1], 2);
    zk_option_set(ZK_OPTION_ON_ERROR, 1);
    char *p = zk_malloc(300 * 1024);
    zk_free(p + 4096);       /* reported, leaked */
    void *q = zk_malloc(64); /* still works */
    zk_free(q);
    _exit(q != NULL ? 0 : 1);
  }
  close(pipe_fds[1]);
  char message[512] = {0};
  CHECK(read(pipe_fds[0], message, sizeof(message) - 1) > 0);
  close(pipe_fds[0]);
  int status;
  waitpid(child, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  CHECK(strstr(message, "inside a block") != NULL);
}

/* In a child limited to its current address space plus 64 MiB: allocate
 * each kind of block until failure, check ENOMEM, free, allocate again. */
static void test_out_of_memory(void) {
  pid_t child = fork();
  if (child == 0) {
    zk_free(zk_malloc(16)); /* heap and first segment exist */
    struct rlimit limit;
    CHECK(getrlimit(RLIMIT_AS, &limit) == 0);
    FILE *status = fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    CHECK(fscanf(status, "%lu", &pages) == 1);
    fclose(status);
    limit.rlim_cur = pages * 4096 + ((size_t)64 << 20);
    CHECK(setrlimit(RLIMIT_AS, &limit) == 0);
    static const size_t sizes[] = {64, 4000, 300 * 1024, 8 << 20};
    enum { MAX_BLOCKS = 2 << 20 };
    void **blocks = zk_malloc(MAX_BLOCKS * sizeof(void *));
    CHECK(blocks != NULL);
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
      size_t count = 0;
      for (;;) {
        errno = 0;
        void *p = zk_malloc(sizes[s]);
        if (p == NULL) {
          CHECK_EQ(errno, ENOMEM);
          break;
        }
        ((volatile char *)p)[0] = 1;
        CHECK(count < MAX_BLOCKS);
        blocks[count++] = p;
      }
      CHECK(count > 0);
      errno = 0;
      CHECK(zk_calloc(1, sizes[s]) == NULL && errno == ENOMEM);
      for (size_t i = 0; i < count; i++)
        zk_free(blocks[i]);
      zk_collect(true); /* give the address space back */
      void *again = zk_malloc(sizes[s]);
      CHECK(again != NULL);
      zk_free(again);
      printf("out of memory at %zu blocks of %zu B; recovered\n", count,
             sizes[s]);
      fflush(stdout);
    }
    _exit(0);
  }
  int status;
  waitpid(child, &status, 0);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main(void) {
  test_expect_abort(double_free_small, "double free");
  test_expect_abort(double_free_large, "double free or free of an invalid");
  test_expect_abort(foreign_pointer, "free of a pointer zkmem does not own");
  test_expect_abort(interior_pointer_secure, "inside a block");
  test_expect_abort(interior_pointer_remote, "inside a block");
  test_expect_abort(double_free_not_head_secure, "double free");
  test_expect_abort(interior_pointer_large, "inside a block");
  test_warn_mode_goes_on();
  test_out_of_memory();
  printf("test_errors: ok\n");
  return 0;
}
