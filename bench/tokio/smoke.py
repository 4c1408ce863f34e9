#!/usr/bin/env python3
"""Smoke test of the Tokio workload: each workload, with a small op count,
must exit 0 and print one JSON result that adds up, under the C library's
malloc or, with --preload, under another allocator; or the crate binary,
whose global allocator is zkmem's crate.

  smoke.py --binary BUILD/cargo/release/zkmem-tokio-bench
  smoke.py --binary ... --preload BUILD/libzkmem.so
  smoke.py --binary BUILD/cargo/release/zkmem-tokio-bench-crate
"""

import argparse
import json
import math
import os
import subprocess
import sys

WORKLOADS = ["pipeline", "reqrep"]


def check(binary, workload, ops, threads, preload):
    environment = dict(os.environ)
    environment.pop("LD_PRELOAD", None)
    if preload:
        environment["LD_PRELOAD"] = os.path.abspath(preload)
    command = [binary, workload, "--ops", str(ops), "--threads", str(threads)]
    completed = subprocess.run(command, env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, timeout=60)
    where = f"{' '.join(command)}" + (f" (LD_PRELOAD={preload})"
                                      if preload else "")
    if completed.returncode != 0:
        return f"{where}: exit status {completed.returncode}\n" + (
            completed.stderr[-2000:])
    # ld.so only warns when a preload fails; the run would measure glibc.
    if "cannot be preloaded" in completed.stderr:
        return f"{where}: {completed.stderr.strip()}"
    lines = [line for line in completed.stdout.splitlines() if line.strip()]
    if len(lines) != 1:
        return f"{where}: want one line of output, got {completed.stdout!r}"
    try:
        result = json.loads(lines[0])
    except ValueError as error:
        return f"{where}: not JSON ({error}): {lines[0]!r}"
    print(lines[0])
    problems = []
    if result.get("scenario") != f"tokio-{workload}":
        problems.append(f"scenario {result.get('scenario')!r}")
    if result.get("ops") != ops:
        problems.append(f"ops {result.get('ops')!r}, asked for {ops}")
    if result.get("threads") != threads:
        problems.append(f"threads {result.get('threads')!r}")
    for field in ("seconds", "ops_per_s", "ns_per_op", "peak_rss_kib",
                  "checksum"):
        value = result.get(field)
        if not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0:
            problems.append(f"{field} {value!r}")
    if problems:
        return f"{where}: implausible result: {', '.join(problems)}"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True)
    parser.add_argument("--preload", help="allocator library to preload")
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.preload and not os.path.exists(args.preload):
        print(f"error: {args.preload} not found", file=sys.stderr)
        return 1
    failures = [failure for failure in
                (check(args.binary, workload, args.ops, args.threads,
                       args.preload) for workload in WORKLOADS)
                if failure]
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
