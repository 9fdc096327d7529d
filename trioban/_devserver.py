"""A throwaway PostgreSQL server for tests and benchmarks.

It finds PostgreSQL's binaries (installing Debian's package when running as root on a machine
without them), initialises a private data directory in a fresh temp dir, and runs the server
on a unix socket in that dir only (mode 0700): its superuser logs in without a password, so
only the dir's owner may reach it, never other local users over TCP. PostgreSQL refuses to run
as root: as root, the server runs as the ``postgres`` user, or a system user ``trioban-pg``
created for it, with that user's group only (not root's). Nothing outside the temp dir has its
ownership or permissions changed.

While it runs in the main thread, SIGTERM (a CI timeout) stops it cleanly: see
``_terminate_as_interrupt``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

import attrs
import psycopg

from ._errors import TriobanError

_START_TIMEOUT = 60  # for pg_ctl start, which waits until the server accepts connections
_CONNECT_TIMEOUT = 10.0  # for the check that follows it, through the DSN handed out
_LOG_LINES = 20  # of the server's log, in a start failure's message
_PROGRAMS = ("initdb", "pg_ctl", "postgres")
# A unix socket's path is at most sizeof(sockaddr_un.sun_path) - 1 bytes.
_SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107
_SOCKET_NAME = "/.s.PGSQL.65535"  # the longest name PostgreSQL gives its socket


class ServerError(TriobanError):
    """Raised when a throwaway or embedded PostgreSQL server can't be found, installed or started.

    ``log`` is the server's log file when it failed to start, and ``log_tail`` the last lines
    that start wrote there (a throwaway server's log is gone once its temp dir is removed).
    """

    def __init__(self, message: str, *, log: Path | None = None, log_tail: str = "") -> None:
        if log is not None:
            message += f"\nthe server log {log} ends:\n{log_tail}" if log_tail else f" (log: {log})"
        super().__init__(message)
        self.log = log
        self.log_tail = log_tail


def _say(message: str) -> None:
    print(f"trioban: {message}", file=sys.stderr, flush=True)


def _search() -> Path | None:
    explicit = os.environ.get("TRIOBAN_PG_BIN")
    if explicit:
        missing = [name for name in _PROGRAMS if not (Path(explicit) / name).exists()]
        if missing:
            raise ServerError(
                f"TRIOBAN_PG_BIN is {explicit}, which has no {', '.join(missing)}: set it to "
                "the bin directory of a PostgreSQL installation (the one holding initdb, pg_ctl "
                "and postgres, e.g. /usr/lib/postgresql/16/bin), or unset it to search the usual "
                "places"
            )
        return Path(explicit)
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found and (Path(found) / "initdb").exists():
            return Path(found)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
    )
    for candidate in reversed(candidates):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


def _apt_install() -> None:
    _say("PostgreSQL binaries not found; installing Debian's postgresql package with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def find_binaries() -> Path:
    """The directory holding ``initdb`` and ``postgres``, installing them if needed and able."""
    found = _search()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install()
        found = _search()
    if found is None:
        raise ServerError(
            "no PostgreSQL binaries found: install PostgreSQL (e.g. `apt-get install "
            "postgresql`), set TRIOBAN_PG_BIN to its bin directory, or point "
            "TRIOBAN_TEST_DSN at a running server"
        )
    return found


def _server_user() -> str | None:
    """The unprivileged user to run the server as, or None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        pass
    try:
        pwd.getpwnam("trioban-pg")
    except KeyError:
        _say("running as root: creating system user 'trioban-pg' to run PostgreSQL")
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             "trioban-pg"],
            check=True,
        )  # fmt: skip
    return "trioban-pg"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_user(os_user: str | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a program as ``os_user`` (None: as this process): its
    uid and primary group, and no supplementary groups. ``user=`` alone would keep root's gid
    and groups, letting the server read root's group-readable files."""
    if os_user is None:
        return {}
    entry = pwd.getpwnam(os_user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _run_pg(
    bindir: Path, os_user: str | None, args: list[str], *, cwd: Path, env: dict[str, str] | None
) -> subprocess.CompletedProcess[str]:
    """Run one of PostgreSQL's programs, as ``os_user`` when running as root."""
    return subprocess.run(
        [str(bindir / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
        **_as_user(os_user),
    )


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stderr or result.stdout).strip()[-2000:]


def _pg_options(settings: dict[str, str]) -> str:
    """Settings for ``pg_ctl -o``, which hands them to the server through /bin/sh."""
    return " ".join(f"-c {name}={shlex.quote(value)}" for name, value in settings.items())


def _log_size(log: Path) -> int:
    try:
        return log.stat().st_size
    except OSError:
        return 0


def _start_failure(message: str, log: Path, offset: int) -> ServerError:
    """A ServerError for a start that failed, with the last lines ``log`` got past ``offset``."""
    try:
        with log.open("rb") as file:
            file.seek(max(offset, _log_size(log) - 64 * 1024))
            text = file.read().decode(errors="replace")
    except OSError:
        text = ""
    return ServerError(message, log=log, log_tail="\n".join(text.splitlines()[-_LOG_LINES:]))


@attrs.define
class TempServer:
    """A running throwaway server; ``dsn(dbname)`` connects to one of its databases.

    It listens on a unix socket in ``root`` only: ``port`` just names the socket.
    """

    bindir: Path
    root: Path
    port: int
    os_user: str | None
    durable: bool
    user: str = "postgres"

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def host(self) -> str:
        """The socket's directory, which libpq takes as the host."""
        return str(self.root)

    def dsn(self, dbname: str = "postgres") -> str:
        # No sslmode: libpq ignores it on a unix socket, so an inherited PGSSLMODE=require
        # is harmless (sslmode=disable would clash with PGSSLNEGOTIATION=direct). The path is
        # percent-encoded: TMPDIR may hold spaces or '&'.
        host = quote(self.host, safe="/")
        return f"postgresql://{self.user}@/{dbname}?host={host}&port={self.port}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = _run_pg(self.bindir, self.os_user, list(args), cwd=self.root, env=None)
        if check and result.returncode != 0:
            raise ServerError(f"{args[0]} failed: {_output(result)}")
        return result

    def _settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": "",
            "port": str(self.port),
            "unix_socket_directories": '"' + self.host.replace('"', '""') + '"',
            "unix_socket_permissions": "0700",  # as its directory
            "max_connections": "300",
            "shared_buffers": "128MB",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        return settings

    def start(self) -> None:
        """Start the server and wait until it accepts connections (ServerError if it won't).
        A server that started but fails the check (or a pg_ctl that gave up waiting on one
        still starting) is stopped again: nothing is left running on a failure."""
        log = self.root / "server.log"
        offset = _log_size(log)
        options = _pg_options(self._settings())
        try:
            result = self._run(
                "pg_ctl", "-D", str(self.datadir), "-l", str(log), "-o", options, "-w",
                "-t", str(_START_TIMEOUT), "start", check=False,
            )  # fmt: skip
            if result.returncode != 0:
                raise _start_failure(f"PostgreSQL did not start: {_output(result)}", log, offset)
            self._wait_connectable(log, offset)
        except BaseException:
            self.stop("immediate")  # on a KeyboardInterrupt too; a no-op without a server
            raise

    def _wait_connectable(self, log: Path, offset: int) -> None:
        deadline = time.monotonic() + _CONNECT_TIMEOUT
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    message = f"PostgreSQL did not accept connections at {self.dsn()}: {exc}"
                    raise _start_failure(message, log, offset) from None
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate)."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "immediate") -> None:
        """Stop the server abruptly (by default) and start it again."""
        self.stop(mode)
        self.start()


@contextlib.contextmanager
def temp_postgres(*, durable: bool = False) -> Iterator[TempServer]:
    """Run a throwaway server for the duration of the block, then remove every trace of it.

    ``durable=False`` (tests) turns off fsync; benchmarks pass ``durable=True`` to keep
    PostgreSQL's default durability.
    """
    bindir = find_binaries()
    os_user = _server_user()
    with _terminate_as_interrupt():
        root = _private_dir(os_user)
        try:
            # Any number would do (the socket's dir is private): a free one tells servers apart.
            server = TempServer(bindir, root, _free_port(), os_user, durable)
            server._run(
                "initdb", "-D", str(server.datadir), "-U", "postgres", "--auth-local", "trust",
                "--auth-host", "reject", "--no-sync", "-E", "UTF8",
            )  # fmt: skip
            server.start()
            try:
                yield server
            finally:
                server.stop("immediate")
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _private_dir(os_user: str | None) -> Path:
    """A fresh temp dir, of the server's user and mode 0700: its socket goes there."""
    longest = len(os.fsencode(tempfile.gettempdir())) + len("/trioban-pg-12345678" + _SOCKET_NAME)
    if longest > _SOCKET_PATH_MAX:
        raise ServerError(
            f"the temp directory {tempfile.gettempdir()} is too long a path for the throwaway "
            "PostgreSQL's unix socket: set TMPDIR to a shorter one (e.g. /tmp)"
        )
    root = Path(tempfile.mkdtemp(prefix="trioban-pg-"))  # mode 0700
    if os_user is not None:
        entry = pwd.getpwnam(os_user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    return root


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (a CI timeout, a supervisor) interrupts like Ctrl-C, so the
    ``finally`` clauses run: pytest tears its fixtures down on a KeyboardInterrupt, stopping
    the server and removing its temp dir, where the default SIGTERM would leave both. Only in
    the main thread and when SIGTERM has no handler already; a second SIGTERM kills at once."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        on_interrupt = signal.getsignal(signal.SIGINT)
        if not callable(on_interrupt):
            raise KeyboardInterrupt
        # Within trio.run this is Trio's handler, which raises only where it is safe to.
        on_interrupt(signal.SIGINT, frame)

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is interrupt:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
