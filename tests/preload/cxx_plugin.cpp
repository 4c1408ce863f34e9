// A C++ plugin that a C program loads with dlopen (cxx_plugin_host.c): the
// C++ runtime arrives after the allocator, in a scope of its own. A failed
// new must still call this plugin's new-handler and throw std::bad_alloc,
// and a nothrow new whose handler throws must return null.
#include <cstdint>
#include <cstdio>
#include <new>

namespace {

int handler_calls;

void give_up_after_two() {
  if (++handler_calls == 2)
    std::set_new_handler(nullptr);
}

void throw_bad_alloc() {
  handler_calls++;
  throw std::bad_alloc();
}

} // namespace

extern "C" __attribute__((visibility("default"))) int plugin_run(void) {
  const std::size_t too_much = SIZE_MAX / 4;
  std::set_new_handler(give_up_after_two);
  bool caught = false;
  try {
    char *p = new char[too_much];
    delete[] p;
  } catch (const std::bad_alloc &) {
    caught = true;
  }
  std::printf("plugin: bad_alloc caught: %s, handler calls %d\n",
              caught ? "yes" : "no", handler_calls);
  handler_calls = 0;
  std::set_new_handler(throw_bad_alloc);
  void *quiet = ::operator new(too_much, std::nothrow);
  std::printf("plugin: nothrow new with a throwing handler: %s, handler "
              "calls %d\n",
              quiet == nullptr ? "null" : "a block", handler_calls);
  std::set_new_handler(nullptr);
  int *numbers = new int[1000];
  numbers[999] = 7;
  int result = numbers[999];
  delete[] numbers;
  return caught && quiet == nullptr ? result : -1;
}
