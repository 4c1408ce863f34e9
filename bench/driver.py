#!/usr/bin/env python3
"""Runs the zkmem allocation benchmarks against every allocator it can find.

Each (scenario, allocator) pair runs in a fresh process; rounds are
interleaved (A B C, A B C, ...) so slow drifts of the machine hit every
allocator alike, and the tables report medians. Results go to stdout (tables),
BUILD/bench/results.json (every run) and BUILD/bench/results.svg (chart).

Allocators, as table rows:
  zkmem-pool  zk_pool_* through bench_pool (fixed-size scenarios only)
  zkmem       BUILD/libzkmem.so under LD_PRELOAD
  zkmem-heaps scenario tasks with a task heap per task, under LD_PRELOAD
  zkmem-crate the Tokio scenarios with zkmem's crate (bindings/rust) as
              Rust's global allocator, no preload; zkmem-crate-scope and
              zkmem-crate-heaps: tokio-reqrep with each request task in
              Heap::scope, of one heap shared by all or of its own
  glibc       the system malloc, no preload
  jemalloc, mimalloc, tcmalloc   under LD_PRELOAD, when installed
  mimalloc3, snmalloc            under LD_PRELOAD, when the repository's
              parent directory holds shared/peers/libmimalloc.so.3.4 and
              shared/peers/libsnmallocshim.so (builds of releases that
              Debian does not package)
  NAME        any other malloc replacement under LD_PRELOAD, from
              --peer NAME=PATH (repeatable) or ZKMEM_BENCH_PEERS=NAME=PATH,...
  seed        the seed report's stack pool (fixed-size scenarios only)
Peers missing from the machine are skipped, and said so on stderr; every
peer found takes part in every table and in the "zkmem against the best
peer" line.

Scenarios tokio-pipeline and tokio-reqrep run a Tokio program
(bench/tokio/) under every malloc row: Rust's default allocator is the C
library's malloc, so the same binary measures Tokio's default allocator
(glibc), zkmem and each peer; a second build of it, with zkmem's crate as
the global allocator, runs the crate rows. The driver builds both with cargo
(offline, from Debian's packaged crates) and skips those scenarios when
cargo or the crates are missing.

Standard library only, so it runs wherever the build does.
"""

import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

# ---------------------------------------------------------------------------
# Scenarios: name, what it does, ops for a full and a --quick run, and which
# fixed-size rows (pool, seed) it has. Op counts are chosen so a default run
# of every allocator fits in ten minutes on two cores.


class Scenario:
    def __init__(self, name, title, ops, quick_ops, pool=False, seed=False,
                 tokio=None, workers=False, per_op=1e6):
        self.name = name
        self.title = title
        self.ops = ops
        self.quick_ops = quick_ops
        self.pool = pool
        self.seed = seed
        self.tokio = tokio  # workload of the Tokio binary, or None
        self.workers = workers  # takes --workers (threads per side)
        # Rates shown in millions of ops/s, or in ops/s where a single op
        # costs milliseconds (bigblocks).
        self.per_op = per_op


SCENARIOS = [
    Scenario("fixed", "alloc+free pairs of 64 B", 100_000_000, 200_000,
             pool=True, seed=True),
    Scenario("stress", "batches of 1,000 random 8-256 B, freed in reverse",
             40_000_000, 200_000, pool=True, seed=True),
    Scenario("reuse", "one 128 B object allocated and freed repeatedly",
             100_000_000, 200_000, pool=True, seed=True),
    Scenario("large", "batches of 100 random 1-5 KB, freed in random order",
             10_000_000, 40_000),
    Scenario("mixed",
             "10,000 live objects, log-uniform 8 B-64 KB, random replacement",
             10_000_000, 40_000),
    Scenario("handoff",
             "64-1,024 B objects allocated on one thread, freed on another",
             4_000_000, 20_000, pool=True),
    Scenario("scaling", "scenario stress on 1, 2, 4 ... threads at once",
             20_000_000, 100_000),
    Scenario("memory",
             "RSS of scenario mixed (every page touched), then freed",
             400_000, 20_000),
    Scenario("live", "1,000,000 live 64 B objects, RSS over their payload",
             1_000_000, 20_000, pool=True),
    # The four C scenarios below take 13-21 s a round with seven malloc rows
    # on a 2-core x86-64 machine (scaled from --quick runs on a busy
    # machine), over half of it bigblocks, whose every op costs
    # milliseconds: two to three minutes over 9 rounds. The Tokio ones, 3-4 s.
    Scenario("batches",
             "batches of 4,096 blocks of 8 B-2 KiB made on producer threads, "
             "freed on consumer threads", 4_000_000, 65_536, workers=True),
    Scenario("bigblocks",
             "20 live blocks of 5-25 MiB, replaced at random, zero-filled",
             400, 200, per_op=1),
    Scenario("server",
             "larson-style: threads replace 10-1,000 B blocks in slots "
             "shared by all", 4_000_000, 100_000, workers=True),
    Scenario("churn",
             "8 B-16 KiB blocks, temporary, short- and long-lived, "
             "interleaved", 10_000_000, 100_000),
    Scenario("tasks",
             "short tasks polled 4 times by worker threads, moving between "
             "them, each keeping blocks across polls; zkmem-heaps: a task "
             "heap per task, destroyed at its end", 2_000_000, 40_000,
             workers=True),
    Scenario("tokio-pipeline",
             "Tokio: 16 B-4 KiB messages through a chain of 5 tasks and "
             "bounded channels (op = one message delivered)",
             400_000, 20_000, tokio="pipeline", workers=True),
    Scenario("tokio-reqrep",
             "Tokio: a task per request, a String to a server task, a fresh "
             "Vec back through a oneshot (op = one round trip)",
             200_000, 20_000, tokio="reqrep", workers=True),
]
SCENARIO_BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}

PEERS = ["jemalloc", "mimalloc", "tcmalloc", "mimalloc3", "snmalloc"]
# zkmem's own rows and glibc, in table order; seed comes last.
OWN_ROWS = ["zkmem-pool", "zkmem", "zkmem-heaps", "zkmem-crate",
            "zkmem-crate-scope", "zkmem-crate-heaps", "glibc"]
ROW_ORDER = OWN_ROWS + PEERS + ["seed"]
BUILTIN_ROWS = OWN_ROWS + ["seed"]
# The crate rows: (name, arguments of zkmem-tokio-bench-crate, scenarios;
# None: every Tokio scenario).
CRATE_ROWS = [
    ("zkmem-crate", [], None),
    ("zkmem-crate-scope", ["--scope", "shared"], ["tokio-reqrep"]),
    ("zkmem-crate-heaps", ["--scope", "task"], ["tokio-reqrep"]),
]
PEER_LIBRARIES = {
    "jemalloc": ["libjemalloc.so.2", "libjemalloc.so"],
    "mimalloc": ["libmimalloc.so.2", "libmimalloc.so"],
    "tcmalloc": ["libtcmalloc_minimal.so.4", "libtcmalloc.so.4",
                 "libtcmalloc_minimal.so", "libtcmalloc.so"],
}
# Builds of releases Debian does not package, kept beside the repository
# (REPOSITORY/../shared/peers), never inside it.
SHARED_PEERS = {
    "mimalloc3": "libmimalloc.so.3.4",
    "snmalloc": "libsnmallocshim.so",
}
LIBRARY_DIRECTORIES = [
    "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
    "/usr/lib", "/usr/local/lib", "/usr/local/lib64"
]

