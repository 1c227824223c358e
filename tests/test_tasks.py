"""matcalc.tasks: the one lifecycle (statuses, transitions, priorities, state, snapshot) and the layers that
take it from there: the store's transitions, dask priorities and the server's queue follow the same rules."""

from __future__ import annotations

import threading

import pytest

from matcalc.cluster.tasks import Task, dask_priority
from matcalc.execution import Job
from matcalc.tasks import (
    ACTIVE,
    PRIORITIES,
    STATUSES,
    TERMINAL,
    Priority,
    TaskSnapshot,
    TaskState,
    TaskStatus,
    can_advance,
    check_priority,
    check_status,
    crash_error,
    death_reason,
)


def test_statuses_sets_and_transitions():
    assert STATUSES == ("PENDING", "QUEUED", "ASSIGNED", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    assert TERMINAL | ACTIVE == set(TaskStatus) and not TERMINAL & ACTIVE
    order = ["PENDING", "QUEUED", "ASSIGNED", "RUNNING"]
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            assert can_advance(a, b) == (j > i), (a, b)
        assert all(can_advance(a, t) for t in TERMINAL)
    for t in TERMINAL:
        assert not any(can_advance(t, s) for s in TaskStatus)
    assert check_status("running") is TaskStatus.RUNNING
    with pytest.raises(ValueError, match="status must be one of PENDING"):
        check_status("DONE")


def test_one_priority_order_everywhere():
    assert PRIORITIES == ("CRITICAL", "HIGH", "NORMAL", "LOW")
    assert [p.rank for p in Priority] == [0, 1, 2, 3] and [p.level for p in Priority] == [3, 2, 1, 0]
    assert check_priority(" high ") is Priority.HIGH
    with pytest.raises(ValueError, match="priority must be one of CRITICAL, HIGH, NORMAL, LOW"):
        check_priority("URGENT")
    # dask runs higher numbers first: every level beats the next, FIFO within a level
    numbers = [dask_priority(p) for p in ("LOW", "CRITICAL", "NORMAL", "HIGH", "CRITICAL")]
    low, crit1, normal, high, crit2 = numbers
    assert crit1 > crit2 > high > normal > low


def test_the_server_queue_follows_the_same_order():
    """The executor's queue hands tasks out by priority, FIFO within a level (no worker runs them here:
    the callbacks only record the order in which the queue offers them)."""
    from matcalc.server.pool import PoolExecutor

    offered: list[str] = []
    done = threading.Event()

    class Record:
        def on_started(self, task_id, worker, gpu):
            offered.append(task_id)
            if len(offered) == 6:
                done.set()
            return None  # "cancelled meanwhile": nothing runs

    ex = PoolExecutor(1, isolated=False)
    for i, prio in enumerate(["LOW", "NORMAL", "CRITICAL", "NORMAL", "HIGH", "CRITICAL"]):
        ex.submit(Job(task_id=f"{prio}-{i}", model="emt", prop="single_point", priority=prio))
    ex.start(Record())
    try:
        assert done.wait(30)
        assert offered == ["CRITICAL-2", "CRITICAL-5", "HIGH-4", "NORMAL-1", "NORMAL-3", "LOW-0"]
    finally:
        ex.shutdown(5)


def test_state_transitions_and_callbacks():
    seen: list[tuple[str, str]] = []
    state = TaskState()
    state.add_status_callback(lambda owner, s: seen.append(("status", s.value)))
    state.add_progress_callback(lambda owner, ev: seen.append(("progress", str(ev["step"]))))
    state.add_done_callback(lambda owner: seen.append(("done", owner.status.value)))
    assert state.start_attempt() == 1
    assert state.advance(TaskStatus.QUEUED) and state.advance(TaskStatus.RUNNING, "w1", at=5.0)
    assert not state.advance(TaskStatus.QUEUED)  # never backwards
    assert state.started_at == 5.0 and state.worker == "w1"
    assert state.record_progress({"step": 3})
    assert state.retry(crashed=True) and state.status == TaskStatus.PENDING and state.crashes == 1
    assert state.progress is None and state.started_at is None
    assert state.start_attempt() == 2 and state.advance(TaskStatus.RUNNING)
    assert state.finish(TaskStatus.FAILED, error=ValueError("bad"))
    assert not state.finish(TaskStatus.COMPLETED, result=1) and not state.retry()  # terminal stays terminal
    assert not state.record_progress({"step": 9})
    assert state.error == "ValueError: bad" and state.done()
    assert seen == [("status", "QUEUED"), ("status", "RUNNING"), ("progress", "3"), ("status", "PENDING"),
                    ("status", "RUNNING"), ("status", "FAILED"), ("done", "FAILED")]
    with pytest.raises(ValueError, match="terminal"):
        state.advance(TaskStatus.COMPLETED)
    late: list[str] = []
    state.add_done_callback(lambda owner: late.append("late"))  # called at once when already finished
    assert late == ["late"]


def test_one_snapshot_shape_for_cluster_tasks_store_rows_and_rest_json(tmp_path):
    pytest.importorskip("sqlalchemy")
    from ase.build import bulk

    from matcalc.server.schemas import TaskOut
    from matcalc.store import NewTask, Store

    task = Task(task_id="t1", prop="single_point", model="emt", priority="high", params={})
    task.state.start_attempt()
    task.state.advance(TaskStatus.RUNNING, "w")
    task.state.finish(TaskStatus.FAILED, error=RuntimeError("x"))
    snap = TaskSnapshot.of(task)
    assert (snap.id, snap.status, snap.priority, snap.attempts, snap.worker, snap.error) == (
        "t1", TaskStatus.FAILED, Priority.HIGH, 1, "w", "RuntimeError: x")
    assert TaskSnapshot.of(snap.to_dict()) == snap  # the JSON form reads back as the same snapshot

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        sid = store.add_structure(bulk("Cu", "fcc", a=3.6), "text", "cif")[0].id
        row = store.create_tasks([NewTask(type="single-point", model="emt", structure_id=sid, priority="LOW")])[0]
        store.mark_queued(row.id)
        store.mark_started(row.id, worker="process-0:1")
        store.record_crash(row.id, "killed by signal 9 (SIGKILL)", max_crashes=1)
        row = store.get_task(row.id)
        rest = TaskOut.of(row).model_dump(mode="json")
        assert TaskSnapshot.of(rest) == row.snapshot()  # the REST task and the stored row: one shape
        s = row.snapshot()
        assert (s.status, s.priority, s.attempts, s.crashes, s.property) == (
            TaskStatus.FAILED, Priority.LOW, 1, 1, "single-point")
        assert s.error == crash_error("killed by signal 9 (SIGKILL)", 1, 1)
    finally:
        store.close()


def test_death_reasons():
    assert death_reason(-6) == "killed by signal 6 (SIGABRT)"
    assert death_reason(-9) == "killed by signal 9 (SIGKILL)"
    assert death_reason(3) == "exited with status 3"
