"""The throwaway server for tests: reachable by its owner only, run with the server user's own
group, never left running by a failed start or a SIGTERM, and a start that fails says why."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from trioban import _devserver
from trioban._devserver import ServerError, TempServer, find_binaries, temp_postgres

from .conftest import ExistingServer

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs another OS user")


@pytest.fixture
def temp_server(pg_server: TempServer | ExistingServer) -> TempServer:
    """The session's throwaway server (these tests check it, not one at TRIOBAN_TEST_DSN)."""
    if not isinstance(pg_server, TempServer):
        pytest.skip("the suite runs on the server at TRIOBAN_TEST_DSN")
    return pg_server


@pytest.fixture
def roots(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The temp dirs of the servers temp_postgres starts in the test."""
    made: list[Path] = []
    private_dir = _devserver._private_dir

    def recorded(os_user: str | None) -> Path:
        made.append(private_dir(os_user))
        return made[-1]

    monkeypatch.setattr(_devserver, "_private_dir", recorded)
    return made


def _postmasters(root: Path) -> list[int]:
    """The PIDs of processes running on ``root``'s data directory."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if f" {root}/data ".encode() in command:
            found.append(int(proc.name))
    return found


@pytest.fixture
def no_postmaster_left(roots: list[Path]) -> Iterator[None]:
    """Checks that no server of the test's is left running (and kills one that is)."""
    yield
    leaked = [pid for root in roots for pid in _postmasters(root)]
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, "a postmaster was left running"
    assert not any(root.exists() for root in roots), "a temp dir was left behind"


def test_it_listens_only_on_a_unix_socket_in_a_private_directory(temp_server: TempServer) -> None:
    with psycopg.connect(temp_server.dsn()) as conn:
        settings = conn.execute(
            "SELECT current_setting('listen_addresses'), current_setting('unix_socket_directories')"
        ).fetchone()
    assert settings == ("", f'"{temp_server.root}"')  # no TCP at all
    found = temp_server.root.stat()
    assert found.st_mode & 0o777 == 0o700
    os_user = temp_server.os_user
    assert found.st_uid == (os.geteuid() if os_user is None else pwd.getpwnam(os_user).pw_uid)


@as_root
def test_another_os_user_cannot_connect(temp_server: TempServer) -> None:
    """Its superuser logs in without a password: nobody but its owner (and root) may reach it."""
    psql = temp_server.bindir / "psql"
    if not psql.exists():
        pytest.skip(f"no psql in {temp_server.bindir}")
    tried = subprocess.run(
        [str(psql), temp_server.dsn(), "-Atc", "SELECT 1"],
        user="nobody",
        group="nogroup",
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        check=False,
    )
    assert tried.returncode != 0, tried.stdout
    assert "Permission denied" in tried.stderr


@as_root
def test_as_root_the_server_runs_with_its_users_group_only(temp_server: TempServer) -> None:
    assert temp_server.os_user is not None
    entry = pwd.getpwnam(temp_server.os_user)
    postmaster = (temp_server.datadir / "postmaster.pid").read_text().split()[0]
    with psycopg.connect(temp_server.dsn()) as conn:  # its backend ends with it: read it now
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        statuses = [_proc_status(pid) for pid in (postmaster, backend[0])]
    for status in statuses:
        assert status["Uid"].split() == [str(entry.pw_uid)] * 4
        assert status["Gid"].split() == [str(entry.pw_gid)] * 4  # not root's 0
        assert status["Groups"].split() == []


def _proc_status(pid: object) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines)


def test_an_inherited_pgsslmode_require_does_not_break_it(
    temp_server: TempServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSSLMODE", "require")  # libpq ignores it on a unix socket
    with psycopg.connect(temp_server.dsn(), connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.usefixtures("no_postmaster_left")
def test_a_start_that_fails_shows_the_server_log(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = TempServer._settings
    monkeypatch.setattr(TempServer, "_settings", lambda self: {**settings(self), "port": "x"})
    with pytest.raises(ServerError, match="PostgreSQL did not start") as caught, temp_postgres():
        pass
    assert 'invalid value for parameter "port"' in caught.value.log_tail
    assert caught.value.log_tail in str(caught.value)  # the log itself is removed with the server


@pytest.mark.usefixtures("no_postmaster_left")
def test_a_server_that_starts_but_refuses_the_check_is_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dsn = TempServer.dsn
    monkeypatch.setattr(TempServer, "dsn", lambda self, dbname="postgres": dsn(self, "nowhere"))
    monkeypatch.setattr(_devserver, "_CONNECT_TIMEOUT", 0.5)
    with pytest.raises(ServerError, match="did not accept connections") as caught, temp_postgres():
        pass
    assert 'database "nowhere" does not exist' in str(caught.value)


def test_a_pg_bin_without_postgresql_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOBAN_PG_BIN", str(tmp_path))  # e.g. /usr/lib/postgresql/16 (no /bin)
    with pytest.raises(ServerError, match="has no initdb, pg_ctl, postgres: set it to the bin"):
        find_binaries()


_KILLED_SESSION = """
import os
from pathlib import Path

import trio
from psycopg.conninfo import conninfo_to_dict


async def test_waits(trioban_dsn):
    Path(os.environ["SERVER_DIR_FILE"]).write_text(conninfo_to_dict(trioban_dsn)["host"])
    await trio.sleep(60)
"""


@pytest.mark.timeout(60)
def test_a_pytest_session_stopped_by_sigterm_stops_its_server(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    """A CI timeout's SIGTERM interrupts the session as Ctrl-C would: pytest tears the
    fixtures down, so the server stops and its temp dir goes."""
    pytester.makeconftest('pytest_plugins = ["trioban.testing"]\n')
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_killed=_KILLED_SESSION)
    told = tmp_path / "server-dir"
    env = {k: v for k, v in os.environ.items() if k != "TRIOBAN_TEST_DSN"}
    session = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=pytester.path,
        env={**env, "SERVER_DIR_FILE": str(told)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not told.exists() and session.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert told.exists(), "the session never ran its test"
        root = Path(told.read_text())
        session.send_signal(signal.SIGTERM)
        output, _ = session.communicate(timeout=30)
    finally:
        session.kill()
        session.wait()
    leaked, left = _postmasters(root), root.exists()
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    assert "KeyboardInterrupt" in output
    assert not leaked, output
    assert not left, output
