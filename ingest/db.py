"""Database URLs, engines and schema creation, with the password kept out of every message.

URL rules (documented in ``cgnn ingest --help``):

* ``--db URL`` or the environment variable ``CGNN_DB_URL``; there is no silent default.
* A value without ``://`` is a path to an SQLite file (``demo/oqmd.sqlite`` -> ``sqlite:///demo/oqmd.sqlite``).
* ``mysql://`` and ``mariadb://`` mean PyMySQL (``mysql+pymysql://``).
* If the URL names a user but no password and ``CGNN_DB_PASSWORD`` is set, that password is used, so it
  need not appear on a command line (where ``ps`` would show it).
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from cgnn_dgl.errors import CgnnError, UsageError

ENV_URL = "CGNN_DB_URL"
ENV_PASSWORD = "CGNN_DB_PASSWORD"
SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
SCHEMA_SQL = SQL_DIR / "schema.sql"
ELEMENTS_SQL = SQL_DIR / "seed_elements.sql"


_PASSWORD_HINT = (f"URL-encode the password (urllib.parse.quote(password, safe='')) or leave it out of the URL "
                  f"(mysql+pymysql://user@host:3306/qmdb) and put it in ${ENV_PASSWORD}")


def resolve_url(value: str | None) -> URL:
    """``--db`` value (or ``$CGNN_DB_URL``) -> SQLAlchemy URL; raises UsageError when there is none."""
    value = value or os.environ.get(ENV_URL)
    if not value:
        raise UsageError(f"no database given: pass --db URL or set {ENV_URL} "
                         "(e.g. sqlite:///demo/oqmd.sqlite or mysql+pymysql://user@127.0.0.1:3306/qmdb)")
    if "://" not in value:
        value = "sqlite:///" + str(Path(value))
    # An unescaped '@' in the password makes SQLAlchemy split the URL in the wrong place, and the pieces
    # (part of the password as a "host") would end up in messages; so refuse it without echoing anything.
    if value.split("://", 1)[1].split("?", 1)[0].count("@") > 1:
        raise UsageError("the database URL looks malformed: more than one '@' before the host (an unescaped '@' "
                         f"in the password?); {_PASSWORD_HINT}")
    try:
        url = make_url(value)
    except Exception:
        raise UsageError("cannot parse the database URL (expected e.g. mysql+pymysql://user@host:3306/qmdb); "
                         f"{_PASSWORD_HINT}") from None
    if url.drivername in ("mysql", "mariadb", "mariadb+pymysql"):
        url = url.set(drivername="mysql+pymysql")
    if url.drivername not in ("mysql+pymysql", "sqlite", "sqlite+pysqlite"):
        raise UsageError(f"unsupported database driver {url.drivername!r}: use mysql+pymysql:// or sqlite:///")
    if url.username and url.password is None and os.environ.get(ENV_PASSWORD):
        url = url.set(password=os.environ[ENV_PASSWORD])
    return url


def safe_url(url: URL | str) -> str:
    """The URL as text with any password replaced by ``***`` (for logs, messages and manifests)."""
    if isinstance(url, str):
        url = make_url(url)
    return url.render_as_string(hide_password=True)


def is_mysql(engine_or_url) -> bool:
    name = engine_or_url.dialect.name if hasattr(engine_or_url, "dialect") else make_url(engine_or_url).get_backend_name()
    return name in ("mysql", "mariadb")


def make_engine(url: URL | str, *, must_exist: bool = True) -> Engine:
    """An engine for reading; SQLite files must exist unless ``must_exist`` is False."""
    if isinstance(url, str):
        url = resolve_url(url)
    kwargs: dict = {"pool_pre_ping": True}
    if url.get_backend_name() == "sqlite":
        db = url.database or ""
        if must_exist and db not in ("", ":memory:") and not Path(db).exists():
            raise UsageError(f"SQLite database {db} does not exist (create one with `cgnn db init --db {safe_url(url)}`)")
        if db not in ("", ":memory:"):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs["pool_recycle"] = 3600
        kwargs["connect_args"] = {"charset": "utf8mb4", "connect_timeout": 10, "read_timeout": 600}
    return sa.create_engine(url, **kwargs)


def describe_error(exc: BaseException, url: URL | str | None = None) -> str:
    """One line for a database error, without the SQL statement and never with the password."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).splitlines()[0] if str(orig) else type(orig).__name__
    where = f" ({safe_url(url)})" if url is not None else ""
    if url is not None:
        u = make_url(url) if isinstance(url, str) else url
        if u.password:
            text = text.replace(str(u.password), "***")
    return f"database error{where}: {text}"