# Shared virtual machines switch between speeds from one second to the next
# (runs of one allocator 40-50% apart): the median of 9 rounds moves less
# with them than the median of 5.
DEFAULT_RUNS = 9
DEFAULT_WORKERS = 2  # threads per side: runnable, if not fast, on two cores
DEFAULT_TIME_BUDGET_S = 540  # ten minutes, less a margin for the first round
PURGE_WAIT_MS = 1500  # zkmem's default purge delay (1000 ms) + margin
QUICK_PURGE_WAIT_MS = 200


def log(message):
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Allocators


class Allocator:
    def __init__(self, name, binary, arguments=(), preload=None,
                 scenarios=None, version=None, malloc=True, tokio=False):
        self.name = name
        self.binary = binary
        self.arguments = list(arguments)
        self.preload = preload
        self.scenarios = scenarios  # None: every scenario of its binary
        self.version = version
        # A malloc row (glibc, or a library preloaded in its place) also
        # runs any other program, the Tokio one included.
        self.malloc = malloc
        # `binary` is a Tokio program of its own (the crate rows): it runs
        # the Tokio scenarios only.
        self.tokio = tokio

    def runs(self, scenario):
        if scenario.tokio and not self.tokio:
            # zkmem-heaps is a malloc row for scenario tasks alone.
            return self.malloc and self.scenarios is None
        if self.tokio and not scenario.tokio:
            return False
        return self.scenarios is None or scenario.name in self.scenarios

    def environment(self):
        environment = dict(os.environ)
        environment.pop("LD_PRELOAD", None)
        if self.preload:
            environment["LD_PRELOAD"] = self.preload
        return environment


def ldconfig_libraries():
    """Maps library file names to paths as the dynamic linker's cache has
    them, 64-bit entries first; empty when ldconfig is unavailable."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        output = subprocess.run([ldconfig, "-p"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True,
                                timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    entries = []
    for line in output.splitlines():
        match = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if match:
            entries.append(match.groups())
    libraries = {}
    for name, flags, path in sorted(entries, key=lambda e: "64" not in e[1]):
        libraries.setdefault(name, path)
    return libraries


def find_peer(name, cache):
    for library in PEER_LIBRARIES[name]:
        for directory in LIBRARY_DIRECTORIES:
            path = os.path.join(directory, library)
            if os.path.exists(path):
                return os.path.realpath(path)
        if library in cache and os.path.exists(cache[library]):
            return os.path.realpath(cache[library])
    return None


def package_version(path):
    """Debian package version of the package that owns `path`, if any."""
    if not shutil.which("dpkg-query"):
        return None
    try:
        owner = subprocess.run(["dpkg-query", "-S", path],
                               stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True,
                               timeout=10).stdout
        if not owner:
            # dpkg records the path as shipped; the real path may differ
            # (usrmerge), so try the file name under any directory.
            owner = subprocess.run(
                ["dpkg-query", "-S", "*/" + os.path.basename(path)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, timeout=10).stdout
        package = owner.split(":", 1)[0].strip() if owner else ""
        if not package:
            return None
        version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            timeout=10).stdout.strip()
        return f"{package} {version}" if version else package
    except (OSError, subprocess.SubprocessError):
        return None


def zkmem_version(source_dir):
    try:
        with open(os.path.join(source_dir, "include", "zkmem.h")) as handle:
            header = handle.read()
    except OSError:
        return None
    parts = [re.search(rf"ZKMEM_VERSION_{part}\s+(\d+)", header)
             for part in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    version = ".".join(match.group(1) for match in parts)
    try:
        # -dirty marks figures measured on uncommitted sources.
        commit = subprocess.run(["git", "-C", source_dir, "describe",
                                 "--always", "--dirty"],
                                stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version} ({commit})" if commit else version


def register_peer(name):
    """Makes `name` a peer row: in the tables, the ratios and the chart."""
    if name not in PEERS:
        PEERS.append(name)
        ROW_ORDER[:] = OWN_ROWS + PEERS + ["seed"]


def parse_peer(text, origin):
    """NAME=PATH -> (name, path); exits with a message when malformed."""
    name, _, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name) or not path:
        raise SystemExit(f"error: {origin}: want NAME=PATH, got {text!r}")
    if name in BUILTIN_ROWS:
        raise SystemExit(f"error: {origin}: {name} is a built-in row")
    return name, path


def extra_peers(source_dir, requested):
    """The peers beyond Debian's packages, in table order: the shared builds
    beside the repository, then ZKMEM_BENCH_PEERS, then --peer. A later entry
    of the same name replaces an earlier one. Returns ([(name, path,
    version)], [(name, reason)])."""
    found, skipped = {}, {}
    shared = os.path.join(source_dir, "..", "shared", "peers")
    for name, library in SHARED_PEERS.items():
        path = os.path.join(shared, library)
        if os.path.exists(path):
            found[name] = (os.path.realpath(path),
                           f"{library}, built from its release, not packaged")
        else:
            skipped[name] = "not found (../shared/peers/" + library + ")"
    from_environment = os.environ.get("ZKMEM_BENCH_PEERS", "")
    for item in from_environment.split(","):
        if not item.strip():
            continue
        name, path = parse_peer(item, "ZKMEM_BENCH_PEERS")
        if os.path.exists(path):
            found.pop(name, None)
            found[name] = (os.path.realpath(path), package_version(path))
            skipped.pop(name, None)
        else:
            skipped[name] = f"not found ({path}, from ZKMEM_BENCH_PEERS)"
    for name, path in requested:
        found.pop(name, None)
        found[name] = (os.path.realpath(path), package_version(path))
        skipped.pop(name, None)
    return ([(name, path, version) for name, (path, version) in found.items()],
            list(skipped.items()))


def discover_allocators(build_dir, source_dir, wanted, requested_peers=()):
    """Returns the allocators to run; says on stderr what was skipped."""
    bench_dir = os.path.join(build_dir, "bench")
    bench_malloc = os.path.join(bench_dir, "bench_malloc")
    bench_pool = os.path.join(bench_dir, "bench_pool")
    if not os.access(bench_malloc, os.X_OK):
        raise SystemExit(f"error: {bench_malloc} not found; build first "
                         f"(make build, or cmake --build {build_dir})")
    found, skipped = [], []
    fixed_pool = [s.name for s in SCENARIOS if s.pool]
    fixed_seed = [s.name for s in SCENARIOS if s.seed]
    version = zkmem_version(source_dir)

    if os.access(bench_pool, os.X_OK):
        found.append(Allocator("zkmem-pool", bench_pool, ["--alloc", "pool"],
                               scenarios=fixed_pool, version=version,
                               malloc=False))
    else:
        skipped.append(("zkmem-pool", f"{bench_pool} not built"))
    library = os.path.join(build_dir, "libzkmem.so")
    if os.path.exists(library):
        found.append(Allocator("zkmem", bench_malloc,
                               preload=os.path.realpath(library),
                               version=version))
        # The tasks scenario again, each task in a task heap of its own.
        found.append(Allocator("zkmem-heaps", bench_malloc, ["--task-heaps"],
                               preload=os.path.realpath(library),
                               scenarios=["tasks"], version=version))
    else:
        skipped.append(("zkmem", f"{library} not built"))
    found.append(Allocator("glibc", bench_malloc,
                           version=os.confstr("CS_GNU_LIBC_VERSION")
                           if hasattr(os, "confstr") else None))
    extra, extra_skipped = extra_peers(source_dir, requested_peers)
    extra_names = {name for name, _, _ in extra}
    cache = ldconfig_libraries()
    for name in PEER_LIBRARIES:
        if name in extra_names:
            continue  # --peer or ZKMEM_BENCH_PEERS replaces the package
        path = find_peer(name, cache)
        if path:
            found.append(Allocator(name, bench_malloc, preload=path,
                                   version=package_version(path)))
        else:
            skipped.append((name, "not installed"))
    for name, path, peer_version in extra:
        register_peer(name)
        found.append(Allocator(name, bench_malloc, preload=path,
                               version=peer_version))
    skipped += extra_skipped
    found.append(Allocator("seed", bench_malloc, ["--alloc", "seed"],
                           scenarios=fixed_seed,
                           version="reference, in the workload",
                           malloc=False))
    found.sort(key=lambda allocator: ROW_ORDER.index(allocator.name))

    if wanted:
        unknown = set(wanted) - set(ROW_ORDER)
        if unknown:
            raise SystemExit(f"error: unknown allocator(s) "
                             f"{', '.join(sorted(unknown))}; known: "
                             f"{', '.join(ROW_ORDER)}")
        for allocator in found:
            if allocator.name not in wanted:
                skipped.append((allocator.name, "not in --allocators"))
        found = [a for a in found if a.name in wanted]

    for allocator in found:
        where = allocator.preload or allocator.binary
        log(f"found   {allocator.name:<10} {where}"
            + (f"  [{allocator.version}]" if allocator.version else ""))
    for name, reason in skipped:
        log(f"skipped {name:<10} {reason}")
    if not any(a.name in PEERS for a in found):
        log("note: no peer allocator found; comparing with glibc only")
    return found


# ---------------------------------------------------------------------------
# The Tokio workload (bench/tokio): a Rust program, built with cargo.

TOKIO_BINARY = "zkmem-tokio-bench"
TOKIO_CRATE_BINARY = "zkmem-tokio-bench-crate"  # package bench/tokio/crate
DEBIAN_CRATES = "/usr/share/cargo/registry"  # bench/tokio/.cargo/config.toml


def cmake_cache_value(build_dir, key):
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt")) as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


def find_cargo(build_dir):
    """(cargo, the rustc beside it), or (None, None). The build tree's choice
    comes first: if CMake and the driver built with different toolchains,
    each would rebuild everything the other had built. Then Debian's own
    before PATH's: a rustup toolchain earlier in PATH is not the compiler
    Debian's packaged crates were checked with, nor the one CI uses."""
    for cargo in (cmake_cache_value(build_dir, "ZKMEM_CARGO"),
                  "/usr/bin/cargo", shutil.which("cargo")):
        if cargo and os.path.isabs(cargo) and os.access(cargo, os.X_OK):
            rustc = os.path.join(os.path.dirname(cargo), "rustc")
            return cargo, rustc if os.access(rustc, os.X_OK) else None
    return None, None


