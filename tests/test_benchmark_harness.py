"""The benchmark harness's arithmetic: medians, ranges and runs meeting a target."""

from __future__ import annotations

from benchmarks.__main__ import _summary, _table


def test_a_run_meets_its_target_only_when_every_bound_holds() -> None:
    runs = [
        {"p50_ms": 1.0, "p99_ms": 7.0},
        {"p50_ms": 2.0, "p99_ms": 5.0},
        {"p50_ms": 3.0, "p99_ms": 1.0},
    ]
    line = _summary("W4", runs)  # p50 <= 2.5 and p99 <= 6: only the second run meets both
    assert line["p50_ms"] == 2.0
    assert line["p99_ms_range"] == [1.0, 7.0]
    assert line["runs_meeting_target"] == 1
    assert "| W4 | p50_ms 2.0, p99_ms 5.0 |" in _table({}, [line], "3 runs")
    assert "| p50_ms ≤ 2.5, p99_ms ≤ 6 | 1 of 3 |" in _table({}, [line], "3 runs")


def test_throughput_targets_are_lower_bounds() -> None:
    line = _summary("W1", [{"jobs_per_s": 44_999.0}, {"jobs_per_s": 45_000.0}])
    assert line["runs_meeting_target"] == 1
