"""``trioban.open()``: start an instance's services in order, and stop them in reverse."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Final

import trio

from . import _aio, _embedded, _heartbeat, _lifeline, _pg, _pruner, _schema, _settle, _stager
from ._config import Config
from ._errors import InternalError, TriobanError
from ._instance import Oban
from ._leader import CHANNEL as LEADER_CHANNEL
from ._leader import while_leading
from ._queues import SIGNAL
from ._registry import asyncio_queues
from ._worker import CURRENT

PRUNE_INTERVAL: Final = 30.0
"""Seconds between pruner runs (sooner when ``prune_max_age`` is shorter, but never less
than ``MIN_PRUNE_INTERVAL``: each run reads the table)."""
MIN_PRUNE_INTERVAL: Final = 1.0


@asynccontextmanager
async def open(conf: Config) -> AsyncIterator[Oban]:
    """Start a trioban instance: schema verified, notifier, queues and services running.

    The block is entered once every service is ready. Leaving it stops the queues from
    fetching, gives running jobs ``conf.shutdown_grace`` seconds, cancels the rest (they stay
    ``executing`` for the lifeline to rescue), writes every pending ack and closes connections.
    Acks are written however the block is left, an exception or a cancellation too; if
    PostgreSQL can't be reached, trioban gives up on them 10 seconds after the grace and logs
    the jobs left ``executing``. An exception raised inside the block comes out unchanged; a
    failure of one of trioban's own tasks comes out as a ``TriobanError``.
    """
    if not isinstance(conf, Config):
        raise TypeError(f"trioban.open() expects a trioban.Config, got {conf!r}")
    if conf.dsn is None:
        async with _embedded_dsn() as dsn, open(conf.evolve(dsn=dsn)) as oban:
            yield oban
        return
    body_error: BaseException | None = None
    try:
        async with (
            _pg.open_pool(_no_jit(conf.dsn), size=conf.pool_size) as pool,
            _pg.open_pool(_relaxed(_no_jit(conf.dsn)), size=len(conf.queues) + 2) as work_pool,
        ):
            await _prepare_schema(pool, conf)
            async with _running(conf, pool, work_pool) as oban:
                try:
                    yield oban
                except BaseException as exc:
                    body_error = exc
                    raise
    except BaseExceptionGroup as group:
        collapsed = _collapse(group, body_error)
        if collapsed is group:
            raise
        # The user's own exception keeps its cause; ours points at the group.
        raise collapsed from (group if collapsed is not body_error else collapsed.__cause__)


@asynccontextmanager
async def _embedded_dsn() -> AsyncIterator[str]:
    """The embedded server's DSN (``Config(dsn=None)``), started off the event loop."""
    server = _embedded.embedded_server()
    dsn = await trio.to_thread.run_sync(server.__enter__)
    try:
        yield dsn
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.__exit__, None, None, None)


@asynccontextmanager
async def _running(conf: Config, pool: _pg.Pool, work_pool: _pg.Pool) -> AsyncIterator[Oban]:
    oban = Oban._create(conf, pool, work_pool)
    if conf.testing == "disabled":  # testing modes run no queue: tests drain them
        for queue, limit in conf.queues.items():
            oban._queues.add(queue, limit)
    _subscribe(oban)
    # Set before any task starts, so jobs inherit it (a job may relay or insert in turn).
    token = CURRENT.set(oban)
    try:
        async with (
            _aio.loop_if(bool(asyncio_queues() & set(conf.queues))),
            _services(oban) as running,
        ):
            yield running
    finally:
        CURRENT.reset(token)


@asynccontextmanager
async def _services(oban: Oban) -> AsyncIterator[Oban]:
    conf, producers = oban.config, oban._queues.producers
    async with trio.open_nursery() as services:
        await services.start(oban._notifier.run)
        await services.start(oban._relays.run)
        await services.start(oban._inserter.run)
        await services.start(
            _heartbeat.run,
            oban._work_pool,
            conf.prefix,
            conf.heartbeat_interval,
            conf.rescue_after,
            producers,
            oban._acker.unwritten,
        )
        # Testing modes run no maintenance: they must not take the lease from nodes that do.
        if conf.testing == "disabled":
            await services.start(oban._leadership.run)
            await _start_maintenance(services, oban)
        async with _serving(oban):
            # Always, even with no queue yet: one started later (start_queue) needs staging.
            await services.start(
                _stager.run, oban._work_pool, conf.prefix, conf.stage_interval, producers
            )
            yield oban
        services.cancel_scope.cancel()


