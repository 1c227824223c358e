"""Backups of the task database: SQLite's online backup API, ``pg_dump``/``pg_restore`` for PostgreSQL.

A backup is checked before a restore touches anything: a file that is not a matcalc backup is refused
with a clear error and the live database is left as it was.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

REQUIRED_TABLES = ("alembic_version", "tasks", "structures", "task_logs")


class BackupError(RuntimeError):
    """A backup or restore could not be done; the message says why (nothing was changed)."""


def _backend(engine: Engine) -> str:
    return engine.url.get_backend_name()


def _libpq_url(engine: Engine) -> str:
    """The engine's URL in the form libpq tools accept (no SQLAlchemy driver suffix)."""
    return make_url(engine.url.render_as_string(hide_password=False)).set(drivername="postgresql") \
        .render_as_string(hide_password=False)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(f"{name} not found on PATH: install the PostgreSQL client tools (Debian: postgresql-client)")
    return path


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BackupError(f"{Path(cmd[0]).name} failed ({proc.returncode}): {proc.stderr.strip()}")


def _check_sqlite_backup(path: Path) -> None:
    if not path.is_file():
        raise BackupError(f"no such backup file: {path}")
    with path.open("rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise BackupError(f"{path} is not a SQLite database (not a matcalc backup)")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if con.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            raise BackupError(f"{path} fails SQLite's integrity check")
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a readable SQLite database: {exc}") from exc
    finally:
        con.close()
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        raise BackupError(f"{path} is not a matcalc backup (missing tables: {', '.join(missing)})")


def backup(engine: Engine, path: str | Path) -> Path:
    """Write a consistent copy of the live database to ``path`` (running servers may keep writing)."""
    path = Path(path).expanduser()
    if path.exists():
        raise BackupError(f"{path} exists: choose a new file (a backup never overwrites)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if _backend(engine) == "sqlite":
        raw = engine.raw_connection()
        try:
            dest = sqlite3.connect(str(path))
            try:
                raw.driver_connection.backup(dest)  # SQLite online backup: consistent while others write
            finally:
                dest.close()
        finally:
            raw.close()
    elif _backend(engine) == "postgresql":
        _run([_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={path}", f"--dbname={_libpq_url(engine)}"])
    else:
        raise BackupError(f"backups are supported for SQLite and PostgreSQL, not {_backend(engine)}")
    log.info("backup of %s written to %s", engine.url.render_as_string(hide_password=True), path)
    return path


def restore(engine: Engine, path: str | Path) -> None:
    """Replace the database's contents with the backup at ``path`` (validated first)."""
    path = Path(path).expanduser()
    if _backend(engine) == "sqlite":
        _check_sqlite_backup(path)
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        raw = engine.raw_connection()
        try:
            src.backup(raw.driver_connection)
        finally:
            raw.close()
            src.close()
        engine.dispose()
    elif _backend(engine) == "postgresql":
        if not path.is_file():
            raise BackupError(f"no such backup file: {path}")
        listing = subprocess.run([_tool("pg_restore"), "--list", str(path)], capture_output=True, text=True)
        if listing.returncode != 0 or "TABLE public tasks" not in listing.stdout:
            raise BackupError(f"{path} is not a matcalc PostgreSQL backup (pg_dump custom format with a tasks table)")
        _run([_tool("pg_restore"), "--clean", "--if-exists", "--no-owner", "--single-transaction",
              f"--dbname={_libpq_url(engine)}", str(path)])
        engine.dispose()
    else:
        raise BackupError(f"backups are supported for SQLite and PostgreSQL, not {_backend(engine)}")
    log.info("restored %s from %s", engine.url.render_as_string(hide_password=True), path)
