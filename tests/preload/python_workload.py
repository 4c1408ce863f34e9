"""Allocation-heavy Python workload with deterministic output.

Dicts, lists, strings, bytes, JSON, cyclic garbage, large buffers, and
threads that pass objects to each other (so blocks are freed by another
thread than the one that allocated them). Prints one checksum line per part.
"""

import collections
import gc
import hashlib
import json
import queue
import random
import re
import threading


def digest(value):
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def dict_churn(seed, count):
    rng = random.Random(seed)
    table = {}
    for index in range(count):
        key = "k%d_%d" % (rng.randrange(count // 4), index % 7)
        values = table.get(key)
        if values is None:
            table[key] = [index]
        else:
            values.append(index)
            if len(values) > 8:
                del table[key]
    nested = {i: {str(j): (j, str(j) * 3) for j in range(i % 50)} for i in range(3000)}
    total = sum(len(v) for v in table.values())
    return len(table), total, digest(sorted(table.items())[:200]), digest(nested[2999])


def string_work(seed, count):
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghij") for _ in range(rng.randrange(1, 12)))
        for _ in range(count)
    ]
    text = " ".join(words)
    counts = collections.Counter(text.split())
    shouted = "|".join(word.upper() * 3 for word in words[:20000])
    reversed_words = sorted(word[::-1] for word in words)
    pieces = re.findall(r"[abc]+", text)
    formatted = ["%s=%08d:%r" % (w, i, w.encode()) for i, w in enumerate(words[:30000])]
    unicode_text = "".join(chr(0x400 + (ord(c) % 200)) for c in text[:200000])
    return (
        len(text),
        len(counts),
        digest(counts.most_common(20)),
        len(shouted),
        digest(reversed_words[::1000]),
        len(pieces),
        digest(formatted[::997]),
        len(unicode_text.encode("utf-8")),
    )


def list_work(seed, count):
    rng = random.Random(seed)
    lists = []
    for _ in range(count):
        lists.append([rng.random() for _ in range(rng.randrange(0, 64))])
        if len(lists) > 500:
            lists.pop(rng.randrange(len(lists)))
    flat = sorted(x for chunk in lists for x in chunk)
    tuples = [tuple(range(i % 30)) for i in range(50000)]
    sets = [frozenset(t) for t in tuples[:20000]]
    return len(lists), len(flat), digest([round(x, 6) for x in flat[::97]]), len(set(sets))


def json_roundtrip(seed, count):
    rng = random.Random(seed)
    document = [
        {
            "id": index,
            "name": "item%d" % index,
            "tags": [rng.randrange(100) for _ in range(rng.randrange(8))],
            "nested": {"value": rng.randrange(10**9), "pad": "x" * rng.randrange(200)},
        }
        for index in range(count)
    ]
    encoded = json.dumps(document, sort_keys=True)
    decoded = json.loads(encoded)
    return len(encoded), digest(decoded[::1000]), decoded == document


class Node:
    def __init__(self, value):
        self.value = value
        self.children = []
        self.parent = None


def cyclic_garbage(rounds):
    collected = 0
    for round_number in range(rounds):
        root = Node(round_number)
        for index in range(2000):
            child = Node(index)
            child.parent = root
            root.children.append(child)
            child.children.append(root)
        del root
        collected += gc.collect()
    return collected > 0


def buffers(seed):
    rng = random.Random(seed)
    data = bytearray()
    for _ in range(3000):
        data += bytes([rng.randrange(256)]) * rng.randrange(1, 4000)
    blocks = [bytes(rng.randrange(1, 1 << 20)) for _ in range(40)]
    large = bytearray(48 << 20)
    large[::4096] = b"\x01" * len(large[::4096])
    resized = b"".join(blocks)
    return len(data), hashlib.sha256(data).hexdigest()[:16], len(resized), sum(large)


def worker(seed, results, index):
    results[index] = (dict_churn(seed, 60000), list_work(seed, 20000))


def pipeline(seed, batches):
    """Producers build lists of strings; consumers (other threads) free them."""
    channel = queue.Queue(maxsize=64)
    totals = [0, 0]

    def produce(offset):
        rng = random.Random(seed + offset)
        for batch in range(batches):
            channel.put(["%d-%d-%s" % (offset, batch, "y" * rng.randrange(64)) for _ in range(200)])

    def consume(slot):
        while True:
            batch = channel.get()
            if batch is None:
                return
            totals[slot] += sum(len(s) for s in batch)

    producers = [threading.Thread(target=produce, args=(i,)) for i in range(2)]
    consumers = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for thread in producers + consumers:
        thread.start()
    for thread in producers:
        thread.join()
    for _ in consumers:
        channel.put(None)
    for thread in consumers:
        thread.join()
    return sum(totals)


def main():
    print("dicts", dict_churn(1, 200000))
    print("strings", string_work(2, 200000))
    print("lists", list_work(3, 100000))
    print("json", json_roundtrip(4, 20000))
    print("cycles", cyclic_garbage(20))
    print("buffers", buffers(5))
    results = [None] * 4
    threads = [threading.Thread(target=worker, args=(10 + i, results, i)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, result in enumerate(results):
        print("thread", index, result)
    print("pipeline", pipeline(6, 400))


if __name__ == "__main__":
    main()
