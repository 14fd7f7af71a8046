"""The registry's database: engines for SQLite and PostgreSQL, write locks, and the schema's version.

One writer at a time per registry, readers never blocked: SQLite runs in WAL mode and a write transaction starts with
``BEGIN IMMEDIATE``; PostgreSQL (READ COMMITTED) takes ``LOCK TABLE tasks IN EXCLUSIVE MODE`` first, which queues
other writers and lets plain ``SELECT`` through. Writes are a few rows after minutes of training, so serialising them
costs nothing and makes "the next version number" and "the one default" simple facts rather than races.

The schema is versioned by Alembic (``adaptkit/registry/migrations``). Opening a registry reads ``alembic_version``
with one query and imports Alembic only when the registry is behind (or new), so reads stay fast.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, MetaData, create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, DBAPIError, NoSuchModuleError, OperationalError

from adaptkit.errors import RegistryError, param
from adaptkit.registry.dberrors import advice

__all__ = ["SCHEMA_HEAD", "identity", "normalise_url", "sqlite_file", "make_engine", "write_lock", "retryable",
           "schema_revision", "ensure_schema", "migrate", "describe"]

SCHEMA_HEAD = "0002"  # the newest revision in registry/migrations/versions; a test checks they agree
MIGRATIONS = Path(__file__).parent / "migrations"
CONNECT_TIMEOUT_S = 5
LOCK_TIMEOUT_S = 30  # how long a writer waits for another writer's lock before a retry
_MIGRATION_LOCK = 0x616B7467  # "aktg": a PostgreSQL advisory lock that queues concurrent upgrades
_V01_TABLES = {"backbones", "tasks", "adapter_versions"}


def normalise_url(url: str | os.PathLike) -> str:
    """A plain path becomes a SQLite URL; ``postgresql://`` and ``postgres://`` use psycopg 3."""
    url = str(url)
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url)


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def identity(url: str) -> str:
    """A server registry's name whoever connects to it: the URL without user and password."""
    return make_url(url).set(username=None, password=None).render_as_string(hide_password=False)


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for other back ends and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser().resolve()


def make_engine(url: str) -> Engine:
    """An engine for ``url`` that turns a missing driver or an unreachable server into a :class:`RegistryError`."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise RegistryError(f"bad registry URL {url!r}: use a path, sqlite:///PATH or "
                            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from exc
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {}
    if backend == "postgresql":
        kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}
    file = sqlite_file(url) if backend == "sqlite" else None
    if file is not None and file.is_file() and not os.access(file.parent, os.W_OK):
        # A WAL database in a read-only folder can be read only as immutable (no -shm file can be made there);
        # writes then fail as "readonly database", which dberrors explains.
        url = f"sqlite:///file:{file}?mode=ro&immutable=1&uri=true"
    try:
        engine = create_engine(url, **kwargs)
    except NoSuchModuleError as exc:
        raise RegistryError(f"unknown database {parsed.drivername!r} in the registry URL: use a path, "
                            "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE") from exc
    except ImportError as exc:
        hint = 'pip install "adaptkit[postgres]"' if exc.name == "psycopg" else f"install the {exc.name} module" + \
            (', or write postgresql:// to use psycopg 3 (pip install "adaptkit[postgres]")'
             if backend == "postgresql" else "")
        raise RegistryError(f"the registry URL {describe(url)} needs the {exc.name} driver, which is not "
                            f"installed: {hint}") from exc
    if backend == "sqlite":
        _sqlite_pragmas(engine)
    event.listen(engine, "handle_error", _connect_error)
    return engine


def _sqlite_pragmas(engine: Engine) -> None:
    """A busy timeout so that several processes can write (WAL is set once, by :func:`_wal`); BEGIN IMMEDIATE so
    writers queue, not fail."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event below issue BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(LOCK_TIMEOUT_S * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("adaptkit_write") else "BEGIN")


