"""`matcalc db backup|restore`: a round trip loses no task, result or log; a bad file changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ase.build import bulk
from sqlalchemy import text

pytest.importorskip("sqlalchemy")

from matcalc.store import NewTask, Store, TaskStatus, db  # noqa: E402

PG_URL = os.environ.get("MATCALC_TEST_PG_URL", "").strip()
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason="MATCALC_TEST_PG_URL not set"))]


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'live.db'}"
    engine = db.make_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return PG_URL


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matcalc.cli", *args], capture_output=True, text=True, timeout=300)


def snapshot(store: Store) -> dict:
    tasks = store.list_tasks(page_size=1000).items
    return {
        t.id: (t.status, t.result, t.error, [(lg.level, lg.message) for lg in store.get_logs(t.id)])
        for t in tasks
    }


def fill(store: Store) -> list[str]:
    row, _ = store.add_structure(bulk("Cu", cubic=True), "Cu text", "cif", name="Cu")
    tasks = store.create_tasks([NewTask(type="single_point", model="emt", structure_id=row.id) for _ in range(3)])
    done, failed, _queued = (t.id for t in tasks)
    for tid in (done, failed):
        store.mark_queued(tid)
        store.mark_started(tid)
        store.add_logs([{"task_id": tid, "level": "INFO", "message": f"step {i}"} for i in range(3)])
    store.finish(done, TaskStatus.COMPLETED, result={"kind": "single_point", "energy_eV": -0.0123})
    store.finish(failed, TaskStatus.FAILED, error="ValueError: fmax must be > 0")
    return [t.id for t in tasks]


def test_backup_restore_round_trip(url: str, tmp_path: Path) -> None:
    store = Store(url)
    ids = fill(store)
    before = snapshot(store)
    assert len(before) == 3 and before[ids[0]][1]["energy_eV"] == -0.0123
    backup = tmp_path / "matcalc.backup"
    out = cli("db", "--db", url, "backup", str(backup))
    assert out.returncode == 0, out.stderr
    assert backup.stat().st_size > 0

    # damage after the backup: a new task and a deleted log
    row = store.get_structure(store.get_task(ids[0]).structure_id)
    store.create_tasks([NewTask(type="relax", model="emt", structure_id=row.id)])
    with store.write() as s:
        s.execute(text("DELETE FROM task_logs"))
    assert snapshot(store) != before
    store.close()

    out = cli("db", "--db", url, "restore", str(backup))
    assert out.returncode == 0, out.stderr
    restored = Store(url)
    try:
        assert snapshot(restored) == before
    finally:
        restored.close()


def test_backup_never_overwrites(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'live.db'}"
    Store(url).close()
    target = tmp_path / "exists.bak"
    target.write_text("keep me")
    out = cli("db", "--db", url, "backup", str(target))
    assert out.returncode == 2 and "exists" in out.stderr
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(("content", "message"), [
    (b"not a database at all", "not a SQLite database"),
    (None, "no such backup file"),
])
def test_restore_refuses_a_bad_file_and_changes_nothing(tmp_path: Path, content: bytes | None, message: str) -> None:
    url = f"sqlite:///{tmp_path / 'live.db'}"
    store = Store(url)
    fill(store)
    before = snapshot(store)
    store.close()
    bad = tmp_path / "bad.bak"
    if content is not None:
        bad.write_bytes(content)
    out = cli("db", "--db", url, "restore", str(bad))
    assert out.returncode == 2 and message in out.stderr
    store = Store(url)
    assert snapshot(store) == before
    store.close()


def test_restore_refuses_a_foreign_sqlite_file(tmp_path: Path) -> None:
    import sqlite3

    url = f"sqlite:///{tmp_path / 'live.db'}"
    store = Store(url)
    fill(store)
    before = snapshot(store)
    store.close()
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    out = cli("db", "--db", url, "restore", str(other))
    assert out.returncode == 2 and "not a matcalc backup" in out.stderr
    store = Store(url)
    assert snapshot(store) == before
    store.close()