def prepare_tokio(build_dir, source_dir):
    """Builds the Tokio workload (a no-op when it is up to date) and returns
    the paths of its binaries: (malloc's, the crate's), the crate's None
    without Debian's cc crate; (None, None) after saying on stderr why it
    cannot be built here. Raises RunFailure when cargo is there but the
    build fails."""
    names = "tokio-pipeline, tokio-reqrep"
    cargo, rustc = find_cargo(build_dir)
    if cargo is None:
        log(f"skipped {names}: cargo not found (Debian: apt-get install "
            f"rustc cargo librust-tokio-dev)")
        return None, None
    if not glob.glob(os.path.join(DEBIAN_CRATES, "tokio-1.*")):
        log(f"skipped {names}: no tokio crate in {DEBIAN_CRATES} (Debian: "
            f"apt-get install librust-tokio-dev)")
        return None, None
    package = os.path.join(source_dir, "bench", "tokio")
    # cmake/cargo.cmake's target directory: a build with another would
    # rebuild tokio for nothing.
    target = os.path.join(build_dir, "cargo")
    binary = os.path.join(target, "release", TOKIO_BINARY)
    builds = [(package, binary)]
    crate_binary = None
    if glob.glob(os.path.join(DEBIAN_CRATES, "cc-1.*")):
        crate_binary = os.path.join(target, "release", TOKIO_CRATE_BINARY)
        builds.append((os.path.join(package, "crate"), crate_binary))
    else:
        log("skipped zkmem-crate rows: no cc crate in "
            f"{DEBIAN_CRATES} (Debian: apt-get install librust-cc-dev)")
    environment = dict(os.environ)
    environment.pop("LD_PRELOAD", None)
    environment["CARGO_TARGET_DIR"] = target
    if rustc:
        environment["RUSTC"] = rustc
    for directory, built in builds:
        log(f"building {os.path.relpath(directory, source_dir)}: {cargo} "
            f"build --release, offline, from {DEBIAN_CRATES}")
        # Cargo reads .cargo/config.toml (the offline crate source) from the
        # directory it runs in and its parents, not from the manifest's.
        try:
            completed = subprocess.run([cargo, "build", "--release"],
                                       cwd=directory, env=environment,
                                       stdout=sys.stderr, timeout=1800)
        except (OSError, subprocess.SubprocessError) as error:
            raise RunFailure(f"cargo build of {directory} failed: {error}")
        if completed.returncode != 0 or not os.access(built, os.X_OK):
            raise RunFailure(f"cargo build of {directory} failed (exit "
                             f"status {completed.returncode}); see the "
                             "messages above")
    log(f"found   {'tokio':<10} {binary}  [{tokio_version()}]")
    return binary, crate_binary


def crate_allocators(crate_binary, source_dir, wanted):
    """The crate rows, wanted ones only, in table order."""
    rows = []
    for name, arguments, scenarios in CRATE_ROWS:
        if wanted and name not in wanted:
            continue
        rows.append(Allocator(name, crate_binary, arguments,
                              scenarios=scenarios,
                              version=zkmem_version(source_dir),
                              malloc=False, tokio=True))
        log(f"found   {name:<10} {crate_binary}"
            + (f" {' '.join(arguments)}" if arguments else ""))
    return rows


def tokio_version():
    versions = sorted(os.path.basename(path) for path in
                      glob.glob(os.path.join(DEBIAN_CRATES, "tokio-1.*")))
    return versions[-1] if versions else "tokio"


# ---------------------------------------------------------------------------
# Machine description


def machine_info(allocators):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    glibc = (os.confstr("CS_GNU_LIBC_VERSION")
             if hasattr(os, "confstr") else None)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "kernel": f"{platform.system()} {platform.release()}",
        "glibc": glibc,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg())
        if hasattr(os, "getloadavg") else None,
        "versions": {a.name: a.version for a in allocators if a.version},
    }


