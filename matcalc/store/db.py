"""Engines and migrations: SQLite file by default, PostgreSQL (or anything SQLAlchemy speaks) by URL.

* default URL: ``MATCALC_DB_URL`` or ``sqlite:///~/.matcalc/matcalc.db``;
* SQLite connections get WAL journaling, ``synchronous=FULL`` (an acknowledged task survives a power
  loss, not only a process crash; ``MATCALC_SQLITE_SYNCHRONOUS=NORMAL`` trades that for speed), a busy
  timeout and foreign keys on connect;
* `upgrade` runs the Alembic migrations shipped in ``matcalc/store/migrations``
  programmatically (what ``matcalc db upgrade`` and the server's start-up call).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

log = logging.getLogger(__name__)

DEFAULT_DB_PATH = Path("~/.matcalc/matcalc.db")
SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_SYNCHRONOUS_MODES = ("FULL", "NORMAL", "EXTRA")
"""Accepted ``MATCALC_SQLITE_SYNCHRONOUS`` values. FULL (default): every commit is fsynced, so what the server
acknowledged survives a power loss; NORMAL (WAL): survives a crash of the process, may lose the last commits
on power loss."""
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def default_url() -> str:
    """``MATCALC_DB_URL`` if set, else the SQLite file ``~/.matcalc/matcalc.db``."""
    env = os.environ.get("MATCALC_DB_URL", "").strip()
    if env:
        return env
    return f"sqlite:///{DEFAULT_DB_PATH.expanduser()}"


def normalize_url(url: str | None) -> str:
    """Expand ``~`` in SQLite paths and map bare ``postgresql://`` to the psycopg 3 driver."""
    url = (url or default_url()).strip()
    u = make_url(url)
    if u.drivername == "sqlite" and u.database and u.database != ":memory:":
        path = Path(u.database).expanduser()
        u = u.set(database=str(path))
    elif u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u.render_as_string(hide_password=False)


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_synchronous() -> str:
    """The SQLite ``synchronous`` mode: ``MATCALC_SQLITE_SYNCHRONOUS`` or FULL."""
    mode = os.environ.get("MATCALC_SQLITE_SYNCHRONOUS", "").strip().upper() or "FULL"
    if mode not in SQLITE_SYNCHRONOUS_MODES:
        raise ValueError(f"MATCALC_SQLITE_SYNCHRONOUS must be one of {', '.join(SQLITE_SYNCHRONOUS_MODES)}, "
                         f"got {mode!r}")
    return mode


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        mode = cur.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode and str(mode[0]).lower() not in ("wal", "memory"):
            log.warning("SQLite did not switch to WAL (journal_mode=%s)", mode[0])
        cur.execute(f"PRAGMA synchronous = {sqlite_synchronous()}")
    finally:
        cur.close()


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url`` (default `default_url`); SQLite parents are created."""
    url = normalize_url(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        sqlite_synchronous()  # a bad MATCALC_SQLITE_SYNCHRONOUS fails here, not on the first connection
        memory = not u.database or u.database == ":memory:"
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        if memory:
            kwargs.setdefault("poolclass", StaticPool)
        else:
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 20)
    return create_engine(url, **kwargs)


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the Alembic migrations up to ``revision`` (default: the newest)."""
    from alembic import command

    cfg = _alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Revert the migrations down to ``revision`` (``"base"``: drop everything)."""
    from alembic import command

    cfg = _alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None``: not initialised)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    """The newest revision shipped with this matcalc."""
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(create_engine("sqlite://"))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def table_names(engine: Engine) -> list[str]:
    return sorted(inspect(engine).get_table_names())
