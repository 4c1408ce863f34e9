#!/usr/bin/env bash
# Installs zkmem into a scratch prefix, then builds and runs small programs
# against that prefix: with CMake's find_package(zkmem) (zkmem::zkmem and
# zkmem::zkmem_static) and with `pkg-config --cflags --libs zkmem` (shared,
# and static through the same flags). Exit 0 pass, 1 fail, 77 skip.
set -euo pipefail

cmake=cmake
build_dir=
consumer=
workdir=
cc=cc
cxx=c++
pkg_config=pkg-config
no_skip=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cmake) cmake=$2; shift 2 ;;
    --build-dir) build_dir=$2; shift 2 ;;
    --consumer) consumer=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --cc) cc=$2; shift 2 ;;
    --cxx) cxx=$2; shift 2 ;;
    --pkg-config) pkg_config=$2; shift 2 ;;
    --no-skip) no_skip=1; shift ;;
    *) echo "install_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$build_dir" ] || [ -z "$consumer" ] || [ -z "$workdir" ]; then
  echo "usage: install_check.sh --build-dir DIR --consumer DIR --workdir DIR" \
    "[--cmake CMAKE] [--cc CC] [--cxx CXX] [--pkg-config PKG_CONFIG]" \
    "[--no-skip]" >&2
  exit 2
fi

step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*"; exit 1; }
# Runs a command, showing its output only when it fails.
quiet() {
  local log
  log=$(mktemp)
  if ! "$@" >"$log" 2>&1; then
    cat "$log"
    rm -f "$log"
    fail "command failed: $*"
  fi
  rm -f "$log"
}

rm -rf "$workdir"
mkdir -p "$workdir"
prefix="$workdir/prefix"

step "install into $prefix"
quiet "$cmake" --install "$build_dir" --prefix "$prefix"
header=$(find "$prefix" -name zkmem.h -print -quit)
[ -n "$header" ] || fail "zkmem.h not installed"
config=$(find "$prefix" -name zkmemConfig.cmake -print -quit)
[ -n "$config" ] || fail "zkmemConfig.cmake not installed"
[ -f "$(dirname "$config")/zkmemConfigVersion.cmake" ] ||
  fail "zkmemConfigVersion.cmake not installed"
pc=$(find "$prefix" -name zkmem.pc -print -quit)
[ -n "$pc" ] || fail "zkmem.pc not installed"
libdir=$(dirname "$(dirname "$pc")")
for library in libzkmem.a libzkmem.so; do
  [ -e "$libdir/$library" ] || fail "$library not installed in $libdir"
done
echo "installed: $(cd "$prefix" && find . -type f -o -type l | sort | tr '\n' ' ')"
version_part() { sed -n "s/^#define ZKMEM_VERSION_$1 *//p" "$header"; }
version="$(version_part MAJOR).$(version_part MINOR).$(version_part PATCH)"
next_major=$(($(version_part MAJOR) + 1))

step "find_package(zkmem) consumer"
consumer_build="$workdir/cmake-consumer"
# find_package searches <prefix>/lib, lib/<arch> and share on its own; a
# custom CMAKE_INSTALL_LIBDIR (lib64 on Debian) needs zkmem_DIR.
search=(-DCMAKE_PREFIX_PATH="$prefix")
case "$(dirname "$config")" in
  "$prefix"/lib/cmake/zkmem | "$prefix"/lib/*-*/cmake/zkmem) ;;
  "$prefix"/share/cmake/zkmem) ;;
  *) search+=(-Dzkmem_DIR="$(dirname "$config")") ;;
esac
quiet "$cmake" -S "$consumer" -B "$consumer_build" -DCMAKE_BUILD_TYPE=Release \
  "${search[@]}" -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF \
  -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx"
