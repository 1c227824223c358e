"""matcalc.cluster on a small CPU LocalCluster (1 worker process, 1 task thread, EMT)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

import matcalc as mc
from matcalc import cluster
from matcalc.cluster import TaskCancelledError, TaskStatus, TaskTimeoutError


def cu(n: int = 2, rattle: float = 0.05, seed: int = 0):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(n)
    atoms.rattle(rattle, seed=seed)
    return atoms


def wait_for(cond, timeout: float = 60.0, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return cond()


def endless_md():
    """A task function running NVE molecular dynamics (ASE loop) until asked to stop."""

    def endless_md(structure, model, **params):  # nested: cloudpickle ships it by value
        from ase import units
        from ase.md.verlet import VelocityVerlet

        from matcalc import progress
        from matcalc.calculations.common import prepare

        prep = prepare(structure, model)
        atoms = prep.atoms
        atoms.calc = prep.calculator()
        md = VelocityVerlet(atoms, timestep=1.0 * units.fs)
        for step in range(10**9):
            md.run(1)
            progress.report("md", step, 10**9, energy_eV=float(atoms.get_potential_energy()))
            if progress.should_stop():
                raise progress.StopRequested(f"stopped at step {step}")
        raise AssertionError("unreachable")

    return endless_md


def blocker(cl, **kw):
    """A task that keeps the (single-threaded) worker busy until it is stopped."""
    return cl.submit(endless_md(), cu(2, 0.2, seed=7), model="emt", **kw)


@pytest.fixture(scope="module")
def cl():
    with cluster.start(n_gpus=0, n_workers=1, threads_per_worker=1, preload=("emt",), dashboard=False,
                       torch_threads=2) as c:
        yield c


def test_workers_report_setup_and_env(cl):
    (info,) = cl.workers()
    assert info["nthreads"] == 1
    assert info["torch_threads"] == 2  # set deliberately (dask's default environment says 1)
    assert "emt" in info["models"]  # preloaded
    assert info["gpu"] is None and info["device"] == "cpu"
    env = cl.client.run(cluster.worker.worker_environ)
    (worker_env,) = env.values()
    assert "MALLOC_TRIM_THRESHOLD_" not in worker_env
    assert worker_env["OMP_NUM_THREADS"] == "2"
    assert worker_env["OPENBLAS_NUM_THREADS"] == "1"  # numpy's small linear algebra: one thread

    def torch_threads_in_task(structure, model, **params):  # runs in a dask task thread
        import torch

        torch.ones(64, 64) @ torch.ones(64, 64)  # initialises this thread's intra-op pool
        return torch.get_num_threads()

    assert cl.submit(torch_threads_in_task, cu(1), model="emt").result(60) == 2


def test_results_equal_in_process(cl):
    atoms = cu(2, 0.1, seed=3)
    task = cl.submit(mc.relax, atoms, model="emt", fmax=1e-3, optimizer="BFGS", relax_cell=False)
    sp = cl.submit("single_point", atoms, model="emt", task_id="sp-equal")
    remote = task.result(120)
    local = mc.relax(atoms, "emt", fmax=1e-3, optimizer="BFGS", relax_cell=False)
    assert task.status == TaskStatus.COMPLETED and task.id and sp.id == "sp-equal"
    assert remote.steps == local.steps
    np.testing.assert_allclose(remote.energies_eV, local.energies_eV, rtol=0, atol=1e-10)
    np.testing.assert_allclose(remote.final_structure.positions, local.final_structure.positions, atol=1e-10)
    # and against plain ASE on the same model
    ref = atoms.copy()
    ref.calc = EMT()
    e0 = ref.get_potential_energy()
    assert sp.result(60).energy_eV == pytest.approx(e0, abs=1e-10)
    np.testing.assert_allclose(sp.result().forces_eV_per_A, ref.get_forces(), atol=1e-10)
    frame = cl.gather_frame([task, sp])
    assert list(frame["task_id"]) == [task.id, "sp-equal"]
    assert frame["error"].isna().all()
    assert frame.loc[1, "energy_eV"] == pytest.approx(e0, abs=1e-10)
    d = task.to_dict()
    assert d["status"] == "COMPLETED" and d["result"]["kind"] == "relax" and d["worker"]
    calls = []
    task.add_done_callback(calls.append)  # already finished: called at once
    assert calls == [task]


def test_progress_events_arrive_during_relaxation(cl):
    events, during = [], []
    task = cl.submit("relax", cu(2, 0.25, seed=11), model="emt", fmax=1e-5, optimizer="FIRE", relax_cell=False,
                     max_steps=3000)

    def on_progress(t, event):
        events.append(event)
        during.append(not t.done())

    task.add_progress_callback(on_progress)
    result = task.result(120)
    assert result.steps > 50
    assert len(events) >= 2 and any(during)
    steps = [e["step"] for e in events]
    assert steps == sorted(steps)
    assert all(e["stage"] == "relax" and e["total_steps"] == 3000 for e in events)
    assert events[-1]["step"] == result.steps  # the last step is always delivered
    assert events[-1]["energy_eV"] == pytest.approx(result.final_energy_eV, abs=1e-9)
    assert task.progress == events[-1]
    messages = [r["message"] for r in task.logs]
    assert any("relax: converged" in m for m in messages)
    assert all(r["task_id"] == task.id for r in task.logs)


def test_failing_task_leaves_cluster_healthy(cl):
    bad = cl.submit("relax", cu(), model="emt", fmax=-1.0, retries=3)  # invalid input: never retried
    silicon = cl.submit("single_point", bulk("Si"), model="emt")  # EMT has no Si parameters
    unreadable = cl.submit("single_point", "not a structure at all\n\n", model="emt")
    good = cl.map("single_point", [cu(2, 0.05, seed=s) for s in range(3)], model="emt")
    assert isinstance(bad.exception(60), ValueError) and "fmax" in str(bad.exception())
    assert bad.status == TaskStatus.FAILED and bad.attempts == 1
    with pytest.raises(ValueError):
        bad.result()
    assert silicon.exception(60) is not None and silicon.status == TaskStatus.FAILED
    assert unreadable.status == TaskStatus.FAILED and isinstance(unreadable.exception(), mc.StructureError)
    assert all(t.result(60).energy_eV for t in good)
    frame = cl.gather_frame([bad, *good])
    assert frame["error"].notna().tolist() == [True, False, False, False]
    assert frame.loc[0, "status"] == "FAILED" and "fmax" in frame.loc[0, "error"]


def test_unreadable_file_is_a_failed_row_named_after_the_file(cl, tmp_path: Path):
    """A malformed CIF fails its own task with a StructureError naming the problem, and its row (task label,
    gather_frame, the widgets' results table) is named after the file, as the rows of readable files are."""
    from matcalc.widgets import results_table

    bad = tmp_path / "bad.cif"
    bad.write_text("data_bad\nloop_\n_atom_site_label\n_atom_site_fract_x\nC1 0.1 0.2\n")
    good = tmp_path / "Cu4.xyz"
    cu(1, 0.0).write(good, format="extxyz")
    tasks = cl.map("single_point", [str(bad), good], model="emt")
    assert [t.label for t in tasks] == ["bad", "Cu4"]
    assert tasks[0].status == TaskStatus.FAILED and isinstance(tasks[0].exception(), mc.StructureError)
    assert "bad.cif" in tasks[0].error
    frame = cl.gather_frame(tasks)
    assert frame["label"].tolist() == ["bad", "Cu4"] and frame["status"].tolist() == ["FAILED", "COMPLETED"]
    table = results_table(tasks)
    assert table["label"].tolist() == ["bad", "Cu4"]


def compute_failed_shown(key: str) -> bool:
    """On a worker: would dask's "Compute Failed" record (with its traceback) of task ``key`` pass the filters of
    the worker's ``distributed.worker`` logger (that is, be printed)?"""
    import logging

    logger = logging.getLogger("distributed.worker")
    record = logger.makeRecord("distributed.worker", logging.ERROR, __file__, 0,
                               "Compute Failed\nKey:       %s\nState:     executing\nTraceback: %r\n",
                               (key, "Traceback (most recent call last): ..."), None)
    return all(f.filter(record) for f in logger.filters)


def test_expected_failures_are_not_printed_by_dask_workers(cl):
    """A matcalc task's failure is its own outcome (on the Task, above); dask's worker does not print it again as
    a traceback in the notebook. Anyone else's task failures still are."""
    ours = cl.client.run(compute_failed_shown, cluster.worker.task_key("relax", "CALF-20"))
    theirs = cl.client.run(compute_failed_shown, "inc-5f3a")
    assert ours and not any(ours.values())
    assert theirs and all(theirs.values())


def test_invalid_submission_arguments(cl):
    with pytest.raises(ValueError, match="priority"):
        cl.submit("single_point", cu(), model="emt", priority="URGENT")
    with pytest.raises(ValueError, match="timeout_s"):
        cl.submit("single_point", cu(), model="emt", timeout_s=0)
    with pytest.raises(ValueError, match="retries"):
        cl.submit("single_point", cu(), model="emt", retries=-1)
    with pytest.raises(ValueError, match="unknown property"):
        cl.submit("melting_point", cu(), model="emt")
    t = cl.submit("single_point", cu(), model="emt", task_id="dup")
    with pytest.raises(ValueError, match="task_id"):
        cl.submit("single_point", cu(), model="emt", task_id="dup")
    t.result(60)


def test_priorities_reorder_queued_work(cl):
    block = blocker(cl, task_id="prio-blocker")
    assert wait_for(lambda: block.status == TaskStatus.RUNNING)
    order = ["LOW", "LOW", "NORMAL", "HIGH", "LOW", "HIGH", "CRITICAL"]
    tasks = [cl.submit("single_point", cu(1), model="emt", priority=p, task_id=f"prio-{i}-{p}")
             for i, p in enumerate(order)]
    # all wait on the worker's queue (ASSIGNED), behind the running blocker
    assert wait_for(lambda: all(t.status == TaskStatus.ASSIGNED for t in tasks))
    assert block.cancel()
    for t in tasks:
        t.result(60)
    ran = [t.id for t in sorted(tasks, key=lambda t: t.started_at)]
    assert ran == ["prio-6-CRITICAL", "prio-3-HIGH", "prio-5-HIGH", "prio-2-NORMAL",
                   "prio-0-LOW", "prio-1-LOW", "prio-4-LOW"]


def test_cancel_queued_and_running(cl):
    block = blocker(cl)
    queued = cl.submit("single_point", cu(), model="emt")
    assert wait_for(lambda: block.status == TaskStatus.RUNNING)
    assert queued.status in (TaskStatus.QUEUED, TaskStatus.ASSIGNED)
    assert queued.cancel()
    assert queued.status == TaskStatus.CANCELLED
    with pytest.raises(TaskCancelledError):
        queued.result(1)
    assert not queued.cancel()  # already finished
    assert block.cancel()
    assert block.status == TaskStatus.CANCELLED
    # the worker thread stops at the next optimizer step and is free again
    assert wait_for(lambda: cl.workers()[0]["running_tasks"] == [], timeout=60, every=0.3)
    after = cl.submit("single_point", cu(), model="emt")
    assert after.result(60).n_atoms == 32
    assert queued.started_at is None  # never ran


def test_timeout(cl):
    slow = blocker(cl, timeout_s=1.0)
    with pytest.raises(TaskTimeoutError):
        slow.result(60)
    assert slow.status == TaskStatus.TIMEOUT
    assert slow.started_at is not None
    assert wait_for(lambda: cl.workers()[0]["running_tasks"] == [], timeout=60, every=0.3)
    assert cl.submit("single_point", cu(), model="emt").result(60)


def test_retry_only_transient_errors(cl, tmp_path: Path):
    marker = str(tmp_path / "first-attempt-done")

    def flaky(structure, model, **params):  # nested: cloudpickle ships it by value
        import os

        from matcalc.calculations.single_point import single_point

        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return single_point(structure, model, **params)

    retried = cl.submit(flaky, cu(), model="emt", retries=1)
    assert retried.result(60).n_atoms == 32
    assert retried.attempts == 2 and retried.status == TaskStatus.COMPLETED and retried.property == "flaky"
    Path(marker).unlink()
    no_retry = cl.submit(flaky, cu(), model="emt", retries=0)
    assert "out of memory" in str(no_retry.exception(60)) and no_retry.status == TaskStatus.FAILED


def test_gpus_without_gpu(monkeypatch):
    import torch

    if not torch.cuda.is_available():
        assert cluster.gpus() == []
        usable, reason = cluster.cuda_status()
        assert not usable and "GPU" in reason
    gpu_module = sys.modules["matcalc.cluster.gpus"]  # (the package exports the function under that name)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    monkeypatch.setattr(gpu_module, "_NVML_READY", None)
    assert cluster.gpus() == []


def test_connect_to_running_scheduler(cl):
    atoms = cu(2, 0.05, seed=5)
    ref = atoms.copy()
    ref.calc = EMT()
    with cluster.connect(cl.address, torch_threads=2, dashboard=False) as other:
        task = other.submit("single_point", atoms, model="emt")
        assert task.result(60).energy_eV == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        assert [w["address"] for w in other.workers()] == [w["address"] for w in cl.workers()]
        assert not other.gpu
        running = blocker(other)
        assert wait_for(lambda: running.status == TaskStatus.RUNNING)
    # closing a connection cancels its unfinished tasks (also on the workers) ...
    assert running.status == TaskStatus.CANCELLED
    assert wait_for(lambda: cl.workers()[0]["running_tasks"] == [], timeout=60, every=0.3)
    # ... and leaves the cluster running
    assert cl.submit("single_point", atoms, model="emt").result(60).n_atoms == len(atoms)
    with pytest.raises(ValueError, match="address"):
        cluster.connect("")


def test_task_logs_are_isolated_between_concurrent_tasks():
    """Log records go to the task whose context emitted them, also with tasks in parallel threads
    (the one job runner, as the dask workers and the server's workers run it)."""
    from concurrent.futures import ThreadPoolExecutor

    from matcalc.execution import Job, install_log_capture, run_job

    install_log_capture("INFO")
    published: dict[str, list] = {"a": [], "b": []}

    def one(tid: str):
        job = Job(task_id=tid, model="emt", prop="relax", structure=cu(2, 0.1, seed=ord(tid)),
                  params={"fmax": 1e-3, "optimizer": "FIRE", "relax_cell": False})
        return run_job(job, published[tid].append, progress_interval_s=0.0)

    with ThreadPoolExecutor(2) as pool:
        out = dict(zip("ab", pool.map(one, "ab"), strict=True))
    for tid in "ab":
        assert out[tid].status == TaskStatus.COMPLETED, out[tid].error
        logs = out[tid].logs
        assert logs and all(r["task_id"] == tid for r in logs)
        assert sum("relax: converged" in r["message"] for r in logs) == 1
        kinds = [m["type"] for m in published[tid]]
        assert kinds[0] == "running" and "progress" in kinds and "log" in kinds
        assert all(m["task_id"] == tid and m["attempt"] == 1 for m in published[tid])
        progress_events = [m for m in published[tid] if m["type"] == "progress"]
        assert progress_events[-1]["step"] == out[tid].result.steps


@pytest.mark.slow
def test_chgnet_single_point_equals_in_process(cl):
    si = bulk("Si", "diamond", a=5.43, cubic=True)
    si.rattle(0.03, seed=2)
    remote = cl.submit("single_point", si, model="chgnet").result(300)
    local = mc.single_point(si, "chgnet")
    assert remote.energy_eV == pytest.approx(local.energy_eV, rel=1e-6)
    np.testing.assert_allclose(remote.forces_eV_per_A, local.forces_eV_per_A, atol=1e-5)
    np.testing.assert_allclose(remote.stress_GPa, local.stress_GPa, atol=1e-4)
    assert "chgnet" in cl.workers()[0]["models"]  # kept loaded for the next task (model affinity)


def test_cancel_from_a_status_callback(cl):
    """Callbacks run on the client's event loop thread; cancelling from there still stops the worker."""
    task = blocker(cl)
    task.add_status_callback(lambda t, status: t.cancel() if status == TaskStatus.RUNNING else None)
    with pytest.raises(TaskCancelledError):
        task.result(60)
    assert task.status == TaskStatus.CANCELLED
    assert wait_for(lambda: cl.workers()[0]["running_tasks"] == [], timeout=60, every=0.3)


def test_transient_error_classification():
    from distributed.scheduler import KilledWorker

    assert cluster.is_transient(KilledWorker("matcalc-relax-1", "tcp://127.0.0.1:1", "worker died"))
    assert cluster.is_transient(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not cluster.is_transient(ValueError("fmax must be > 0"))
    assert not cluster.is_transient(mc.StructureError("partial occupancy"))
    assert not cluster.is_transient(TaskTimeoutError("late"))
    assert not cluster.is_transient(RuntimeError("model diverged"))
