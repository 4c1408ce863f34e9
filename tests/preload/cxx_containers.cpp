// C++ standard containers under an allocator given by LD_PRELOAD.
//
// Each worker thread builds maps of strings to vectors, unordered maps,
// shared_ptr graphs, over-aligned objects (aligned operator new), string
// streams and thrown exceptions, and reduces them to a checksum. A
// producer/consumer queue moves batches of strings between threads, so
// consumers free what producers allocated. Prints checksums that depend only
// on the work, never on scheduling.
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

struct Random {
  uint64_t state;
  uint64_t next() {
    state += 0x9e3779b97f4a7c15u;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
  }
  size_t below(size_t bound) { return static_cast<size_t>(next() % bound); }
};

uint64_t mix(uint64_t hash, uint64_t value) {
  return (hash ^ value) * 0x100000001b3u;
}

uint64_t mix(uint64_t hash, const std::string &text) {
  for (unsigned char c : text)
    hash = mix(hash, c);
  return hash;
}

std::string random_word(Random &random) {
  std::string word;
  size_t length = 1 + random.below(random.below(4) == 0 ? 200 : 24);
  for (size_t i = 0; i < length; i++)
    word.push_back(static_cast<char>('a' + random.below(26)));
  return word;
}

struct alignas(64) Padded {
  uint64_t values[8];
};

struct Graph {
  uint64_t id;
  std::vector<std::shared_ptr<Graph>> edges;
  std::weak_ptr<Graph> parent;
};

uint64_t map_work(Random &random) {
  std::map<std::string, std::vector<uint32_t>> index;
  for (int i = 0; i < 40000; i++) {
    auto &list = index[random_word(random)];
    size_t count = random.below(16);
    for (size_t j = 0; j < count; j++)
      list.push_back(static_cast<uint32_t>(random.next()));
  }
  for (auto it = index.begin(); it != index.end();) {
    if (it->second.size() % 3 == 0)
      it = index.erase(it);
    else
      ++it;
  }
  uint64_t hash = 14695981039346656037u;
  for (auto &entry : index) {
    std::sort(entry.second.begin(), entry.second.end());
    hash = mix(hash, entry.first);
    for (uint32_t value : entry.second)
      hash = mix(hash, value);
  }
  return mix(hash, index.size());
}

uint64_t unordered_work(Random &random) {
  std::unordered_map<uint64_t, std::string> table;
  for (int i = 0; i < 60000; i++) {
    uint64_t key = random.below(20000);
    if (random.below(4) == 0)
      table.erase(key);
    else
      table[key] += random_word(random);
  }
  uint64_t hash = 0;
  for (const auto &entry : table) // order-independent sum
    hash += mix(mix(14695981039346656037u, entry.first), entry.second);
  return hash;
}

uint64_t aligned_work(Random &random) {
  std::vector<std::unique_ptr<Padded>> objects;
  uint64_t hash = 0;
  for (int i = 0; i < 20000; i++) {
    if (!objects.empty() && random.below(3) == 0) {
      size_t victim = random.below(objects.size());
      hash = mix(hash, objects[victim]->values[7]);
      objects[victim] = std::move(objects.back());
      objects.pop_back();
    }
    auto object = std::make_unique<Padded>();
    if (reinterpret_cast<uintptr_t>(object.get()) % alignof(Padded) != 0)
      throw std::runtime_error("misaligned over-aligned object");
    for (auto &value : object->values)
      value = random.next();
    objects.push_back(std::move(object));
  }
  return mix(hash, objects.size());
}

uint64_t graph_work(Random &random) {
  auto root = std::make_shared<Graph>();
  root->id = 0;
  std::vector<std::shared_ptr<Graph>> nodes{root};
  for (uint64_t i = 1; i < 30000; i++) {
    auto node = std::make_shared<Graph>();
    node->id = i;
    auto &parent = nodes[random.below(nodes.size())];
    node->parent = parent;
    parent->edges.push_back(node);
    nodes.push_back(node);
    if (random.below(5) == 0)
      nodes.erase(nodes.begin() +
                  static_cast<long>(random.below(nodes.size())));
  }
  uint64_t hash = 0, count = 0;
  std::vector<const Graph *> stack{root.get()};
  while (!stack.empty()) {
    const Graph *node = stack.back();
    stack.pop_back();
    hash = mix(hash, node->id);
    count++;
    for (const auto &edge : node->edges)
      stack.push_back(edge.get());
  }
  return mix(hash, count);
}

