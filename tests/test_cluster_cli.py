"""A real multi-process dask cluster started from the command line (``dask scheduler`` + two ``dask worker``
processes, as a user starts one by hand), used through ``mc.cluster.connect`` and ``matcalc serve --cluster
tcp://...``: matcalc's setup reaches the workers through the client; a worker killed with SIGKILL in the middle
of a task has its tasks completed once, equal to in-process; a scheduler that goes away is a clear error."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write

import matcalc as mc
from matcalc import cluster
from matcalc.cluster import TaskStatus

DASK = str(Path(sys.executable).parent / "dask")
TESTS = Path(__file__).resolve().parent
# what docs/guide/cluster.md tells users to give hand-started workers (no MALLOC_TRIM_THRESHOLD_, one BLAS thread)
WORKER_ENV = {"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON":
              "{'MALLOC_TRIM_THRESHOLD_': None, 'OMP_NUM_THREADS': '1', 'OPENBLAS_NUM_THREADS': '1'}"}


def cells(n: int) -> list:
    out = []
    for i in range(n):
        a = bulk("Cu", "fcc", a=3.62, cubic=True)
        a.rattle(0.06, seed=i)
        a.info["label"] = f"Cu4-{i}"
        out.append(a)
    return out


def journaled(journal: Path):
    """``relax`` that writes ``start``/``done`` lines per label to ``journal`` (how often each task ran and
    completed, whoever sent it). With ``hold=True``, the first attempt of a structure first runs EMT molecular
    dynamics until its worker is killed (a long task caught in the middle; the file ``<label>.held`` names the
    process and its batch job), then the next attempt relaxes."""

    def journaled_relax(structure, model, hold=False, **params):  # nested: cloudpickle ships it by value
        import os
        import time

        from ase.calculators.emt import EMT
        from ase.md.verlet import VelocityVerlet

        import matcalc as mc

        label = structure.info["label"]
        with open(journal / f"{label}.log", "a") as f:
            f.write(f"start {os.getpid()}\n")
        held = journal / f"{label}.held"
        if hold and not held.exists():
            held.write_text(f"{os.getpid()} {os.environ.get('SLURM_JOB_ID', '')}")
            md_atoms = structure.copy()
            md_atoms.calc = EMT()
            md = VelocityVerlet(md_atoms, timestep=1.0)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # until this process is killed
                md.run(5)
            raise AssertionError("the worker running the held task was never killed")
        result = mc.relax(structure, model, **params)
        with open(journal / f"{label}.log", "a") as f:
            f.write("done\n")
        return result

    return journaled_relax


def journal_counts(journal: Path, label: str) -> tuple[int, int]:
    lines = (journal / f"{label}.log").read_text().split("\n")
    return sum(ln.startswith("start") for ln in lines), sum(ln == "done" for ln in lines)


def wait_until(cond, timeout: float, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return bool(cond())


@pytest.fixture(scope="module")
def cli_cluster(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes (nanny, one thread each); yields the address."""
    base = tmp_path_factory.mktemp("cli-cluster")
    sched_file = base / "scheduler.json"
    env = {**os.environ, **WORKER_ENV, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("MATCALC_PLUGINS", None)  # the client brings its plugins
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(sched_file)], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(base / "scheduler.log", "w"), start_new_session=True)]  # noqa: SIM115
    try:
        assert wait_until(sched_file.exists, 120), (base / "scheduler.log").read_text()
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            procs.append(subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--nworkers", "1",
                                           "--name", f"cli-{i}", "--death-timeout", "60"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=open(base / f"worker-{i}.log", "w"),  # noqa: SIM115
                                          start_new_session=True))
        yield {"address": address, "scheduler": procs[0], "dir": base}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


@pytest.fixture(scope="module")
def cl(cli_cluster):
    os.environ["MATCALC_PLUGINS"] = "morse_plugin"  # installed on the workers by the client's worker plugin
    try:
        c = cluster.connect(cli_cluster["address"], preload=("emt",), torch_threads=1, timeout_s=60)
    finally:
        os.environ.pop("MATCALC_PLUGINS", None)
    with c:
        c.wait_for_workers(2, timeout_s=240)
        yield c


def test_connect_installs_matcalc_worker_setup(cl):
    infos = cl.workers()
    assert len(infos) == 2 and {i["name"] for i in infos} == {"cli-0", "cli-1"}
    for info in infos:
        assert info["torch_threads"] == 1 and "emt" in info["models"]
        assert info["malloc_trim_threshold"] is None  # the environment the docs give hand-started workers
    # the model plugin named by the client's MATCALC_PLUGINS was imported on the workers
    from ase.calculators.morse import MorsePotential
    from morse_plugin import MORSE, NAME

    (atoms,) = cells(1)
    res = cl.submit("single_point", atoms, model=NAME).result(120)
    ref = atoms.copy()
    ref.calc = MorsePotential(**MORSE)
    assert res.energy_eV == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(res.forces_eV_per_A, ref.get_forces(), atol=1e-10)
    assert cl.kind == "connected" and cl.dashboard_link and "dashboard" in cl._repr_html_()


