"""matcalc on a real one-node SLURM (``scripts/ci-slurm``; .ci/run starts it and sets MATCALC_TEST_SLURM=1,
SLURM_CONF and MATCALC_REQUIRE_SLURM=1, which turns the skip below into a failure): tasks through dask workers
in SLURM batch jobs equal the in-process results; ``scancel`` of the job running a task mid-task -> the task
completes once on another job; ``matcalc serve --cluster slurm`` configured from the TOML config file, its jobs
started by ``adapt``.

Locally: ``SLURM_CONF="$(./scripts/ci-slurm)" MATCALC_TEST_SLURM=1 pytest tests/test_slurm.py``, then
``./scripts/ci-slurm stop "$SLURM_CONF"``."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time

import numpy as np
import pytest
from ase.io import read, write
from test_cluster_cli import cells, journal_counts, journaled, wait_until

import matcalc as mc
from matcalc import cluster
from matcalc.cluster import TaskStatus

REQUIRED = os.environ.get("MATCALC_REQUIRE_SLURM") == "1"
JOB = {"cores": 1, "memory": "2GB", "walltime": "00:20:00", "interface": "lo"}
"""One core and 2 GB per job, the scheduler and the workers on the loopback interface."""


def slurm_missing() -> str | None:
    """Why SLURM tests cannot run here (None: they can)."""
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        return "dask-jobqueue is not installed (pip install 'matcalc-mof[hpc]')"
    if os.environ.get("MATCALC_TEST_SLURM") != "1":
        return "no test SLURM: SLURM_CONF=\"$(./scripts/ci-slurm)\" MATCALC_TEST_SLURM=1 (.ci/run does it)"
    if not shutil.which("sbatch"):
        return "sbatch not found"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    if not out.stdout.strip():
        return "sinfo lists no node"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = slurm_missing()
    if reason:
        if REQUIRED:
            pytest.fail(f"MATCALC_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def squeue_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30, check=True)
    return {line.strip() for line in out.stdout.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def jobs_cluster(slurm, tmp_path_factory):
    logs = tmp_path_factory.mktemp("slurm-logs")
    t0 = time.monotonic()
    cl = cluster.start(kind="slurm", jobs=2, preload=("emt",), log_directory=str(logs), verbose=False, **JOB)
    try:
        cl.wait_for_workers(2, timeout_s=300)
        print(f"\nSLURM: 2 workers in 2 jobs connected {time.monotonic() - t0:.1f} s after start()")
        yield cl
    finally:
        cl.close()
    assert wait_until(lambda: not (squeue_ids() & set(cluster.hpc.job_ids(cl.cluster).values())), 60)


def test_eight_tasks_through_slurm_jobs_equal_in_process(jobs_cluster):
    cl = jobs_cluster
    assert cl.kind == "slurm" and not cl.gpu
    infos = cl.workers()
    assert len(infos) == 2 and all(i["malloc_trim_threshold"] is None and "emt" in i["models"] for i in infos)
    jobs = {cl.job_of(i["address"]) for i in infos}
    assert len(jobs) == 2 and jobs <= squeue_ids()  # two batch jobs, each running one worker
    structures = cells(8)
    params = {"fmax": 1e-3, "optimizer": "BFGS", "relax_cell": True}
    tasks = cl.map("relax", structures, model="emt", **params)
    frame = cl.gather_frame(tasks, timeout=600)
    assert frame["status"].tolist() == ["COMPLETED"] * 8, frame[["label", "status", "error"]]
    assert frame["label"].tolist() == [a.info["label"] for a in structures]
    assert {cl.job_of(t.worker) for t in tasks} == jobs  # both jobs did work
    from matcalc.widgets import results_table  # the notebook's table reads these Tasks as any others

    assert results_table(tasks)["label"].tolist() == frame["label"].tolist()
    for t, atoms in zip(tasks, structures, strict=True):
        local = mc.relax(atoms, "emt", **params)
        remote = t.result()
        assert remote.steps == local.steps and remote.converged == local.converged
        np.testing.assert_allclose(remote.energies_eV, local.energies_eV, rtol=0, atol=1e-10)
        np.testing.assert_allclose(remote.final_structure.cell[:], local.final_structure.cell[:], atol=1e-10)


def test_scancel_of_the_job_running_a_task_completes_it_once(jobs_cluster, tmp_path):
    """Last on this cluster: one of its two jobs is cancelled."""
    cl = jobs_cluster
    journal = tmp_path / "journal"
    journal.mkdir()
    (atoms,) = cells(1)
    params = {"fmax": 1e-3, "optimizer": "BFGS", "relax_cell": False}
    task = cl.submit(journaled(journal), atoms, model="emt", hold=True, **params)
    marker = journal / "Cu4-0.held"
    assert wait_until(marker.exists, 300), "the held task never started"
    assert wait_until(lambda: task.status == TaskStatus.RUNNING, 60), task.status
    job = marker.read_text().split()[1]
    assert job and job == cl.job_of(task.worker)
    subprocess.run(["scancel", job], check=True, timeout=30)
    assert task.wait(300), task.status
    assert task.status == TaskStatus.COMPLETED, task.error
    assert task.crashes == 1 and task.attempts == 2 and cl.job_of(task.worker) != job
    starts, done = journal_counts(journal, "Cu4-0")
    assert (starts, done) == (2, 1)
    local = mc.relax(atoms, "emt", **params)
    np.testing.assert_allclose(task.result().energies_eV, local.energies_eV, rtol=0, atol=1e-10)
    assert wait_until(lambda: job not in squeue_ids(), 60)


def test_serve_cluster_slurm_from_the_config_file(slurm, tmp_path):
    """``matcalc serve --cluster slurm``: the [cluster] table lays out the jobs; adapt starts one when tasks come."""
    from fastapi.testclient import TestClient
    from live_server import wait_tasks

    from matcalc.server import create_app
    from matcalc.server.config import load_settings

    toml = tmp_path / "matcalc.toml"
    toml.write_text(f'[server]\ndb_url = "sqlite:///{tmp_path / "slurm.db"}"\n\n[cluster]\nkind = "slurm"\n'
                    f'cores = 1\nmemory = "2GB"\nwalltime = "00:20:00"\ninterface = "lo"\nminimum_jobs = 0\n'
                    f'maximum_jobs = 1\nlog_directory = "{tmp_path / "logs"}"\n')
    settings = load_settings(config_file=toml, env={})
    assert settings.cluster == "slurm"
    before = squeue_ids()
    (atoms,) = cells(1)
    buf = io.StringIO()
    write(buf, atoms, format="extxyz")
    with TestClient(create_app(settings)) as c:
        cfg = c.get("/api/v1/system/config").json()["data"]
        assert cfg["executor"]["cluster"] == "slurm" and cfg["dashboard"].startswith("http://")
        assert cfg["cluster_options"]["maximum_jobs"] == 1
        tid = c.post("/api/v1/tasks/single-point", json={"structure": buf.getvalue(), "format": "extxyz",
                                                          "model": "emt"}).json()["data"]["id"]
        done = wait_tasks(c, [tid], timeout_s=300)[tid]
        assert done["status"] == "COMPLETED", done
        ours = squeue_ids() - before
        assert len(ours) == 1  # the one job adapt submitted
        energy = c.get(f"/api/v1/tasks/{tid}/result").json()["data"]["result"]["energy_eV"]
    sent = read(io.StringIO(buf.getvalue()), format="extxyz")
    assert energy == pytest.approx(mc.single_point(sent, "emt").energy_eV, abs=1e-10)
    assert wait_until(lambda: not (squeue_ids() & ours), 60)  # the server's shutdown cancelled its job