# ---------------------------------------------------------------------------
# Running


class RunFailure(Exception):
    pass


def scenario_ops(scenario, args):
    ops = scenario.quick_ops if args.quick else scenario.ops
    return max(2, int(ops * args.ops_scale))


def run_once(allocator, scenario, ops, args):
    timeout = args.timeout
    if scenario.tokio:
        command = [allocator.binary if allocator.tokio else args.tokio_binary,
                   scenario.tokio, "--ops", str(ops), "--threads",
                   str(args.workers)]
        if allocator.tokio:
            command += allocator.arguments
    else:
        command = [allocator.binary, "--scenario", scenario.name, "--ops",
                   str(ops), "--json"] + allocator.arguments
    if scenario.name == "scaling" and args.threads:
        command += ["--threads", args.threads]
    if scenario.name == "memory":
        command += ["--purge-wait-ms", str(args.purge_wait_ms)]
    if scenario.workers and not scenario.tokio:
        command += ["--workers", str(args.workers)]
    started = time.monotonic()
    try:
        completed = subprocess.run(command, env=allocator.environment(),
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFailure(f"timed out after {timeout} s: {' '.join(command)}")
    wall = time.monotonic() - started
    stderr = completed.stderr.strip()
    if completed.returncode != 0:
        status = (f"killed by signal {-completed.returncode}"
                  if completed.returncode < 0
                  else f"exit status {completed.returncode}")
        raise RunFailure(f"{status}: {' '.join(command)}"
                         + (f"\n    {stderr[-2000:]}" if stderr else ""))
    # ld.so only warns when a preload fails, and the run would silently
    # measure glibc instead.
    if "cannot be preloaded" in stderr:
        raise RunFailure(f"LD_PRELOAD failed: {stderr[-500:]}")
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RunFailure(f"no JSON result from {' '.join(command)}: "
                         f"{completed.stdout[-500:]!r}")
    if not (result.get("ops", 0) > 0 and result.get("seconds", 0) > 0
            and math.isfinite(result.get("ops_per_s", float("nan")))):
        raise RunFailure(f"implausible result {result}")
    return result, wall


def plan(allocators, scenarios):
    """The (scenario, allocator) pairs of one round, in order."""
    return [(scenario, allocator) for scenario in scenarios
            for allocator in allocators if allocator.runs(scenario)]


def run_all(allocators, scenarios, args):
    pairs = plan(allocators, scenarios)
    runs = args.runs
    records, failures = [], []
    round_index = 0
    started = time.monotonic()
    while round_index < runs:
        round_started = time.monotonic()
        for index, (scenario, allocator) in enumerate(pairs):
            ops = scenario_ops(scenario, args)
            label = (f"[{round_index * len(pairs) + index + 1}/"
                     f"{runs * len(pairs)}] {scenario.name:<14} "
                     f"{allocator.name:<10} run {round_index + 1} of {runs}")
            try:
                result, wall = run_once(allocator, scenario, ops, args)
            except RunFailure as failure:
                log(f"{label}  FAILED\n    {failure}")
                failures.append({"scenario": scenario.name,
                                 "allocator": allocator.name,
                                 "run": round_index + 1,
                                 "error": str(failure)})
                continue
            unit = "M ops/s" if scenario.per_op == 1e6 else "ops/s"
            log(f"{label}  "
                f"{format_rate(result['ops_per_s'], scenario.per_op):>9} "
                f"{unit}  ({wall:.2f} s)")
            records.append({"scenario": scenario.name,
                            "allocator": allocator.name,
                            "run": round_index + 1, "wall_s": round(wall, 3),
                            "result": result})
        round_index += 1
        # A default run must fit the time budget: after the first round we
        # know what a round costs and drop rounds that would not fit.
        if round_index == 1 and not args.runs_given and runs > 1:
            round_time = time.monotonic() - round_started
            affordable = int(args.time_budget // max(round_time, 1e-3))
            if affordable < runs:
                runs = max(1, affordable)
                log(f"note: a round takes {round_time:.0f} s; running "
                    f"{runs} round(s) to stay within {args.time_budget} s")
    elapsed = time.monotonic() - started
    log(f"done: {len(records)} runs in {elapsed:.0f} s, "
        f"{len(failures)} failed")
    return records, failures, runs


# ---------------------------------------------------------------------------
# Summaries

MEMORY_FIELDS = ["rss_baseline_kib", "live_peak_kib", "rss_live_kib",
                 "rss_after_free_kib", "rss_after_wait_kib",
                 "rss_after_collect_kib"]


def median_or_none(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else None


def summarise(records):
    """medians[scenario][allocator] -> dict of median figures."""
    grouped = {}
    for record in records:
        grouped.setdefault(record["scenario"], {}).setdefault(
            record["allocator"], []).append(record["result"])
    medians = {}
    for scenario, by_allocator in grouped.items():
        medians[scenario] = {}
        for allocator, results in by_allocator.items():
            summary = {"runs": len(results)}
            for field in ["ops", "ops_per_s", "ns_per_op", "peak_rss_kib",
                          "reuse_rate", "live_peak_kib", "live_rss_kib",
                          "live_rss_ratio", "minor_faults",
                          "faults_per_replacement", "rss_peak_kib",
                          "live_kib"] + MEMORY_FIELDS:
                if any(field in result for result in results):
                    summary[field] = median_or_none(
                        [result.get(field) for result in results])
            if scenario == "scaling":
                by_threads = {}
                for result in results:
                    for point in result.get("points", []):
                        by_threads.setdefault(point["threads"], []).append(
                            point)
                summary["points"] = [{
                    "threads": threads,
                    "ops_per_s": median_or_none(
                        [p["ops_per_s"] for p in points]),
                    "speedup": median_or_none([p["speedup"] for p in points]),
                } for threads, points in sorted(by_threads.items())]
            rates = [result["ops_per_s"] for result in results]
            # (max - min) / median of the runs: how far to trust the median.
            summary["spread"] = ((max(rates) - min(rates))
                                 / statistics.median(rates))
            medians[scenario][allocator] = summary
    return medians


# Fixed-size rows serve varying sizes with one pool of the largest size,
# which the reader must know to compare them with malloc rows.
FIXED_SIZE_NOTES = {
    "stress": "(zkmem-pool and seed: one pool of 256 B objects serves every "
              "size)",
    "handoff": "(zkmem-pool: one pool of 1,024 B objects serves every size)",
}


# What a reader needs to read the table right.
SCENARIO_NOTES = {
    "bigblocks": "(op: a free or a malloc; each new block is zero-filled by "
                 "the program, in the timed loop; faults: minor page faults "
                 "during the timed loop)",
    "server": "(peak RSS with every block live; RSS live at end: with the "
              "threads still running; bytes live: what the blocks asked for)",
    "tokio-pipeline": "(the whole program is timed, the runtime's work and "
                      "the writes into the messages included: the ratios are "
                      "what the allocator changes for a Tokio program)",
    "tokio-reqrep": "(the whole program is timed, the runtime's work "
                    "included: the ratios are what the allocator changes for "
                    "a Tokio program)",
}


def format_rate(ops_per_s, per_op=1e6):
    if per_op != 1e6:
        return f"{ops_per_s / per_op:,.0f}"
    millions = ops_per_s / 1e6
    if millions >= 100:
        return f"{millions:.0f}"
    if millions >= 10:
        return f"{millions:.1f}"
    return f"{millions:.2f}"


def format_kib(kib):
    if kib is None:
        return "n/a"
    return f"{kib / 1024:.1f} MiB"


def format_ns(nanoseconds):
    if nanoseconds >= 10_000:
        return f"{nanoseconds:,.0f}"
    return f"{nanoseconds:.2f}"


def format_count(value):
    return "-" if value is None else f"{value:,.0f}"


def format_spread(summary):
    if summary.get("runs", 0) < 2:
        return "-"
    return f"{summary['spread']:.0%}"


def format_ratio(value, reference):
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}x"


def print_table(headers, rows, out):
    widths = [max(len(str(cell)) for cell in column)
              for column in zip(headers, *rows)]
    line = "  ".join(f"{header:<{width}}" if index == 0 else
                     f"{header:>{width}}"
                     for index, (header, width) in enumerate(
                         zip(headers, widths)))
    print(line, file=out)
    print("  ".join("-" * width for width in widths), file=out)
    for row in rows:
        print("  ".join(f"{cell:<{width}}" if index == 0 else
                        f"{cell:>{width}}"
                        for index, (cell, width) in enumerate(
                            zip(row, widths))), file=out)


def ordered(by_allocator):
    return [name for name in ROW_ORDER if name in by_allocator]


def best_peer(by_allocator, key="ops_per_s", lowest=False):
    values = [by_allocator[name][key] for name in PEERS
              if name in by_allocator and by_allocator[name].get(key)]
    if not values:
        return None
    return min(values) if lowest else max(values)


def paired_with_best_peer(records, scenario, by_allocator):
    """zkmem against the best peer (by median), round by round: rounds run
    every allocator back to back, so a round's two runs share the machine's
    state of the moment. Returns (peer, rounds zkmem was ahead, rounds,
    median of the per-round ratios), or None."""
    peer_rate = best_peer(by_allocator)
    if "zkmem" not in by_allocator or peer_rate is None:
        return None
    peer = next(name for name in PEERS if name in by_allocator and
                by_allocator[name].get("ops_per_s") == peer_rate)
    rates = {}
    for record in records:
        if record["scenario"] == scenario and record["allocator"] in (
                "zkmem", peer):
            rates.setdefault(record["run"], {})[record["allocator"]] = (
                record["result"]["ops_per_s"])
    ratios = [pair["zkmem"] / pair[peer] for pair in rates.values()
              if "zkmem" in pair and pair.get(peer)]
    if not ratios:
        return None
    ahead = sum(1 for ratio in ratios if ratio > 1.0)
    return peer, ahead, len(ratios), statistics.median(ratios)


def report(medians, machine, settings, out, records=()):
    print(f"zkmem benchmarks, {settings['date']}", file=out)
    print(f"machine: {machine['cpu']}, {machine['cores']} cores "
          f"({machine['usable_cores']} usable), {machine['kernel']}, "
          f"{machine['glibc'] or 'libc unknown'}", file=out)
    for name, version in machine["versions"].items():
        print(f"  {name:<10} {version}", file=out)
    print(f"runs: {settings['runs']} per (scenario, allocator), each in its "
          f"own process, interleaved; medians shown"
          + (" (QUICK SMOKE RUN: figures are meaningless)"
             if settings["quick"] else ""), file=out)
    present = [name for name in PEERS
               if any(name in rows for rows in medians.values())]
    print("ratios: ops/s over glibc's and over the best of the peers "
          f"present ({', '.join(present) or 'none'}; higher is better); "
          "spread: (max - min) / median of the runs", file=out)
    load = machine.get("load_average")
    if load:
        busy = load[0] > 0.5 * (machine.get("usable_cores") or 1)
        print(f"load average at start: {load[0]:.2f} {load[1]:.2f} "
              f"{load[2]:.2f}"
              + ("  (WARNING: the machine was busy; figures are noisy)"
                 if busy else ""), file=out)

    for scenario in SCENARIOS:
        by_allocator = medians.get(scenario.name)
        if not by_allocator:
            continue
        any_result = next(iter(by_allocator.values()))
        print(f"\n== {scenario.name}: {scenario.title} "
              f"({int(any_result.get('ops') or 0):,} ops per run) ==",
              file=out)
        glibc = by_allocator.get("glibc", {}).get("ops_per_s")
        peer = best_peer(by_allocator)
        if scenario.name == "scaling":
            print_scaling(by_allocator, glibc, peer, out)
            continue
        if scenario.name == "memory":
            print_memory(by_allocator, out)
            continue
        headers = ["allocator",
                   "M ops/s" if scenario.per_op == 1e6 else "ops/s",
                   "spread", "ns/op",
                   # Tokio's own default is glibc's malloc: this column is
                   # what switching allocator would change for a Tokio
                   # program.
                   "vs Tokio's default allocator (glibc)" if scenario.tokio
                   else "vs glibc",
                   "vs best peer", "peak RSS"]
        if scenario.name == "reuse":
            headers.append("reuse rate")
        if scenario.name == "live":
            headers += ["RSS of objects", "RSS / payload"]
        if scenario.name == "bigblocks":
            headers += ["minor faults", "faults / replacement"]
        if scenario.name == "server":
            headers += ["RSS live at end", "bytes live"]
        rows = []
        for name in ordered(by_allocator):
            summary = by_allocator[name]
            # The server's own reading, taken with every block live, where
            # it has one: VmHWM can lag the RSS it just reported.
            peak_rss = summary.get("rss_peak_kib", summary.get("peak_rss_kib"))
            row = [name, format_rate(summary["ops_per_s"], scenario.per_op),
                   format_spread(summary),
                   format_ns(summary["ns_per_op"]),
                   format_ratio(summary["ops_per_s"], glibc),
                   format_ratio(summary["ops_per_s"], peer),
                   format_kib(peak_rss)]
            if scenario.name == "reuse":
                rate = summary.get("reuse_rate")
                row.append("-" if rate is None else f"{rate:.1%}")
            if scenario.name == "live":
                ratio = summary.get("live_rss_ratio")
                row += [format_kib(summary.get("live_rss_kib")),
                        "-" if ratio is None else f"{ratio:.3f}x"]
            if scenario.name == "bigblocks":
                row += [format_count(summary.get("minor_faults")),
                        format_count(summary.get("faults_per_replacement"))]
            if scenario.name == "server":
                row += [format_kib(summary.get("rss_live_kib")),
                        format_kib(summary.get("live_kib"))]
            rows.append(row)
        print_table(headers, rows, out)
        paired = paired_with_best_peer(records, scenario.name, by_allocator)
        if paired and paired[2] > 1:
            peer, ahead, rounds, ratio = paired
            print(f"zkmem vs {peer} round by round: ahead in {ahead} of "
                  f"{rounds}, median ratio {ratio:.2f}x", file=out)
        note = FIXED_SIZE_NOTES.get(scenario.name)
        if note and any(name in by_allocator for name in ("zkmem-pool",
                                                          "seed")):
            print(note, file=out)
        note = SCENARIO_NOTES.get(scenario.name)
        if note:
            print(note, file=out)


def print_scaling(by_allocator, glibc, peer, out):
    thread_counts = sorted({point["threads"] for summary in
                            by_allocator.values()
                            for point in summary.get("points", [])})
    headers = (["allocator"] + [f"{t} thr M ops/s" for t in thread_counts]
               + ["spread", f"speed-up {thread_counts[-1]} thr", "vs glibc",
                  "vs best peer", "peak RSS"])
    rows = []
    for name in ordered(by_allocator):
        summary = by_allocator[name]
        points = {point["threads"]: point for point in summary["points"]}
        row = [name]
        for threads in thread_counts:
            point = points.get(threads)
            row.append(format_rate(point["ops_per_s"]) if point else "-")
        last = points.get(thread_counts[-1])
        row.append(format_spread(summary))
        row.append(f"{last['speedup']:.2f}x" if last else "-")
        row += [format_ratio(summary["ops_per_s"], glibc),
                format_ratio(summary["ops_per_s"], peer),
                format_kib(summary.get("peak_rss_kib"))]
        rows.append(row)
    print_table(headers, rows, out)
    print("(ops per thread fixed: ideal speed-up equals the thread count; "
          "ratios use the largest count)", file=out)


def print_memory(by_allocator, out):
    headers = ["allocator", "peak RSS", "live at end", "after free",
               "after wait", "after zk_collect", "vs best peer (peak)"]
    peer = best_peer(by_allocator, "peak_rss_kib", lowest=True)
    rows = []
    for name in ordered(by_allocator):
        summary = by_allocator[name]
        rows.append([name, format_kib(summary.get("peak_rss_kib")),
                     format_kib(summary.get("rss_live_kib")),
                     format_kib(summary.get("rss_after_free_kib")),
                     format_kib(summary.get("rss_after_wait_kib")),
                     format_kib(summary.get("rss_after_collect_kib")),
                     format_ratio(summary.get("peak_rss_kib"), peer)])
    print_table(headers, rows, out)
    sample = next(iter(by_allocator.values()))
    print(f"(bytes asked for at the peak: "
          f"{format_kib(sample.get('live_peak_kib'))}; process baseline "
          f"{format_kib(sample.get('rss_baseline_kib'))}; 'after wait' is "
          f"after sleeping past the purge delay and 1,000 malloc/free "
          f"pairs of 16 B-256 KiB; lower is better)", file=out)


# ---------------------------------------------------------------------------
# Chart: a hand-written SVG, readable without the tables.

COLOURS = {
    "zkmem-pool": "#08519c", "zkmem": "#4292c6", "glibc": "#737373",
    "zkmem-heaps": "#9ecae1", "zkmem-crate": "#2171b5",
    "zkmem-crate-scope": "#6baed6", "zkmem-crate-heaps": "#c6dbef",
    "jemalloc": "#e6550d", "mimalloc": "#31a354", "tcmalloc": "#9e58b5",
    "mimalloc3": "#a1d99b", "snmalloc": "#e7298a", "seed": "#d6ae2b",
}
# Peers from --peer or ZKMEM_BENCH_PEERS, in the order they appear.
EXTRA_COLOURS = ["#8c564b", "#17becf", "#bcbd22", "#7f7f7f", "#f781bf"]


def colour(name):
    if name in COLOURS:
        return COLOURS[name]
    extras = [peer for peer in PEERS if peer not in COLOURS]
    index = extras.index(name) if name in extras else 0
    return EXTRA_COLOURS[index % len(EXTRA_COLOURS)]


# Memory bars keep one colour per reading, not per allocator: the panel is
# grouped by allocator and read left to right as the program's life.
MEMORY_SERIES = [("peak_rss_kib", "peak", "#08306b"),
                 ("rss_live_kib", "live at end", "#2171b5"),
                 ("rss_after_free_kib", "after free", "#6baed6"),
                 ("rss_after_wait_kib", "after wait", "#bdd7e7"),
                 ("rss_after_collect_kib", "after zk_collect", "#fd8d3c")]
FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""


def escape_xml(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;")
            .replace(">", "&gt;").replace('"', "&quot;"))


def svg_text(x, y, text, size=12, anchor="start", weight="normal",
             fill="#222", rotate=None):
    transform = (f' transform="rotate({rotate} {x:.1f} {y:.1f})"'
                 if rotate is not None else "")
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" {FONT} '
            f'text-anchor="{anchor}" font-weight="{weight}" '
            f'fill="{fill}"{transform}>{escape_xml(text)}</text>')


def throughput_groups(medians):
    """(label, caption, {allocator: ops/s}) per scenario with a rate."""
    groups = []
    for scenario in SCENARIOS:
        by_allocator = medians.get(scenario.name)
        # Bigblocks runs at a few thousand ops/s: on the chart's log scale it
        # would squash every other group; its table tells its story.
        if not by_allocator or scenario.name in ("memory", "bigblocks"):
            continue
        values = {name: by_allocator[name]["ops_per_s"]
                  for name in ordered(by_allocator)
                  if by_allocator[name].get("ops_per_s")}
        caption = {
            "fixed": "64 B pairs", "stress": "8-256 B x1000",
            "reuse": "one 128 B", "large": "1-5 KB x100",
            "mixed": "8 B-64 KB, 10k live", "handoff": "2 threads",
            "batches": "4,096 per batch", "server": "larson-style",
            "churn": "8 B-16 KiB, lifetimes",
            "tokio-pipeline": "Tokio, op = message",
            "tokio-reqrep": "Tokio, op = request",
        }.get(scenario.name, "")
        if scenario.name == "scaling":
            threads = max((p["threads"] for s in by_allocator.values()
                           for p in s.get("points", [])), default=1)
            caption = f"stress, {threads} threads"
        if values:
            groups.append((scenario.name, caption, values))
    return groups


def write_svg(path, medians, machine, settings):
    groups = throughput_groups(medians)
    memory = medians.get("memory", {})
    width = 1100
    left, right = 80, 20
    top = 70
    plot_height = 360
    parts = []
    height = top + plot_height + 130
    memory_top = height
    if memory:
        height += 330
    parts.append(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" '
                 f'height="{height}" viewBox="0 0 {width} {height}">')
    parts.append(f'<rect width="{width}" height="{height}" fill="white"/>')
    parts.append(svg_text(left, 28, "zkmem allocation benchmarks: throughput "
                          "per scenario (higher is better)", 18, weight="bold"))
    subtitle = (f"median of {settings['runs']} run(s) per bar, each in its own "
                f"process; {machine['cpu']}, {machine['usable_cores']} cores, "
                f"{machine['kernel']}; {settings['date'][:10]}")
    if settings["quick"]:
        subtitle = "QUICK SMOKE RUN, figures meaningless; " + subtitle
    load = machine.get("load_average")
    if load and load[0] > 0.5 * (machine.get("usable_cores") or 1):
        subtitle += f"; machine busy (load {load[0]:.1f}): noisy"
    parts.append(svg_text(left, 48, subtitle, 11, fill="#555"))

    if groups:
        values = [v for _, _, group in groups for v in group.values()]
        low = 10 ** math.floor(math.log10(min(values) / 1e6))
        high = 10 ** math.ceil(math.log10(max(values) / 1e6))
        if high <= low:
            high = low * 10
        plot_width = width - left - right
        bottom = top + plot_height

        def y_of(ops_per_s):
            fraction = ((math.log10(ops_per_s / 1e6) - math.log10(low))
                        / (math.log10(high) - math.log10(low)))
            return bottom - fraction * plot_height

        decade = low
        while decade <= high * 1.0001:
            for multiple in (1, 2, 5):
                value = decade * multiple
                if value > high * 1.0001:
                    break
                y = y_of(value * 1e6)
                major = multiple == 1
                parts.append(
                    f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" '
                    f'y2="{y:.1f}" stroke="{"#bbb" if major else "#e5e5e5"}" '
                    f'stroke-width="1"/>')
                label = f"{value:g}"
                parts.append(svg_text(left - 6, y + 4, label, 11 if major
                                      else 9, anchor="end",
                                      fill="#333" if major else "#888"))
            decade *= 10
        parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" '
                     f'y2="{bottom}" stroke="#333"/>')
        parts.append(f'<line x1="{left}" y1="{bottom}" x2="{width - right}" '
                     f'y2="{bottom}" stroke="#333"/>')
        parts.append(svg_text(22, top + plot_height / 2,
                              "million ops/s (log scale)", 13,
                              anchor="middle", rotate=-90))

        group_width = plot_width / len(groups)
        for index, (label, caption, group) in enumerate(groups):
            names = list(group)
            bar_width = min(22.0, (group_width - 16) / max(len(names), 1))
            start = (left + index * group_width
                     + (group_width - bar_width * len(names)) / 2)
            for position, name in enumerate(names):
                x = start + position * bar_width
                y = y_of(group[name])
                parts.append(
                    f'<rect x="{x + 1:.1f}" y="{y:.1f}" '
                    f'width="{bar_width - 2:.1f}" height="{bottom - y:.1f}" '
                    f'fill="{colour(name)}">'
                    f'<title>{escape_xml(name)} {escape_xml(label)}: '
                    f'{group[name] / 1e6:.2f} M ops/s</title></rect>')
                parts.append(svg_text(x + bar_width / 2 + 3, y - 3,
                                      format_rate(group[name]), 9,
                                      anchor="start", fill="#333",
                                      rotate=-90))
            centre = left + (index + 0.5) * group_width
            parts.append(svg_text(centre, bottom + 18, label, 13,
                                  anchor="middle", weight="bold"))
            parts.append(svg_text(centre, bottom + 33, caption, 10,
                                  anchor="middle", fill="#555"))

        # Legend, one entry per allocator present anywhere.
        present = [name for name in ROW_ORDER
                   if any(name in group for _, _, group in groups)]
        legend_y = bottom + 60
        x = left
        for name in present:
            parts.append(f'<rect x="{x}" y="{legend_y - 10}" width="14" '
                         f'height="14" fill="{colour(name)}"/>')
            parts.append(svg_text(x + 19, legend_y + 1, name, 12))
            x += 30 + 8 * len(name)
        parts.append(svg_text(left, legend_y + 28,
                              "zkmem-pool: zk_pool_* with one pool of the "
                              "scenario's largest size; seed: the seed "
                              "report's stack pool (single-threaded). Bar "
                              "labels: M ops/s.", 10, fill="#555"))

    if memory:
        parts.extend(memory_panel(memory, width, left, right, memory_top))
    parts.append("</svg>")
    with open(path, "w") as handle:
        handle.write("\n".join(parts) + "\n")


