"""The Trio-native driver and pool, against a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
import trio

from trioban import _pg


async def _active_queries(dsn: str, text: str) -> int:
    conn = await _pg.connect(dsn)
    try:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = %s AND state = 'active'", [text]
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0
    finally:
        await conn.close()


def test_the_psycopg_seams_we_rely_on_exist() -> None:
    # trioban/_pg.py drives these undocumented parts; an upgrade that moves them fails here.
    assert psycopg.__version__.startswith("3.3.")
    conn_type = psycopg.AsyncConnection
    for name in ("wait", "_connect_gen", "_cancel_gen", "_get_connection_params", "cancel"):
        assert callable(getattr(conn_type, name)), name
    assert hasattr(psycopg.errors, "_WaitTimeout")
    from psycopg._conninfo_attempts import conninfo_attempts
    from psycopg._enums import Ready, Wait

    assert callable(conninfo_attempts)
    assert (int(Wait.R), int(Wait.W), int(Ready.R)) == (1, 2, 1)


async def test_execute_transaction_copy_and_notifies(dsn: str) -> None:
    with trio.fail_after(10):
        conn = await _pg.connect(dsn)
        other = await _pg.connect(dsn)
        try:
            cur = await conn.execute("SELECT %s::int + 1", [41])
            assert await cur.fetchone() == (42,)
            await conn.execute("CREATE TABLE t (x int)")
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await conn.execute("INSERT INTO t VALUES (1)")
                    raise RuntimeError
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (2)")
            async with conn.cursor() as cur, cur.copy("COPY t (x) FROM STDIN") as copy:
                for i in range(3, 6):
                    await copy.write_row([i])
            cur = await conn.execute("SELECT array_agg(x ORDER BY x) FROM t")
            assert await cur.fetchone() == ([2, 3, 4, 5],)
            await conn.execute("LISTEN ch")
            await other.execute("NOTIFY ch, 'hi'")
            notes = [n async for n in conn.notifies(timeout=2, stop_after=1)]
            assert [(n.channel, n.payload) for n in notes] == [("ch", "hi")]
            assert [n async for n in conn.notifies(timeout=0.05)] == []
        finally:
            await conn.close()
            await other.close()


async def test_cancelling_a_query_cancels_it_on_the_server(dsn: str) -> None:
    conn = await _pg.connect(dsn)
    try:
        start = trio.current_time()
        with trio.move_on_after(0.2):
            await conn.execute("SELECT pg_sleep(10)")
        assert trio.current_time() - start < 1.5
        assert await _active_queries(dsn, "SELECT pg_sleep(10)") == 0
        cur = await conn.execute("SELECT 1")  # and the connection is still usable
        assert await cur.fetchone() == (1,)
    finally:
        await conn.close()


async def test_a_connection_cancelled_mid_transaction_comes_back_clean(dsn: str) -> None:
    async with _pg.open_pool(dsn, size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE t (x int)")
        with trio.move_on_after(0.2):
            async with pool.connection() as conn, conn.transaction():
                await conn.execute("INSERT INTO t VALUES (1)")
                await conn.execute("SET LOCAL statement_timeout = 12345")
                await conn.execute("SELECT pg_sleep(10)")
        async with pool.connection() as conn:
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            cur = await conn.execute("SELECT count(*) FROM t")
            assert await cur.fetchone() == (0,)
            cur = await conn.execute("SHOW statement_timeout")
            assert await cur.fetchone() == ("0",)


async def test_pool_limits_concurrency_and_cancelled_checkouts_leak_nothing(dsn: str) -> None:
    async with _pg.open_pool(dsn, size=2) as pool:
        inside = 0
        peak = 0

        async def use() -> None:
            nonlocal inside, peak
            async with pool.connection() as conn:
                inside += 1
                peak = max(peak, inside)
                await conn.execute("SELECT pg_sleep(0.05)")
                inside -= 1

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(use)
        assert peak == 2
        async with pool.connection(), pool.connection():
            with trio.move_on_after(0.1) as scope:
                async with pool.connection():
                    pytest.fail("a third checkout must wait")
            assert scope.cancelled_caught
        stats = pool.statistics()
        assert (stats.in_use, stats.waiting) == (0, 0)
        assert stats.idle <= 2


async def test_broken_connections_are_replaced(dsn: str) -> None:
    async with _pg.open_pool(dsn, size=1) as pool:
        async with pool.connection() as conn:
            pid = conn.pgconn.backend_pid
        killer = await _pg.connect(dsn)
        await killer.execute("SELECT pg_terminate_backend(%s)", [pid])
        await killer.close()
        with pytest.raises(psycopg.OperationalError):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
        async with pool.connection() as conn:
            assert conn.pgconn.backend_pid != pid
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)


async def test_connections_past_their_lifetime_are_recycled(dsn: str) -> None:
    async with _pg.open_pool(dsn, size=1, max_lifetime=0.0) as pool:
        async with pool.connection() as conn:
            first = conn.pgconn.backend_pid
        async with pool.connection() as conn:
            assert conn.pgconn.backend_pid != first


async def test_closing_the_pool_closes_its_connections(dsn: str) -> None:
    async with _pg.open_pool(dsn, size=2) as pool, pool.connection() as conn:
        kept = conn
    assert kept.closed


async def test_unreachable_server_raises_database_unavailable() -> None:
    async with _pg.open_pool("postgresql://nobody@127.0.0.1:1/x", size=1) as pool:
        with trio.fail_after(10), pytest.raises(_pg.DatabaseUnavailable, match="cannot connect"):
            async with pool.connection():
                pass


def test_with_options_keeps_existing_options() -> None:
    dsn = "postgresql://u@h/db?options=-c%20search_path%3Dx"
    params = psycopg.conninfo.conninfo_to_dict(_pg.with_options(dsn, synchronous_commit="off"))
    assert params["options"] == "-c search_path=x -c synchronous_commit=off"
