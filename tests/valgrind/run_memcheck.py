#!/usr/bin/env python3
"""Runs memcheck_target under valgrind's memcheck, zkmem (built with
ZKMEM_VALGRIND) doing the allocating, and checks what memcheck reports.

  run_memcheck.py VALGRIND TARGET LIBRARY

`clean` must report no error and no leak; `misuse` must report each
mistake, attributed to zkmem's malloc/free and to the right source line.
--soname-synonyms=somalloc=nouserintercepts stops valgrind from putting its
own malloc in place of zkmem's (it would otherwise replace any library's).
"""
import re
import subprocess
import sys


def memcheck(valgrind, target, mode):
    command = [valgrind, "--soname-synonyms=somalloc=nouserintercepts",
               "--leak-check=full", "--error-exitcode=99", target, mode]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    return run.returncode, run.stderr


def require(log, pattern, what, failures):
    if not re.search(pattern, log, re.MULTILINE | re.DOTALL):
        failures.append(f"missing: {what} (/{pattern}/)")


def main():
    valgrind, target, library = sys.argv[1:4]
    failures = []

    code, log = memcheck(valgrind, target, "clean")
    if code != 0:
        failures.append(f"clean run exited {code}")
    require(log, r"ERROR SUMMARY: 0 errors", "clean: no error", failures)
    require(log, r"All heap blocks were freed", "clean: nothing lost",
            failures)
    # Allocations were zkmem's, seen through the annotations: a run where
    # valgrind's own malloc took over would count the same blocks without
    # them, so look for zkmem's frames in the misuse run below.

    code, misuse = memcheck(valgrind, target, "misuse")
    if code != 99:
        failures.append(f"misuse run exited {code}, expected 99 (errors)")
    zk = re.escape(library.rsplit("/", 1)[-1].split(".so")[0])
    require(misuse, r"Invalid read of size 1\n.*?memcheck_target\.c:\d+.*?"
            r"inside a block of size 64 free'd\n.*?at 0x[0-9A-F]+: free \(in "
            r"[^)]*" + zk, "read after free, freed by zkmem's free", failures)
    require(misuse, r"Invalid write of size 1\n.*?0 bytes after a block of "
            r"size 24 alloc'd\n.*?at 0x[0-9A-F]+: malloc \(in [^)]*" + zk,
            "write past the end of a zkmem block", failures)
    require(misuse, r"Conditional jump or move depends on uninitialised",
            "use of uninitialised malloc memory", failures)
    require(misuse, r"100 bytes in 1 blocks are definitely lost.*?"
            r"leak_100_bytes", "the leak, with its stack", failures)
    require(misuse, r"ERROR SUMMARY: 4 errors", "exactly four errors",
            failures)

    if failures:
        print("memcheck with zkmem: FAILED")
        for failure in failures:
            print("  " + failure)
        print("---- clean ----\n" + log + "\n---- misuse ----\n" + misuse)
        return 1
    print("memcheck with zkmem: clean run clean; read after free, overflow, "
          "uninitialised use and leak all reported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
