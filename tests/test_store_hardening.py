"""Store hardening: NaN/Infinity never reach storage (same on SQLite and PostgreSQL), idempotency keys
stored with their tasks, the label filter, SQLite synchronous=FULL.

PostgreSQL runs too when MATCALC_TEST_PG_URL is set (CI starts one with scripts/ci-postgres).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from ase.build import bulk
from sqlalchemy import select, text

from matcalc.store import Alert, NewTask, Store, TaskFilter, TaskLog, db
from matcalc.store.repository import (
    IdempotencyClaim,
    IdempotencyKeyReusedError,
    IdempotencyKeyTakenError,
)
from test_store import BACKENDS, PG_URL, _reset_pg


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
    row, _ = store.add_structure(bulk("Cu", "fcc", a=3.6, cubic=True), "cu text", "cif", name="Cu")
    return row.id


def _new(structure_id: str, **kw) -> NewTask:
    return NewTask(type="single_point", model="emt", structure_id=structure_id, **kw)


def _raw(store: Store, table: str, column: str, row_id) -> str:
    """The column's text exactly as the database holds it."""
    with store.engine.connect() as conn:
        return str(conn.execute(text(f"SELECT CAST({column} AS TEXT) FROM {table} WHERE id = :i"),
                                {"i": row_id}).scalar())


# ----------------------------------------------------------------------------- NaN/Infinity
def test_no_json_column_stores_nan_or_infinity(store, cu_id):
    """Every JSON column the store writes: parameters, progress, result, log data, alert data."""
    nan, inf = float("nan"), float("inf")
    [task] = store.create_tasks([_new(cu_id, parameters={"position": [nan, 0.0, 0.0], "temperature_K": inf})])
    assert store.mark_started(task.id) == 1
    assert store.set_progress(task.id, {"stage": "md", "energy_eV": -inf, "fmax_eV_per_A": np.float32(0.5)})
    result = {"kind": "single_point", "energy_eV": nan, "forces_eV_per_A": [[nan, 1.0, -inf]],
              "stress": np.array([1.0, np.nan]), "n": np.int64(3), "pair": (inf, 2.0)}
    assert store.finish(task.id, "COMPLETED", result=result)
    store.add_logs([{"task_id": task.id, "message": "x", "data": {"T": nan}}])
    with store.write() as s:
        alert = Alert(rule="test", message="m", data={"free_GB": inf})
        s.add(alert)
        s.flush()
        alert_id = alert.id

    row = store.get_task(task.id)
    assert row.parameters == {"position": [None, 0.0, 0.0], "temperature_K": None}
    assert row.progress == {"stage": "md", "energy_eV": None, "fmax_eV_per_A": 0.5}
    assert row.result == {"kind": "single_point", "energy_eV": None, "forces_eV_per_A": [[None, 1.0, None]],
                          "stress": [1.0, None], "n": 3, "pair": [None, 2.0]}
    assert store.get_logs(task.id)[-1].data == {"T": None}
    with store.read() as s:
        assert s.get(Alert, alert_id).data == {"free_GB": None}
        log_id = s.scalars(select(TaskLog.id).where(TaskLog.task_id == task.id).order_by(TaskLog.id.desc())).first()
    raws = [_raw(store, "tasks", c, task.id) for c in ("parameters", "progress", "result")]
    raws += [_raw(store, "task_logs", "data", log_id), _raw(store, "alerts", "data", alert_id)]
    for raw in raws:  # strict JSON text on both databases
        assert "NaN" not in raw and "Infinity" not in raw and "null" in raw


