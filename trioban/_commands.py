"""The ``trioban`` command: install, start, status, jobs, demo.

Human output uses rich tables and progress bars; ``--json`` prints one JSON document for
machines. A user error (bad DSN, unknown queue, bad option) is one line on stderr and a
non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import signal
import sys
import sysconfig
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, NoReturn

import psycopg
import trio
from rich.console import Console
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from . import _demo, _pg, _schema
from ._checks import MAX_JOB_ID
from ._config import Config, parse_queues
from ._errors import ConfigError, TriobanError, sole_error
from ._instance import Oban
from ._job import JobState
from ._open import _embedded_dsn, open
from ._sql import query
from ._store import job_from_row

Command = Callable[[argparse.Namespace], Awaitable[int]]

_DEFAULT_QUEUES: Final = {"default": 10}
"""What ``trioban start`` runs when neither ``--queues`` nor the config file names queues."""
_LIST_LIMIT: Final = 50
"""How many jobs ``trioban jobs list`` shows without ``--limit``."""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of the ``trioban`` command."""
    args = _parser().parse_args(argv)
    # A running node reports its warnings; one-shot commands keep to their one line.
    logging.basicConfig(format="trioban: %(message)s", stream=sys.stderr)
    logging.getLogger("trioban").setLevel(
        logging.WARNING if args.command is _start else logging.CRITICAL
    )
    logging.getLogger("trioban.embedded").setLevel(logging.WARNING)
    try:
        code = trio.run(args.command, args)
    except KeyboardInterrupt:
        code = 130
    except _USER_ERRORS as exc:
        code = _fail(exc)
    except BaseExceptionGroup as group:
        # A nursery (start, status --watch) wraps the error: it is still the user's one line.
        error = sole_error(group)
        if not isinstance(error, _USER_ERRORS):
            raise
        code = _fail(error)
    sys.exit(code)


_USER_ERRORS: Final = (TriobanError, psycopg.Error, ValueError, TypeError, OSError)


def _fail(exc: BaseException) -> int:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"trioban: error: {message}", file=sys.stderr)
    return 1


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _positive(text: str) -> int:
    """An argparse type: an int from 1 to 2**63 - 1 (a job id, a limit)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_JOB_ID:
        raise argparse.ArgumentTypeError(f"expected an int from 1 to 2**63 - 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dsn",
        default=os.environ.get("TRIOBAN_DSN") or None,  # set but empty: not set
        help="PostgreSQL DSN (default: $TRIOBAN_DSN, else the config file's, else embedded)",
    )
    common.add_argument("--config", help="a TOML file with a [trioban] table")
    common.add_argument("--prefix", help="the schema holding trioban's tables")
    common.add_argument("--json", action="store_true", help="print JSON for machines")
    parser = argparse.ArgumentParser(prog="trioban", description="Trio-native job queue")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(command=handler)
        return sub

    command("install", _install, "create or upgrade the schema")
    uninstall = command("uninstall", _uninstall, "drop trioban's tables (every job is lost)")
    uninstall.add_argument("--yes", action="store_true", help="confirm")
    uninstall.add_argument("--drop-schema", action="store_true", help="drop the prefix schema")
    start = command("start", _start, "run queues until SIGINT/SIGTERM (twice: at once)")
    start.add_argument(
        "--queues", help="e.g. default:10,math:5 (default: the config file's, else default:10)"
    )
    start.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module defining workers (repeatable)",
    )
    status = command("status", _status, "queues by state, and live nodes")
    status.add_argument("--watch", type=_seconds, metavar="SECONDS", help="refresh every SECONDS")
    jobs = command("jobs", _jobs, "list, retry or cancel jobs")
    jobs.add_argument("action", choices=["list", "retry", "cancel"])
    jobs.add_argument("ids", nargs="*", type=_positive, help="job ids")
    jobs.add_argument("--state", choices=[s.value for s in JobState])
    jobs.add_argument("--queue")
    jobs.add_argument("--worker")
    jobs.add_argument(
        "--limit",
        type=_positive,
        help=f"the newest N matching jobs (list: default {_LIST_LIMIT}; retry/cancel: default all)",
    )
    command("demo", _demo_command, "relays across queues and a workflow, in seconds")
    return parser  # fmt: skip


def _config(args: argparse.Namespace, **settings: Any) -> Config:
    overrides = {"dsn": args.dsn, "prefix": args.prefix, **settings}
    if args.config:
        return Config.from_toml(args.config, **overrides)
    return Config.build(**{k: v for k, v in overrides.items() if v is not None})


def _console(args: argparse.Namespace) -> Console:
    return Console(stderr=bool(args.json))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# -- commands --------------------------------------------------------------------------------


async def _install(args: argparse.Namespace) -> int:
    async with open(_config(args, queues={}, install=True)) as oban:
        version = await _version(oban)
    _report(args, {"installed": True, "prefix": oban.config.prefix, "version": version})
    return 0


async def _uninstall(args: argparse.Namespace) -> int:
    if not args.yes:
        raise ValueError("uninstall deletes every job; run again with --yes to confirm")
    conf = _config(args, queues={})
    # A bare connection, not an instance: opening one would install the schema (a mistyped
    # --prefix would create it) or refuse one that is out of date.
    async with _connection(conf) as conn:
        cur = await conn.execute(query("trioban_objects", conf.prefix), {"prefix": conf.prefix})
        objects, schema_exists = await cur.fetchone() or (0, False)
        # An empty schema (an earlier uninstall kept it) may still be dropped.
        droppable = args.drop_schema and schema_exists and conf.prefix != "public"
        if not objects and not droppable:
            raise TriobanError(
                f"nothing to uninstall: prefix {conf.prefix!r} holds no trioban tables; "
                "check --prefix and --dsn"
            )
        await _schema.uninstall(conn, conf.prefix, drop_schema=args.drop_schema)
    _report(args, {"uninstalled": True, "prefix": conf.prefix})
    return 0


@asynccontextmanager
async def _connection(conf: Config) -> AsyncIterator[_pg.Connection]:
    """One connection to the database of ``conf`` (the embedded server's without a DSN)."""
    if conf.dsn is None:
        async with _embedded_dsn() as dsn, _connection(conf.evolve(dsn=dsn)) as conn:
            yield conn
        return
    async with _pg.open_pool(conf.dsn, size=1) as pool, pool.connection() as conn:
        yield conn


def _import(module: str) -> None:
    """Import a ``--import`` module; failing to is the user's one-line error, which says
    where the module's code raised (a missing setting, a syntax error)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError("--import", f"cannot import {module!r}: {exc}") from exc
    except Exception as exc:
        text = f"importing {module!r} failed: {type(exc).__name__}: {exc}{_where(exc)}"
        raise ConfigError("--import", text) from exc


def _where(exc: Exception) -> str:
    """Where the project's own code raised ``exc``: its innermost frame outside Python's and
    the installed packages' files (an ``os.environ[...]`` raises inside ``os``)."""
    if isinstance(exc, SyntaxError):
        return f" ({exc.filename}:{exc.lineno})"
    installed = {
        sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")
    }
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if not f.filename.startswith(("<", *installed))] or frames
    return f" ({own[-1].filename}:{own[-1].lineno})" if own else ""


