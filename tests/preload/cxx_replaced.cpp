// A program that replaces only operator new(size_t) and operator
// delete(void *), as tracking programs do: its replacements put a header
// before each block. Every other form it uses (new[], sized delete, the
// nothrow forms, the library's containers) must reach these two as the C++
// runtime's defaults do, so each delete finds its header. Prints the
// replaced pair's counts, the same under any malloc; a delete that misses
// its header aborts.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace {

const uint64_t kMagic = 0x7a6b6d656d686472u;
long news, deletes;

struct Header {
  uint64_t magic;
  uint64_t size;
};

} // namespace

void *operator new(std::size_t size) {
  Header *header = static_cast<Header *>(std::malloc(sizeof(Header) + size));
  if (header == nullptr)
    throw std::bad_alloc();
  header->magic = kMagic;
  header->size = size;
  news++;
  return header + 1;
}

void operator delete(void *p) noexcept {
  if (p == nullptr)
    return;
  Header *header = static_cast<Header *>(p) - 1;
  if (header->magic != kMagic) {
    std::fprintf(stderr, "delete of a block the replaced new did not make\n");
    std::abort();
  }
  header->magic = 0;
  deletes++;
  std::free(header);
}

namespace {

struct Node {
  int value;
  char payload[40];
};

struct Counted {
  Counted() { payload[0] = 1; }
  ~Counted() { payload[0] = 0; }
  char payload[24];
};

} // namespace

int main() {
  long sum = 0;
  for (int round = 0; round < 100; round++) {
    Node *node = new Node{round, {}}; // sized delete below
    sum += node->value;
    delete node;
    char *bytes = new char[100 + round]; // new[] and delete[]
    bytes[0] = 'x';
    delete[] bytes;
    Counted *array = new Counted[3]; // sized delete[]
    sum += array[1].payload[0];
    delete[] array;
    Node *quiet = new (std::nothrow) Node{round, {}};
    sum += quiet->value;
    delete quiet;
    int *numbers = new (std::nothrow) int[10];
    numbers[0] = round;
    sum += numbers[0];
    delete[] numbers;
    std::vector<std::string> words;
    for (int i = 0; i < 20; i++)
      words.push_back(std::string(30 + i, 'a'));
    std::map<int, std::unique_ptr<Node>> nodes;
    for (int i = 0; i < 10; i++)
      nodes[i] = std::unique_ptr<Node>(new Node{i, {}});
    sum += static_cast<long>(words.size() + nodes.size());
  }
  std::printf("sum %ld, every delete found its header: %s\n", sum,
              news == deletes ? "yes" : "no");
  std::printf("replaced new called %s\n", news > 0 ? "yes" : "no");
  return news == deletes ? 0 : 1;
}
