"""Config(dsn=None): the embedded PostgreSQL, started, reused and stopped by trioban."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio

import trioban
from trioban import _embedded
from trioban._devserver import ServerError, _server_user

from .workers import echo


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Under /var/tmp: as root, the server's user must be able to reach it.
    path = Path("/var/tmp") / f"trioban-embedded-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TRIOBAN_DATA_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)
    path.with_name(f"{path.name}.lock").unlink(missing_ok=True)


# Another process using the embedded server: ready once imported, then attached on a line
# on stdin; it leaves on the next line. It gives up after a minute rather than hang the test.
_USER = """
import faulthandler, sys, time
import psycopg
from trioban._embedded import embedded_server
faulthandler.dump_traceback_later(60, exit=True)
print("ready", flush=True)
sys.stdin.readline()
with embedded_server() as dsn:
    if "--later" in sys.argv:  # like open(): it connects a moment after it joins
        time.sleep(1.5)
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")
    print(dsn, flush=True)
    sys.stdin.readline()
"""


def _user(*args: str) -> subprocess.Popen[str]:
    user = subprocess.Popen(
        [sys.executable, "-c", _USER, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert user.stdout is not None
    assert user.stdout.readline() == "ready\n"
    return user


def _tell(user: subprocess.Popen[str]) -> None:
    assert user.stdin is not None
    user.stdin.write("\n")
    user.stdin.flush()


def _attached(user: subprocess.Popen[str]) -> str:
    """The DSN that ``user`` got, once it ran a query on it."""
    assert user.stdout is not None
    dsn = user.stdout.readline().strip()
    if not dsn:
        _, err = user.communicate(timeout=10)
        pytest.fail(f"the other process failed:\n{err}")
    return dsn


async def test_embedded_server_runs_jobs_and_is_reused(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conf = trioban.Config(dsn=None, queues={"default": 2})
    var_tmp = Path("/var/tmp").stat().st_mode
    with trio.fail_after(120), caplog.at_level(logging.INFO, "trioban.embedded"):
        async with trioban.open(conf) as oban:
            assert await oban.relay(echo.new({"value": "embedded"})) == "embedded"
            async with oban.transaction() as conn:
                await conn.execute("CREATE TABLE kept (x int)")
        assert not (data_dir / "postmaster.pid").exists()  # stopped on exit
        async with trioban.open(conf) as oban, oban.transaction() as conn:
            cur = await conn.execute("SELECT to_regclass('kept') IS NOT NULL")
            assert await cur.fetchone() == (True,)
    assert caplog.text.count("embedded PostgreSQL started") == 2
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    assert mode == 0o700
    if os.geteuid() == 0:
        assert "running as root: the embedded PostgreSQL runs as user" in caplog.text
        assert data_dir.stat().st_uid != 0
        assert Path("/var/tmp").stat().st_mode == var_tmp  # untouched


@pytest.mark.skipif(os.geteuid() != 0, reason="the root-only refusal")
async def test_as_root_a_private_data_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp_path.chmod(0o700)
    monkeypatch.setenv("TRIOBAN_DATA_DIR", str(tmp_path / "pg"))
    with pytest.raises(ServerError, match="cannot reach its data"):
        async with trioban.open(trioban.Config(dsn=None)):
            pass
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700  # left as it was


@pytest.mark.skipif(os.geteuid() != 0, reason="runs as this user when not root")
def test_as_root_the_server_runs_with_its_users_group_only(data_dir: Path) -> None:
    """Not with root's group (0), which would let it read root's group-readable files."""
    os_user = _server_user()
    assert os_user is not None
    entry = pwd.getpwnam(os_user)
    with _embedded.embedded_server():
        pid = (data_dir / "postmaster.pid").read_text().split()[0]
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    assert status["Uid"].split() == [str(entry.pw_uid)] * 4
    assert status["Gid"].split() == [str(entry.pw_gid)] * 4
    assert status["Groups"].split() == []


@pytest.mark.timeout(60)
def test_processes_starting_and_stopping_it_at_once_share_one_server(data_dir: Path) -> None:
    users = [_user(), _user()]
    for user in users:  # both initialise and start the server at once
        _tell(user)
    assert len({_attached(user) for user in users}) == 1
    for user in users:  # and both leave at once
        _tell(user)
    for user in users:
        _, err = user.communicate(timeout=30)
        assert user.returncode == 0, err
    assert not (data_dir / "postmaster.pid").exists()  # the last one out stopped it


@pytest.mark.timeout(60)
def test_a_process_joining_while_the_server_stops_gets_a_running_one(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    joiner = _user("--later")
    others_connected = _embedded._others_connected

    def check_while_joined(dsn: str) -> bool:
        _tell(joiner)  # it joins as this process decides to stop the server
        time.sleep(1)
        return others_connected(dsn)

    monkeypatch.setattr(_embedded, "_others_connected", check_while_joined)
    with _embedded.embedded_server():
        pass
    _attached(joiner)  # it waited for the stop, then started the server again
    _tell(joiner)
    joiner.communicate(timeout=30)
    assert joiner.returncode == 0
    assert not (data_dir / "postmaster.pid").exists()


@pytest.mark.timeout(60)
def test_a_server_left_by_a_killed_process_is_stopped_by_the_next_one_out(
    data_dir: Path,
) -> None:
    owner = _user()
    _tell(owner)
    dsn = _attached(owner)
    owner.kill()
    owner.communicate(timeout=10)
    with _embedded.embedded_server() as joined:
        assert joined == dsn  # the same server, joined
    assert not (data_dir / "postmaster.pid").exists()


def test_a_stale_pid_file_whose_pid_was_reused_is_not_trusted(data_dir: Path) -> None:
    with _embedded.embedded_server():
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    # After a crash or a reboot, the file's PID names another process, here one of the
    # server's user: PostgreSQL itself trusts that and refuses to start.
    other = subprocess.Popen(["sleep", "60"], user=_server_user(), cwd="/")
    try:
        lines[0] = str(other.pid)
        (data_dir / "postmaster.pid").write_text("\n".join(lines) + "\n")
        with _embedded.embedded_server() as dsn, psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert other.poll() is None  # left alone
    finally:
        other.kill()
        other.wait()


def test_a_data_dir_with_odd_characters_and_missing_parents(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = data_dir / "new parent" / 'it\'s $HOME & a "quote"'
    monkeypatch.setenv("TRIOBAN_DATA_DIR", str(odd))
    with _embedded.embedded_server() as dsn, psycopg.connect(dsn) as conn:
        assert conn.execute("SHOW data_directory").fetchone() == (str(odd),)
    if os.geteuid() == 0:  # created open to the server's user
        assert stat.S_IMODE((data_dir / "new parent").stat().st_mode) == 0o755


@pytest.mark.parametrize(
    ("name", "refusal"), [("x" * 80, "too long a path for it"), ("a,b", "has a comma")]
)
def test_a_data_dir_that_cannot_work_is_refused_clearly(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, name: str, refusal: str
) -> None:
    monkeypatch.setenv("TRIOBAN_DATA_DIR", str(data_dir / name))
    with pytest.raises(ServerError, match=refusal), _embedded.embedded_server():
        pass


def test_a_start_failure_shows_the_server_log_and_what_to_do(data_dir: Path) -> None:
    data_dir.mkdir(mode=0o700)
    (data_dir / "PG_VERSION").write_text("15\n")  # an older major's, and a broken one
    with pytest.raises(ServerError) as caught, _embedded.embedded_server():
        pass
    assert caught.value.log == data_dir / "server.log"
    assert "postgresql.conf" in caught.value.log_tail
    message = str(caught.value)
    assert f"{data_dir}/server.log ends:" in message
    assert caught.value.log_tail in message
    assert "holds the data of PostgreSQL 15" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a file of another user")
def test_a_lock_file_of_another_user_is_refused(data_dir: Path) -> None:
    lock = data_dir.with_name(f"{data_dir.name}.lock")
    lock.touch()
    os.chown(lock, 65534, 65534)  # nobody's: it could hold the lock forever
    with pytest.raises(ServerError, match="not a file of yours"), _embedded.embedded_server():
        pass
