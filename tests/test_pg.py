"""The Trio-native driver and pool, against a real PostgreSQL."""

from __future__ import annotations

import inspect
import json
import socket

import psycopg
import pytest
import trio
import trio.testing
from psycopg import generators
from psycopg.adapt import Transformer
from psycopg.conninfo import make_conninfo

import trioban
from trioban import _pg
from trioban._sql import Prepared, prepared

ADD = Prepared(b"test_add", b"SELECT $1::int + 1, $2::text, now() > '2000-01-01'", ("x", "y"))
SLEEP = Prepared(b"test_sleep", b"SELECT 1 FROM pg_sleep($1)", ("seconds",))


async def _prepared_names(conn: _pg.Connection) -> list[str]:
    cur = await conn.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'test_%%'")
    return sorted(row[0] for row in await cur.fetchall())


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
    # trioban/_pg/_driver.py drives these undocumented parts; an upgrade that moves them fails here.
    assert psycopg.__version__.startswith("3.3.")
    conn_type = psycopg.AsyncConnection
    for name in ("wait", "_connect_gen", "_cancel_gen", "_get_connection_params", "cancel"):
        assert callable(getattr(conn_type, name)), name
    # notifies(timeout=...) passes its deadline to wait() as timeout (psycopg 3.3.6 on).
    assert "timeout" in inspect.signature(conn_type.wait).parameters
    assert hasattr(psycopg.errors, "_WaitTimeout")
    assert callable(psycopg.errors.error_from_result)
    assert callable(generators.execute)
    assert callable(Transformer.set_pgresult)
    assert callable(Transformer.load_rows)
    from psycopg._conninfo_attempts import conninfo_attempts
    from psycopg._enums import Ready, Wait

    assert callable(conninfo_attempts)
    assert (int(Wait.R), int(Wait.W), int(Ready.R)) == (1, 2, 1)
    # Connection.transaction() re-implements psycopg's block with the same parameters.
    ours = inspect.signature(_pg.Connection.transaction).parameters
    assert list(ours) == list(inspect.signature(conn_type.transaction).parameters)
    assert psycopg.AsyncTransaction.Status.ACTIVE  # its .status, set as it is entered


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