async def _start(args: argparse.Namespace) -> int:
    if os.getcwd() not in sys.path:
        # As `python -m`, celery and uvicorn do: the project's modules (--import, and those
        # of workers named by jobs) import from where the command runs; a console script's
        # sys.path holds its bin directory instead.
        sys.path.insert(0, os.getcwd())
    for module in args.imports:
        await trio.to_thread.run_sync(_import, module)
    flag = None if args.queues is None else parse_queues(args.queues, "--queues")
    conf = _config(args, queues=flag)
    if not conf.queues:  # neither --queues nor the config file names any
        conf = conf.evolve(queues=_DEFAULT_QUEUES)
    console = _console(args)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        forced = 0  # the signal that stopped the node at once, if one did
        async with trio.open_nursery() as nursery:
            stop = trio.Event()

            async def on_signals() -> None:
                nonlocal forced
                async for signum in signals:
                    if not stop.is_set():
                        console.print(f"{signal.Signals(signum).name}: stopping gracefully "
                                      "(again to stop at once)")  # fmt: skip
                        stop.set()
                    else:
                        forced = signum
                        nursery.cancel_scope.cancel()

            nursery.start_soon(on_signals)
            async with open(conf):
                queues = ", ".join(f"{q}:{n}" for q, n in conf.queues.items())
                console.print(f"trioban node {conf.node} running {queues}")
                await stop.wait()
            console.print("stopped")
            nursery.cancel_scope.cancel()
    # Stopped at once: exit as a process killed by that signal would (130 for SIGINT).
    return 128 + forced if forced else 0


async def _status(args: argparse.Namespace) -> int:
    async with open(_config(args, queues={}, install=False)) as oban:
        if args.json:
            _print_json(await _status_data(oban))
            return 0
        console = _console(args)
        if not args.watch:
            console.print(_status_tables(await _status_data(oban)))
            return 0
        # Ctrl-C arrives as a message and ends the watch through its cancel scope, so the
        # instance always shuts down cleanly (a KeyboardInterrupt could land anywhere).
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch, oban, console, args.watch)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        return 130


async def _watch(oban: Oban, console: Console, every: float) -> None:
    if not console.is_terminal:  # piped: one snapshot after another
        while True:
            console.print(_status_tables(await _status_data(oban)))
            await trio.sleep(every)
    with Live(console=console, auto_refresh=False) as live:
        while True:
            live.update(_status_tables(await _status_data(oban)), refresh=True)
            await trio.sleep(every)