def memory_panel(memory, width, left, right, top):
    parts = [svg_text(left, top + 10, "memory scenario: resident memory "
                      "(MiB, lower is better)", 16, weight="bold")]
    names = ordered(memory)
    plot_top, plot_height = top + 40, 200
    bottom = plot_top + plot_height
    values = [memory[name].get(key) for name in names
              for key, _, _ in MEMORY_SERIES]
    high_mib = max([v for v in values if v] + [1024]) / 1024
    # A 1-2-5 step giving four to ten gridlines.
    step = 10 ** math.floor(math.log10(high_mib))
    for factor in (0.1, 0.2, 0.5, 1):
        if high_mib / (step * factor) <= 10:
            step *= factor
            break
    high = math.ceil(high_mib / step) * step
    plot_width = width - left - right

    def y_of(kib):
        return bottom - (kib / 1024) / high * plot_height

    tick = 0.0
    while tick <= high + 1e-9:
        y = y_of(tick * 1024)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" '
                     f'y2="{y:.1f}" stroke="#e5e5e5"/>')
        parts.append(svg_text(left - 6, y + 4, f"{tick:g}", 11,
                              anchor="end"))
        tick += step
    parts.append(f'<line x1="{left}" y1="{plot_top}" x2="{left}" '
                 f'y2="{bottom}" stroke="#333"/>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{width - right}" '
                 f'y2="{bottom}" stroke="#333"/>')
    parts.append(svg_text(22, plot_top + plot_height / 2, "MiB resident", 13,
                          anchor="middle", rotate=-90))
    sample = memory[names[0]]
    live = sample.get("live_peak_kib")
    if live:
        y = y_of(live + (sample.get("rss_baseline_kib") or 0))
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" '
                     f'y2="{y:.1f}" stroke="#c00" stroke-dasharray="6 4"/>')

    group_width = plot_width / max(len(names), 1)
    series = MEMORY_SERIES
    for index, name in enumerate(names):
        summary = memory[name]
        bar_width = min(26.0, (group_width - 20) / len(series))
        start = (left + index * group_width
                 + (group_width - bar_width * len(series)) / 2)
        for position, (key, label, colour) in enumerate(series):
            value = summary.get(key)
            x = start + position * bar_width
            if value is None:
                parts.append(svg_text(x + bar_width / 2, bottom - 4, "n/a", 8,
                                      anchor="middle", fill="#888"))
                continue
            y = y_of(value)
            parts.append(f'<rect x="{x + 1:.1f}" y="{y:.1f}" '
                         f'width="{bar_width - 2:.1f}" '
                         f'height="{bottom - y:.1f}" fill="{colour}">'
                         f'<title>{escape_xml(name)} {label}: '
                         f'{value / 1024:.1f} MiB</title></rect>')
            parts.append(svg_text(x + bar_width / 2, y - 3,
                                  f"{value / 1024:.0f}", 9, anchor="middle",
                                  fill="#333"))
        parts.append(svg_text(left + (index + 0.5) * group_width, bottom + 18,
                              name, 12, anchor="middle", weight="bold"))
    legend_y = bottom + 48
    x = left
    parts.append(svg_text(x, legend_y + 1, "bars, left to right:", 12))
    x += 130
    for key, label, colour in series:
        parts.append(f'<rect x="{x}" y="{legend_y - 10}" width="14" '
                     f'height="14" fill="{colour}"/>')
        parts.append(svg_text(x + 19, legend_y + 1, label, 12))
        x += 40 + 7 * len(label)
    if live:
        parts.append(f'<line x1="{x}" y1="{legend_y - 3}" x2="{x + 24}" '
                     f'y2="{legend_y - 3}" stroke="#c00" '
                     f'stroke-dasharray="6 4"/>')
        parts.append(svg_text(x + 30, legend_y + 1,
                              "bytes asked for at peak + baseline", 12))
    parts.append(svg_text(left, legend_y + 24,
                          "after wait: after sleeping past the purge delay "
                          "and 1,000 malloc/free pairs; after zk_collect: zkmem "
                          "only (n/a elsewhere). Bar labels: MiB.", 10,
                          fill="#555"))
    return parts