def parse_server_version(text: str) -> tuple[str, tuple[int, ...]]:
    """``SELECT VERSION()`` text -> ('mysql' | 'mariadb', version tuple), e.g. '5.7.29-log' -> ('mysql', (5, 7, 29))."""
    text = text or ""
    mariadb = "mariadb" in text.lower()
    if mariadb and text.startswith("5.5.5-"):  # MariaDB's replication-compatibility prefix
        text = text[len("5.5.5-"):]
    numbers = tuple(int(x) for x in re.findall(r"\d+", text.split("-")[0])[:3])
    return ("mariadb" if mariadb else "mysql"), numbers


WINDOW_FUNCTIONS_SINCE = {"mysql": (8, 0), "mariadb": (10, 2), "sqlite": (3, 25)}


def window_functions_supported(kind: str, version: tuple[int, ...]) -> bool:
    """MySQL >= 8.0, MariaDB >= 10.2, SQLite >= 3.25."""
    return tuple(version[:2]) >= WINDOW_FUNCTIONS_SINCE[kind]


def server_version(conn: sa.Connection) -> tuple[str, tuple[int, ...]]:
    """('mysql' | 'mariadb' | 'sqlite', version tuple) of the connected server."""
    if conn.dialect.name == "sqlite":
        import sqlite3

        return "sqlite", tuple(int(x) for x in sqlite3.sqlite_version.split("."))
    return parse_server_version(conn.exec_driver_sql("SELECT VERSION()").scalar() or "")


def supports_window_functions(conn: sa.Connection) -> bool:
    return window_functions_supported(*server_version(conn))


def split_sql(text: str) -> list[str]:
    """Statements of a simple SQL script (no ';' inside strings or procedures; '--' comments dropped)."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    body = "\n".join(re.sub(r"\s--\s.*$", "", ln) for ln in lines)
    return [s.strip() for s in body.split(";") if s.strip()]


def create_schema(engine: Engine, *, seed_elements: bool = True) -> dict:
    """Create the OQMD tables (``sql/schema.sql`` on MySQL, ``ingest.tables`` on SQLite) and the elements seed.

    Idempotent: existing tables are kept, elements are seeded only into an empty table.
    """
    from ingest import tables as T

    with engine.begin() as conn:
        if is_mysql(engine):
            for stmt in split_sql(SCHEMA_SQL.read_text()):
                conn.exec_driver_sql(stmt)
        else:
            T.metadata.create_all(conn)
        seeded = 0
        if seed_elements and not conn.execute(sa.select(sa.func.count()).select_from(T.elements)).scalar():
            for stmt in split_sql(ELEMENTS_SQL.read_text()):
                conn.exec_driver_sql(stmt)
            seeded = conn.execute(sa.select(sa.func.count()).select_from(T.elements)).scalar()
    return {"tables": len(T.metadata.tables), "elements_seeded": seeded}


def missing_tables(conn: sa.Connection, needed=("entries", "structures", "atoms", "calculations",
                                                   "formation_energies", "elements")) -> list[str]:
    have = set(sa.inspect(conn).get_table_names())
    return [t for t in needed if t not in have]


@contextlib.contextmanager
def temporary_mysql_database(server_url: str | URL, prefix: str = "cgnn_tmp") -> Iterator[URL]:
    """Create a uniquely named database on a MySQL/MariaDB server, yield its URL, drop it afterwards."""
    url = make_url(server_url) if isinstance(server_url, str) else server_url
    name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
    admin = sa.create_engine(url.set(database=None), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET latin1")
        yield url.set(database=name)
    finally:
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            admin.dispose()


def mysql_reachable(server_url: str | URL) -> str | None:
    """None when the server answers, else a one-line reason (used to skip tests and benchmarks)."""
    url = make_url(server_url) if isinstance(server_url, str) else server_url
    engine = sa.create_engine(url.set(database=None), connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return None
    except Exception as exc:  # any failure means "not usable here"
        return describe_error(exc, url)
    finally:
        engine.dispose()


def require_tables(conn: sa.Connection, url) -> None:
    missing = missing_tables(conn)
    if missing:
        raise CgnnError(f"{safe_url(url)} lacks the OQMD table(s) {', '.join(missing)}; "
                        "load a dump or run `cgnn db init`")
