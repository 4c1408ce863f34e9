#!/usr/bin/env python3
"""Run a real program without and with LD_PRELOAD of an allocator, compare.

usage: preload_check.py --preload LIB [options] CASE [ARGS...]

Every case runs its program(s) twice in fresh directories: once as the system
has it (the baseline) and once with LD_PRELOAD=LIB. The two runs must exit the
same way and produce the same output. The preloaded run is also checked to
have really used LIB: the dynamic linker logs its symbol bindings
(LD_DEBUG=bindings into files), and every binding of malloc, calloc, realloc
and free in every process must go to LIB. With --stats-env/--stats-regex, the
preloaded run also gets that environment variable and its stderr must match
the regular expression (the allocator's statistics printed at exit).

Cases:
  python-workload PYTHON SCRIPT   run a Python script, compare stdout
  python-regrtest PYTHON MODULE.. `PYTHON -m test` on standard test modules,
                                  compare the per-test results
  sort                            GNU sort of a generated 200k-line file
  sqlite                          sqlite3 CLI: build, index, query a database
  git                             git init/add/commit/log/gc on a generated repo
  exe PROGRAM [ARGS..]            any program, compare stdout

Exit status: 0 pass, 1 fail, 77 skipped because a needed program is missing
(1 instead with --no-skip).
"""

import argparse
import difflib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

SKIP = 77
MALLOC_SYMBOLS = ("malloc", "calloc", "realloc", "free")
BINDING = re.compile(
    r"binding file (?P<file>.+?) \[\d+\] to (?P<lib>.+?) \[\d+\]: "
    r"normal symbol `(?P<symbol>[A-Za-z_0-9]+)'"
)


class Failure(Exception):
    pass


class Skip(Exception):
    pass


class Run:
    """One execution of a command: exit status and captured streams."""

    def __init__(self, argv, returncode, stdout, stderr, seconds):
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.seconds = seconds

    def describe(self):
        tail = self.stderr[-3000:].decode(errors="replace")
        return "$ %s\nexit status %s after %.1f s; stderr tail:\n%s" % (
            " ".join(self.argv),
            self.returncode,
            self.seconds,
            tail,
        )


