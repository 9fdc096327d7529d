"""Scratch databases for tests: copies of a template, each lent to one test at a time.

Cloning a database costs the server 0.06-0.45 s, more than most tests take. So a database goes
back to the pool when its test left nothing behind but rows: they are reset to the template's
and the next test gets it (about 30 ms). When the test changed anything else (created, altered
or dropped a table, a schema, a function, a comment, a grant; set a database setting), left
connections open or a prepared transaction, or wrote many rows, the database is dropped.

The server's user should be a superuser (as the throwaway test servers' is): it terminates what
a test left connected, and clears the planner statistics a test's ANALYZE wrote.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

_Conn = psycopg.Connection[tuple[object, ...]]

# A database whose tables grew by more than this (dead rows a reset leaves) is dropped.
_MAX_GROWTH = 1 << 20
# How long the connections a test closed may take to end (a backend exits just after).
_END_WAIT = 1.0

# The catalogs a test changes when it changes a database's schema: creating almost any object
# adds a pg_depend row, and each ALTER updates a row of the object's own catalog. (Scanning
# them all, pg_description and the operator classes too, would take 16 ms rather than 5.)
_CATALOGS = [
    *("pg_namespace", "pg_class", "pg_attribute", "pg_attrdef", "pg_constraint", "pg_index"),
    *("pg_trigger", "pg_proc", "pg_type", "pg_enum", "pg_depend", "pg_sequence", "pg_rewrite"),
    *("pg_policy", "pg_default_acl", "pg_extension", "pg_event_trigger", "pg_publication"),
    *("pg_description", "pg_largeobject_metadata", "pg_language", "pg_foreign_data_wrapper"),
    *("pg_foreign_server", "pg_user_mapping"),
]
# The database's own row and settings (shared catalogs: the same in the template and its
# clones): ALTER DATABASE, GRANT ... ON DATABASE, COMMENT ON DATABASE.
_DATABASE_SETTINGS = """
SELECT 'pg_database', concat_ws(':', d.datconnlimit, d.datdba, d.datacl::text,
  (SELECT count(*) FROM pg_db_role_setting AS s WHERE s.setdatabase = d.oid),
  (SELECT count(*) FROM pg_shdescription AS c WHERE c.objoid = d.oid))
FROM pg_database AS d WHERE d.datname = current_database()
"""
_PREPARED = "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"
_USER_RELATIONS = """
SELECT c.oid, n.nspname, c.relname, c.relkind = 'S'
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY c.oid
"""
_SIZE = "SELECT coalesce(sum(pg_total_relation_size(oid)), 0)::bigint FROM unnest(%s::oid[]) AS oid"
# Clients only: an autovacuum worker busy in the database neither writes rows nor blocks a reset.
_OTHER_BACKENDS = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""
_TERMINATE = "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid"


@dataclass(frozen=True)
class _Table:
    name: sql.Identifier
    rows: str | None  # as JSON; None: empty


@dataclass(frozen=True)
class _Template:
    """What a clone of the template holds, to tell whether a used one can be reset."""

    fingerprint_sql: sql.Composed
    fingerprint: object
    tables: list[_Table]
    sequences: list[tuple[int, object, object]]  # oid, last_value, is_called
    relations: list[int]  # the oids of the tables and sequences (a clone keeps them)
    size: int  # their bytes on disk


class ScratchDatabases:
    """Lends out databases cloned from one template, each to one test at a time."""

    def __init__(self, server_dsn: str, stem: str, template: str, state: _Template) -> None:
        self._server_dsn = server_dsn
        self._stem = stem
        self.template = template
        self._state = state
        self._free: list[str] = []
        self._lent: set[str] = set()
        self._oids: dict[str, int] = {}  # each clone's: a test may rename its database
        self._undropped: set[str] = set()  # a drop failed: close() tries again
        self.clones = 0  # how many were cloned (the others were reused)

    def take(self) -> str:
        """The DSN of a database that holds what the template holds, and nothing else."""
        if self._free:
            name = self._free.pop()
        else:
            name = f"{self._stem}_t_{uuid.uuid4().hex}"
            with self._admin() as conn:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                        sql.Identifier(name), sql.Identifier(self.template)
                    )
                )
                oid = _one(conn, "SELECT oid FROM pg_database WHERE datname = %s", (name,))[0]
            self._oids[name] = int(str(oid))
            self.clones += 1
        self._lent.add(name)
        return self._dsn(name)

    @contextmanager
    def lent(self) -> Iterator[str]:
        """``take()`` for the block, then ``give_back()``."""
        dsn = self.take()
        try:
            yield dsn
        finally:
            self.give_back(dsn)

    def give_back(self, dsn: str) -> None:
        """Reset the database at ``dsn`` for the next test, or drop it if it can't be."""
        name = str(conninfo_to_dict(dsn)["dbname"])
        self._lent.remove(name)  # KeyError: not one of this pool's, or given back already
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                reusable = _reset(conn, self._state)
        except psycopg.Error:
            reusable = False  # e.g. the test renamed it, or made it refuse connections
        if reusable:
            self._free.append(name)
        else:
            self._drop(name)

    def close(self) -> None:
        """Drop the databases, lent ones too, and the template; every drop is tried, and
        those that fail are named in one error."""
        names = [*self._free, *self._lent, *self._undropped]
        self._free.clear()
        self._lent.clear()
        self._undropped.clear()
        for name in names:
            with suppress(psycopg.Error):  # kept in _undropped: named below
                self._drop(name)
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(self.template))
            )
        if self._undropped:
            raise RuntimeError(f"could not drop the test databases {sorted(self._undropped)}")

    def _drop(self, name: str) -> None:
        """Drop a clone, under the name it has now; kept for ``close()`` if that fails."""
        try:
            with self._admin() as conn:
                found = conn.execute(
                    "SELECT datname FROM pg_database WHERE oid = %s", (self._oids[name],)
                ).fetchone()
                if found is not None:
                    drop = sql.SQL("DROP DATABASE {} WITH (FORCE)")
                    conn.execute(drop.format(sql.Identifier(str(found[0]))))
        except psycopg.Error:
            self._undropped.add(name)
            raise
        self._oids.pop(name, None)
        self._undropped.discard(name)

    def _admin(self) -> _Conn:
        return psycopg.connect(self._server_dsn, autocommit=True)

    def _dsn(self, name: str) -> str:
        return make_conninfo("", **{**conninfo_to_dict(self._server_dsn), "dbname": name})


