// The installed header used from C++.
#include <zkmem.h>

#include <cstdio>
#include <cstring>
#include <string>

int main() {
  std::string text = "zkmem from C++";
  char *copy = static_cast<char *>(zk_malloc(text.size() + 1));
  if (copy == nullptr)
    return 1;
  std::memcpy(copy, text.c_str(), text.size() + 1);
  std::printf("%s ok\n", copy);
  zk_free(copy);
  return 0;
}
