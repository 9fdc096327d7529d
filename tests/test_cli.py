"""The trioban command, run as a real process against the test database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, LiteralString

import psycopg
import trio

import trioban
from trioban import JobState
from trioban._demo import ORDERS

from .helpers import eventually, reaches
from .nodes import ROOT
from .workers import echo, sleeper, steer


async def cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    result = await trio.run_process(
        [sys.executable, "-m", "trioban._commands", *args],
        cwd=ROOT,
        env=None if env is None else {**os.environ, **env},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr.decode()
    return result


async def cli_json(*args: str) -> Any:
    return json.loads((await cli(*args, "--json")).stdout)


@asynccontextmanager
async def _command(
    argv: list[str], *, cwd: Path = ROOT, python: tuple[str, ...] = ()
) -> AsyncIterator[trio.Process]:
    """``python *python -m trioban._commands *argv`` with piped output; killed if still
    running when the block exits (a failed or timed-out test leaves nothing behind)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, *python, "-m", "trioban._commands", *argv],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


async def _rows(dsn: str, statement: LiteralString) -> list[tuple[Any, ...]]:
    """A statement's rows (none for a command), read on a plain connection in a thread."""

    def read() -> list[tuple[Any, ...]]:
        with psycopg.connect(dsn) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description is not None else []

    return await trio.to_thread.run_sync(read)


async def _read_until(proc: trio.Process, marker: bytes, count: int = 1) -> bytes:
    """The process's output up to the end of the line holding ``marker`` (the ``count``-th)."""
    assert proc.stdout is not None
    output = b""
    while output.count(marker) < count or not output.endswith(b"\n"):
        chunk = await proc.stdout.receive_some()
        assert chunk, output
        output += chunk
    return output


async def test_install_status_and_uninstall(empty_dsn: str) -> None:
    with trio.fail_after(60):
        assert (await cli_json("install", "--dsn", empty_dsn))["installed"] is True
        status = await cli_json("status", "--dsn", empty_dsn)
        assert status == {"queues": {}, "nodes": []}
        refused = await cli("uninstall", "--dsn", empty_dsn, check=False)
        assert refused.returncode == 1
        assert refused.stderr.decode().strip() == (
            "trioban: error: uninstall deletes every job; run again with --yes to confirm"
        )
        await cli("uninstall", "--dsn", empty_dsn, "--yes")
        gone = await cli("status", "--dsn", empty_dsn, check=False)
        assert gone.returncode == 1
        assert "schema in prefix 'public' is missing" in gone.stderr.decode()


async def test_status_and_jobs_commands(dsn: str) -> None:
    async with trioban.open(trioban.Config(dsn=dsn)) as oban:
        jobs = await oban.insert_all([echo.new({"i": i}) for i in range(3)])
        failing = await oban.insert(steer.new({"kind": "raise"}, queue="other", max_attempts=1))
    with trio.fail_after(60):
        status = await cli_json("status", "--dsn", dsn)
        assert status["queues"] == {"default": {"available": 3}, "other": {"available": 1}}
        listed = await cli_json("jobs", "list", "--dsn", dsn, "--queue", "default")
        assert [job["id"] for job in listed] == sorted((j.id or 0 for j in jobs), reverse=True)
        cancelled = await cli_json("jobs", "cancel", str(jobs[0].id), "--dsn", dsn)
        assert cancelled == {"cancel": 1, "of": 1}
        bulk = await cli_json("jobs", "cancel", "--state", "available", "--dsn", dsn)
        assert bulk == {"cancel": 3, "of": 3}
        retried = await cli_json("jobs", "retry", "--state", "cancelled", "--queue", "other",
                                 "--dsn", dsn)  # fmt: skip
        assert retried == {"retry": 1, "of": 1}
        async with trioban.open(trioban.Config(dsn=dsn, queues={})) as oban:
            again = await oban.get_job(failing.id or 0)
            extra = await oban.insert(echo.new({"i": 3}))
            assert await oban.cancel_job(extra.id or 0, reason="")  # an empty last error
        assert again is not None
        assert again.state is JobState.AVAILABLE
        human = (await cli("jobs", "list", "--dsn", dsn)).stdout.decode()
        assert "5 jobs" in human
        assert "cancelled" in human


