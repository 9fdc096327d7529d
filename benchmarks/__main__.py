"""trioban's benchmark: the workloads of PERFORMANCE.md, one JSON line each.

    python -m benchmarks [--runs 3] [--only W1,W4] [--dsn postgresql://...]

Without --dsn (or TRIOBAN_BENCH_DSN) a throwaway PostgreSQL with default durability (fsync
and synchronous_commit on) is started. Each workload runs --runs times on a fresh schema; the
line reports the median and the min-max.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
from collections.abc import Awaitable, Callable, Iterator

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
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(WORKLOADS))
    parser.add_argument("--dsn", default=os.environ.get("TRIOBAN_BENCH_DSN"))
    opts = parser.parse_args()
    names = [name.strip().upper() for name in opts.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    machine = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": platform.system(),
    }
    print(json.dumps({"benchmark": "trioban", **machine}), flush=True)
    with _server(opts.dsn) as admin_dsn:
        for name in names:
            runs = []
            for _ in range(opts.runs):
                dsn = _fresh_database(admin_dsn)
                runs.append(trio.run(WORKLOADS[name], dsn))
            print(json.dumps(_summary(name, runs)), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
