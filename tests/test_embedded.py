"""Config(dsn=None): the embedded PostgreSQL, started, reused and stopped by trioban."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import trioban
from trioban._devserver import ServerError

from .workers import echo


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Under /var/tmp: as root, the server's user must be able to reach it.
    path = Path("/var/tmp") / f"trioban-embedded-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TRIOBAN_DATA_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_embedded_server_runs_jobs_and_is_reused(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conf = trioban.Config(dsn=None, queues={"default": 2})
    var_tmp = Path("/var/tmp").stat().st_mode
    with trio.fail_after(120), caplog.at_level(logging.INFO, "trioban.embedded"):
        async with trioban.open(conf) as oban:
            assert await oban.relay(echo.new({"value": "embedded"})) == "embedded"
            async with oban.transaction() as conn:
                await conn.execute("CREATE TABLE kept (x int)")
        assert not (data_dir / "postmaster.pid").exists()  # stopped on exit
        async with trioban.open(conf) as oban, oban.transaction() as conn:
            cur = await conn.execute("SELECT to_regclass('kept') IS NOT NULL")
            assert await cur.fetchone() == (True,)
    assert caplog.text.count("embedded PostgreSQL started") == 2
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    assert mode == 0o700
    if os.geteuid() == 0:
        assert "running as root: the embedded PostgreSQL runs as user" in caplog.text
        assert data_dir.stat().st_uid != 0
        assert Path("/var/tmp").stat().st_mode == var_tmp  # untouched


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-only refusal")
async def test_as_root_a_private_data_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path.chmod(0o700)
    monkeypatch.setenv("TRIOBAN_DATA_DIR", str(tmp_path / "pg"))
    with pytest.raises(ServerError, match="cannot reach its data"):
        async with trioban.open(trioban.Config(dsn=None)):
            pass
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700  # left as it was