@pytest.mark.slow
def test_server_on_a_cli_started_cluster(cl, cli_cluster, tmp_path):
    """``matcalc serve --cluster tcp://...``: tasks run on the hand-started workers; /system/config shows the
    dashboard."""
    from fastapi.testclient import TestClient
    from live_server import wait_tasks

    from matcalc.server import Settings, create_app

    (atoms,) = cells(1)
    buf = io.StringIO()
    write(buf, atoms, format="extxyz")
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'cli.db'}", cluster=cli_cluster["address"],
                              cluster_options={"timeout_s": 60}))
    with TestClient(app) as c:
        cfg = c.get("/api/v1/system/config").json()["data"]
        assert cfg["executor"]["kind"] == "dask" and cfg["executor"]["cluster"] == "connected"
        assert cfg["dashboard"] and cfg["dashboard"].startswith("http://")
        tid = c.post("/api/v1/tasks/single-point", json={"structure": buf.getvalue(), "format": "extxyz",
                                                          "model": "emt"}).json()["data"]["id"]
        done = wait_tasks(c, [tid])[tid]
        assert done["status"] == "COMPLETED" and done["worker"] in {w["address"] for w in cl.workers()}
        energy = c.get(f"/api/v1/tasks/{tid}/result").json()["data"]["result"]["energy_eV"]
    sent = read(io.StringIO(buf.getvalue()), format="extxyz")  # the structure as the server read it
    assert energy == pytest.approx(mc.single_point(sent, "emt").energy_eV, abs=1e-10)


def test_sigkill_of_a_worker_mid_task_completes_every_task_once(cl, tmp_path):
    """kill -9 of the worker running a task while the other worker is idle (where dask itself would rerun the
    task at once): the task runs again elsewhere and completes exactly once (one ``done`` in the journal, one
    terminal transition), as do the tasks submitted around the death; all equal to in-process."""
    journal = tmp_path / "journal"
    journal.mkdir()
    fn = journaled(journal)
    structures = cells(5)
    params = {"fmax": 1e-3, "optimizer": "BFGS", "relax_cell": False}
    finished: dict[str, int] = {}

    def count(t):
        finished[t.id] = finished.get(t.id, 0) + 1

    held = cl.submit(fn, structures[0], model="emt", hold=True, **params)
    held.add_done_callback(count)
    marker = journal / "Cu4-0.held"
    assert wait_until(marker.exists, 180), "the held task never started"
    assert wait_until(lambda: held.status == TaskStatus.RUNNING, 60), held.status
    victim = held.worker
    os.kill(int(marker.read_text().split()[0]), signal.SIGKILL)  # the worker process (its nanny starts a new one)
    rest = cl.map(fn, structures[1:], model="emt", **params)
    for t in rest:
        t.add_done_callback(count)
    tasks = [held, *rest]
    assert cl.wait(tasks, timeout=300), [t.status for t in tasks]
    assert [t.status for t in tasks] == [TaskStatus.COMPLETED] * 5, [(t.status, t.error) for t in tasks]
    assert held.crashes == 1 and held.attempts == 2 and held.worker != victim
    assert finished == {t.id: 1 for t in tasks}
    for t, atoms in zip(tasks, structures, strict=True):
        starts, done = journal_counts(journal, atoms.info["label"])
        assert done == 1, (atoms.info["label"], starts, done)  # never computed twice to the end
        local = mc.relax(atoms, "emt", **params)
        remote = t.result()
        assert remote.steps == local.steps
        np.testing.assert_allclose(remote.energies_eV, local.energies_eV, rtol=0, atol=1e-10)
        np.testing.assert_allclose(remote.final_structure.positions, local.final_structure.positions, atol=1e-10)
    frame = cl.gather_frame(tasks)
    assert frame["status"].tolist() == ["COMPLETED"] * 5 and frame["label"].tolist() == [
        a.info["label"] for a in structures]


def test_a_scheduler_that_goes_away_is_a_clear_error(cl, cli_cluster):
    """Last in this module: the scheduler process is killed. A task in flight FAILs with an error naming the
    scheduler's address (never RUNNING or waiting forever); connecting to the address is a ConnectionError
    naming it, after the timeout given."""
    address = cli_cluster["address"]
    atoms = bulk("Cu", "fcc", a=3.62, cubic=True).repeat(3)
    atoms.rattle(0.2, seed=5)
    task = cl.submit("relax", atoms, model="emt", fmax=1e-9, max_steps=10**6, optimizer="FIRE", relax_cell=False)
    assert wait_until(lambda: task.status == TaskStatus.RUNNING, 120), task.status
    sched = cli_cluster["scheduler"]
    os.killpg(sched.pid, signal.SIGKILL)
    sched.wait(30)
    assert task.wait(120), task.status
    assert task.status == TaskStatus.FAILED and isinstance(task.exception(), ConnectionError)
    assert address in task.error and "scheduler" in task.error
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match=address.replace(".", r"\.")):
        cluster.connect(address, timeout_s=2)
    assert time.monotonic() - t0 < 60
