"""A task that kills the process running it fails alone; nothing stays RUNNING; the attempts cap holds.

Against a live ``matcalc serve`` (default executor: supervised worker processes; and ``--cluster
local``), on SQLite and, with ``MATCALC_TEST_PG_URL``, PostgreSQL. The poison tasks use the test-only
models of ``tests/crash_plugin.py`` (registered through ``MATCALC_PLUGINS``), whose ``evaluate`` aborts,
segfaults or SIGKILLs its own process; every other result is checked against ASE's EMT run here.
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from live_server import LiveServer, wait_tasks  # noqa: E402
from matcalc.tasks import WORKER_CRASHED  # noqa: E402

PG_URL = os.environ.get("MATCALC_TEST_PG_URL", "").strip()
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason="MATCALC_TEST_PG_URL not set"))]
TESTS = Path(__file__).parent
CU = bulk("Cu", "fcc", a=3.6, cubic=True)


def cif(atoms) -> str:
    buf = io.BytesIO()
    write(buf, atoms, format="cif")
    return buf.getvalue().decode()


def emt_energy(atoms) -> float:
    a = atoms.copy()
    a.calc = EMT()
    return float(a.get_potential_energy())


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'crash.db'}"
    from test_store import _reset_pg

    _reset_pg(PG_URL)
    return PG_URL


def crash_server(tmp_path: Path, db_url: str, *args: str) -> LiveServer:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    env = {"MATCALC_PLUGINS": "crash_plugin", "PYTHONPATH": path, "MATCALC_TEST_CRASH_DIR": str(tmp_path)}
    return LiveServer(tmp_path, db_url, *args, env=env).start(timeout_s=300)  # dask: several processes to start


def submit(c: httpx.Client, kind: str, **body) -> str:
    r = c.post(f"/tasks/{kind}", json=body)
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def messages(c: httpx.Client, task_id: str) -> list[str]:
    return [e["message"] for e in c.get(f"/tasks/{task_id}/logs").json()["data"]]


def wait_status(c: httpx.Client, task_id: str, cond, timeout_s: float = 120) -> dict:
    """Poll the task until ``cond(task)``; the API answers every poll."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = c.get(f"/tasks/{task_id}")
        assert r.status_code == 200, r.text
        t = r.json()["data"]
        if cond(t):
            return t
        assert time.monotonic() < deadline, f"task {task_id}: {t['status']} attempts {t['attempts']}"
        time.sleep(0.1)


def long_md(label: str) -> dict:
    """An EMT NVT run far longer than any test waits (it is killed or cancelled)."""
    return {"structure": cif(CU), "model": "emt", "ensemble": "nvt", "nvt_steps": 10_000_000, "interval": 50,
            "label": label}


def worker_pid(task: dict) -> int:
    """The pid of the worker process running ``task`` (its ``worker`` is ``process-N:PID``)."""
    return int(str(task["worker"]).rsplit(":", 1)[1])


def gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def assert_nothing_running(c: httpx.Client) -> None:
    q = c.get("/system/queue").json()["data"]["by_status"]
    assert q["RUNNING"] == q["ASSIGNED"] == q["QUEUED"] == q["PENDING"] == 0, q


