/* A C program that loads a C++ plugin (cxx_plugin.cpp) with dlopen, in a
 * scope of its own: the C++ runtime is not in the process's scope when the
 * allocator starts. Prints the plugin's report and result. */
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: cxx_plugin_host PLUGIN\n");
    return 2;
  }
  void *plugin = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (plugin == NULL) {
    fprintf(stderr, "dlopen: %s\n", dlerror());
    return 1;
  }
  int (*run)(void) = (int (*)(void))dlsym(plugin, "plugin_run");
  if (run == NULL) {
    fprintf(stderr, "dlsym: %s\n", dlerror());
    return 1;
  }
  int result = run();
  fflush(stdout);
  printf("host: plugin returned %d\n", result);
  return result == 7 ? 0 : 1;
}