@asynccontextmanager
async def _serving(oban: Oban) -> AsyncIterator[None]:
    """Run the acker and the queues; on every exit path the queues stop, then the acker writes
    what is queued. It is shielded, so an exception or a cancellation loses no ack, and
    bounded: it stops ``_acker.DRAIN_TIMEOUT`` seconds after the grace. Running jobs get their
    grace on a normal exit or an exception; a cancelled exit has cancelled them already."""
    acker, grace = oban._acker, oban.config.shutdown_grace
    async with trio.open_nursery() as acking:
        # Not ``start()``: the acker is ready at once, and a ``start()`` cancelled before its
        # ``started()`` would wait for it, shielded, for ever, never reaching ``close()``.
        acking.start_soon(acker.run)
        try:
            async with oban._queues.serve(grace):
                try:
                    yield
                finally:
                    acker.stop_after(grace)
        finally:
            acker.close()


async def _start_maintenance(services: trio.Nursery, oban: Oban) -> None:
    """The leader's periodic work (lifeline, workflow sweep, pruner) and the cron scheduler."""
    conf, pool, leadership = oban.config, oban._work_pool, oban._leadership
    await services.start(
        while_leading,
        leadership,
        conf.heartbeat_interval,
        "lifeline",
        _lifeline.Lifeline(
            pool,
            conf.prefix,
            conf.rescue_after,
            leadership.steady_for,
            settle=partial(_settle.settle_jobs, pool, conf.prefix),
        ),
    )
    await services.start(
        while_leading,
        leadership,
        conf.heartbeat_interval,
        "workflow sweep",
        _settle.Sweep(pool, conf.prefix),
    )
    if conf.prune_max_age is not None:
        await services.start(
            while_leading,
            leadership,
            max(MIN_PRUNE_INTERVAL, min(PRUNE_INTERVAL, conf.prune_max_age)),
            "pruner",
            _pruner.Pruner(pool, conf.prefix, conf.prune_max_age, conf.prune_limit),
        )
    if oban._scheduler.entries:
        await services.start(oban._scheduler.run)


def _subscribe(oban: Oban) -> None:
    notifier, relays, queues = oban._notifier, oban._relays, oban._queues

    def on_reconnect() -> None:
        relays.poll_soon()
        queues.wake_all()

    notifier.subscribe("relay", relays.deliver)
    notifier.subscribe(SIGNAL, oban._on_signal)
    notifier.subscribe(LEADER_CHANNEL, oban._leadership.elect_soon)
    notifier.on_reconnect(on_reconnect)


def _no_jit(dsn: str) -> str:
    """The DSN with PostgreSQL's JIT off (unless the DSN sets it): compiling a maintenance
    statement over a large jobs table (settling a workflow, pruning) costs up to a second,
    far more than running it, and trioban's statements are short."""
    return _pg.with_options(dsn, jit="off")


def _relaxed(dsn: str) -> str:
    """The DSN for the pool that claims and acks jobs: commits there don't wait for the disk.

    Inserts stay durable on commit. A claim or an ack lost to a PostgreSQL crash at worst runs
    a job again (at-least-once), and this halves the disk flushes on the path of every job.
    """
    return _pg.with_options(dsn, synchronous_commit="off")


async def _prepare_schema(pool: _pg.Pool, conf: Config) -> None:
    async with pool.connection() as conn:
        if conf.install:
            await _schema.install(conn, conf.prefix)
        else:
            await _schema.verify(conn, conf.prefix)


def _leaves(exc: BaseException) -> list[BaseException]:
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for child in exc.exceptions for leaf in _leaves(child)]


def _collapse(
    group: BaseExceptionGroup[BaseException], body: BaseException | None
) -> BaseException:
    """What to raise for an exception group from the instance's nurseries (STYLE rule 8)."""
    leaves = _leaves(group)
    # The body's own exception, a group too, comes out whole. Found by its leaves: a
    # cancel scope on the way out may have copied the groups holding them.
    mine = set() if body is None else {id(leaf) for leaf in _leaves(body)}
    if body is not None and all(id(leaf) in mine for leaf in leaves):
        return body
    if all(isinstance(leaf, trio.Cancelled) for leaf in leaves):
        return group
    ours = [
        leaf for leaf in leaves if id(leaf) not in mine and not isinstance(leaf, trio.Cancelled)
    ]
    if body is not None and not ours:
        return body  # beside it, only Cancelled: its consequence
    if len(ours) == 1 and isinstance(ours[0], TriobanError) and body is None:
        return ours[0]
    for leaf in ours:
        if isinstance(leaf, KeyboardInterrupt):  # Ctrl-C, delivered to whichever task ran
            return leaf
    return InternalError(f"a trioban task failed: {ours[0]!r}")
