/* Uses the installed zkmem API. With an argument, checks that the program
 * runs with (shared:PATH) or without (static) a libzkmem.so from PATH mapped.
 * Prints one line on success. */
#include <zkmem.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what) {
  fprintf(stderr, "consumer: %s\n", what);
  return 1;
}

/* 1 if /proc/self/maps has a libzkmem.so mapping whose path contains dir. */
static int zkmem_mapped_from(const char *dir) {
  FILE *maps = fopen("/proc/self/maps", "r");
  char line[4096];
  int found = 0;
  if (maps == NULL)
    return -1;
  while (fgets(line, sizeof line, maps) != NULL) {
    if (strstr(line, "libzkmem.so") != NULL && strstr(line, dir) != NULL)
      found = 1;
  }
  fclose(maps);
  return found;
}

int main(int argc, char **argv) {
  char *text = zk_malloc(100);
  if (text == NULL || zk_usable_size(text) < 100)
    return fail("zk_malloc");
  strcpy(text, "zkmem");
  text = zk_realloc(text, 100000);
  if (text == NULL || strcmp(text, "zkmem") != 0)
    return fail("zk_realloc");
  zk_free(text);

  void *aligned = NULL;
  if (zk_posix_memalign(&aligned, 4096, 5000) != 0 ||
      (size_t)aligned % 4096 != 0)
    return fail("zk_posix_memalign");
  zk_free(aligned);

  zk_pool_options_t options = {0};
  options.name = "consumer";
  zk_pool_t *pool = zk_pool_create(48, &options);
  if (pool == NULL)
    return fail("zk_pool_create");
  void *objects[1000];
  for (int i = 0; i < 1000; i++) {
    objects[i] = zk_pool_alloc(pool);
    if (objects[i] == NULL)
      return fail("zk_pool_alloc");
    memset(objects[i], i & 0xff, 48);
  }
  for (int i = 0; i < 1000; i++)
    zk_pool_free(pool, objects[i]);
  zk_pool_stats_t pool_stats;
  if (zk_pool_stats(pool, &pool_stats) != 0 || pool_stats.object_size != 48)
    return fail("zk_pool_stats");
  zk_pool_destroy(pool);

  zk_stats_t stats;
  zk_stats_get(&stats);

  if (argc > 1) {
    if (strncmp(argv[1], "shared:", 7) == 0) {
      if (zkmem_mapped_from(argv[1] + 7) != 1)
        return fail("libzkmem.so of the install prefix is not mapped");
      /* linked with the shared library, malloc is zkmem's too */
      char *block = malloc(1000);
      if (block == NULL || zk_usable_size(block) < 1000)
        return fail("malloc is not served by zkmem");
      free(block);
    } else if (strcmp(argv[1], "static") == 0) {
      if (zkmem_mapped_from("/") != 0)
        return fail("statically linked, yet libzkmem.so is mapped");
    }
  }
  printf("zkmem %d.%d.%d ok\n", ZKMEM_VERSION_MAJOR, ZKMEM_VERSION_MINOR,
         ZKMEM_VERSION_PATCH);
  return 0;
}