class Variant:
    """Baseline or preloaded: the environment and the logs of one side."""

    def __init__(self, name, root, options, preload):
        self.name = name
        self.directory = os.path.join(root, name)
        os.makedirs(self.directory)
        self.preload = preload
        self.options = options
        self.runs = []
        self.ld_log_directory = os.path.join(root, name + "-ld")
        os.makedirs(self.ld_log_directory)

    def environment(self, extra=None, stats=True):
        env = dict(os.environ)
        for name in ("LD_PRELOAD", "LD_DEBUG", "LD_DEBUG_OUTPUT"):
            env.pop(name, None)
        env.update(LC_ALL="C", TZ="UTC", PYTHONHASHSEED="0")
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        if self.preload:
            env["LD_PRELOAD"] = self.options.preload
            env["LD_DEBUG"] = "bindings"
            env["LD_DEBUG_OUTPUT"] = os.path.join(self.ld_log_directory, "ld")
            if stats and self.options.stats_env:
                name, _, value = self.options.stats_env.partition("=")
                env[name] = value
        if extra:
            env.update(extra)
        return env

    def run(
        self, argv, cwd=None, env=None, stdin=None, stats=True, check=True,
        expect_stats=True,
    ):
        """Runs argv, returns the Run; with check, a non-zero exit fails.

        stats: give the preloaded run the statistics variable; expect_stats:
        and require the statistics on its stderr."""
        full_env = self.environment(env, stats)
        start = time.monotonic()
        process = subprocess.Popen(
            argv,
            cwd=cwd or self.directory,
            env=full_env,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=self.options.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            run = Run(argv, "timeout", stdout, stderr, time.monotonic() - start)
            raise Failure("%s run timed out\n%s" % (self.name, run.describe()))
        run = Run(argv, process.returncode, stdout, stderr, time.monotonic() - start)
        run.stats = (
            self.preload and stats and expect_stats and bool(self.options.stats_env)
        )
        self.runs.append(run)
        if check and run.returncode != 0:
            raise Failure("%s run failed\n%s" % (self.name, run.describe()))
        return run

    def check_used(self):
        """The preloaded library must have served every malloc-family call."""
        library = os.path.realpath(self.options.preload)
        bound = {symbol: 0 for symbol in MALLOC_SYMBOLS}
        elsewhere = []
        logs = os.listdir(self.ld_log_directory)
        for log in logs:
            with open(os.path.join(self.ld_log_directory, log), "rb") as handle:
                for raw in handle:
                    match = BINDING.search(raw.decode(errors="replace"))
                    if not match or match["symbol"] not in MALLOC_SYMBOLS:
                        continue
                    target = os.path.realpath(match["lib"])
                    if target == library:
                        bound[match["symbol"]] += 1
                    elif ".so" not in os.path.basename(target):
                        # A program whose code takes malloc's address (not
                        # built as PIE) has a canonical PLT entry, to which
                        # the libraries bind; its own binding is checked.
                        continue
                    elif len(elsewhere) < 10:
                        elsewhere.append(raw.decode(errors="replace").strip())
        if elsewhere:
            raise Failure(
                "malloc-family symbols bound to another library than %s:\n%s"
                % (library, "\n".join(elsewhere))
            )
        if not bound["malloc"] or not bound["free"]:
            raise Failure(
                "no process bound malloc and free to %s (%d dynamic linker "
                "logs); was it preloaded?" % (library, len(logs))
            )
        if self.options.stats_regex:
            stats_runs = [r for r in self.runs if r.stats]
            pattern = re.compile(self.options.stats_regex.encode())
            for run in stats_runs:
                if not pattern.search(run.stderr):
                    raise Failure(
                        "statistics (%s) not found on stderr of the preloaded "
                        "run:\n%s" % (self.options.stats_regex, run.describe())
                    )
        return sum(bound.values())


def require_program(name):
    path = shutil.which(name)
    if not path:
        raise Skip("%s not found on PATH" % name)
    return path


def compare(what, baseline, preloaded):
    """Equal outputs, or a failure showing the first differences."""
    if baseline == preloaded:
        return
    if isinstance(baseline, list) and baseline and isinstance(baseline[0], bytes):
        if len(baseline) != len(preloaded):
            raise Failure("%s: %d parts, then %d" % (what, len(baseline), len(preloaded)))
        for number, (left, right) in enumerate(zip(baseline, preloaded)):
            compare("%s (part %d)" % (what, number + 1), left, right)
        return
    if isinstance(baseline, bytes):
        baseline = baseline.decode(errors="replace").splitlines()
        preloaded = preloaded.decode(errors="replace").splitlines()
    elif isinstance(baseline, str):
        baseline = baseline.splitlines()
        preloaded = preloaded.splitlines()
    else:
        baseline = [str(item) for item in baseline]
        preloaded = [str(item) for item in preloaded]
    diff = list(
        difflib.unified_diff(
            baseline, preloaded, "baseline", "preloaded", lineterm="", n=1
        )
    )
    raise Failure(
        "%s differs between the baseline and the preloaded run:\n%s"
        % (what, "\n".join(diff[:60]))
    )


# ---- cases -----------------------------------------------------------------
# Each case takes (variant, args) and returns what must be equal for both.


def case_python_workload(variant, args):
    python, script = args
    run = variant.run([python, os.path.abspath(script)])
    return run.stdout


def case_python_regrtest(variant, args):
    python, modules = args[0], args[1:]
    probe = (
        "import importlib.util, sys\n"
        "try:\n"
        "    missing = [m for m in sys.argv[1:]\n"
        "               if importlib.util.find_spec('test.' + m) is None]\n"
        "except ImportError:\n"
        "    missing = sys.argv[1:]\n"
        "print(' '.join(missing))\n"
    )
    if variant.name == "baseline":
        missing = variant.run([python, "-c", probe] + modules).stdout.split()
        if missing:
            version = "%d.%d" % sys.version_info[:2]
            raise Skip(
                "%s lacks the standard test modules %s (Debian: apt-get "
                "install libpython%s-testsuite)"
                % (python, b" ".join(missing).decode(), version)
            )
    junit = os.path.join(variant.directory, "results.xml")
    run = variant.run(
        [python, "-m", "test", "--junit-xml", junit] + modules,
        stats=False,  # subprocesses of the tests check their stderr
        check=False,
    )
    results = []
    if os.path.exists(junit):
        for testcase in ElementTree.parse(junit).iter("testcase"):
            outcome = testcase.get("status"), testcase.get("result")
            for child in testcase:
                if child.tag in ("failure", "error", "skipped"):
                    outcome += (child.tag,)
            results.append("%s %s" % (testcase.get("name"), " ".join(outcome)))
    if not results:
        raise Failure("%s: no test results\n%s" % (variant.name, run.describe()))
    if run.returncode != 0:
        sys.stdout.write(
            "note: %s run of the test modules exited %d\n%s\n"
            % (variant.name, run.returncode, run.stdout[-2000:].decode())
        )
    return ["exit status %s" % run.returncode] + results


def generate_lines(path, count, seed):
    """Deterministic text: words, numbers, duplicates, a tab-separated key."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.-"
    recent = []
    with open(path, "w") as out:
        for index in range(count):
            if recent and rng.random() < 0.1:
                line = rng.choice(recent)
            else:
                length = min(int(rng.expovariate(1 / 40)) + 1, 400)
                text = "".join(rng.choice(alphabet) for _ in range(length))
                line = "%s\t%d\t%s" % (text, rng.randrange(-(10**6), 10**6), index)
                recent.append(line)
                if len(recent) > 1000:
                    recent.pop(0)
            out.write(line + "\n")


def case_sort(variant, args):
    sort = require_program("sort")
    source = os.path.join(os.path.dirname(variant.directory), "input.txt")
    if not os.path.exists(source):
        generate_lines(source, 200000, 1)
    temporary = os.path.join(variant.directory, "tmp")
    os.makedirs(temporary)
    outputs = []
    commands = [
        # small buffer: temporary files and a multi-way merge
        ["-S", "2M", "-T", temporary, "--parallel=2"],
        # numeric key, reverse key, stable, unique lines
        ["-t", "\t", "-k2,2n", "-k1,1r", "-s", "--parallel=2"],
        ["-u", "-f"],
    ]
    for number, options in enumerate(commands):
        output = os.path.join(variant.directory, "sorted%d.txt" % number)
        # coreutils closes stderr at exit, before any statistics can be printed
        variant.run([sort] + options + ["-o", output, source], expect_stats=False)
        with open(output, "rb") as handle:
            outputs.append(handle.read())
    if len(outputs[0]) != os.path.getsize(source):
        raise Failure("sort lost bytes: %d of %d" % (len(outputs[0]), os.path.getsize(source)))
    return outputs


SQLITE_SCRIPT_HEAD = """
.bail on
PRAGMA page_size = 4096;
PRAGMA cache_size = 500;
CREATE TABLE customer(id INTEGER PRIMARY KEY, name TEXT, city TEXT, note TEXT);
CREATE TABLE orders(id INTEGER PRIMARY KEY, customer INTEGER, amount INTEGER,
                    item TEXT, day INTEGER);
BEGIN;
"""

SQLITE_SCRIPT_TAIL = """
COMMIT;
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 60000)
INSERT INTO orders(customer, amount, item, day)
  SELECT (x * 7919) % 5000 + 1, (x * 104729) % 10007,
         printf('item-%05d-%s', x % 977, substr(hex(x * 2654435761), 1, 8)),
         x % 365
  FROM n;
