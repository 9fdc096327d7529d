"""trioban's benchmark: the workloads of PERFORMANCE.md, one JSON line each.

    python -m benchmarks [--runs 3] [--pause 0] [--only W1,W4] [--dsn postgresql://...]
                         [--write-docs]

Without --dsn (or TRIOBAN_BENCH_DSN) a throwaway PostgreSQL with default durability (fsync
and synchronous_commit on) is started. Each workload runs --runs times on a fresh schema; the
line reports the median and the min-max. The workloads take turns (W1..W6, then again), so a
slow stretch of the machine touches all of them alike; --pause waits that many seconds between
rounds, to spread the runs over a machine whose speed drifts over minutes. Each line also
counts the runs that met the workload's target (``runs_meeting_target``), and a last line gives
the CPU probe, a fixed Python loop timed before each round, so that figures taken on a machine
in a slow stretch can be told apart. --write-docs also writes the figures, with the machine's
details, as a table to docs/reference/benchmark-results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import trio

from . import workloads

WORKLOADS: dict[str, Callable[[str], Awaitable[dict[str, float]]]] = {
    "W1": workloads.w1_bulk_insert,
    "W2": workloads.w2_single_inserts,
    "W3": workloads.w3_drain,
    "W4": workloads.w4_sequential_relays,
    "W5": workloads.w5_concurrent_relays,
    "W6": workloads.w6_relay_via_node_process,
}


@contextlib.contextmanager
def _server(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from trioban._devserver import temp_postgres

    with temp_postgres(durable=True) as server:
        yield server.dsn()


def _fresh_database(admin_dsn: str) -> str:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS trioban_bench WITH (FORCE)")
        conn.execute("CREATE DATABASE trioban_bench")
    return psycopg.conninfo.make_conninfo(admin_dsn, dbname="trioban_bench")


def _summary(name: str, runs: list[dict[str, float]]) -> dict[str, object]:
    line: dict[str, object] = {"workload": name, "runs": len(runs)}
    for key in runs[0]:
        values = [run[key] for run in runs]
        line[key] = round(statistics.median(values), 3)
        line[f"{key}_range"] = [round(min(values), 3), round(max(values), 3)]
    line["runs_meeting_target"] = sum(_meets(name, run) for run in runs)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between rounds")
    parser.add_argument("--only", default=",".join(WORKLOADS))
    parser.add_argument("--dsn", default=os.environ.get("TRIOBAN_BENCH_DSN"))
    parser.add_argument("--write-docs", action="store_true", help="write the docs table")
    opts = parser.parse_args()
    names = [name.strip().upper() for name in opts.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    machine: dict[str, object] = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.system(),
        "processor": _processor(),
    }
    print(json.dumps({"benchmark": "trioban", **machine}), flush=True)
    if opts.runs < 1 or opts.pause < 0:
        parser.error("--runs must be at least 1 and --pause at least 0")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    probes: list[float] = []
    started = time.monotonic()
    with _server(opts.dsn) as admin_dsn:
        machine["postgresql"] = _server_version(admin_dsn)
        # Round-robin: a machine's speed drifts over minutes, so each workload is sampled
        # across the whole session rather than all its runs landing in one stretch.
        for round_ in range(1, opts.runs + 1):
            if round_ > 1:
                time.sleep(opts.pause)
            probes.append(cpu_probe_ms())
            for name in names:
                runs[name].append(trio.run(WORKLOADS[name], _fresh_database(admin_dsn)))
            print(f"round {round_}/{opts.runs} done", file=sys.stderr, flush=True)
    lines = [_summary(name, runs[name]) for name in names]
    low, mid, high = round(min(probes)), round(statistics.median(probes)), round(max(probes))
    for line in lines:
        print(json.dumps(line), flush=True)
    print(json.dumps({"cpu_probe_ms": mid, "cpu_probe_ms_range": [low, high]}), flush=True)
    if opts.write_docs:
        how = (
            f"medians of {opts.runs} runs over {(time.monotonic() - started) / 60:.0f} minutes; "
            f"the CPU probe took {mid} ms ({low}-{high})"
        )
        DOCS_TABLE.write_text(_table(machine, lines, how), encoding="utf-8")
        print(f"wrote {DOCS_TABLE}", file=sys.stderr)
    sys.stdout.flush()


DOCS_TABLE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "benchmark-results.md"
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "W1": {"jobs_per_s": (">=", 45_000)},
    "W2": {"jobs_per_s": (">=", 2_000)},
    "W3": {"jobs_per_s": (">=", 6_000)},
    "W4": {"p50_ms": ("<=", 2.5), "p99_ms": ("<=", 6)},
    "W5": {"wall_s": ("<=", 0.4)},
    "W6": {"p50_ms": ("<=", 3)},
}
"""PERFORMANCE.md's targets: a run meets its workload's target when every bound holds."""


def _meets(name: str, run: dict[str, float]) -> bool:
    return all(
        run[metric] >= bound if op == ">=" else run[metric] <= bound
        for metric, (op, bound) in TARGETS[name].items()
    )


def _target_text(name: str) -> str:
    return ", ".join(
        f"{metric} {'≥' if op == '>=' else '≤'} {bound:,}"
        for metric, (op, bound) in TARGETS[name].items()
    )


def cpu_probe_ms() -> float:
    """How long a fixed pure-Python loop takes, in ms: the machine's speed at this moment."""
    started = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i
    return (time.perf_counter() - started) * 1000


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _server_version(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def _table(machine: dict[str, object], lines: list[dict[str, object]], how: str) -> str:
    """The figures as a Markdown page for the docs."""
    figures = []
    for line in lines:
        name = str(line["workload"])
        skip = {"workload", "runs", "runs_meeting_target"}
        values = {k: v for k, v in line.items() if k not in skip}
        shown = ", ".join(
            f"{k} {v:,}" if isinstance(v, float) else f"{k} {v}"
            for k, v in values.items()
            if not k.endswith("_range")
        )
        spread = ", ".join(f"{k} {v}" for k, v in values.items() if k.endswith("_range"))
        met = f"{line['runs_meeting_target']} of {line['runs']}"
        figures.append(f"| {name} | {shown} | {spread} | {_target_text(name)} | {met} |")
    about = ", ".join(f"{k}: {v}" for k, v in machine.items())
    return (
        "# Benchmark results\n\n"
        f"Written by `python -m benchmarks --write-docs` ({how}; min-max shown).\n"
        f"Machine: {about}.\n\n"
        "| workload | median | range | target | runs meeting it |\n|---|---|---|---|---|\n"
        + "\n".join(figures)
        + "\n"
    )


if __name__ == "__main__":
    main()