found_dir=$(sed -n 's/^zkmem_DIR:[A-Z]*=//p' "$consumer_build/CMakeCache.txt")
case "$found_dir" in
  "$prefix"/*) ;;
  *) fail "find_package(zkmem) found $found_dir, not the scratch prefix" ;;
esac
quiet "$cmake" --build "$consumer_build"
expected="zkmem $version ok"
output=$("$consumer_build/consumer_shared" "shared:$prefix/") ||
  fail "consumer_shared (zkmem::zkmem) failed"
[ "$output" = "$expected" ] || fail "consumer_shared printed '$output'"
output=$("$consumer_build/consumer_static" static) ||
  fail "consumer_static (zkmem::zkmem_static) failed"
[ "$output" = "$expected" ] || fail "consumer_static printed '$output'"
output=$("$consumer_build/consumer_cxx") || fail "consumer_cxx failed"
[ "$output" = "zkmem from C++ ok" ] || fail "consumer_cxx printed '$output'"
echo "zkmem::zkmem, zkmem::zkmem_static and C++ consumers ok"

step "find_package(zkmem $next_major.0) must be refused"
mkdir -p "$workdir/version-check"
cat >"$workdir/version-check/CMakeLists.txt" <<EOF
cmake_minimum_required(VERSION 3.16)
project(zkmem_version_check LANGUAGES C)
find_package(zkmem $next_major.0 CONFIG)
if(zkmem_FOUND)
  message(FATAL_ERROR "zkmem $next_major.0 requested, yet found \${zkmem_VERSION}")
endif()
EOF
quiet "$cmake" -S "$workdir/version-check" -B "$workdir/version-check/build" \
  "${search[@]}" -DCMAKE_C_COMPILER="$cc"

step "pkg-config consumer"
if ! command -v "$pkg_config" >/dev/null 2>&1; then
  if [ "$no_skip" = 1 ]; then
    fail "pkg-config not found"
  fi
  echo "SKIP: pkg-config not found (Debian: apt-get install pkg-config)"
  exit 77
fi
# only the scratch prefix: never a zkmem.pc installed on the system
PKG_CONFIG_LIBDIR=$(dirname "$pc")
PKG_CONFIG_PATH=$PKG_CONFIG_LIBDIR
export PKG_CONFIG_LIBDIR PKG_CONFIG_PATH
pc_version=$("$pkg_config" --modversion zkmem) || fail "pkg-config zkmem failed"
[ "$pc_version" = "$version" ] ||
  fail "pkg-config says version $pc_version, zkmem.h $version"
pc_libdir=$("$pkg_config" --variable=libdir zkmem)
[ "$pc_libdir" -ef "$libdir" ] ||
  fail "zkmem.pc libdir $pc_libdir is not $libdir"
cflags=$("$pkg_config" --cflags zkmem)
libs=$("$pkg_config" --libs zkmem)
static_libs=$("$pkg_config" --static --libs zkmem)
case " $static_libs " in
  *" -lpthread "*) ;;
  *) fail "pkg-config --static --libs zkmem lacks -lpthread: $static_libs" ;;
esac
echo "cflags: $cflags; libs: $libs; static libs: $static_libs"
# shellcheck disable=SC2086 # the flags are lists of words
quiet "$cc" -Wall -Wextra -Werror $cflags "$consumer/consumer.c" -o \
  "$workdir/pc_shared" $libs -Wl,-rpath,"$pc_libdir"
output=$("$workdir/pc_shared" "shared:$prefix/") ||
  fail "pkg-config shared consumer failed"
[ "$output" = "$expected" ] || fail "pkg-config shared consumer printed '$output'"
# The archive: the same flags with -lzkmem taken from libzkmem.a.
# shellcheck disable=SC2086
quiet "$cc" -Wall -Wextra -Werror $cflags "$consumer/consumer.c" -o \
  "$workdir/pc_static" ${static_libs//-lzkmem/-l:libzkmem.a}
output=$("$workdir/pc_static" static) || fail "pkg-config static consumer failed"
[ "$output" = "$expected" ] || fail "pkg-config static consumer printed '$output'"
echo "pkg-config shared and static consumers ok"

rm -rf "$workdir"
echo "PASS install"
