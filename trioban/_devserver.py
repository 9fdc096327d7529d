"""A throwaway PostgreSQL server for tests and benchmarks.

It finds PostgreSQL's binaries (installing Debian's package when running as root on a machine
without them), initialises a private data directory in a fresh temp dir, and runs the server on
127.0.0.1 and a free port. PostgreSQL refuses to run as root: as root, the server runs as the
``postgres`` user, or a system user ``trioban-pg`` created for it. Nothing outside the temp dir
has its ownership or permissions changed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import psycopg

from ._errors import TriobanError

_START_TIMEOUT = 60.0
_LOG_LINES = 20  # of the server's log, in a start failure's message
_START_ATTEMPTS = 3  # a throwaway server's port can be taken before it binds it


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


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _run_pg(
    bindir: Path, os_user: str | None, args: list[str], *, cwd: Path, env: dict[str, str] | None
) -> subprocess.CompletedProcess[str]:
    """Run one of PostgreSQL's programs, as ``os_user`` when running as root."""
    return subprocess.run(
        [str(bindir / args[0]), *args[1:]],
        user=os_user,
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        env=None if env is None else {**os.environ, **env},
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
    """A running throwaway server; ``dsn(dbname)`` connects to one of its databases."""

    bindir: Path
    root: Path
    port: int
    os_user: str | None
    durable: bool
    host: str = "127.0.0.1"
    user: str = "postgres"

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = _run_pg(self.bindir, self.os_user, list(args), cwd=self.root, env=None)
        if check and result.returncode != 0:
            raise ServerError(f"{args[0]} failed: {_output(result)}")
        return result

    def _settings(self) -> dict[str, str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "max_connections": "300",
            "shared_buffers": "128MB",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        return settings

    def start(self) -> None:
        """Start the server and wait until it accepts connections (ServerError if it won't)."""
        log = self.root / "server.log"
        offset = _log_size(log)
        options = _pg_options(self._settings())
        result = self._run(
            "pg_ctl", "-D", str(self.datadir), "-l", str(log), "-o", options, "-w", "start",
            check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise _start_failure(f"PostgreSQL did not start: {_output(result)}", log, offset)
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise _start_failure(
                        "PostgreSQL did not accept connections", log, offset
                    ) from None
                time.sleep(0.1)

    def _start_on_a_free_port(self) -> None:
        """Start, on another free port if this one was taken since it was picked."""
        for attempt in range(_START_ATTEMPTS):
            try:
                self.start()
                return
            except ServerError as exc:
                taken = "already in use" in exc.log_tail or not _port_free(self.port)
                if not taken or attempt == _START_ATTEMPTS - 1:
                    raise
                self.port = _free_port()

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
    root = Path(tempfile.mkdtemp(prefix="trioban-pg-"))
    try:
        if os_user is not None:
            entry = pwd.getpwnam(os_user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        root.chmod(0o700)
        server = TempServer(bindir, root, _free_port(), os_user, durable)
        server._run(
            "initdb", "-D", str(server.datadir), "-A", "trust", "-U", "postgres",
            "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        server._start_on_a_free_port()
        try:
            yield server
        finally:
            server.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