uint64_t stream_and_exception_work(Random &random) {
  std::ostringstream out;
  uint64_t caught = 0;
  for (int i = 0; i < 20000; i++) {
    out << random_word(random) << ' ' << random.next() << '\n';
    if (i % 50 == 0) {
      try {
        throw std::runtime_error("error " + std::to_string(i) + " " +
                                 random_word(random));
      } catch (const std::exception &error) {
        caught = mix(caught, std::string(error.what()));
      }
    }
  }
  std::string text = out.str();
  std::istringstream in(text);
  std::string word;
  uint64_t hash = caught;
  while (in >> word)
    hash = mix(hash, word.size());
  return mix(hash, text.size());
}

uint64_t worker_checksum(uint64_t seed) {
  Random random{seed};
  uint64_t hash = map_work(random);
  hash = mix(hash, unordered_work(random));
  hash = mix(hash, aligned_work(random));
  hash = mix(hash, graph_work(random));
  return mix(hash, stream_and_exception_work(random));
}

class BatchQueue {
public:
  void push(std::unique_ptr<std::vector<std::string>> batch) {
    std::unique_lock<std::mutex> lock(mutex_);
    not_full_.wait(lock, [this] { return batches_.size() < 32; });
    batches_.push_back(std::move(batch));
    not_empty_.notify_one();
  }
  std::unique_ptr<std::vector<std::string>> pop() {
    std::unique_lock<std::mutex> lock(mutex_);
    not_empty_.wait(lock, [this] { return !batches_.empty(); });
    auto batch = std::move(batches_.front());
    batches_.pop_front();
    not_full_.notify_one();
    return batch;
  }

private:
  std::mutex mutex_;
  std::condition_variable not_empty_, not_full_;
  std::deque<std::unique_ptr<std::vector<std::string>>> batches_;
};

uint64_t pipeline_checksum() {
  const int producers = 2, consumers = 2, batches = 2000;
  BatchQueue queue;
  std::vector<uint64_t> sums(consumers, 0);
  std::vector<std::thread> threads;
  for (int p = 0; p < producers; p++) {
    threads.emplace_back([&queue, p] {
      Random random{1000u + static_cast<uint64_t>(p)};
      for (int b = 0; b < batches; b++) {
        auto batch = std::make_unique<std::vector<std::string>>();
        for (size_t i = 0, n = 1 + random.below(64); i < n; i++)
          batch->push_back(random_word(random));
        queue.push(std::move(batch));
      }
    });
  }
  for (int c = 0; c < consumers; c++) {
    threads.emplace_back([&queue, &sums, c] {
      for (;;) {
        auto batch = queue.pop();
        if (!batch)
          return;
        for (const auto &word : *batch) // order-independent sum
          sums[static_cast<size_t>(c)] += mix(14695981039346656037u, word);
      }
    });
  }
  for (int p = 0; p < producers; p++)
    threads[static_cast<size_t>(p)].join();
  for (int c = 0; c < consumers; c++)
    queue.push(nullptr);
  for (int c = 0; c < consumers; c++)
    threads[static_cast<size_t>(producers + c)].join();
  uint64_t total = 0;
  for (uint64_t sum : sums)
    total += sum;
  return total;
}

} // namespace

int main() {
  const int workers = 4;
  std::vector<uint64_t> checksums(workers);
  std::vector<std::thread> threads;
  for (int i = 0; i < workers; i++)
    threads.emplace_back([&checksums, i] {
      checksums[static_cast<size_t>(i)] =
          worker_checksum(static_cast<uint64_t>(i) + 1);
    });
  for (auto &thread : threads)
    thread.join();
  for (int i = 0; i < workers; i++)
    std::printf(
        "worker %d: %016llx\n", i,
        static_cast<unsigned long long>(checksums[static_cast<size_t>(i)]));
  std::printf("pipeline: %016llx\n",
              static_cast<unsigned long long>(pipeline_checksum()));
  std::printf("main: %016llx\n",
              static_cast<unsigned long long>(worker_checksum(99)));
  return 0;
}
