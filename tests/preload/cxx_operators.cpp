// C++'s operators new and delete as libzkmem.so exports them (linked with
// it, so the program's operators are zkmem's): every form is found in the
// library, hands out blocks of the size and alignment asked for, and fails
// as the language says: the new-handler is called and its work retried, an
// exception it throws reaches the caller, and without one new throws
// std::bad_alloc while the nothrow forms return null. In secure mode a
// sized delete with a size larger than the block is reported.
#include "test_util.h"
#include "zkmem.h"

#include <dlfcn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

namespace {

// Every operator the C++ runtime defines, by its symbol.
const char *const kOperators[] = {
    "_Znwm",
    "_Znam",
    "_ZnwmRKSt9nothrow_t",
    "_ZnamRKSt9nothrow_t",
    "_ZnwmSt11align_val_t",
    "_ZnamSt11align_val_t",
    "_ZnwmSt11align_val_tRKSt9nothrow_t",
    "_ZnamSt11align_val_tRKSt9nothrow_t",
    "_ZdlPv",
    "_ZdaPv",
    "_ZdlPvm",
    "_ZdaPvm",
    "_ZdlPvRKSt9nothrow_t",
    "_ZdaPvRKSt9nothrow_t",
    "_ZdlPvSt11align_val_t",
    "_ZdaPvSt11align_val_t",
    "_ZdlPvmSt11align_val_t",
    "_ZdaPvmSt11align_val_t",
    "_ZdlPvSt11align_val_tRKSt9nothrow_t",
    "_ZdaPvSt11align_val_tRKSt9nothrow_t",
};

void check_exported() {
  for (const char *name : kOperators) {
    void *address = dlsym(RTLD_DEFAULT, name);
    Dl_info info;
    if (address == nullptr || dladdr(address, &info) == 0 ||
        info.dli_fname == nullptr ||
        std::strstr(info.dli_fname, "libzkmem") == nullptr) {
      std::fprintf(stderr, "%s: not libzkmem's (%s)\n", name,
                   address != nullptr && dladdr(address, &info) != 0
                       ? info.dli_fname
                       : "not found");
      std::exit(1);
    }
  }
}

// zkmem's own view: a block it handed out has a usable size.
void check_block(void *p, size_t size, size_t alignment) {
  CHECK(p != nullptr);
  CHECK(reinterpret_cast<uintptr_t>(p) % alignment == 0);
  CHECK(zk_usable_size(p) >= size);
  std::memset(p, 0x5a, size);
}

// What the default forms promise: alignment for any object that fits, as
// malloc's blocks (16 bytes from 16 on, 8 below).
size_t fundamental_alignment(size_t size) {
  return size >= alignof(std::max_align_t) ? alignof(std::max_align_t) : 8;
}

void check_forms() {
  // Sizes from zero to a huge block, each form with its delete.
  const size_t sizes[] = {0, 1, 24, 100, 4096, 70000, 3 << 20};
  for (size_t size : sizes) {
    void *a = ::operator new(size);
    void *b = ::operator new(size);
    CHECK(a != b);
    check_block(a, size, fundamental_alignment(size));
    check_block(b, size, fundamental_alignment(size));
    ::operator delete(a);
    ::operator delete(b, size);
    char *array = new char[size + 1];
    check_block(array, size + 1, 1);
    delete[] array;
    array = new char[size + 1];
    ::operator delete[](array, size + 1);
    void *quiet = ::operator new(size, std::nothrow);
    check_block(quiet, size, fundamental_alignment(size));
    ::operator delete(quiet, std::nothrow);
    quiet = ::operator new[](size, std::nothrow);
    check_block(quiet, size, fundamental_alignment(size));
    ::operator delete[](quiet, std::nothrow);
    const size_t alignments[] = {1, 16, 64, 4096, size_t(1) << 21};
    for (size_t alignment : alignments) {
      std::align_val_t align{alignment};
      void *p = ::operator new(size, align);
      check_block(p, size, alignment);
      ::operator delete(p, align);
      p = ::operator new[](size, align);
      check_block(p, size, alignment);
      ::operator delete[](p, size, align);
      p = ::operator new(size, align, std::nothrow);
      check_block(p, size, alignment);
      ::operator delete(p, size, align);
      p = ::operator new[](size, align, std::nothrow);
      check_block(p, size, alignment);
      ::operator delete[](p, align, std::nothrow);
      p = ::operator new(size, align);
      ::operator delete(p, align, std::nothrow);
    }
  }
  // Over-aligned types take the aligned forms.
  struct alignas(256) Wide {
    char bytes[300];
  };
  Wide *wide = new Wide[3];
  check_block(wide, sizeof(Wide) * 3, 256);
  delete[] wide;
  std::string text(1000, 'z');
  CHECK(text.size() == 1000);
}

// More than any machine can give.
const size_t kTooMuch = SIZE_MAX / 4;

int handler_calls;
void *reserve;

void give_up_after_three() {
  if (++handler_calls == 3)
    std::set_new_handler(nullptr);
}

void release_reserve() {
  handler_calls++;
  ::operator delete(reserve);
  reserve = nullptr;
}

struct HandlerError {
  int code;
};
void throw_own_error() {
  handler_calls++;
  throw HandlerError{42};
}

// Each new form, for a size (and an alignment) that cannot be had: whether
// it threw std::bad_alloc (the throwing forms) or returned null (nothrow).
struct Form {
  const char *name;
  bool nothrow;
  void *(*call)(size_t size, size_t alignment);
};
const Form kForms[] = {
    {"new", false, [](size_t n, size_t) { return ::operator new(n); }},
    {"new[]", false, [](size_t n, size_t) { return ::operator new[](n); }},
    {"new nothrow", true,
     [](size_t n, size_t) { return ::operator new(n, std::nothrow); }},
    {"new[] nothrow", true,
     [](size_t n, size_t) { return ::operator new[](n, std::nothrow); }},
    {"aligned new", false,
     [](size_t n, size_t a) {
       return ::operator new(n, std::align_val_t{a});
     }},
    {"aligned new[]", false,
     [](size_t n, size_t a) {
       return ::operator new[](n, std::align_val_t{a});
     }},
    {"aligned new nothrow", true,
     [](size_t n, size_t a) {
       return ::operator new(n, std::align_val_t{a}, std::nothrow);
     }},
    {"aligned new[] nothrow", true,
     [](size_t n, size_t a) {
       return ::operator new[](n, std::align_val_t{a}, std::nothrow);
     }},
};

// Runs a form that must fail; true when it failed as its kind should.
bool fails_properly(const Form &form, size_t size, size_t alignment) {
  try {
    void *p = form.call(size, alignment);
    if (p != nullptr) {
      std::fprintf(stderr, "%s: got a block\n", form.name);
      return false;
    }
    return form.nothrow;
  } catch (const std::bad_alloc &) {
    return !form.nothrow;
  }
}

void throw_bad_alloc_from_handler() {
  handler_calls++;
  throw std::bad_alloc();
}

void check_failures() {
  for (const Form &form : kForms) {
    // No handler: bad_alloc, or null from the nothrow forms.
    if (!fails_properly(form, kTooMuch, 64)) {
      std::fprintf(stderr, "%s of too much: wrong failure\n", form.name);
      std::exit(1);
    }
    // A handler is called until it removes itself.
    handler_calls = 0;
    std::set_new_handler(give_up_after_three);
    CHECK(fails_properly(form, kTooMuch, 64) && handler_calls == 3);
    // A handler that throws bad_alloc: a nothrow form returns null.
    handler_calls = 0;
    std::set_new_handler(throw_bad_alloc_from_handler);
    CHECK(fails_properly(form, kTooMuch, 64) && handler_calls == 1);
    std::set_new_handler(nullptr);
  }
  // An alignment that is no power of two fails at once, handler or not.
  std::set_new_handler(give_up_after_three);
  for (const Form &form : kForms) {
    if (std::strstr(form.name, "aligned") == nullptr)
      continue;
    for (size_t alignment : {size_t(0), size_t(3), size_t(48)}) {
      handler_calls = 0;
      if (!fails_properly(form, 100, alignment) || handler_calls != 0) {
        std::fprintf(stderr, "%s with alignment %zu: wrong failure\n",
                     form.name, alignment);
        std::exit(1);
      }
    }
  }
  std::set_new_handler(nullptr);

  // A handler that makes room: the new after it succeeds. A task heap's
  // limit is the room, a block of it the reserve the handler gives back.
  zk_heap_options_t options = {};
  options.name = "cxx-new-handler";
  options.limit_bytes = 4 << 20;
  zk_heap_t *heap = zk_heap_create(&options);
  CHECK(heap != nullptr);
  zk_heap_t *previous = zk_heap_enter(heap);
  reserve = ::operator new(3 << 20);
  handler_calls = 0;
  std::set_new_handler(release_reserve);
  void *after = ::operator new(2 << 20);
  CHECK(after != nullptr && handler_calls == 1 && reserve == nullptr);
  ::operator delete(after);
  reserve = ::operator new(3 << 20);
  after = ::operator new (2 << 20, std::align_val_t{4096}, std::nothrow);
  CHECK(after != nullptr && handler_calls == 2 && reserve == nullptr);
  CHECK(reinterpret_cast<uintptr_t>(after) % 4096 == 0);
  ::operator delete (after, std::align_val_t{4096});
  std::set_new_handler(nullptr);
  zk_heap_enter(previous);
  zk_heap_destroy(heap);

  // An exception the handler throws reaches the caller.
  handler_calls = 0;
  std::set_new_handler(throw_own_error);
  int code = 0;
  try {
    char *p = new char[kTooMuch];
    delete[] p;
  } catch (const HandlerError &error) {
    code = error.code;
  }
  CHECK(code == 42 && handler_calls == 1);
  std::set_new_handler(nullptr);
}

// Secure mode checks a sized delete's size: too large a size is reported
// and aborts (run in a child, with ZKMEM_SECURE=1 set before it starts).
void check_sized_delete_misuse(const char *self) {
  int pipe_ends[2];
  CHECK(pipe(pipe_ends) == 0);
  pid_t child = fork();
  CHECK(child >= 0);
  if (child == 0) {
    dup2(pipe_ends[1], STDERR_FILENO);
    close(pipe_ends[0]);
    setenv("ZKMEM_SECURE", "1", 1);
    execl(self, self, "--sized-delete-misuse", static_cast<char *>(nullptr));
    _exit(127);
  }
  close(pipe_ends[1]);
  char output[512] = {};
  size_t length = 0;
  ssize_t got;
  while (length < sizeof(output) - 1 &&
         (got = read(pipe_ends[0], output + length,
                     sizeof(output) - 1 - length)) > 0)
    length += static_cast<size_t>(got);
  close(pipe_ends[0]);
  int status = 0;
  CHECK(waitpid(child, &status, 0) == child);
  CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT);
  CHECK(std::strstr(output, "sized delete with a size larger than the block") !=
        nullptr);
}

int sized_delete_misuse() {
  char *p = new char[100];
  ::operator delete[](p, 100000);
  return 0; // not reached: the delete reports and aborts
}

} // namespace

int main(int argc, char **argv) {
  if (argc > 1 && std::strcmp(argv[1], "--sized-delete-misuse") == 0)
    return sized_delete_misuse();
  check_exported();
  check_forms();
  check_failures();
  check_sized_delete_misuse(argv[0]);
  std::puts("cxx_operators: ok");
  return 0;
}