async def _status_data(oban: Oban) -> dict[str, Any]:
    async with oban._pool.connection() as conn:
        cur = await conn.execute(query("queue_states", oban.config.prefix))
        rows = await cur.fetchall()
    queues: dict[str, dict[str, int]] = {}
    for queue, state, count in rows:
        queues.setdefault(queue, {})[state] = count
    nodes = [
        {"node": i.node, "queue": i.queue, "limit": i.limit, "paused": i.paused,
         "running": len(i.running)}
        for i in await oban.check_all_queues()
    ]  # fmt: skip
    return {"queues": queues, "nodes": nodes}


def _status_tables(data: dict[str, Any]) -> Table:
    states = [s.value for s in JobState]
    table = Table(title="jobs by queue and state")
    table.add_column("queue")
    for state in states:
        table.add_column(state, justify="right")
    for queue, counts in sorted(data["queues"].items()):
        table.add_row(queue, *(str(counts.get(state, 0)) for state in states))
    nodes = Table(title="live nodes")
    for column in ("node", "queue", "limit", "paused", "running"):
        nodes.add_column(column)
    for node in data["nodes"]:
        nodes.add_row(*(str(node[c]) for c in ("node", "queue", "limit", "paused", "running")))
    outer = Table.grid(padding=1)
    outer.add_row(table)
    outer.add_row(nodes)
    return outer


async def _jobs(args: argparse.Namespace) -> int:
    async with open(_config(args, queues={}, install=False)) as oban:
        if args.action == "list":
            return await _list_jobs(oban, args)
        if not args.ids and args.state is None:
            raise ValueError(
                f"jobs {args.action} needs job ids or --state (e.g. --state discarded)"
            )
        # The jobs `jobs list` would show with the same filters (every one without --limit).
        async with oban._pool.connection() as conn:
            cur = await conn.execute(query("list_job_ids", oban.config.prefix), _filters(args))
            ids = [row[0] for row in await cur.fetchall()]
        changed = 0
        with Progress(console=_console(args), transient=True) as progress:
            task = progress.add_task(f"{args.action} {len(ids)} jobs", total=len(ids))
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                if args.action == "cancel":
                    changed += await oban.cancel_all_jobs(chunk)
                else:
                    for job_id in chunk:
                        changed += await oban.retry_job(job_id)
                progress.advance(task, len(chunk))
        _report(args, {args.action: changed, "of": len(ids)})
    return 0


def _filters(args: argparse.Namespace, limit: int | None = None) -> dict[str, Any]:
    """The parameters of ``list_jobs`` and ``list_job_ids``: every filter of ``jobs``."""
    return {"ids": args.ids or None, "state": args.state, "queue": args.queue,
            "worker": args.worker, "limit": args.limit or limit}  # fmt: skip


async def _list_jobs(oban: Oban, args: argparse.Namespace) -> int:
    params = _filters(args, _LIST_LIMIT)
    async with oban._pool.connection() as conn:
        cur = await conn.execute(query("list_jobs", oban.config.prefix), params)
        jobs = [job_from_row(row) for row in await cur.fetchall()]
    if args.json:
        _print_json([
            {"id": j.id, "state": j.state.value, "queue": j.queue, "worker": j.worker,
             "attempt": j.attempt, "max_attempts": j.max_attempts, "args": dict(j.args),
             "scheduled_at": j.scheduled_at, "errors": list(j.errors)}
            for j in jobs
        ])  # fmt: skip
        return 0
    table = Table(title=f"{len(jobs)} jobs")
    for column in ("id", "state", "queue", "worker", "attempt", "scheduled_at", "last error"):
        table.add_column(column)
    for j in jobs:
        error = _first_line(j.errors[-1])[:60] if j.errors else ""
        table.add_row(str(j.id), j.state.value, j.queue, j.worker,
                      f"{j.attempt}/{j.max_attempts}", str(j.scheduled_at), error)  # fmt: skip
    _console(args).print(table)
    return 0


def _first_line(error: object) -> str:
    """The first line of an entry of a job's errors (empty, or written by another tool too)."""
    text = str(error.get("error", "")) if isinstance(error, dict) else str(error)
    return next(iter(text.splitlines()), "")


async def _demo_command(args: argparse.Namespace) -> int:
    figures = await _demo.run(_config(args), _console(args))
    if args.json:
        _print_json(figures)
    return 0


async def _version(oban: Oban) -> int:
    async with oban._pool.connection() as conn:
        return await _schema.installed_version(conn, oban.config.prefix)


def _report(args: argparse.Namespace, data: dict[str, Any]) -> None:
    if args.json:
        _print_json(data)
    else:
        _console(args).print(", ".join(f"{k}: {v}" for k, v in data.items()))


if __name__ == "__main__":
    main()
