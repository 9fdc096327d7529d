"""The throwaway server for tests: a start that fails says why, and a port taken meanwhile is
replaced."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest

from trioban import _devserver
from trioban._devserver import ServerError, temp_postgres


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port that another process listens on."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        yield int(squatter.getsockname()[1])


def test_a_port_taken_after_it_was_picked_is_replaced(
    taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks = iter([taken_port])  # taken between the pick and the server's start
    free_port = _devserver._free_port
    monkeypatch.setattr(_devserver, "_free_port", lambda: next(picks, None) or free_port())
    with temp_postgres() as server:
        assert server.port != taken_port
        psycopg.connect(server.dsn()).close()


def test_a_start_that_fails_shows_the_server_log(
    taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_devserver, "_free_port", lambda: taken_port)
    with pytest.raises(ServerError, match="PostgreSQL did not start") as caught, temp_postgres():
        pass
    assert "Address already in use" in caught.value.log_tail
    assert caught.value.log_tail in str(caught.value)  # the log itself is removed with the server