@pytest.mark.slow
def test_poison_tasks_fail_alone_and_the_next_task_runs(tmp_path, db_url):
    """abort, segfault and SIGKILL in a model's evaluate: each fails only its own task, after one rerun, with
    'worker crashed' and the signal; the API answers throughout; the task behind them completes; a task that
    crashed once completes on the restarted worker."""
    srv = crash_server(tmp_path, db_url, "--workers", "1")
    try:
        with srv.client() as c:
            poisons = {sig: submit(c, "single-point", structure=cif(CU), model=f"crash-{how}", label=how)
                       for how, sig in (("abort", "SIGABRT"), ("segv", "SIGSEGV"), ("kill", "SIGKILL"))}
            good = submit(c, "single-point", structure=cif(CU), model="emt", label="good")
            once = submit(c, "single-point", structure=cif(CU), model="crash-once", label="once")
            deadline = time.monotonic() + 300
            ids = [*poisons.values(), good, once]
            while True:  # the API keeps answering while workers die and restart
                assert srv.proc.poll() is None, "the server died"
                assert c.get("/health").status_code == 200
                tasks = {i: c.get(f"/tasks/{i}").json()["data"] for i in ids}
                if all(t["status"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for t in tasks.values()):
                    break
                assert time.monotonic() < deadline, {t["label"]: t["status"] for t in tasks.values()}
                time.sleep(0.2)
            for sig, tid in poisons.items():
                t = tasks[tid]
                assert t["status"] == "FAILED" and t["error"].startswith(WORKER_CRASHED), t["error"]
                assert sig in t["error"] and t["attempts"] == 2 and t["crashes"] == 2, t
                log = messages(c, tid)
                assert sum(m.startswith("task requeued: its execution died") for m in log) == 1, log
                assert log[-1].startswith(f"task failed: {WORKER_CRASHED}") and sig in log[-1], log
                r = c.get(f"/tasks/{tid}/result")
                assert r.status_code == 409 and WORKER_CRASHED in r.json()["message"], r.text
            ref = emt_energy(CU)
            for tid, attempts, crashes in ((good, 1, 0), (once, 2, 1)):
                t = tasks[tid]
                assert t["status"] == "COMPLETED" and (t["attempts"], t["crashes"]) == (attempts, crashes), t
                energy = c.get(f"/tasks/{tid}/result").json()["data"]["result"]["energy_eV"]
                assert energy == pytest.approx(ref, abs=1e-8)
            info = c.get("/system/queue").json()["data"]["executor"]
            assert info["kind"] == "process" and info["crashed"] == 7 and info["restarts"] == 7, info
            assert_nothing_running(c)
    finally:
        srv.stop()


@pytest.mark.slow
def test_worker_killed_twice_ends_failed_and_never_stays_running(tmp_path):
    """The OOM killer's SIGKILL on the worker process of a running task, from outside: the task leaves
    RUNNING at once (back to the queue, one crash counted) and runs on the new worker; killed again it is
    FAILED. A task queued behind it completes."""
    srv = crash_server(tmp_path, f"sqlite:///{tmp_path / 'kill.db'}", "--workers", "1")
    try:
        with srv.client() as c:
            md = submit(c, "stability", **long_md("md"))
            good = submit(c, "single-point", structure=cif(CU), model="emt", label="good")
            first = wait_status(c, md, lambda t: t["status"] == "RUNNING" and t["progress"])
            os.kill(worker_pid(first), signal.SIGKILL)
            assert gone(worker_pid(first))
            again = wait_status(c, md, lambda t: t["attempts"] == 2 and t["status"] == "RUNNING" and t["progress"])
            assert again["crashes"] == 1 and worker_pid(again) != worker_pid(first)
            assert "task requeued: its execution died (worker process-0 killed by signal 9 (SIGKILL))" \
                in messages(c, md)
            os.kill(worker_pid(again), signal.SIGKILL)
            t = wait_status(c, md, lambda t: t["status"] != "RUNNING" or t["attempts"] > 2)
            assert t["status"] == "FAILED" and t["attempts"] == 2 and t["crashes"] == 2, t
            assert t["error"].startswith(WORKER_CRASHED) and "SIGKILL" in t["error"]
            done = wait_tasks(c, [good], prefix="", timeout_s=120)[good]
            assert done["status"] == "COMPLETED" and done["attempts"] == 1
            assert_nothing_running(c)
    finally:
        srv.stop()


@pytest.mark.slow
def test_server_restarts_requeue_a_task_a_worker_process_ran(tmp_path, db_url):
    restarts_twice(tmp_path, db_url, "process")


@pytest.mark.slow
def test_server_restarts_count_crashes_of_an_in_process_run_and_the_cap_ends_the_loop(tmp_path):
    restarts_twice(tmp_path, f"sqlite:///{tmp_path / 'inprocess.db'}", "inprocess")


def restarts_twice(tmp_path: Path, db_url: str, cluster: str) -> None:
    """A task RUNNING when the server is SIGKILLed runs again at the next start. With worker processes the
    server's death is not the task's (a task's own crash is counted where it happens, see above): the task is
    requeued as it was, however often the server dies. In-process the task may have killed the server: each
    restart counts a crash and the cap ends the requeue loop (FAILED at the second start)."""
    srv = crash_server(tmp_path, db_url, "--workers", "1", "--cluster", cluster)
    isolated = cluster == "process"
    try:
        with srv.client() as c:
            md = submit(c, "stability", **long_md("md"))
            t = wait_status(c, md, lambda t: t["status"] == "RUNNING" and t["progress"])
        srv.kill(signal.SIGKILL)
        if isolated:
            assert gone(worker_pid(t)), "a worker process outlived its server"
        srv.start(timeout_s=300)
        with srv.client() as c:
            t = wait_status(c, md, lambda t: t["status"] == "RUNNING" and t["attempts"] == 2)
            assert t["crashes"] == (0 if isolated else 1)
            if not isolated:
                assert any(m.startswith("task requeued: its execution died (the server stopped while it ran")
                           for m in messages(c, md))
        srv.kill(signal.SIGKILL)
        if isolated:
            assert gone(worker_pid(t))
        srv.start(timeout_s=300)
        with srv.client() as c:
            if isolated:
                t = wait_status(c, md, lambda t: t["status"] == "RUNNING" and t["attempts"] == 3)
                assert t["crashes"] == 0
                assert c.post(f"/tasks/{md}/cancel").status_code == 200
                t = wait_status(c, md, lambda t: t["status"] == "CANCELLED")
            else:
                t = c.get(f"/tasks/{md}").json()["data"]
                assert t["status"] == "FAILED" and t["crashes"] == 2 and t["attempts"] == 2, t
                assert t["error"].startswith(WORKER_CRASHED) and "the server stopped while it ran" in t["error"]
            assert_nothing_running(c)
    finally:
        srv.stop()


@pytest.mark.slow
def test_dask_worker_crash_is_retried_on_another_worker_then_failed(tmp_path, db_url):
    """--cluster local: a task that kills its dask worker runs once more on another worker, then is FAILED
    ('worker crashed'); never RUNNING forever. A task that crashed once completes there; the others too."""
    srv = crash_server(tmp_path, db_url, "--cluster", "local", "--workers", "2")
    try:
        with srv.client() as c:
            poison = submit(c, "single-point", structure=cif(CU), model="crash-abort", label="poison")
            once = submit(c, "single-point", structure=cif(CU), model="crash-once", label="once")
            goods = [submit(c, "single-point", structure=cif(CU), model="emt", label=f"good{i}") for i in range(3)]
            tasks = wait_tasks(c, [poison, once, *goods], prefix="", timeout_s=300)
            t = tasks[poison]
            assert t["status"] == "FAILED" and t["error"].startswith(WORKER_CRASHED), t
            assert t["crashes"] == 2 and t["attempts"] == 2, t
            ref = emt_energy(CU)
            for tid in (once, *goods):
                assert tasks[tid]["status"] == "COMPLETED", tasks[tid]
                assert c.get(f"/tasks/{tid}/result").json()["data"]["result"]["energy_eV"] == pytest.approx(ref)
            assert tasks[once]["crashes"] == 1 and tasks[once]["attempts"] == 2
            assert all(tasks[g]["crashes"] == 0 for g in goods)
            assert_nothing_running(c)
            assert srv.proc.poll() is None and c.get("/health").status_code == 200
    finally:
        srv.stop()


def test_crash_model_plugin_is_test_only():
    """The poison models exist only where MATCALC_PLUGINS names the test plugin."""
    import matcalc

    assert not any(card.name.startswith("crash-") for card in matcalc.list_models())

