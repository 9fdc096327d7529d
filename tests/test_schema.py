"""Schema install/verify, prefixes, and identifiers that can't be injected."""

from __future__ import annotations

import pytest
import trio

import trioban
from trioban import Config, JobState, _pg, _schema, _sql

from .workers import echo


async def _tables(dsn: str, prefix: str) -> set[str]:
    conn = await _pg.connect(dsn)
    try:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", [prefix]
        )
        return {row[0] for row in await cur.fetchall()}
    finally:
        await conn.close()


async def test_install_is_idempotent_and_verifiable(empty_dsn: str) -> None:
    conn = await _pg.connect(empty_dsn)
    try:
        with pytest.raises(_schema.SchemaError, match="missing or out of date"):
            await _schema.verify(conn, "public")
        others = [await _pg.connect(empty_dsn) for _ in range(3)]
        async with trio.open_nursery() as nursery:  # concurrent installers take turns
            for other in others:
                nursery.start_soon(_schema.install, other, "public")
        for other in others:
            await other.close()
        await _schema.install(conn, "public")
        await _schema.verify(conn, "public")
    finally:
        await conn.close()
    assert {"oban_jobs", "oban_peers", "trioban_producers", "trioban_schema"} <= await _tables(
        empty_dsn, "public"
    )


async def test_open_installs_unless_told_not_to(empty_dsn: str) -> None:
    run_install = r"run `trioban install --prefix public` \(with --dsn\)"  # no instance to call
    with pytest.raises(trioban.SchemaError, match=run_install):
        async with trioban.open(Config(dsn=empty_dsn, install=False)):
            pass
    async with trioban.open(Config(dsn=empty_dsn, queues={})) as oban:
        await oban.install()  # again: harmless
    async with trioban.open(Config(dsn=empty_dsn, install=False)):
        pass


async def test_instances_in_different_prefixes_are_isolated(empty_dsn: str) -> None:
    with trio.fail_after(20):
        async with (
            trioban.open(Config(dsn=empty_dsn, prefix="tenant_a", queues={"default": 5})) as a,
            trioban.open(Config(dsn=empty_dsn, prefix="tenant_b", queues={})) as b,
        ):
            assert "oban_jobs" in await _tables(empty_dsn, "tenant_a")
            job = await b.insert(echo.new({"value": 1}))
            assert job.id is not None
            assert await a.relay(echo.new({"value": 2}), timeout=5) == 2
            await trio.sleep(0.3)
            # tenant_a's queue never saw tenant_b's job, nor its gossip.
            stored = await b.get_job(job.id)
            assert stored is not None
            assert stored.state is JobState.AVAILABLE
            async with b.listen(["gossip"]) as messages:
                await a.notify("gossip", {"from": "a"})
                await b.notify("gossip", {"from": "b"})
                assert await messages.receive() == ("gossip", {"from": "b"})


@pytest.mark.parametrize(
    "prefix",
    ["public; DROP TABLE oban_jobs", 'a"b', "Public", "x" * 64, "", "1abc", "a-b", "a b"],
)
def test_hostile_prefixes_are_rejected(prefix: str) -> None:
    with pytest.raises(trioban.ConfigError) as raised:
        _sql.quoted_prefix(prefix)
    assert raised.value.field == "prefix"


def test_statements_are_rendered_with_a_quoted_prefix() -> None:
    text = _sql.query("fetch_jobs", "my_app")
    assert '"my_app".oban_jobs' in text
    assert "{prefix}" not in text
    assert set(_sql.QUERIES) >= {"insert_jobs", "fetch_jobs", "ack_jobs", "stage_jobs"}


async def test_upgrade_under_load_never_deadlocks(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An upgrade while a node stages, acks and runs users' transactions takes its table locks
    up front, so neither side dies of a deadlock (it once took a weaker lock first)."""
    config = Config(dsn=dsn, queues={"default": 20}, stage_interval=0.01, heartbeat_interval=0.05)
    with trio.fail_after(30):
        async with trioban.open(config) as oban:

            async def load() -> None:
                while True:
                    await oban.insert_all(
                        [echo.new({"value": i}, schedule_in=0.01) for i in range(50)]
                    )
                    async with oban.transaction() as conn:
                        await oban.insert(echo.new({"value": 1}), conn=conn)
                        await trio.sleep(0.01)
                        await oban.insert(echo.new({"value": 2}), conn=conn)

            upgrader = await _pg.connect(dsn)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load)
                    for _ in range(40):
                        await upgrader.execute(
                            "UPDATE trioban_schema SET version = %s", [_sql.SCHEMA_VERSION - 1]
                        )
                        await _schema.install(upgrader, "public")
                    nursery.cancel_scope.cancel()
                assert await _schema.installed_version(upgrader, "public") == _sql.SCHEMA_VERSION
            finally:
                await upgrader.close()
            assert await oban.relay(echo.new({"value": 7}), timeout=5) == 7
    assert not [r for r in caplog.records if "deadlock" in r.getMessage()]


async def test_upgrade_gives_up_behind_a_long_transaction(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_schema, "_LOCK_TIMEOUT", "100ms")
    monkeypatch.setattr(_schema, "_RETRY_PAUSE", 0.0)
    old = _sql.SCHEMA_VERSION - 1
    holder, upgrader = await _pg.connect(dsn), await _pg.connect(dsn)
    try:
        await upgrader.execute("UPDATE trioban_schema SET version = %s", [old])
        with trio.fail_after(10):
            async with holder.transaction():  # a long transaction that reads the job table
                await holder.execute("SELECT count(*) FROM oban_jobs")
                with pytest.raises(trioban.SchemaError, match="long transactions"):
                    await _schema.install(upgrader, "public")
                assert await _schema.installed_version(upgrader, "public") == old
            await _schema.install(upgrader, "public")  # once it ends, the upgrade goes through
        assert await _schema.installed_version(upgrader, "public") == _sql.SCHEMA_VERSION
    finally:
        await holder.close()
        await upgrader.close()
    retries = [r for r in caplog.records if "could not lock its tables" in r.getMessage()]
    assert len(retries) == _schema._LOCK_ATTEMPTS
