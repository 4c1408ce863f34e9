#!/usr/bin/env python3
"""Check that a malloc library exports every allocation entry point glibc has.

usage: check_exports.py --library LIB [--nm NM] [--cc CC] [--libc LIBC]
                        [--require NAME]... [--no-skip]

Under LD_PRELOAD, a call to an entry point the preloaded library lacks goes to
glibc's allocator with the other allocator's blocks. This lists the defined
dynamic symbols of libc.so.6 (found with --libc, else `CC
-print-file-name=libc.so.6`, else in this process's own memory map), keeps
the allocation functions, and fails naming every one that LIB does not
export, and every --require name it does not export either (entry points of
a newer glibc than this machine's).

Exit status: 0 pass, 1 fail, 77 skipped because nm or glibc is missing (1
instead with --no-skip).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys

SKIP = 77

# glibc's malloc family and its __libc_ aliases. Anchored, so that other
# functions merely starting with these words (freeaddrinfo, freelocale,
# freeifaddrs, __libc_freeres, __libc_alloca_cutoff) stay out; written as
# families, so that an entry point a later glibc adds (malloc_*) is caught.
ALLOCATION = re.compile(
    r"^(?:__libc_)?(?:"
    r"malloc(?:_\w+)?|mallinfo2?|mallopt"
    r"|(?:c|re|p?v|aligned_)alloc|reallocarray|(?:posix_)?memalign"
    r"|c?free|free_(?:aligned_)?sized"
    r")$"
)
# Functions only: glibc's hook variables (__malloc_hook) are data.
FUNCTION_TYPES = set("TWi")


class Skip(Exception):
    pass


def dynamic_symbols(nm, path, functions_only):
    """name -> version text ('' when unversioned) of the defined dynamic
    symbols of path."""
    result = subprocess.run(
        [nm, "-D", "--defined-only", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        universal_newlines=True,
    )
    if result.returncode != 0:
        raise RuntimeError("%s -D %s failed:\n%s" % (nm, path, result.stderr))
    symbols = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) != 3:
            continue
        kind, name = fields[1], fields[2]
        if functions_only and kind not in FUNCTION_TYPES:
            continue
        name, _, version = name.partition("@")
        symbols[name] = version.lstrip("@")
    return symbols


def find_libc(options):
    if options.libc:
        return options.libc
    if options.cc:
        try:
            found = subprocess.run(
                [options.cc, "-print-file-name=libc.so.6"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                universal_newlines=True,
            ).stdout.strip()
        except OSError:
            found = ""
        # Without a libc.so.6 of its own the compiler echoes the bare name.
        if os.path.isabs(found) and os.path.exists(found):
            return os.path.realpath(found)
    # The libc this interpreter runs on: the one LD_PRELOAD interposes on.
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libc.so"):
                    return path
    except OSError:
        pass
    raise Skip("libc.so.6 not found (neither --libc, --cc nor /proc/self/maps)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--library", required=True)
    parser.add_argument("--nm", default="nm")
    parser.add_argument("--cc")
    parser.add_argument("--libc")
    parser.add_argument("--require", action="append", default=[])
    parser.add_argument("--no-skip", action="store_true")
    options = parser.parse_args()

    try:
        nm = shutil.which(options.nm)
        if nm is None:
            raise Skip("nm not found (%s): install binutils" % options.nm)
        libc = find_libc(options)
    except Skip as skip:
        print("SKIP: %s" % skip)
        return 1 if options.no_skip else SKIP

    glibc = {
        name: version
        for name, version in dynamic_symbols(nm, libc, True).items()
        if ALLOCATION.match(name)
    }
    # An nm whose output this script misreads must not pass with nothing.
    for name in ("malloc", "free", "calloc", "realloc"):
        if name not in glibc:
            print("FAIL: %s not found among the symbols of %s" % (name, libc))
            return 1
    exported = dynamic_symbols(nm, options.library, False)

    missing = [
        "%s (glibc %s)" % (name, glibc[name] or "unversioned")
        for name in sorted(glibc)
        if name not in exported
    ]
    missing += [
        "%s (required)" % name
        for name in options.require
        if name not in exported and name not in glibc
    ]
    if missing:
        print(
            "FAIL: %s lacks %d allocation entry point(s) of %s:"
            % (options.library, len(missing), libc)
        )
        for entry in missing:
            print("  " + entry)
        return 1
    print(
        "ok: %s exports all %d allocation entry points of %s: %s; and %s"
        % (
            options.library,
            len(glibc),
            libc,
            " ".join(sorted(glibc)),
            " ".join(options.require) or "nothing more",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