async def test_start_runs_jobs_and_stops_on_sigterm(dsn: str) -> None:
    async with trioban.open(trioban.Config(dsn=dsn)) as oban:
        job = await oban.insert(echo.new({"value": 1}))
    with trio.fail_after(60):
        argv = ["start", "--dsn", dsn, "--queues", "default:2", "--import", "tests.workers"]
        async with _command(argv) as proc:
            assert proc.stdout is not None
            await _read_until(proc, b"running default:2")
            async with trioban.open(trioban.Config(dsn=dsn)) as oban:

                async def done() -> bool:
                    found = await oban.get_job(job.id or 0)
                    return found is not None and found.state is JobState.COMPLETED

                await eventually(done)
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
            rest = b""
            while chunk := await proc.stdout.receive_some():
                rest += chunk
            assert b"SIGTERM: stopping gracefully" in rest
            assert b"stopped" in rest


async def test_a_second_signal_stops_at_once_with_the_signals_exit_code(dsn: str) -> None:
    async with trioban.open(trioban.Config(dsn=dsn, queues={})) as oban:
        job = await oban.insert(sleeper.new({"seconds": 60}))
    with trio.fail_after(60):
        argv = ["start", "--dsn", dsn, "--queues", "default:2", "--import", "tests.workers"]
        async with _command(argv) as proc:
            await _read_until(proc, b"running default:2")
            async with trioban.open(trioban.Config(dsn=dsn, queues={})) as oban:
                await reaches(oban, job.id, JobState.EXECUTING)
            proc.send_signal(signal.SIGTERM)
            await _read_until(proc, b"stopping gracefully")
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(10):  # not the job's 60 s, nor the shutdown grace
                assert await proc.wait() == 128 + signal.SIGTERM


async def test_errors_are_one_line() -> None:
    with trio.fail_after(60):
        bad = await cli("status", "--dsn", "postgresql://nobody@127.0.0.1:1/x", check=False)
        assert bad.returncode == 1
        lines = bad.stderr.decode().strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("trioban: error: cannot connect to PostgreSQL")
        usage = await cli("status", "--no-such-option", check=False)
        assert usage.returncode == 2
        assert "unrecognized arguments: --no-such-option" in usage.stderr.decode()


async def test_status_watch_refreshes_until_interrupted(dsn: str) -> None:
    with trio.fail_after(60):
        async with _command(["status", "--watch", "0.1", "--dsn", dsn]) as proc:
            await _read_until(proc, b"jobs by queue and state", count=2)
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 130


async def test_start_runs_the_queues_of_its_config_file(dsn: str, tmp_path: Path) -> None:
    config = tmp_path / "app.toml"
    config.write_text(f'[trioban]\ndsn = "{dsn}"\nqueues = {{mail = 3, reports = 2}}\n')
    with trio.fail_after(60):
        for argv, running in [
            (["--config", str(config)], b"running mail:3, reports:2"),
            (["--config", str(config), "--queues", "other:1"], b"running other:1"),
            (["--dsn", dsn], b"running default:10"),
        ]:
            async with _command(["start", *argv]) as proc:
                output = await _read_until(proc, b"running")
                assert running + b"\n" in output, output
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0


async def test_start_and_watch_errors_are_one_line() -> None:
    with trio.fail_after(60):
        bad = await cli("start", "--dsn", "postgresql://nobody@127.0.0.1:1/x", check=False)
        assert bad.returncode == 1
        # A starting node logs its retries; the error itself is one line, no traceback.
        stderr = bad.stderr.decode()
        assert "Traceback" not in stderr
        assert (
            stderr.strip()
            .splitlines()[-1]
            .startswith("trioban: error: cannot connect to PostgreSQL")
        )
        for every in ("-1", "0", "nan", "soon"):
            watch = await cli("status", "--watch", every, check=False)
            assert watch.returncode == 2
            assert "expected a number of seconds > 0" in watch.stderr.decode()