async def test_a_connection_cancelled_mid_transaction_comes_back_clean(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The cancelled block's rollback still runs (shielded), so the pool keeps the connection
    rather than throwing it away with a warning."""
    async with _pg.open_pool(dsn, size=1) as pool:
        async with pool.connection() as conn:
            await conn.execute("CREATE TABLE t (x int)")
            pid = conn.pgconn.backend_pid
        with trio.move_on_after(0.2):
            async with pool.connection() as conn, conn.transaction():
                await conn.execute("INSERT INTO t VALUES (1)")
                await conn.execute("SET LOCAL statement_timeout = 12345")
                await conn.execute("SELECT pg_sleep(10)")
        async with pool.connection() as conn:
            assert conn.pgconn.backend_pid == pid
            assert "rollback on return failed" not in caplog.text
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
        release = trio.Event()

        async def hold_both(task_status: trio.TaskStatus[None]) -> None:
            async with pool.connection(), pool.connection():
                task_status.started()
                await release.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(hold_both)
            with trio.move_on_after(0.1) as scope:
                async with pool.connection():
                    pytest.fail("a third checkout must wait")
            assert scope.cancelled_caught
            release.set()
        stats = pool.statistics()
        assert (stats.in_use, stats.waiting) == (0, 0)
        assert stats.idle <= 2


async def _terminate(dsn: str, pid: int) -> None:
    killer = await _pg.connect(dsn)
    try:  # waits (up to 5 s) until the backend has gone
        await killer.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
    finally:
        await killer.close()


async def test_broken_connections_are_replaced(dsn: str) -> None:
    """An idle connection the server closed is replaced at checkout, unnoticed; one that breaks
    while in use fails that use, and is replaced too."""
    async with _pg.open_pool(dsn, size=1) as pool:
        async with pool.connection() as conn:
            pid = conn.pgconn.backend_pid
        await _terminate(dsn, pid)
        async with pool.connection() as conn:
            assert conn.pgconn.backend_pid != pid
            pid = conn.pgconn.backend_pid
            await _terminate(dsn, pid)
            with pytest.raises(psycopg.OperationalError):
                await conn.execute("SELECT 1")
        async with pool.connection() as conn:
            assert conn.pgconn.backend_pid != pid
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
        assert pool.statistics().idle == 1


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


async def test_unreachable_server_raises_database_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Each checkout retries for about 3 s, then fails on its own: the failed one gave its
    slot back (size 1)."""
    async with _pg.open_pool("postgresql://nobody@127.0.0.1:1/x", size=1) as pool:
        for _ in range(2):
            start = trio.current_time()
            with pytest.raises(_pg.DatabaseUnavailable, match="cannot connect"):
                async with pool.connection():
                    pass
            assert 2 < trio.current_time() - start < 5
        assert pool.statistics() == _pg.PoolStatistics(size=1, idle=0, in_use=0, waiting=0)


async def test_a_task_holding_every_connection_is_told_at_once(dsn: str) -> None:
    """Asking for another connection while holding them all would wait for itself forever."""
    async with _pg.open_pool(dsn, size=1) as pool, pool.connection() as held:
        with trio.fail_after(1), pytest.raises(trioban.TriobanError, match="already holds all 1"):
            async with pool.connection():
                pass
        cur = await held.execute("SELECT 1")  # the held one still works
        assert await cur.fetchone() == (1,)
    assert pool.statistics() == _pg.PoolStatistics(size=1, idle=0, in_use=0, waiting=0)


async def test_a_checkout_waits_a_bounded_time_for_a_busy_pool(dsn: str) -> None:
    async with _pg.open_pool(dsn, size=1, checkout_timeout=0.3) as pool:
        release = trio.Event()

        async def hold(task_status: trio.TaskStatus[None]) -> None:
            async with pool.connection():
                task_status.started()
                await release.wait()

        async with trio.open_nursery() as nursery:
            await nursery.start(hold)
            start = trio.current_time()
            with pytest.raises(trioban.PoolTimeout, match="all 1 are in use"):
                async with pool.connection():
                    pass
            assert 0.3 <= trio.current_time() - start < 2
            assert _pg.transient(trioban.PoolTimeout("x"))  # retried, never taken as bad data
            release.set()
        async with pool.connection() as conn:  # the slot came back
            cur = await conn.execute("SELECT 1")
            assert await cur.fetchone() == (1,)


async def test_connecting_to_a_silent_server_gives_up_after_the_default_timeout(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that takes the TCP connection but never answers (as when packets are dropped
    on the way) fails the connect after CONNECT_TIMEOUT, not libpq's minutes."""
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever answers
        port = silent.getsockname()[1]
        start = trio.current_time()
        said = rf"no answer from 127\.0\.0\.1:{port} within 10s \(connect_timeout\)"
        with pytest.raises(psycopg.OperationalError, match=said):
            await _pg.connect(f"postgresql://nobody@127.0.0.1:{port}/x")
        assert trio.current_time() - start == pytest.approx(_pg.CONNECT_TIMEOUT, abs=1)
        start = trio.current_time()
        with pytest.raises(psycopg.OperationalError):  # the DSN's own setting wins
            await _pg.connect(f"postgresql://nobody@127.0.0.1:{port}/x?connect_timeout=3")
        assert trio.current_time() - start == pytest.approx(3, abs=1)
        # A checkout starts no try after 4 s: four of 1 s, not seven.
        start = trio.current_time()
        silent_dsn = f"postgresql://nobody@127.0.0.1:{port}/x?connect_timeout=1"
        async with _pg.open_pool(silent_dsn, size=1) as pool:
            with pytest.raises(_pg.DatabaseUnavailable, match="no answer"):
                async with pool.connection():
                    pass
        assert trio.current_time() - start == pytest.approx(4.4, abs=0.5)


def test_with_options_keeps_existing_options() -> None:
    dsn = "postgresql://u@h/db?options=-c%20search_path%3Dx"
    params = psycopg.conninfo.conninfo_to_dict(_pg.with_options(dsn, synchronous_commit="off"))
    assert params["options"] == "-c search_path=x -c synchronous_commit=off"


@pytest.mark.parametrize("options", ["-c jit=on", "-cjit=on", "--jit=on"])
def test_with_options_leaves_a_setting_the_dsn_names(options: str) -> None:
    dsn = make_conninfo("", host="h", options=f"{options} -c work_mem=4MB")
    settings = {"jit": "off", "synchronous_commit": "off"}
    params = psycopg.conninfo.conninfo_to_dict(_pg.with_options(dsn, **settings))
    assert params["options"] == f"{options} -c work_mem=4MB -c synchronous_commit=off"


async def test_trioban_connections_run_without_jit(dsn: str) -> None:
    async with trioban.open(trioban.Config(dsn=dsn, queues={"default": 1})) as oban:
        for pool in (oban._pool, oban._work_pool):
            async with pool.connection() as conn:
                cur = await conn.execute("SHOW jit")
                assert await cur.fetchone() == ("off",)


def test_prepared_statements_number_their_parameters() -> None:
    fetch = prepared("fetch_jobs", "public")
    assert fetch.params == ("queue", "demand", "node", "producer")
    assert b"%(" not in fetch.sql
    assert b"--" not in fetch.sql
    assert b"LIMIT $2" in fetch.sql
    assert b"ARRAY[$3::text, $4::text]" in fetch.sql
    other = prepared("fetch_jobs", "other")
    assert other.name != fetch.name
    assert b'"other".oban_jobs' in other.sql
    assert len(fetch.name) < 64  # PostgreSQL's identifier limit


async def test_run_prepares_once_and_returns_psycopg_rows(dsn: str) -> None:
    with trio.fail_after(10):
        conn = await _pg.connect(dsn)
        try:
            assert await conn.run(ADD, {"x": 41, "y": None}) == [(42, None, True)]
            assert await conn.run(ADD, {"x": "1", "y": "tab\tquote'"}) == [(2, "tab\tquote'", True)]
            assert await _prepared_names(conn) == ["test_add"]
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                await conn.run(ADD, {"x": "not a number", "y": None})
            with pytest.raises(KeyError):
                await conn.run(ADD, {"x": 1})
            await conn.execute("DEALLOCATE ALL")  # outside a transaction: prepared again
            assert await conn.run(ADD, {"x": 0, "y": "a"}) == [(1, "a", True)]
            async with conn.transaction():
                assert await conn.run(ADD, {"x": 1, "y": "b"}) == [(2, "b", True)]
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
        finally:
            await conn.close()


JSON_VALUES = ["{}", '{"a": [1, 2.5, null, true, "\u00e9\\n"]}', "[]", "null", '"s"', "-0.5e3"]


async def test_json_columns_decode_as_json_loads_does(dsn: str) -> None:
    """trioban's connections decode json and jsonb with their own loads (a fast path for
    ``{}``): the values are json.loads's, and each ``{}`` is a dict of its own."""
    statement = "SELECT %s::jsonb, %s::json"
    with trio.fail_after(10):
        conn = await _pg.connect(dsn)
        try:
            for text in JSON_VALUES:
                cur = await conn.execute(statement, [text, text])
                assert await cur.fetchone() == (json.loads(text), json.loads(text))
            cur = await conn.execute("SELECT '{}'::jsonb FROM generate_series(1, 2)")
            first, second = (row[0] for row in await cur.fetchall())
            first["changed"] = True
            assert second == {}
        finally:
            await conn.close()


async def test_cancelling_run_cancels_it_on_the_server(dsn: str) -> None:
    with trio.fail_after(10):
        conn = await _pg.connect(dsn)
        try:
            with trio.move_on_after(0.3):
                await conn.run(SLEEP, {"seconds": 10})
            assert await _active_queries(dsn, "SELECT 1 FROM pg_sleep($1)") == 0
            assert await conn.run(SLEEP, {"seconds": 0}) == [(1,)]
        finally:
            await conn.close()


async def test_an_interrupted_prepare_is_checked_before_preparing_again(dsn: str) -> None:
    """Preparing reads the table's definition, so it waits behind an exclusive lock; cancelled
    there, it may or may not exist on the server: the next run looks before preparing."""
    count = Prepared(b"test_count", b"SELECT count(*) FROM locked", ())
    with trio.fail_after(10):
        conn = await _pg.connect(dsn)
        locker = await _pg.connect(dsn)
        try:
            await conn.execute("CREATE TABLE locked (x int)")
            async with locker.transaction():
                await locker.execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
                with trio.move_on_after(0.3) as scope:
                    await conn.run(count, {})
                assert scope.cancelled_caught
            assert await _prepared_names(conn) == []
            assert await conn.run(count, {}) == [(0,)]
            assert await conn.run(count, {}) == [(0,)]
            assert await _prepared_names(conn) == ["test_count"]
        finally:
            await locker.close()
            await conn.close()


async def test_at_the_server_connection_limit_the_pool_shares_what_it_has(dsn: str) -> None:
    """A role limited to 2 connections, a pool of 4, 4 tasks: the tasks that can't connect
    take the connections the others return, rather than fail with idle ones in the pool."""
    async with await _pg.connect(dsn) as admin:
        await admin.execute("DROP ROLE IF EXISTS limited")
        await admin.execute("CREATE ROLE limited LOGIN CONNECTION LIMIT 2")
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    limited = make_conninfo("", **{**params, "user": "limited"})
    done: list[int] = []
    with trio.fail_after(10):
        async with _pg.open_pool(limited, size=4) as pool:

            async def use(n: int) -> None:
                async with pool.connection() as conn:
                    await conn.execute("SELECT pg_sleep(0.3)")
                done.append(n)

            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(use, n)
    assert sorted(done) == [0, 1, 2, 3]


async def test_connections_get_tcp_keepalives_unless_the_dsn_sets_them(dsn: str) -> None:
    """A server gone without a word (a half-open TCP connection) is noticed in about a minute,
    not the system's two hours: the notifier's connection waits in silence."""
    for conninfo, idle in ((dsn, b"30"), (make_conninfo(dsn, keepalives_idle="5"), b"5")):
        conn = await _pg.connect(conninfo)
        try:
            options = {option.keyword: option.val for option in conn.pgconn.info}
        finally:
            await conn.close()
        assert options[b"keepalives_idle"] == idle
        assert options[b"keepalives_interval"] == b"10"
        assert options[b"keepalives_count"] == b"3"
