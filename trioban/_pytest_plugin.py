"""The pytest fixtures of ``trioban.testing``, in their own module so that the testing
helpers import without pytest (not a dependency of trioban).

pytest loads this module when a project enables ``trioban.testing`` as a plugin (its
``pytest_plugins`` names this one).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest

from ._config import Config
from ._devserver import temp_postgres
from ._instance import Oban
from ._open import open
from ._scratch import ScratchDatabases, scratch_databases
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
def _trioban_databases(trioban_server_dsn: str) -> Iterator[ScratchDatabases]:
    """Databases with the schema, lent to one test at a time; all dropped at the end of the
    session (a long-lived server at ``TRIOBAN_TEST_DSN`` would otherwise keep them)."""
    setup = schema_sql("public").encode()
    with scratch_databases(trioban_server_dsn, stem="trioban", setup=setup) as databases:
        yield databases


@pytest.fixture
def trioban_dsn(_trioban_databases: ScratchDatabases) -> Iterator[str]:
    """A database with the trioban schema and no jobs, for this test alone."""
    with _trioban_databases.lent() as dsn:
        yield dsn


@pytest.fixture
async def oban(trioban_dsn: str) -> AsyncIterator[Oban]:
    """An instance on ``trioban_dsn`` in the manual testing mode (no queue runs)."""
    async with open(Config(dsn=trioban_dsn, testing="manual")) as instance:
        yield instance
