// Matching new and delete forms, for valgrind's memcheck run over the
// preloaded library (tests/preload/CMakeLists.txt): each of zkmem's C++
// operators is a function of its own, so memcheck reports no mismatched
// new/delete where the program has none.
#include <cstdio>
#include <new>

namespace {

__attribute__((noinline)) void use(void *p) {
  __asm__ volatile("" : : "r"(p) : "memory");
}

struct Object {
  long words[4];
};

} // namespace

int main() {
  int *numbers = new int[10];
  use(numbers);
  delete[] numbers;
  Object *object = new Object;
  use(object);
  delete object; // sized delete
  Object *objects = new Object[3];
  use(objects);
  delete[] objects;
  char *quiet = new (std::nothrow) char[5];
  use(quiet);
  ::operator delete[](quiet, std::nothrow);
  void *aligned = ::operator new(100, std::align_val_t{64});
  use(aligned);
  ::operator delete(aligned, std::align_val_t{64});
  void *aligned_array = ::operator new[](300, std::align_val_t{128});
  use(aligned_array);
  ::operator delete[](aligned_array, 300, std::align_val_t{128});
  std::puts("cxx_pairs: ok");
  return 0;
}
