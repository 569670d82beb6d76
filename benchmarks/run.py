"""Benchmarks of the further-link server; figures only, never a pass/fail test.

    python benchmarks/run.py [--quick] [--only NAME[,NAME]] [--json FILE]

Each benchmark starts a fresh server on loopback (``python -m further_link
--no-ssl --host 127.0.0.1 --port 0``), measures it, and measures a limit in
the same run (a bare spawn, a bare aiohttp server, the idle state). The table
shows figure, limit, their ratio and whether the target was met; targets
never change the exit status, which is non-zero only when a benchmark could
not be measured at all.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from _bare import BareError, ProgramAccount, write_hello_script
from _client import BenchClientError
from _context import FULL, QUICK, BenchContext
from _report import BenchResult, render_table, write_json
from _server import ServerError
from bench_cgroup import bench_cgroup
from bench_concurrency import bench_concurrency
from bench_flood import bench_flood
from bench_footprint import bench_footprint
from bench_gui import bench_gui
from bench_latency import bench_latency
from bench_page import bench_page
from bench_plots import bench_plots
from bench_preload import bench_preload
from bench_run_v5 import bench_run_v5
from bench_sharing import bench_sharing
from bench_stdin import bench_stdin
from bench_throughput import bench_throughput

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

Benchmark = Callable[[BenchContext], Awaitable[BenchResult]]
BENCHMARKS: dict[str, Benchmark] = {
    "latency": bench_latency,
    "throughput": bench_throughput,
    "stdin": bench_stdin,
    "concurrency": bench_concurrency,
    "flood": bench_flood,
    "footprint": bench_footprint,
    "run-v5": bench_run_v5,
    "preload": bench_preload,
    "cgroup": bench_cgroup,
    "sharing": bench_sharing,
    "page": bench_page,
    "plots": bench_plots,
    "gui": bench_gui,
}
# As root, programs run as another account that cannot read a virtualenv kept
# under /root; then they get the system's interpreter, as in the test suite.
SYSTEM_PYTHON = "/usr/bin/python3"
FALLBACK_ACCOUNT = "nobody"
# Failures that mean "could not measure", reported per benchmark.
MEASUREMENT_ERRORS = (BenchClientError, BareError, ServerError, OSError, asyncio.TimeoutError)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--quick", action="store_true", help="much smaller counts: a smoke run in under a minute"
    )
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help=f"run only these benchmarks, of: {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    names = [name.strip() for name in (args.only or ",".join(BENCHMARKS)).split(",") if name]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = names
    return args


def git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


async def run_benchmarks(
    names: Sequence[str], ctx: BenchContext
) -> tuple[list[BenchResult], dict[str, str]]:
    results: list[BenchResult] = []
    failures: dict[str, str] = {}
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        began = time.perf_counter()
        try:
            result = await BENCHMARKS[name](ctx)
        except MEASUREMENT_ERRORS as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
            print(f"[bench] {name} FAILED: {failures[name]}", file=sys.stderr, flush=True)
            continue
        result.seconds = time.perf_counter() - began
        results.append(result)
        print(f"[bench] {name} done in {result.seconds:.1f} s", file=sys.stderr, flush=True)
    return results, failures


def program_settings() -> tuple[str, ProgramAccount | None, dict[str, str]]:
    """The interpreter and account of programs, for the server and the bare limits alike.

    The server never runs programs as root. Started as root, it gets
    FURTHER_LINK_USER, else ``pi`` if it exists, else ``nobody``; the bare
    spawns switch to the same account.
    """
    settings = {"FURTHER_LINK_AUTH": "off"}  # the benchmark measures runs, not logins
    # FURTHER_LINK_CONTAINMENT=best-effort compares the figures without cgroups.
    containment = os.environ.get("FURTHER_LINK_CONTAINMENT")
    if containment:
        settings["FURTHER_LINK_CONTAINMENT"] = containment
    # The client reads a socket only while it runs a program there; on a machine so
    # loaded that a gap exceeds half the heartbeat (2.5 s), FURTHER_LINK_HEARTBEAT=60
    # keeps the server from closing it (the flood benchmark then stalls longer).
    heartbeat = os.environ.get("FURTHER_LINK_HEARTBEAT")
    if heartbeat:
        settings["FURTHER_LINK_HEARTBEAT"] = heartbeat
    python = os.environ.get("FURTHER_LINK_PYTHON") or None
    account = None
    if os.geteuid() == 0:
        requested = os.environ.get("FURTHER_LINK_USER")
        account = ProgramAccount.first_existing(
            *([requested] if requested else ["pi", FALLBACK_ACCOUNT])
        )
        settings["FURTHER_LINK_USER"] = account.name
        if python is None and os.access(SYSTEM_PYTHON, os.X_OK):
            python = SYSTEM_PYTHON
    python = python or sys.executable
    settings["FURTHER_LINK_PYTHON"] = python
    return python, account, settings


def describe_machine(quick: bool) -> dict[str, object]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "mode": "quick" if quick else "full",
        "server_python": sys.executable,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }


def log_problem_lines(results: Sequence[BenchResult]) -> list[str]:
    lines = []
    for result in results:
        count = result.details.get("server_log_problem_count", 0)
        if count:
            first = result.details["server_log_problems"][0]
            lines.append(
                f"server log during {result.name}: {count} warning(s)/error(s), e.g. {first}"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        program_python, account, settings = program_settings()
    except KeyError as exc:
        print(f"benchmarks: no such user {exc}; set FURTHER_LINK_USER", file=sys.stderr)
        return 2
    meta = describe_machine(args.quick)
    meta.update(program_python=program_python, program_account=account and account.name)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="further-link-bench-bare-") as scratch:
        os.chmod(scratch, 0o755)  # the program account reads the bare script
        ctx = BenchContext(
            server_python=sys.executable,
            program_python=program_python,
            account=account,
            server_settings=settings,
            repo_root=REPO_ROOT,
            hello_script=write_hello_script(Path(scratch)),
            scale=QUICK if args.quick else FULL,
        )
        results, failures = asyncio.run(run_benchmarks(args.names, ctx))
    meta.update(
        seconds=time.perf_counter() - began,
        load_average_at_end=list(os.getloadavg()),
        scale=asdict(ctx.scale),
        failures=failures,
    )

    print(
        f"further-link benchmarks ({meta['mode']}), commit {meta['commit'] or 'unknown'}, "
        f"{meta['cpus']} CPUs, {meta['seconds']:.0f} s; programs: {program_python}"
        + (f" as {account.name}" if account else "")
    )
    print(render_table([row for result in results for row in result.rows]))
    for line in log_problem_lines(results):
        print(line)
    for name, failure in failures.items():
        print(f"{name}: not measured: {failure}")
    if args.json is not None:
        write_json(args.json, meta, results)
        print(f"JSON written to {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