async def test_retry_and_cancel_take_every_filter_of_list(dsn: str) -> None:
    async with trioban.open(trioban.Config(dsn=dsn, queues={})) as oban:
        echoes = await oban.insert_all([echo.new({"i": i}) for i in range(3)])
        sleepers = await oban.insert_all([sleeper.new({"seconds": 1}) for _ in range(2)])
        other = await oban.insert(sleeper.new({"seconds": 1}, queue="other"))
    echo_ids = [j.id or 0 for j in echoes]
    sleeper_ids = [j.id or 0 for j in sleepers]

    async def states() -> dict[int, str]:
        listed = await cli_json("jobs", "list", "--dsn", dsn)
        return {job["id"]: job["state"] for job in listed}

    with trio.fail_after(60):
        only = ["--state", "available", "--worker", sleeper.name, "--queue", "default"]
        cancelled = await cli_json("jobs", "cancel", *only, "--dsn", dsn)
        assert cancelled == {"cancel": 2, "of": 2}
        assert {i for i, s in (await states()).items() if s == "cancelled"} == set(sleeper_ids)
        # --limit takes the newest jobs, those `jobs list` shows with the same flags.
        newest = await cli_json("jobs", "list", "--state", "available", "--limit", "2",
                                "--dsn", dsn)  # fmt: skip
        assert [job["id"] for job in newest] == [other.id, echo_ids[2]]
        cancelled = await cli_json("jobs", "cancel", "--state", "available", "--limit", "2",
                                   "--dsn", dsn)  # fmt: skip
        assert cancelled == {"cancel": 2, "of": 2}
        # Ids are a filter too: an echo job is not the sleeper asked for.
        retried = await cli_json("jobs", "retry", str(echo_ids[2]), str(sleeper_ids[0]),
                                 "--worker", sleeper.name, "--dsn", dsn)  # fmt: skip
        assert retried == {"retry": 1, "of": 1}
        assert await states() == {
            other.id: "cancelled", sleeper_ids[1]: "cancelled", sleeper_ids[0]: "available",
            echo_ids[2]: "cancelled", echo_ids[1]: "available", echo_ids[0]: "available",
        }  # fmt: skip
        shown = await cli_json("jobs", "list", str(echo_ids[0]), "--dsn", dsn)
        assert [job["id"] for job in shown] == [echo_ids[0]]
        bad = await cli("jobs", "cancel", "--state", "available", "--limit", "0", check=False)
        assert bad.returncode == 2
        assert "expected an int from 1 to 2**63 - 1, got '0'" in bad.stderr.decode()


async def test_start_imports_modules_from_the_current_directory(dsn: str, tmp_path: Path) -> None:
    # What the console script does: its sys.path has its bin directory, not the current one.
    (tmp_path / "cli_app_workers.py").write_text('print("app workers imported", flush=True)\n')
    with trio.fail_after(60):
        argv = ["start", "--dsn", dsn, "--queues", "default:1", "--import", "cli_app_workers"]
        async with _command(argv, cwd=tmp_path, python=("-P",)) as proc:
            output = await _read_until(proc, b"running default:1")
            assert output.startswith(b"app workers imported\n"), output
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
        missing = await cli("start", "--dsn", dsn, "--import", "no_such_app.workers", check=False)
        assert missing.returncode == 1
        assert missing.stderr.decode().splitlines() == [
            "trioban: error: --import: cannot import 'no_such_app.workers': "
            "No module named 'no_such_app'"
        ]
        # A module whose own code raises: one line, saying what and where.
        (tmp_path / "cli_needs_a_setting.py").write_text(
            'import os\n\nSETTING = os.environ["CLI_NO_SUCH_SETTING"]\n'
        )
        (tmp_path / "cli_bad_syntax.py").write_text("def broken(:\n")
        expected = {
            "cli_needs_a_setting": "KeyError: 'CLI_NO_SUCH_SETTING' (",
            "cli_bad_syntax": "SyntaxError: ",
        }
        for module, words in expected.items():
            failed = await cli("start", "--dsn", dsn, "--import", module, check=False,
                               env={"PYTHONPATH": str(tmp_path)})  # fmt: skip
            assert failed.returncode == 1
            (line,) = failed.stderr.decode().splitlines()
            assert line.startswith(f"trioban: error: --import: importing '{module}' failed: ")
            assert words in line
            assert line.endswith((f"{module}.py:3)", f"{module}.py:1)")), line


