"""The pytest fixtures of ``trioban.testing``, in their own module so that the testing
helpers import without pytest (not a dependency of trioban).

pytest loads this module when a project enables ``trioban.testing`` as a plugin (its
``pytest_plugins`` names this one).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ._config import Config
from ._devserver import temp_postgres
from ._instance import Oban
from ._open import open
from ._sql import schema_sql


@pytest.fixture(scope="session")
def trioban_server_dsn() -> Iterator[str]:
    """A PostgreSQL server for the session: ``TRIOBAN_TEST_DSN``, else a throwaway one."""
    existing = os.environ.get("TRIOBAN_TEST_DSN")
    if existing:
        yield existing
        return
    with temp_postgres() as server:
        yield server.dsn()


@pytest.fixture(scope="session")
def _trioban_template(trioban_server_dsn: str) -> Iterator[str]:
    """A database with the schema, cloned for each test; dropped at the end of the session
    (a long-lived server at ``TRIOBAN_TEST_DSN`` would otherwise keep one per session)."""
    name = f"trioban_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(trioban_server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with psycopg.connect(_with_db(trioban_server_dsn, name), autocommit=True) as conn:
            conn.execute(schema_sql("public").encode())
        yield name
    finally:
        with psycopg.connect(trioban_server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def trioban_dsn(trioban_server_dsn: str, _trioban_template: str) -> Iterator[str]:
    """A fresh database with the trioban schema, dropped after the test."""
    name = f"trioban_t_{uuid.uuid4().hex}"
    with psycopg.connect(trioban_server_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(_trioban_template)
            )
        )
    try:
        yield _with_db(trioban_server_dsn, name)
    finally:
        with psycopg.connect(trioban_server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
async def oban(trioban_dsn: str) -> AsyncIterator[Oban]:
    """An instance on ``trioban_dsn`` in the manual testing mode (no queue runs)."""
    async with open(Config(dsn=trioban_dsn, testing="manual")) as instance:
        yield instance


def _with_db(dsn: str, dbname: str) -> str:
    return make_conninfo("", **{**conninfo_to_dict(dsn), "dbname": dbname})