def _assert_same_result(a, b) -> None:
    """Field by field, NaN equal to NaN (what local and REST results must satisfy)."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "wall_time_s":
            continue
        np.testing.assert_equal(x, y, err_msg=f.name)


def test_nan_result_stored_and_returned_equal_to_the_local_one(store, cu_id):
    """A bulk-modulus fit that fails honestly (1-atom Cu stretched to a = 4.6 Å: E(V) has no minimum in
    the sampled volumes) gives NaN fit fields; stored and read back they are NaN again."""
    import matcalc as mc
    from matcalc.calculations.results import Result

    local = mc.bulk_modulus(bulk("Cu", "fcc", a=4.6), "emt", relax_first=False, protocol="fast")
    assert math.isnan(local.bulk_modulus_GPa) and math.isnan(local.equilibrium_volume_A3)
    assert any("failed" in w for w in local.warnings)
    assert np.all(np.isfinite(local.energies_eV))  # the E(V) points themselves are fine
    [task] = store.create_tasks([_new(cu_id)])
    store.mark_started(task.id)
    assert store.finish(task.id, "COMPLETED", result=local.to_dict())
    back = Result.from_dict(store.get_task(task.id).result)
    _assert_same_result(back, local)
    assert math.isnan(back.bulk_modulus_GPa) and math.isnan(back.pressure_derivative)


# ----------------------------------------------------------------------------- idempotency
def _claim(key: str = "k1", body: str = "a" * 64, endpoint: str = "POST /tasks/single-point") -> IdempotencyClaim:
    return IdempotencyClaim(scope="", key=key, endpoint=endpoint, request_sha256=body)


def test_idempotency_key_is_stored_with_its_tasks_and_survives_reopening(url, store, cu_id):
    claim = _claim()
    assert store.find_idempotent(claim) is None
    rows = store.create_tasks([_new(cu_id, label="a"), _new(cu_id, label="b")], batch_id="b" * 32,
                              idempotency=claim)
    with pytest.raises(IdempotencyKeyTakenError):  # the same key again: nothing more is stored
        store.create_tasks([_new(cu_id, label="c")], idempotency=claim)
    assert store.list_tasks().total == 2
    store.close()
    reopened = Store(url)
    try:
        batch_id, tasks = reopened.find_idempotent(claim)
        assert batch_id == "b" * 32 and [t.id for t in tasks] == [r.id for r in rows]
        assert all(t.idempotency_key == "k1" for t in tasks)
        with pytest.raises(IdempotencyKeyReusedError, match="another request body"):
            reopened.find_idempotent(_claim(body="b" * 64))
        with pytest.raises(IdempotencyKeyReusedError, match="POST /tasks/single-point"):
            reopened.find_idempotent(_claim(endpoint="POST /tasks/optimization"))
        assert reopened.find_idempotent(IdempotencyClaim("key:abc", "k1", claim.endpoint, claim.request_sha256)) \
            is None  # another API key's k1 is another key
    finally:
        reopened.close()


def test_list_tasks_filters_by_label(store, cu_id):
    store.create_tasks([_new(cu_id, label="MOF-5"), _new(cu_id, label="MOF-5"), _new(cu_id, label="other"),
                        _new(cu_id)])
    page = store.list_tasks(TaskFilter(label="MOF-5"))
    assert page.total == 2 and {t.label for t in page.items} == {"MOF-5"}
    assert store.list_tasks(TaskFilter(label="mof-5")).total == 0  # exact match


# ----------------------------------------------------------------------------- SQLite durability
def test_sqlite_synchronous_full_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MATCALC_SQLITE_SYNCHRONOUS", raising=False)
    for mode, expected in ((None, 2), ("normal", 1), ("FULL", 2)):
        if mode is not None:
            monkeypatch.setenv("MATCALC_SQLITE_SYNCHRONOUS", mode)
        engine = db.make_engine(f"sqlite:///{tmp_path / 'd.db'}")
        try:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == expected  # 2 = FULL, 1 = NORMAL
        finally:
            engine.dispose()
    monkeypatch.setenv("MATCALC_SQLITE_SYNCHRONOUS", "OFF")
    with pytest.raises(ValueError, match="MATCALC_SQLITE_SYNCHRONOUS must be one of FULL, NORMAL, EXTRA"):
        db.make_engine(f"sqlite:///{tmp_path / 'd.db'}")


def test_an_outcome_that_cannot_be_stored_fails_the_task_with_the_reason(store, cu_id):
    """Not left RUNNING: a result JSON cannot hold (here a datetime, as a careless adapter might return)."""
    from datetime import UTC, datetime

    from matcalc.server.service import TaskService

    service = TaskService(store, executor=None, cache=False)  # type: ignore[arg-type] - on_done needs none
    [task] = store.create_tasks([_new(cu_id)])
    attempt = store.mark_started(task.id)
    service.on_done(task.id, "COMPLETED", {"kind": "single_point", "at": datetime.now(UTC)}, None, attempt)
    row = store.get_task(task.id)
    assert row.status == "FAILED" and row.result is None
    assert "could not be stored" in row.error and "datetime cannot be stored as JSON" in row.error
