# Drives the CMake build; every target builds what it needs first.
BUILD ?= build
PREFIX ?= /usr/local
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_FLAGS ?=

.PHONY: all build test bench install fuzz format clean

all: build

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=$(PREFIX) $(CMAKE_FLAGS)

build: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

bench: build
	python3 bench/driver.py --build $(BUILD) $(BENCH_ARGS)

install: build
	cmake --install $(BUILD) --prefix $(PREFIX)

fuzz: build
	cmake --build $(BUILD) --target fuzz_long

format:
	clang-format -i include/*.h src/*.c src/*.h tests/*/*.c bench/workloads/*.c examples/*.c

clean:
	rm -rf $(BUILD)
