"""The persistent store: migrations, dedup, lifecycle, immutability, requeue, concurrency.

Runs against SQLite always and against PostgreSQL too when MATCALC_TEST_PG_URL is set
(CI starts one with scripts/ci-postgres).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from ase.build import bulk
from sqlalchemy import text

pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")

from matcalc.store import (  # noqa: E402
    ImmutableResultError,
    NewTask,
    NotFoundError,
    Store,
    Structure,
    Task,
    TaskFilter,
    TaskLog,
    TaskStatus,
    db,
)
from matcalc.structures import structure_hash  # noqa: E402

PG_URL = os.environ.get("MATCALC_TEST_PG_URL", "").strip()
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason="MATCALC_TEST_PG_URL not set"))]


def _reset_pg(url: str) -> None:
    engine = db.make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    _reset_pg(PG_URL)
    return PG_URL


@pytest.fixture
def store(url):
    s = Store(url)
    yield s
    s.close()


@pytest.fixture
def cu_id(store) -> str:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    row, _ = store.add_structure(atoms, "cu text", "cif", name="Cu")
    return row.id


def _new(structure_id: str, **kw) -> NewTask:
    return NewTask(type=kw.pop("type", "single_point"), model=kw.pop("model", "emt"), structure_id=structure_id, **kw)


# ----------------------------------------------------------------------------------- schema
def test_migrations_match_models_and_round_trip(url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from matcalc.store.models import Base

    engine = db.make_engine(url)
    try:
        assert db.current_revision(engine) is None
        db.upgrade(engine)
        assert db.current_revision(engine) == db.head_revision()
        assert {"tasks", "structures", "custom_models", "task_logs", "alerts", "webhook_deliveries"} <= set(
            db.table_names(engine))
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations differ: {diff}"
        db.upgrade(engine)  # idempotent
        db.downgrade(engine, "base")
        assert not {"tasks", "structures"} & set(db.table_names(engine))
        db.upgrade(engine)
        assert "tasks" in db.table_names(engine)
    finally:
        engine.dispose()


def test_sqlite_wal_busy_timeout_and_default_url(tmp_path, monkeypatch):
    monkeypatch.delenv("MATCALC_DB_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert db.normalize_url(None) == f"sqlite:///{tmp_path}/.matcalc/matcalc.db"
    monkeypatch.setenv("MATCALC_DB_URL", f"sqlite:///{tmp_path}/other.db")
    s = Store()
    try:
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        s.close()
    assert (tmp_path / "other.db").is_file()
    assert db.normalize_url("postgresql://u:pw@h/d") == "postgresql+psycopg://u:pw@h/d"
    assert "pw" not in db.redact_url("postgresql://u:pw@h/d")


# ----------------------------------------------------------------------------------- structures
def test_structure_dedup_by_canonical_hash(store):
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.rattle(0.02, seed=1)
    permuted = a[[3, 1, 0, 2]]
    first, created = store.add_structure(a, "first text", "cif")
    second, created2 = store.add_structure(permuted, "second text", "extxyz")
    assert created and not created2
    assert first.id == second.id == structure_hash(a)
    stored = store.get_structure(first.id)
    assert stored.content == "first text" and stored.format == "cif" and stored.n_atoms == 4
    assert stored.formula == "Cu4" and stored.periodic
    other, created3 = store.add_structure(bulk("Ni", "fcc", a=3.5, cubic=True), "ni", "cif")
    assert created3 and other.id != first.id
    assert store.count(Structure) == 2
    page = store.list_structures(page=1, page_size=1)
    assert page.total == 2 and len(page.items) == 1
    with pytest.raises(NotFoundError):
        store.get_structure("0" * 64)


# ----------------------------------------------------------------------------------- tasks
def test_task_lifecycle_timestamps_and_logs(store, cu_id):
    (t,) = store.create_tasks([_new(cu_id, parameters={"fmax": 0.05}, priority="HIGH", timeout_s=60)])
    got = store.get_task(t.id)
    assert got.status == TaskStatus.PENDING and got.parameters == {"fmax": 0.05} and got.priority == "HIGH"
    assert got.created_at.tzinfo is not None
    assert store.mark_queued(t.id) and not store.mark_queued(t.id)
    assert store.mark_assigned(t.id, worker="w1", gpu="0")
    assert store.mark_started(t.id) == 1
    store.set_progress(t.id, {"stage": "relax", "step": 3})
    result = {"kind": "single_point", "energy_eV": -1.5, "forces_eV_per_A": [[0.0, 0.0, 0.0]]}
    assert store.finish(t.id, TaskStatus.COMPLETED, result=result, attempt=1)
    done = store.get_task(t.id)
    assert done.status == "COMPLETED" and done.result == result and done.attempts == 1
    assert done.worker == "w1" and done.gpu == "0" and done.progress == {"stage": "relax", "step": 3}
    assert done.created_at <= done.queued_at <= done.started_at <= done.finished_at
    assert [entry.message for entry in store.get_logs(t.id)] == [
        "task submitted", "task started (attempt 1)", "task completed"]
    with pytest.raises(NotFoundError):
        store.get_task("nope")


def test_completed_results_are_immutable(store, cu_id):
    (t,) = store.create_tasks([_new(cu_id)])
    assert store.mark_started(t.id) == 1
    assert store.finish(t.id, "COMPLETED", result={"energy_eV": 1.0})
    with pytest.raises(ImmutableResultError):
        store.finish(t.id, "COMPLETED", result={"energy_eV": 2.0})
    with pytest.raises(ImmutableResultError):
        store.finish(t.id, "FAILED", error="late failure")
    with pytest.raises(ImmutableResultError), store.write() as s:  # directly through the ORM too
        row = s.get(Task, t.id)
        row.result = {"energy_eV": 3.0}
    with pytest.raises(ImmutableResultError), store.write() as s:
        s.delete(s.get(Task, t.id))
    assert store.cancel(t.id) == (False, "COMPLETED")
    assert store.mark_started(t.id) is None
    assert store.requeue(t.id, "test") is False
    assert t.id not in store.requeue_active()
    final = store.get_task(t.id)
    assert final.status == "COMPLETED" and final.result == {"energy_eV": 1.0} and final.error is None


def test_finish_rules_stale_attempts_and_cancellation(store, cu_id):
    a, b, c = store.create_tasks([_new(cu_id), _new(cu_id), _new(cu_id)])
    with pytest.raises(ValueError, match="terminal"):
        store.finish(a.id, "RUNNING")
    with pytest.raises(ValueError, match="result"):
        store.finish(a.id, "COMPLETED")
    # a stale attempt (a worker from before a restart) cannot finish the task
    assert store.mark_started(a.id) == 1
    assert store.requeue(a.id, "worker lost")
    assert store.mark_started(a.id) == 2
    assert not store.finish(a.id, "COMPLETED", result={"x": 1}, attempt=1)
    assert store.finish(a.id, "COMPLETED", result={"x": 2}, attempt=2)
    assert store.get_task(a.id).result == {"x": 2}
    # cancel a queued task: a late result is discarded
    assert store.cancel(b.id) == (True, "CANCELLED")
    assert store.mark_started(b.id) is None
    assert not store.finish(b.id, "COMPLETED", result={"x": 3})
    assert store.get_task(b.id).status == "CANCELLED" and store.get_task(b.id).result is None
    # failures keep the error
    store.mark_started(c.id)
    assert store.finish(c.id, "TIMEOUT", error="timed out after 1 s")
    assert store.get_task(c.id).error == "timed out after 1 s"
    assert store.get_logs(c.id, level="ERROR")[-1].message == "task timeout: timed out after 1 s"


def test_batch_insert_is_atomic(store, cu_id):
    before = (store.count(Task), store.count(TaskLog))
    with pytest.raises(Exception):  # noqa: B017 - the driver's IntegrityError
        store.create_tasks([_new(cu_id), _new("f" * 64)])  # the second names no stored structure
    assert (store.count(Task), store.count(TaskLog)) == before
    with pytest.raises(ValueError):
        store.create_tasks([_new(cu_id, priority="URGENT")])
    assert store.count(Task) == before[0]


def test_requeue_active_after_restart(url, cu_id):
    s1 = Store(url)
    queued, running, assigned, pending, done, cancelled, critical = s1.create_tasks(
        [_new(cu_id) for _ in range(6)] + [_new(cu_id, priority="CRITICAL")])
    for t in (queued, running, assigned, done, cancelled, critical):
        s1.mark_queued(t.id)
    s1.mark_started(running.id)
    s1.mark_assigned(assigned.id, worker="w")
    s1.mark_started(done.id)
    s1.finish(done.id, "COMPLETED", result={"ok": True})
    s1.cancel(cancelled.id)
    s1.close()

    s2 = Store(url)  # "restart": a fresh engine on the same database
    order = s2.requeue_active()
    assert order == [critical.id, queued.id, running.id, assigned.id, pending.id]
    assert s2.get_task(running.id).status == "QUEUED" and s2.get_task(running.id).worker is None
    assert s2.get_task(assigned.id).status == "QUEUED"
    assert s2.get_task(pending.id).status == "PENDING"
    assert s2.get_task(done.id).status == "COMPLETED" and s2.get_task(cancelled.id).status == "CANCELLED"
    assert s2.get_logs(running.id)[-1].message == "task requeued: server restarted"
    assert s2.mark_started(running.id) == 2  # the second attempt
    s2.close()


def test_crashes_are_counted_and_capped(store, cu_id):
    """record_crash: a task whose worker died goes back to the queue until its crashes reach the cap, then
    it is FAILED with a stable 'worker crashed' error; stale attempts and finished tasks are left alone."""
    t, done = store.create_tasks([_new(cu_id), _new(cu_id)])
    for tid in (t.id, done.id):
        store.mark_queued(tid)
    assert store.record_crash(t.id, "killed by signal 6 (SIGABRT)", max_crashes=2) is None  # not on a worker
    assert store.mark_started(t.id, worker="w0") == 1
    assert store.record_crash(t.id, "killed by signal 6 (SIGABRT)", max_crashes=2, attempt=7) is None  # stale
    assert store.record_crash(t.id, "killed by signal 6 (SIGABRT)", max_crashes=2, attempt=1) == TaskStatus.QUEUED
    row = store.get_task(t.id)
    assert (row.status, row.crashes, row.worker) == ("QUEUED", 1, None)
    assert store.mark_started(t.id, worker="w1") == 2
    assert store.record_crash(t.id, "killed by signal 11 (SIGSEGV)", max_crashes=2, attempt=2) == TaskStatus.FAILED
    row = store.get_task(t.id)
    assert row.status == "FAILED" and row.crashes == 2 and row.finished_at is not None
    assert row.error.startswith("worker crashed") and "SIGSEGV" in row.error and "2 time(s)" in row.error
    assert row.snapshot().crashes == 2 and row.snapshot().done
    messages = [log.message for log in store.get_logs(t.id)]
    assert messages[-1] == f"task failed: {row.error}"
    assert "task requeued: its execution died (killed by signal 6 (SIGABRT))" in messages
    store.mark_started(done.id)
    store.finish(done.id, "COMPLETED", result={"ok": True})
    assert store.record_crash(done.id, "killed", max_crashes=2) is None
    assert store.get_task(done.id).status == "COMPLETED"


def test_requeue_active_caps_tasks_that_died_with_the_server(url, cu_id):
    """At start, a task RUNNING in the dead server counts a crash; one that reaches max_crashes is FAILED
    instead of requeued (a task that kills its server does not loop); an ASSIGNED one counts none."""
    s1 = Store(url)
    poison, assigned = s1.create_tasks([_new(cu_id), _new(cu_id)])
    for t in (poison, assigned):
        s1.mark_queued(t.id)
    s1.mark_assigned(assigned.id, worker="w")
    s1.mark_started(poison.id)
    s1.close()
    for restart in (1, 2):
        s = Store(url)
        order = s.requeue_active(max_crashes=2)
        row = s.get_task(poison.id)
        if restart == 1:
            assert order == [poison.id, assigned.id] and (row.status, row.crashes) == ("QUEUED", 1)
            assert s.get_task(assigned.id).crashes == 0
            assert s.mark_started(poison.id) == 2  # it dies with the server again
        else:
            assert order == [assigned.id] and (row.status, row.crashes, row.attempts) == ("FAILED", 2, 2)
            assert row.error.startswith("worker crashed") and "the server stopped while it ran" in row.error
        s.close()


def test_list_filters_paging_and_queue_stats(store, cu_id):
    tasks = store.create_tasks([_new(cu_id, type="single_point", model="emt") for _ in range(3)]
                               + [_new(cu_id, type="optimization", model="lj", priority="LOW") for _ in range(2)],
                               batch_id="b1")
    store.mark_started(tasks[0].id)
    store.finish(tasks[0].id, "FAILED", error="boom")
    page = store.list_tasks(page=1, page_size=2)
    assert page.total == 5 and len(page.items) == 2
    assert len(store.list_tasks(page=3, page_size=2).items) == 1
    assert store.list_tasks(TaskFilter(type="optimization")).total == 2
    assert store.list_tasks(TaskFilter(model="emt", status=["PENDING"])).total == 2
    assert store.list_tasks(TaskFilter(status=["FAILED", "COMPLETED"])).total == 1
    assert store.list_tasks(TaskFilter(priority="LOW", batch_id="b1")).total == 2
    now = datetime.now(UTC)
    assert store.list_tasks(TaskFilter(created_after=now - timedelta(minutes=5))).total == 5
    assert store.list_tasks(TaskFilter(created_before=now - timedelta(minutes=5))).total == 0
    stats = store.queue_stats()
    assert stats["NORMAL"]["PENDING"] == 2 and stats["NORMAL"]["FAILED"] == 1 and stats["LOW"]["PENDING"] == 2
    assert stats["CRITICAL"]["RUNNING"] == 0
    assert sum(sum(v.values()) for v in stats.values()) == 5


def test_logs_level_filter_and_paging(store, cu_id):
    (t,) = store.create_tasks([_new(cu_id)])
    store.add_logs([{"task_id": t.id, "level": lvl, "message": f"m{i}"}
                    for i, lvl in enumerate(["DEBUG", "INFO", "WARNING", "ERROR"])])
    logs = store.get_logs(t.id)
    assert [entry.message for entry in logs] == ["task submitted", "m0", "m1", "m2", "m3"]
    assert [entry.message for entry in store.get_logs(t.id, level="warning")] == ["m2", "m3"]
    assert [entry.message for entry in store.get_logs(t.id, after=logs[2].id, limit=2)] == ["m2", "m3"][:2]
    with pytest.raises(ValueError, match="level"):
        store.get_logs(t.id, level="LOUD")


def test_concurrent_writers_lose_nothing(store, cu_id):
    """8 threads submit and run 25 tasks each through their whole lifecycle at once."""
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(25):
                (t,) = store.create_tasks([_new(cu_id, label=f"{k}-{i}")])
                store.mark_queued(t.id)
                attempt = store.mark_started(t.id, worker=f"w{k}")
                store.finish(t.id, "COMPLETED", result={"k": k, "i": i}, attempt=attempt)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    rows = store.list_tasks(TaskFilter(status=["COMPLETED"]), page_size=500).items
    assert len(rows) == 200
    assert sorted((r.result["k"], r.result["i"]) for r in rows) == [(k, i) for k in range(8) for i in range(25)]
    assert all(r.label == f"{r.result['k']}-{r.result['i']}" and r.attempts == 1 for r in rows)
    assert store.count(TaskLog) == 600


def test_sqlite_other_process_waits_instead_of_failing(tmp_path):
    """A second connection holding the write lock briefly makes writers wait (busy timeout), not fail."""
    path = tmp_path / "busy.db"
    store = Store(f"sqlite:///{path}")
    row, _ = store.add_structure(bulk("Cu", "fcc", a=3.6), "cu", "cif")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    released = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    released.start()
    (t,) = store.create_tasks([_new(row.id)])  # blocks until the other writer commits
    released.join()
    other.close()
    assert store.get_task(t.id).status == "PENDING"
    store.close()


def test_db_cli_upgrade_and_current(tmp_path, capsys):
    from matcalc.cli import main

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["db", "--db", url, "current"]) == 0
    assert "revision None" in capsys.readouterr().out
    assert main(["db", "--db", url, "upgrade"]) == 0
    assert main(["db", "--db", url, "current"]) == 0
    assert f"revision {db.head_revision()}" in capsys.readouterr().out.splitlines()[-1]
    assert main(["db", "--db", url, "downgrade", "base"]) == 0
    engine = db.make_engine(url)
    assert "tasks" not in db.table_names(engine)
    engine.dispose()


def test_json_columns_keep_floats_and_nesting(store, cu_id):
    (t,) = store.create_tasks([_new(cu_id, parameters={"supercell": [2, 2, 2], "t_max": 1000.5,
                                                       "fixed_atoms": [0, 3], "nested": {"a": None}})])
    store.mark_started(t.id)
    forces = np.random.default_rng(0).normal(size=(4, 3))
    store.finish(t.id, "COMPLETED", result={"forces_eV_per_A": forces.tolist(), "energy_eV": -3.25})
    got = store.get_task(t.id)
    assert got.parameters["nested"] == {"a": None} and got.parameters["t_max"] == 1000.5
    np.testing.assert_array_equal(np.asarray(got.result["forces_eV_per_A"]), forces)


def test_concurrent_inserts_of_one_structure_deduplicate(store):
    """Many requests bringing the same new structure at once: one row, no integrity error."""
    from matcalc.store import NewStructure

    atoms = bulk("Pt", "fcc", a=3.92, cubic=True)
    sid = structure_hash(atoms)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            barrier.wait()
            store.create_tasks([_new(sid, label=str(k))], structures=[NewStructure(atoms, f"text {k}", "cif")])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert store.count(Structure) == 1 and store.count(Task) == 8
    assert store.get_structure(sid).content.startswith("text ")