CREATE INDEX orders_customer ON orders(customer, day);
CREATE INDEX customer_city ON customer(city, name);
SELECT count(*), sum(amount), min(item), max(item) FROM orders;
SELECT c.city, count(*), sum(o.amount), avg(o.amount)
  FROM orders o JOIN customer c ON c.id = o.customer
  GROUP BY c.city ORDER BY c.city;
SELECT customer, count(*) AS n, group_concat(DISTINCT day % 7)
  FROM orders WHERE customer BETWEEN 100 AND 120
  GROUP BY customer ORDER BY n DESC, customer;
SELECT name, total, rank() OVER (ORDER BY total DESC, name) FROM (
  SELECT c.name AS name, sum(o.amount) AS total FROM customer c
  JOIN orders o ON o.customer = c.id GROUP BY c.id) ORDER BY 3 LIMIT 15;
SELECT item, count(*) FROM orders WHERE item LIKE 'item-0012%'
  GROUP BY item ORDER BY item;
SELECT length(group_concat(note, ';')) FROM customer WHERE city > 'm';
UPDATE orders SET amount = amount + 1 WHERE day % 3 = 0;
DELETE FROM orders WHERE amount % 11 = 0;
SELECT count(*), sum(amount) FROM orders;
VACUUM;
PRAGMA integrity_check;
SELECT count(*) FROM orders INDEXED BY orders_customer WHERE customer = 42;
"""


def case_sqlite(variant, args):
    sqlite = require_program("sqlite3")
    script = os.path.join(os.path.dirname(variant.directory), "script.sql")
    if not os.path.exists(script):
        rng = random.Random(2)
        cities = ["city%02d" % i for i in range(40)]
        with open(script, "w") as out:
            out.write(SQLITE_SCRIPT_HEAD)
            for identifier in range(1, 5001):
                name = "".join(rng.choice("abcdefghijklmnop") for _ in range(12))
                note = "n" * rng.randrange(0, 300)
                out.write(
                    "INSERT INTO customer VALUES(%d, '%s', '%s', '%s');\n"
                    % (identifier, name, rng.choice(cities), note)
                )
            out.write(SQLITE_SCRIPT_TAIL)
    database = os.path.join(variant.directory, "test.db")
    with open(script, "rb") as stdin:
        run = variant.run([sqlite, "-batch", database], stdin=stdin)
    return run.stdout


def case_git(variant, args):
    git = require_program("git")
    repository = os.path.join(variant.directory, "repo")
    home = os.path.join(variant.directory, "home")
    os.makedirs(repository)
    os.makedirs(home)
    env = {
        "HOME": home,
        "XDG_CONFIG_HOME": home,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_PAGER": "cat",
        "PAGER": "cat",
    }
    output = []

    def git_run(*arguments, date=0):
        extra = dict(env)
        stamp = "%d +0000" % (1700000000 + date * 3600)
        extra.update(GIT_AUTHOR_DATE=stamp, GIT_COMMITTER_DATE=stamp)
        run = variant.run([git] + list(arguments), cwd=repository, env=extra)
        output.append(b"$ git " + " ".join(arguments).encode() + b"\n")
        output.append(run.stdout)

    git_run("init", "-q", "-b", "main")
    git_run("config", "user.name", "Preload Test")
    git_run("config", "user.email", "preload@example.invalid")
    git_run("config", "gc.auto", "0")
    git_run("config", "core.autocrlf", "false")
    # Delta search on several threads packs in a different order from run
    # to run (pack sizes differ by a KiB with any allocator): one thread.
    git_run("config", "pack.threads", "1")
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    files = {}
    for commit in range(24):
        for _ in range(rng.randrange(3, 12)):
            name = "dir%d/file%02d.txt" % (rng.randrange(4), rng.randrange(40))
            lines = files.setdefault(name, [])
            for _ in range(rng.randrange(1, 80)):
                text = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 12)))
                if lines and rng.random() < 0.3:
                    lines[rng.randrange(len(lines))] = text
                else:
                    lines.insert(rng.randrange(len(lines) + 1), text)
            path = os.path.join(repository, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as handle:
                handle.write("\n".join(lines) + "\n")
        if commit % 7 == 6:
            victim = sorted(files)[rng.randrange(len(files))]
            del files[victim]
            os.remove(os.path.join(repository, victim))
        git_run("add", "-A", date=commit)
        git_run("commit", "-q", "-m", "change %d\n\nbody %d" % (commit, commit), date=commit)
        if commit == 11:
            git_run("tag", "-a", "v1", "-m", "tag one", date=commit)
    git_run("log", "--stat", "--format=%H %an <%ae> %ad%n%B", "--date=raw")
    git_run("rev-parse", "HEAD", "HEAD^{tree}", "v1")
    git_run("diff", "--stat", "v1", "HEAD")
    git_run("diff", "HEAD~5", "HEAD", "--", "dir1")
    git_run("blame", "--porcelain", sorted(files)[0])
    git_run("grep", "-c", "epsilon", "HEAD")
    git_run("gc", "-q", "--prune=now")
    git_run("count-objects", "-v")
    git_run("fsck", "--full", "--no-progress", "--strict")
    git_run("log", "--oneline", "--graph", "--all")
    git_run("archive", "--format=tar", "-o", "../archive.tar", "HEAD")
    with open(os.path.join(variant.directory, "archive.tar"), "rb") as handle:
        output.append(b"archive %d bytes\n" % len(handle.read()))
    return b"".join(output)


def case_exe(variant, args):
    run = variant.run([os.path.abspath(args[0])] + args[1:])
    return run.stdout


CASES = {
    "python-workload": case_python_workload,
    "python-regrtest": case_python_regrtest,
    "sort": case_sort,
    "sqlite": case_sqlite,
    "git": case_git,
    "exe": case_exe,
}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preload", required=True, help="library to preload")
    parser.add_argument("--stats-env", default="", help="NAME=VALUE for the preloaded run")
    parser.add_argument("--stats-regex", default="", help="must match its stderr")
    parser.add_argument("--workdir", default=".", help="where to make the run directories")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per command")
    parser.add_argument("--no-skip", action="store_true", help="fail instead of skipping")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("args", nargs=argparse.REMAINDER)
    options = parser.parse_args()

    if not os.path.exists(options.preload):
        print("FAIL: %s does not exist" % options.preload)
        return 1
    # a name without a slash would be looked up in the library path
    options.preload = os.path.abspath(options.preload)
    os.makedirs(options.workdir, exist_ok=True)
    root = tempfile.mkdtemp(prefix=options.case + "-", dir=options.workdir)
    case = CASES[options.case]
    clean = False
    try:
        results = []
        bindings = 0
        for name, preload in (("baseline", False), ("preloaded", True)):
            variant = Variant(name, root, options, preload)
            started = time.monotonic()
            results.append(case(variant, options.args))
            if preload:
                bindings = variant.check_used()
            print(
                "%s: %d command(s), %.1f s"
                % (name, len(variant.runs), time.monotonic() - started)
            )
        compare("output", results[0], results[1])
        size = results[0]
        if isinstance(size, list):
            size = b"".join(
                item if isinstance(item, bytes) else item.encode() for item in size
            )
        print(
            "PASS %s: same output (%d bytes) without and with %s, which got "
            "%d malloc-family bindings"
            % (options.case, len(size), options.preload, bindings)
        )
        clean = True
        return 0
    except Skip as reason:
        print("%s: %s" % ("FAIL" if options.no_skip else "SKIP", reason))
        clean = True
        return 1 if options.no_skip else SKIP
    except Failure as failure:
        print("FAIL %s: %s" % (options.case, failure))
        print("(run directories kept in %s)" % root)
        return 1
    finally:
        if clean and not options.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
