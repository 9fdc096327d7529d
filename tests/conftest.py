"""A real PostgreSQL for the suite: a throwaway server (or TRIOBAN_TEST_DSN), one database per
test cloned from a template that already has the schema."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from trioban._devserver import ServerError, TempServer, find_binaries, temp_postgres
from trioban._sql import schema_sql

TEMPLATE = "trioban_template"


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


def _admin(server: TempServer | ExistingServer) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(server.dsn("postgres"), autocommit=True)


@pytest.fixture(scope="session")
def template(pg_server: TempServer | ExistingServer) -> Iterator[str]:
    """A database with the schema, cloned for each test; dropped at the end of the session (a
    server at TRIOBAN_TEST_DSN would otherwise keep one per session)."""
    name = f"{TEMPLATE}_{uuid.uuid4().hex[:8]}"
    with _admin(pg_server) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(pg_server.dsn(name), autocommit=True) as conn:
            conn.execute(schema_sql("public").encode())
        yield name
    finally:
        with _admin(pg_server) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _database(server: TempServer | ExistingServer, template: str) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex}"
    with _admin(server) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    try:
        yield server.dsn(name)
    finally:
        with _admin(server) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def dsn(pg_server: TempServer | ExistingServer, template: str) -> Iterator[str]:
    """A fresh database with the trioban schema installed in the ``public`` prefix."""
    yield from _database(pg_server, template)


@pytest.fixture
def empty_dsn(pg_server: TempServer | ExistingServer) -> Iterator[str]:
    """A fresh database without the schema."""
    yield from _database(pg_server, "template1")


pytest_plugins = ["pytester"]