def _connect_error(context: Any) -> None:
    """Translate a failed connection (server down, bad password, no such database) into one line."""
    if context.connection is not None:  # a failed statement, not a failed connection: the caller handles it
        return
    exc, target = context.original_exception, context.engine.url
    url = target.render_as_string(hide_password=True)
    text_ = (str(exc).strip().splitlines() or [type(exc).__name__])[0].removeprefix("connection failed: ")
    code = getattr(exc, "sqlstate", None)
    if code in ("28P01", "28000") or "authentication failed" in str(exc):
        msg = f"the PostgreSQL server refused the login for {url} ({text_}): check the user and password"
    elif code == "3D000" or "does not exist" in str(exc):
        msg = f"there is no database {target.database!r} on the server of {url}: create it (createdb " \
              f"{target.database}) or fix the URL"
    elif target.get_backend_name() == "sqlite":
        what = advice(str(exc).lower())
        msg = f"registry {target.database} {what} ({text_})" if what else \
            f"cannot open {target.database} as a SQLite registry ({text_}): pass another {param('registry')}"
    else:
        msg = f"cannot reach the database server of {url} ({text_}): start it, or fix the host and port in the URL"
    raise RegistryError(msg) from exc


def write_lock(conn: Connection) -> None:
    """Queue behind any other writer of this registry (SQLite's BEGIN IMMEDIATE has done it already)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{int(LOCK_TIMEOUT_S * 1000)}ms'")  # then a retry
        conn.exec_driver_sql("LOCK TABLE tasks IN EXCLUSIVE MODE")


def retryable(exc: BaseException) -> bool:
    """A write that may succeed if run again: the lock held by another writer beyond the timeout, a deadlock."""
    if isinstance(exc, OperationalError) and "locked" in str(exc).lower():
        return True
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in ("40001", "40P01", "55P03")


def schema_revision(conn: Connection) -> str | None:
    """The registry's Alembic revision; ``"v0.1"`` for a registry made before migrations; None when it is empty.

    Raises:
        RegistryError: the database holds tables that are not a registry's.
    """
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" in tables:
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    if _V01_TABLES <= tables:
        return "v0.1"
    if tables:
        raise RegistryError(f"{describe(str(conn.engine.url))} is another program's database, not an adaptkit "
                            f"registry (tables {', '.join(sorted(tables)[:5])}): pass the path of an adaptkit "
                            f"registry, or of a new file, with {param('registry')}")
    return None


def ensure_schema(engine: Engine, metadata: MetaData, *, create: bool, location: str) -> bool:
    """Bring the registry behind ``engine`` to :data:`SCHEMA_HEAD`; an empty database only if ``create``.

    Returns:
        Whether the registry exists (False: an empty database and ``create`` is False).
    """
    try:
        with engine.connect() as conn:
            revision = schema_revision(conn)
        if revision is None and not create:
            return False
        if revision != SCHEMA_HEAD:
            with engine.execution_options(adaptkit_write=True).begin() as conn:  # SQLite: BEGIN IMMEDIATE
                migrate(conn, metadata)
            if engine.dialect.name == "sqlite":
                _wal(engine)
    except OperationalError as exc:
        raise RegistryError(f"cannot open the registry {location}: {exc.orig}") from exc
    except DatabaseError as exc:  # e.g. SQLite's "file is not a database"
        raise RegistryError(f"{location} is not a readable adaptkit registry ({exc.orig}): pass another "
                            f"{param('registry')}") from exc
    return True


def _wal(engine: Engine) -> None:
    """Put a SQLite registry in WAL mode (kept in the file), once it is proven ours: readers never wait for a writer.

    Only here, never on connecting: connecting to another program's database must leave its file as it was.
    """
    raw = engine.raw_connection()
    try:
        raw.driver_connection.execute("PRAGMA journal_mode=WAL")  # autocommit: no transaction may be open
    finally:
        raw.close()


def migrate(conn: Connection, metadata: MetaData | None = None) -> None:
    """Create the registry on ``conn``, or bring it to :data:`SCHEMA_HEAD`; a no-op when it is there already.

    Runs inside the caller's write transaction (SQLite: BEGIN IMMEDIATE) and re-reads the revision under the lock,
    so concurrent openers upgrade once. Imports Alembic only here.

    Raises:
        RegistryError: the registry was made by a newer adaptkit, or the database is not a registry.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    revision = schema_revision(conn)
    if revision == SCHEMA_HEAD:
        return
    from alembic import command
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes.update(connection=conn, target_metadata=metadata)
    if revision not in (None, "v0.1"):
        try:
            ScriptDirectory.from_config(cfg).get_revision(revision)
        except CommandError:
            raise RegistryError(f"the registry {describe(str(conn.engine.url))} was made by a newer adaptkit "
                                f"(schema {revision}; this adaptkit knows up to {SCHEMA_HEAD}): upgrade adaptkit "
                                "(pip install -U adaptkit)") from None
    if revision == "v0.1":
        command.stamp(cfg, "0001")
    command.upgrade(cfg, "head")
