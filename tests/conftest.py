"""A real PostgreSQL for the suite: a throwaway server (or TRIOBAN_TEST_DSN), and a database per
test, cloned from a template that already has the schema (or reset to it, see _scratch)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from trioban._devserver import ServerError, TempServer, find_binaries, temp_postgres
from trioban._scratch import ScratchDatabases, scratch_databases
from trioban._sql import schema_sql


def pytest_report_header() -> str:
    """Which PostgreSQL the suite runs on (CI runs it on more than one)."""
    if os.environ.get("TRIOBAN_TEST_DSN"):
        return "postgresql: the server at TRIOBAN_TEST_DSN"
    try:
        postgres = find_binaries() / "postgres"
        version = subprocess.run([postgres, "--version"], capture_output=True, text=True)
    except (ServerError, OSError) as exc:  # the server fixture fails on it, as a test error
        return f"postgresql: {exc}"
    return f"postgresql: {version.stdout.strip()} ({postgres.parent})"


class ExistingServer:
    """A server named by TRIOBAN_TEST_DSN, with the same ``dsn(dbname)`` shape."""

    def __init__(self, dsn: str) -> None:
        self._params = conninfo_to_dict(dsn)

    def dsn(self, dbname: str = "postgres") -> str:
        return make_conninfo("", **{**self._params, "dbname": dbname})


@pytest.fixture(scope="session")
def pg_server() -> Iterator[TempServer | ExistingServer]:
    existing = os.environ.get("TRIOBAN_TEST_DSN")
    if existing:
        yield ExistingServer(existing)
        return
    with temp_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def databases(pg_server: TempServer | ExistingServer) -> Iterator[ScratchDatabases]:
    """Databases with the schema in the ``public`` prefix, lent to one test at a time."""
    setup = schema_sql("public").encode()
    with scratch_databases(pg_server.dsn(), stem="suite", setup=setup) as pool:
        yield pool


@pytest.fixture(scope="session")
def empty_databases(pg_server: TempServer | ExistingServer) -> Iterator[ScratchDatabases]:
    """Databases without the schema, lent to one test at a time."""
    with scratch_databases(pg_server.dsn(), stem="suite_empty") as pool:
        yield pool


@pytest.fixture
def dsn(databases: ScratchDatabases) -> Iterator[str]:
    """A database with the trioban schema installed in the ``public`` prefix and no jobs."""
    with databases.lent() as lent:
        yield lent


@pytest.fixture
def empty_dsn(empty_databases: ScratchDatabases) -> Iterator[str]:
    """A database without the schema."""
    with empty_databases.lent() as lent:
        yield lent


pytest_plugins = ["pytester"]
