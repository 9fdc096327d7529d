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
    with pytest.raises(trioban.SchemaError, match=r"oban\.install"):
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
