"""The test databases of the pytest plugin and the suite: reset and lent again when a test left
only rows behind, dropped when it changed anything else."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from trioban._devserver import TempServer
from trioban._scratch import ScratchDatabases, scratch_databases
from trioban._sql import schema_sql

from .conftest import ExistingServer


@pytest.fixture
def pool(pg_server: TempServer | ExistingServer) -> Iterator[ScratchDatabases]:
    setup = schema_sql("public").encode()
    with scratch_databases(pg_server.dsn(), stem="scratch", setup=setup) as databases:
        yield databases


def _databases(server: TempServer | ExistingServer) -> set[str]:
    with psycopg.connect(server.dsn()) as conn:
        rows = conn.execute(r"SELECT datname FROM pg_database WHERE datname LIKE 'scratch\_%'")
        return {str(name) for (name,) in rows.fetchall()}


def _insert_jobs(dsn: str, count: int) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO oban_jobs (worker, queue, args)"
            " SELECT 'w', 'q', '{}' FROM generate_series(1, %s) RETURNING id",
            (count,),
        )
        return [int(str(id_)) for (id_,) in rows.fetchall()]


def _count(dsn: str, query: str) -> object:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return row[0]


def test_a_database_left_with_rows_only_is_reset_and_lent_again(pool: ScratchDatabases) -> None:
    first = pool.take()
    assert _insert_jobs(first, 3) == [1, 2, 3]
    version = _count(first, "SELECT version FROM trioban_schema")
    pool.give_back(first)
    again = pool.take()
    assert again == first
    assert pool.clones == 1
    assert _count(again, "SELECT count(*) FROM oban_jobs") == 0
    assert _insert_jobs(again, 1) == [1]  # the ids start over
    assert _count(again, "SELECT version FROM trioban_schema") == version  # the template's rows


_ON_DATABASE = "DO $$BEGIN EXECUTE format('{}', current_database()); END$$"
_ALTER_DATABASE = _ON_DATABASE.replace("{}", "ALTER DATABASE %I {}")


@pytest.mark.parametrize(
    "change",
    [
        "CREATE TABLE extra (id int)",
        "CREATE SCHEMA extra",
        "ALTER TABLE oban_jobs ADD COLUMN extra int",
        "ALTER TABLE oban_jobs ALTER COLUMN queue SET DEFAULT 'x'",
        "CREATE FUNCTION extra() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "CREATE INDEX extra ON oban_jobs (queue)",
        "DROP TABLE trioban_producers",
        "CREATE TEMP TABLE extra (id int)",
        _ALTER_DATABASE.format("SET work_mem = ''8MB''"),
        _ALTER_DATABASE.format("CONNECTION LIMIT 5"),
        "COMMENT ON TABLE oban_jobs IS 'left'",
        "SELECT lo_from_bytea(0, 'left')",
        "CREATE ROLE scratch_leaky; GRANT SELECT ON oban_jobs TO scratch_leaky",
        _ON_DATABASE.format("COMMENT ON DATABASE %I IS ''left''"),
        "CREATE ROLE scratch_leaky; "
        + _ON_DATABASE.format("GRANT CREATE ON DATABASE %I TO scratch_leaky"),
    ],
)
def test_a_database_whose_schema_changed_is_dropped(
    pool: ScratchDatabases, pg_server: TempServer | ExistingServer, change: str
) -> None:
    first = pool.take()
    try:
        with psycopg.connect(first, autocommit=True) as conn:
            conn.execute(change)
        pool.give_back(first)
        assert _databases(pg_server) == {pool.template}
        assert pool.take() != first
        assert pool.clones == 2
    finally:
        with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
            admin.execute("DROP ROLE IF EXISTS scratch_leaky")


def test_planner_statistics_a_test_wrote_are_cleared(pool: ScratchDatabases) -> None:
    first = pool.take()
    _insert_jobs(first, 100)
    with psycopg.connect(first, autocommit=True) as conn:
        conn.execute("ANALYZE oban_jobs")
    stats = "SELECT count(*) FROM pg_stats WHERE tablename = 'oban_jobs'"
    assert _count(first, stats) != 0
    pool.give_back(first)
    assert pool.take() == first
    assert _count(first, stats) == 0


def test_a_database_that_grew_is_dropped(
    pool: ScratchDatabases, pg_server: TempServer | ExistingServer
) -> None:
    first = pool.take()
    _insert_jobs(first, 5_000)
    pool.give_back(first)
    assert _databases(pg_server) == {pool.template}


def test_a_database_whose_connections_stay_open_is_dropped(
    pool: ScratchDatabases, pg_server: TempServer | ExistingServer
) -> None:
    """They are ended; a process the test left running might connect again, so the database
    isn't lent again."""
    first = pool.take()
    with psycopg.connect(first, autocommit=True) as left_open:
        left_open.execute("SELECT pg_advisory_lock(1)")
        pool.give_back(first)
        with pytest.raises(psycopg.OperationalError):
            left_open.execute("SELECT 1")
    assert _databases(pg_server) == {pool.template}


def test_a_database_the_test_renamed_is_dropped_all_the_same(
    pool: ScratchDatabases, pg_server: TempServer | ExistingServer
) -> None:
    first = pool.take()
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        name = conninfo_to_dict(first)["dbname"]
        admin.execute(f'ALTER DATABASE "{name}" RENAME TO scratch_renamed')
    pool.give_back(first)
    assert _databases(pg_server) == {pool.template}


def test_the_pool_and_its_template_are_dropped_on_exit(
    pg_server: TempServer | ExistingServer,
) -> None:
    with scratch_databases(pg_server.dsn(), stem="scratch") as databases:
        lent = databases.take()
        databases.give_back(databases.take())
        assert len(_databases(pg_server)) == 3  # the template, one lent, one pooled
        databases.give_back(lent)
    assert _databases(pg_server) == set()
