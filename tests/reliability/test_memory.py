"""The memory targets, measured in a fresh process: an idle instance with 5 queues stays under
60 MB resident, and 10,000 pending relays add under 20 MB."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_idle_instance_and_pending_relays_stay_within_their_memory(dsn: str) -> None:
    probe = subprocess.run(
        [sys.executable, "-m", "tests.memory_probe", dsn],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    figures = json.loads(probe.stdout.strip().splitlines()[-1])
    assert figures["waiting"] == 10_000
    assert figures["idle_mb"] < 60, figures
    assert figures["pending_mb"] < 20, figures
