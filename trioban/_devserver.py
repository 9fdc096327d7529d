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


class ServerError(TriobanError):
    """Raised when a throwaway PostgreSQL server can't be found, installed or started."""


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
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.os_user,
            capture_output=True,
            text=True,
            check=check,
            cwd=self.root,
        )

    def _settings(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "max_connections": "300",
            "shared_buffers": "128MB",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        return [f"-c {name}={value}" for name, value in settings.items()]

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        log = str(self.root / "server.log")
        options = " ".join(self._settings())
        self._run("pg_ctl", "-D", str(self.datadir), "-l", log, "-o", options, "-w", "start")
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                psycopg.connect(self.dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    tail = (self.root / "server.log").read_text(errors="replace")[-2000:]
                    raise ServerError(f"PostgreSQL did not start; its log ends:\n{tail}") from None
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
        server.start()
        try:
            yield server
        finally:
            server.stop("immediate")
    finally:
        shutil.rmtree(root, ignore_errors=True)