@contextmanager
def scratch_databases(
    server_dsn: str, *, stem: str, setup: bytes | None = None
) -> Iterator[ScratchDatabases]:
    """Databases cloned from a template made on the server at ``server_dsn`` (a superuser's,
    to terminate what a test left connected) and set up with the ``setup`` SQL; the pool and
    the template are dropped on exit. Their names start with ``stem``."""
    template = f"{stem}_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(template)))
    databases = None
    try:
        template_dsn = make_conninfo("", **{**conninfo_to_dict(server_dsn), "dbname": template})
        with psycopg.connect(template_dsn, autocommit=True) as conn:
            if setup:
                conn.execute(setup)
            state = _describe(conn)
        databases = ScratchDatabases(server_dsn, stem, template, state)
        yield databases
    finally:
        if databases is not None:
            databases.close()
        else:
            with psycopg.connect(server_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(template)))


def _describe(conn: _Conn) -> _Template:
    """The template's catalog fingerprint, its tables' rows and its sequences' positions."""
    # Each changed catalog row gets a newer xmin, and each dropped one lowers a count.
    parts: list[sql.Composable] = [
        sql.SQL("SELECT {}, concat_ws(':', count(*), max(xmin::text::bigint)) FROM {}").format(
            sql.Literal(catalog), sql.Identifier("pg_catalog", str(catalog))
        )
        for catalog in _CATALOGS
    ]
    parts.append(sql.SQL(_DATABASE_SETTINGS))
    fingerprint_sql = sql.SQL("SELECT array_agg(f::text ORDER BY f::text) FROM ({}) AS f").format(
        sql.SQL(" UNION ALL ").join(parts)
    )
    tables: list[_Table] = []
    sequences: list[tuple[int, object, object]] = []
    relations: list[int] = []
    for oid, schema, relation, is_sequence in conn.execute(_USER_RELATIONS).fetchall():
        name = sql.Identifier(str(schema), str(relation))
        relations.append(int(str(oid)))
        if is_sequence:
            query = sql.SQL("SELECT last_value, is_called FROM {}").format(name)
            last_value, is_called = _one(conn, query)
            sequences.append((int(str(oid)), last_value, is_called))
        else:
            query = sql.SQL("SELECT json_agg(t)::text FROM {} AS t").format(name)
            rows = _one(conn, query)[0]
            tables.append(_Table(name, None if rows is None else str(rows)))
    size = int(str(_one(conn, _SIZE, (relations,))[0]))
    return _Template(
        fingerprint_sql, _one(conn, fingerprint_sql), tables, sequences, relations, size
    )


def _one(
    conn: _Conn, query: sql.Composed | str, params: tuple[object, ...] = ()
) -> tuple[object, ...]:
    row = conn.execute(query, params).fetchone()
    assert row is not None  # an aggregate, or a sequence's one row
    return row


def _reset(conn: _Conn, template: _Template) -> bool:
    """Put the template's rows back; False if the database needs more than that."""
    conn.execute("SET lock_timeout = '2s'")  # a lock a test left can't hold the reset
    if _rolled_back_prepared(conn) or not _others_gone(conn):
        return False
    if _one(conn, template.fingerprint_sql) != template.fingerprint:
        return False
    if int(str(_one(conn, _SIZE, (template.relations,))[0])) > template.size + _MAX_GROWTH:
        return False  # dead rows a reset wouldn't clear
    with conn.transaction():
        for table in template.tables:
            conn.execute(sql.SQL("DELETE FROM {}").format(table.name))
            if table.rows is not None:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {0} SELECT * FROM json_populate_recordset(NULL::{0}, %s)"
                    ).format(table.name),
                    (table.rows,),
                )
        for oid, last_value, is_called in template.sequences:
            conn.execute("SELECT setval(%s::oid, %s, %s)", (oid, last_value, is_called))
        if conn.info.parameter_status("is_superuser") == "on":
            # The planner statistics an ANALYZE (a test's, or autovacuum's) wrote.
            conn.execute(
                "DELETE FROM pg_catalog.pg_statistic WHERE starelid = ANY(%s::oid[])",
                (template.relations,),
            )
    return True


def _rolled_back_prepared(conn: _Conn) -> bool:
    """Roll back the prepared transactions a test left (they outlive its connections, hold
    their locks, and keep the database from being dropped); whether there were any."""
    gids = [str(gid) for (gid,) in conn.execute(_PREPARED).fetchall()]
    for gid in gids:
        conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
    return bool(gids)


def _others_gone(conn: _Conn) -> bool:
    """Whether the connections the test closed have ended (a backend exits just after its
    client closes). One still there after ``_END_WAIT`` is terminated, and False returned:
    a process the test left running might connect again, so its database isn't lent again."""
    deadline = time.monotonic() + _END_WAIT
    while pids := [pid for (pid,) in conn.execute(_OTHER_BACKENDS).fetchall()]:
        if time.monotonic() > deadline:
            conn.execute(_TERMINATE, (pids,))
            return False
        time.sleep(0.01)
    return True