# ---------------------------------------------------------------------------


def parse_list(values):
    items = []
    for value in values or []:
        items += [item.strip() for item in value.split(",") if item.strip()]
    return items


def replay(path):
    with open(path) as handle:
        data = json.load(handle)
    for allocator in data.get("allocators", []):
        if allocator.get("peer") or allocator["name"] not in BUILTIN_ROWS:
            register_peer(allocator["name"])
    medians = summarise(data["runs"])
    report(medians, data["machine"], data["settings"], sys.stdout,
           data["runs"])
    svg_path = os.path.join(os.path.dirname(os.path.abspath(path)),
                            "results.svg")
    write_svg(svg_path, medians, data["machine"], data["settings"])
    print(f"\nwrote {svg_path}")
    return 0


def main():
    parser = argparse.ArgumentParser(
        description="Run the zkmem benchmarks against the allocators found.")
    parser.add_argument("--build", default="build",
                        help="CMake build directory (default: build)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 run, tiny op counts, seconds")
    parser.add_argument("--runs", type=int,
                        help=f"runs per (scenario, allocator), default "
                             f"{DEFAULT_RUNS} (fewer if they would not fit "
                             f"--time-budget)")
    parser.add_argument("--scenario", action="append",
                        help="scenario(s) to run, repeatable or comma list: "
                             + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--allocators",
                        help="comma list of rows to run: "
                             + ", ".join(ROW_ORDER)
                             + ", and any NAME given with --peer")
    parser.add_argument("--peer", action="append", default=[],
                        metavar="NAME=PATH",
                        help="one more peer row: the malloc replacement at "
                             "PATH under LD_PRELOAD (repeatable; "
                             "ZKMEM_BENCH_PEERS=NAME=PATH,... adds more)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                        help="threads per side for batches (producers and "
                             "consumers), threads for server, Tokio worker "
                             f"threads (default {DEFAULT_WORKERS})")
    parser.add_argument("--threads",
                        help="thread counts for scaling, e.g. 1,2,4 "
                             "(default: powers of two up to nproc, and nproc)")
    parser.add_argument("--time-budget", type=float,
                        default=DEFAULT_TIME_BUDGET_S,
                        help="seconds a default run may take (default "
                             f"{DEFAULT_TIME_BUDGET_S})")
    parser.add_argument("--ops-scale", type=float, default=1.0,
                        help="multiply every scenario's op count")
    parser.add_argument("--timeout", type=float,
                        help="seconds before a single run counts as hung")
    parser.add_argument("--from-json", metavar="RESULTS_JSON",
                        help="run nothing: print the tables and redraw the "
                             "chart (beside the file) from an earlier "
                             "results.json")
    parser.add_argument("--out", help="directory for results.json and "
                        "results.svg (default BUILD/bench, or "
                        "BUILD/bench/quick with --quick)")
    args = parser.parse_args()

    if args.from_json:
        return replay(args.from_json)

    args.runs_given = args.runs is not None
    if args.quick:
        args.runs = args.runs or 1
    args.runs = args.runs or DEFAULT_RUNS
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    requested_peers = [parse_peer(text, "--peer") for text in args.peer]
    for name, path in requested_peers:
        if not os.path.exists(path):
            parser.error(f"--peer {name}: {path} not found")
    if args.timeout is None:
        args.timeout = 60 if args.quick else 300
    args.purge_wait_ms = QUICK_PURGE_WAIT_MS if args.quick else PURGE_WAIT_MS
    purge_delay = os.environ.get("ZKMEM_PURGE_DELAY_MS", "")
    if purge_delay.isdigit() and not args.quick:
        args.purge_wait_ms = max(args.purge_wait_ms, int(purge_delay) + 500)

    names = parse_list(args.scenario)
    unknown = [name for name in names if name not in SCENARIO_BY_NAME]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: "
                     + ", ".join(s.name for s in SCENARIOS))
    scenarios = ([SCENARIO_BY_NAME[name] for name in dict.fromkeys(names)]
                 if names else SCENARIOS)

    source_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build_dir = os.path.abspath(args.build)
    wanted = parse_list([args.allocators]) if args.allocators else None
    allocators = discover_allocators(build_dir, source_dir, wanted,
                                     requested_peers)
    build_failures = []
    args.tokio_binary = None
    wants_crate = not wanted or any(name in wanted
                                    for name, _, _ in CRATE_ROWS)
    if any(s.tokio for s in scenarios) and (
            any(a.malloc for a in allocators) or wants_crate):
        try:
            args.tokio_binary, crate_binary = prepare_tokio(build_dir,
                                                            source_dir)
            if crate_binary and wants_crate:
                allocators += crate_allocators(crate_binary, source_dir,
                                               wanted)
                allocators.sort(key=lambda a: ROW_ORDER.index(a.name))
        except RunFailure as failure:
            log(f"FAILED: {failure}")
            build_failures.append({"scenario": "tokio-*", "allocator": "-",
                                   "run": 0, "error": str(failure)})
        if args.tokio_binary is None:
            scenarios = [s for s in scenarios if not s.tokio]
    machine = machine_info(allocators)
    if args.tokio_binary:
        machine["versions"]["tokio"] = tokio_version()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    records, failures, runs = run_all(allocators, scenarios, args)
    failures = build_failures + failures
    medians = summarise(records)
    settings = {
        "date": date, "runs": runs, "quick": args.quick,
        "threads": args.threads, "purge_wait_ms": args.purge_wait_ms,
        "workers": args.workers,
        "ops": {s.name: scenario_ops(s, args) for s in scenarios},
    }

    out_dir = args.out or os.path.join(build_dir, "bench",
                                       "quick" if args.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    report(medians, machine, settings, sys.stdout, records)
    json_path = os.path.join(out_dir, "results.json")
    svg_path = os.path.join(out_dir, "results.svg")
    with open(json_path, "w") as handle:
        json.dump({
            "machine": machine, "settings": settings,
            "allocators": [{"name": a.name, "binary": a.binary,
                            "preload": a.preload, "version": a.version,
                            "peer": a.name in PEERS}
                           for a in allocators],
            "runs": records, "failures": failures, "medians": medians,
        }, handle, indent=1)
        handle.write("\n")
    write_svg(svg_path, medians, machine, settings)
    print(f"\nwrote {json_path}\nwrote {svg_path}")
    if failures:
        print(f"\n{len(failures)} run(s) FAILED:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure['scenario']} / {failure['allocator']} run "
                  f"{failure['run']}: {failure['error'].splitlines()[0]}",
                  file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