async def test_uninstall_creates_nothing_and_says_when_there_is_nothing(empty_dsn: str) -> None:
    schemas = "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'app%'"
    with trio.fail_after(60):
        await cli("install", "--dsn", empty_dsn, "--prefix", "app_jobs")
        typo = await cli("uninstall", "--yes", "--dsn", empty_dsn, "--prefix", "app_jbos",
                         check=False)  # fmt: skip
        assert typo.returncode == 1
        assert typo.stderr.decode().splitlines() == [
            "trioban: error: nothing to uninstall: prefix 'app_jbos' holds no trioban tables; "
            "check --prefix and --dsn"
        ]
        assert await _rows(empty_dsn, schemas) == [("app_jobs",)]
        done = await cli_json("uninstall", "--yes", "--drop-schema", "--dsn", empty_dsn,
                              "--prefix", "app_jobs")  # fmt: skip
        assert done == {"uninstalled": True, "prefix": "app_jobs"}
        assert await _rows(empty_dsn, schemas) == []


async def test_uninstall_drops_a_schema_left_empty_and_keeps_one_holding_other_objects(
    empty_dsn: str,
) -> None:
    schemas = "SELECT nspname FROM pg_namespace WHERE nspname LIKE 'app%' ORDER BY 1"
    with trio.fail_after(60):
        for prefix in ("app_kept", "app_shared"):
            await cli("install", "--dsn", empty_dsn, "--prefix", prefix)
        # An earlier uninstall kept the schema: dropping it later still works.
        await cli("uninstall", "--yes", "--dsn", empty_dsn, "--prefix", "app_kept")
        assert await _rows(empty_dsn, schemas) == [("app_kept",), ("app_shared",)]
        await cli("uninstall", "--yes", "--drop-schema", "--dsn", empty_dsn, "--prefix", "app_kept")
        assert await _rows(empty_dsn, schemas) == [("app_shared",)]
        # A schema holding the user's own table is not dropped, and nothing is uninstalled.
        await _rows(empty_dsn, "CREATE TABLE app_shared.mine (id int)")
        refused = await cli("uninstall", "--yes", "--drop-schema", "--dsn", empty_dsn,
                            "--prefix", "app_shared", check=False)  # fmt: skip
        assert refused.returncode == 1
        assert "schema 'app_shared' holds objects trioban didn't create" in refused.stderr.decode()
        tables = "SELECT count(*) FROM app_shared.oban_jobs"
        assert await _rows(empty_dsn, tables) == [(0,)]


async def test_demo_runs_in_the_prefix_and_database_of_its_settings(
    empty_dsn: str, tmp_path: Path
) -> None:
    config = tmp_path / "app.toml"
    config.write_text(f'[trioban]\ndsn = "{empty_dsn}"\nprefix = "demo_file"\n')
    with trio.fail_after(60):
        figures = await cli_json("demo", "--config", str(config), "--prefix", "demo_flag")
        assert figures["workflow"] == {"loaded": 1000, "shards": 4}
        holders = (
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'oban_jobs'"
        )
        assert await _rows(empty_dsn, holders) == [("demo_flag",)]
        [(count,)] = await _rows(empty_dsn, "SELECT count(*) FROM demo_flag.oban_jobs")
        assert count > ORDERS * 3
        missing = await cli("demo", "--config", str(tmp_path / "nope.toml"), check=False)
        assert missing.returncode == 1
        assert len(missing.stderr.decode().splitlines()) == 1


async def test_the_dsn_is_the_flag_else_the_environment_else_the_config_file(
    dsn: str, tmp_path: Path
) -> None:
    nowhere = "postgresql://nobody@127.0.0.1:1/x"
    config = tmp_path / "app.toml"
    config.write_text(f'[trioban]\ndsn = "{nowhere}"\n')
    with trio.fail_after(60):
        for argv, env in [
            (["--dsn", dsn, "--config", str(config)], {"TRIOBAN_DSN": nowhere}),
            (["--config", str(config)], {"TRIOBAN_DSN": dsn}),
        ]:
            status = await cli("status", "--json", *argv, env=env)
            assert json.loads(status.stdout) == {"queues": {}, "nodes": []}
        # An empty TRIOBAN_DSN is no DSN: the config file's is used.
        config.write_text(f'[trioban]\ndsn = "{dsn}"\n')
        status = await cli("status", "--json", "--config", str(config), env={"TRIOBAN_DSN": ""})
        assert json.loads(status.stdout) == {"queues": {}, "nodes": []}
