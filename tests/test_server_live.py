"""`matcalc serve` as a real uvicorn process on loopback: every task type end to end, auth over
HTTP, 200 concurrent submissions, and SIGKILL / SIGTERM followed by a restart.

Results are checked against independent computations in this process (plain ASE EMT, or the
same matcalc function called locally with the same parameters) and physical limits.
"""

from __future__ import annotations

import io
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule
from ase.calculators.emt import EMT
from ase.io import read, write

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

import matcalc as mc  # noqa: E402
from matcalc.calculations import load_all  # noqa: E402
from matcalc.calculations.results import Result  # noqa: E402

from live_server import API, KEY, TERMINAL, LiveServer  # noqa: E402


def text_of(atoms, fmt: str = "cif") -> str:
    if fmt == "cif":  # ASE's CIF writer wants a binary file
        buf = io.BytesIO()
        write(buf, atoms, format=fmt)
        return buf.getvalue().decode()
    sbuf = io.StringIO()
    write(sbuf, atoms, format=fmt)
    return sbuf.getvalue()


def parsed(text: str):
    """The structure exactly as the server reads it (file text loses digits)."""
    return mc.load_structure(text, require_cell=False)


def wait_all(client: httpx.Client, ids: list[str], timeout_s: float = 120) -> dict[str, dict]:
    """Poll until every task is in a terminal state; returns id -> task."""
    deadline = time.monotonic() + timeout_s
    pending = set(ids)
    done: dict[str, dict] = {}
    while pending and time.monotonic() < deadline:
        page = client.get("/tasks", params={"status": sorted(TERMINAL), "page_size": 500}).json()["data"]
        for t in page["items"]:
            if t["id"] in pending:
                done[t["id"]] = t
                pending.discard(t["id"])
        if pending:
            time.sleep(0.25)
    assert not pending, f"{len(pending)} task(s) not finished after {timeout_s} s"
    return done


def submit(client: httpx.Client, task_type: str, **body) -> str:
    r = client.post(f"/tasks/{task_type}", json=body)
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def result_of(client: httpx.Client, task_id: str, timeout_s: float = 120) -> Result:
    load_all()  # registers every result kind for Result.from_dict
    t = wait_all(client, [task_id], timeout_s)[task_id]
    assert t["status"] == "COMPLETED", f"{t['status']}: {t['error']}"
    r = client.get(f"/tasks/{task_id}/result")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["task_id"] == task_id and data["kind"] == data["result"]["kind"]
    return Result.from_dict(data["result"])


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """Tiny 3x3 linear algebra (cell filters) crawls when BLAS threads spin on a busy 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two worker threads; the API key comes from the environment, the worker count from a config file."""
    work = tmp_path_factory.mktemp("live")
    (work / "matcalc.toml").write_text("[server]\nworkers = 2\nmax_upload_mb = 1\n")
    srv = LiveServer(work, f"sqlite:///{work / 'live.db'}", "--config", str(work / "matcalc.toml"),
                     env={"MATCALC_API_KEY": KEY}, api_key=KEY, key_flag=False)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    with server.client() as c:
        yield c


CU = bulk("Cu", "fcc", a=3.6, cubic=True)


# ----------------------------------------------------------------------------- auth over HTTP
def test_live_auth_and_request_ids(server, api):
    cfg = api.get("/system/config").json()["data"]
    assert cfg["workers"] == 2 and cfg["max_upload_mb"] == 1 and cfg["api_keys"] == ["***"]
    with httpx.Client(base_url=server.url + API, timeout=30) as anon:
        before = api.get("/tasks").json()["data"]["total"]
        r = anon.post("/tasks/single-point", json={"structure": text_of(CU), "model": "emt"})
        assert r.status_code == 401 and r.json()["code"] == 20001
        r = anon.post("/tasks/single-point", json={"structure": text_of(CU), "model": "emt"},
                      headers={"X-API-Key": "not-the-key-123"})
        assert r.status_code == 401 and r.json()["code"] == 20002
        assert r.headers["x-request-id"] == r.json()["request_id"]
        assert anon.get("/health").json()["data"]["ready"] is True
        assert api.get("/tasks").json()["data"]["total"] == before
    big = {"structure": text_of(CU) + "#" * 1_100_000 + "\n", "model": "emt"}
    r = api.post("/tasks/single-point", json=big)
    assert r.status_code == 413 and r.json()["code"] == 40003
    assert api.get("/tasks").json()["data"]["total"] == before
    # the request id reaches the server's log lines
    r = api.get("/system/queue", headers={"X-Request-ID": "trace-me-123"})
    assert r.status_code == 200
    time.sleep(0.3)
    assert "[trace-me-123] GET /api/v1/system/queue 200" in server.log.read_text()


# ----------------------------------------------------------------------------- every task type
def test_live_single_point_matches_ase(server, api):
    atoms = CU.copy()
    atoms.rattle(0.03, seed=7)
    text = text_of(atoms, "extxyz")
    tid = submit(api, "single-point", structure=text, model="emt")
    res = result_of(api, tid)
    ref = read(io.StringIO(text), format="extxyz")  # the same structure as the server read it
    ref.calc = EMT()
    assert type(res).__name__ == "SinglePointResult"
    assert res.energy_eV == pytest.approx(ref.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(res.forces_eV_per_A, ref.get_forces(), atol=1e-8)
    task = api.get(f"/tasks/{tid}").json()["data"]
    assert task["attempts"] == 1 and task["worker"].startswith("process-")  # a worker process ran it ...
    assert int(task["worker"].rsplit(":", 1)[1]) != server.proc.pid  # ... not the API process
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]
    assert task["result_url"] == f"/api/v1/tasks/{tid}/result"


def test_live_optimization_matches_local(api):
    atoms = CU.repeat((2, 1, 1))
    atoms.rattle(0.05, seed=3)
    text = text_of(atoms)
    tid = submit(api, "optimization", structure=text, model="emt", fmax=0.01, optimizer="BFGS", label="cu8")
    res = result_of(api, tid)
    local = mc.relax(parsed(text), "emt", fmax=0.01, optimizer="BFGS")
    assert res.converged and res.steps == local.steps
    assert res.final_energy_eV == pytest.approx(local.final_energy_eV, abs=1e-6)
    assert res.final_volume_A3 == pytest.approx(local.final_volume_A3, rel=1e-6)
    assert res.parameters["optimizer"] == "BFGS" and res.label == "cu8"
    logs = api.get(f"/tasks/{tid}/logs").json()["data"]
    assert logs[0]["message"] == "task submitted" and logs[-1]["message"] == "task completed"
    assert any(entry["event"] == "progress" for entry in logs)


def test_live_bulk_modulus_matches_local(api):
    text = text_of(CU)
    tid = submit(api, "bulk-modulus", structure=text, model="emt", protocol="fast", n_points=5)
    res = result_of(api, tid)
    local = mc.bulk_modulus(parsed(text), "emt", protocol="fast", n_points=5)
    assert res.bulk_modulus_GPa == pytest.approx(local.bulk_modulus_GPa, rel=1e-6)
    assert 120 < res.bulk_modulus_GPa < 150  # EMT Cu: ~134 GPa
    assert len(res.volumes_A3) == 5


def test_live_heat_capacity_matches_local(api):
    prim = bulk("Cu", "fcc", a=3.6)
    text = text_of(prim)
    tid = submit(api, "heat-capacity", structure=text, model="emt", supercell=[3, 3, 3], mesh=10, protocol="fast")
    res = result_of(api, tid)
    local = mc.heat_capacity(parsed(text), "emt", supercell=(3, 3, 3), mesh=10, protocol="fast")
    assert res.cv_300K_J_per_K_g == pytest.approx(local.cv_300K_J_per_K_g, rel=1e-6)
    dulong_petit = 3 * 8.314462618 / 63.546  # J/(K g)
    assert res.cv_J_per_K_g[-1] == pytest.approx(dulong_petit, rel=0.02)


def test_live_stability_matches_local(api):
    cell = CU.repeat((2, 1, 1))
    params = {"nvt_steps": 20, "npt_steps": 20, "interval": 10, "seed": 5, "protocol": "fast"}
    text = text_of(cell)
    tid = submit(api, "stability", structure=text, model="emt", **params)
    res = result_of(api, tid)
    local = mc.stability(parsed(text), "emt", **params)
    assert res.stable and res.stable == local.stable
    np.testing.assert_allclose(res.volume_A3, local.volume_A3, rtol=1e-6)
    np.testing.assert_allclose(res.temperature_K, local.temperature_K, rtol=1e-6)


def test_live_interaction_energy_matches_single_points(api):
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=8.0)
    slab.pbc = True
    top = slab.positions[:, 2].max()
    centre = [*slab.cell[:2].sum(axis=0)[:2] / 2, top + 3.0]
    tid = submit(api, "interaction-energy", structure=text_of(slab, "extxyz"), model="emt", guest="co2",
                 position=centre, box_A=25.0)
    res = result_of(api, tid)

    def emt_energy(a):
        a = a.copy()
        a.calc = EMT()
        return a.get_potential_energy()

    assert res.host_energy_eV == pytest.approx(emt_energy(parsed(text_of(slab, "extxyz"))), abs=1e-8)
    assert res.complex_energy_eV == pytest.approx(emt_energy(res.complex_structure), abs=1e-8)
    gas = molecule("CO2")
    gas.cell = [25.0] * 3
    gas.pbc = True
    gas.center()
    assert res.guest_energy_eV == pytest.approx(emt_energy(gas), abs=1e-6)
    assert res.interaction_energy_eV == pytest.approx(
        res.complex_energy_eV - res.host_energy_eV - res.guest_energy_eV, abs=1e-10)
    assert res.guest_formula == "CO2"


def test_live_chgnet_single_point_on_builtin(api):
    tid = submit(api, "single-point", builtin="RSM0009", model="chgnet")
    res = result_of(api, tid, timeout_s=180)
    atoms = mc.load_structure("RSM0009")
    ref = mc.get_model("chgnet", device="cpu").evaluate([atoms])[0]
    assert res.n_atoms == 22 and res.model == "chgnet"
    assert res.energy_eV == pytest.approx(ref.energy_eV, abs=1e-3)
    np.testing.assert_allclose(res.forces_eV_per_A, ref.forces_eV_per_A, atol=1e-3)


def test_live_failed_task_reports_error(api):
    # EMT has no parameters for Zn: the task is accepted (model and structure are valid) and fails
    zn = bulk("Zn", "hcp", a=2.66, c=4.95)
    tid = submit(api, "single-point", structure=text_of(zn), model="emt")
    t = wait_all(api, [tid])[tid]
    assert t["status"] == "FAILED" and "Zn" in t["error"]
    r = api.get(f"/tasks/{tid}/result")
    assert r.status_code == 409 and r.json()["code"] == 50002 and "Zn" in r.json()["message"]


def test_live_cancel_running_and_timeout(api):
    slow = bulk("Cu", "fcc", a=3.66, cubic=True).repeat((2, 2, 2))
    slow.rattle(0.1, seed=1)
    body = {"structure": text_of(slow), "model": "emt", "fmax": 1e-6, "optimizer": "FIRE", "max_steps": 100000}
    running = submit(api, "optimization", **body)
    timed = submit(api, "optimization", **body, timeout_s=1.0)
    deadline = time.monotonic() + 60
    while api.get(f"/tasks/{running}").json()["data"]["status"] != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.1)
    c = api.post(f"/tasks/{running}/cancel")
    assert c.status_code == 200 and c.json()["data"]["status"] == "CANCELLED"
    done = wait_all(api, [running, timed], timeout_s=90)
    assert done[running]["status"] == "CANCELLED"
    assert done[timed]["status"] == "TIMEOUT" and "timed out after 1 s" in done[timed]["error"]
    assert api.get(f"/tasks/{timed}/result").json()["code"] == 50005
    # both threads are free again: a new task completes
    res = result_of(api, submit(api, "single-point", structure=text_of(CU), model="emt"))
    assert res.n_atoms == 4


# ----------------------------------------------------------------------------- concurrency
@pytest.mark.slow
def test_live_200_concurrent_submissions(server):
    atoms = CU.copy()
    ref = atoms.copy()
    ref.calc = EMT()
    e_ref = ref.get_potential_energy()
    cif = text_of(atoms)

    def post(i: int) -> tuple[int, str]:
        with server.client() as c:
            r = c.post("/tasks/single-point", json={"structure": cif, "model": "emt", "label": f"c{i}"})
            return r.status_code, r.json()["data"]["id"] if r.status_code == 201 else r.text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(post, range(200)))
    assert [s for s, _ in answers] == [201] * 200, [a for a in answers if a[0] != 201][:3]
    ids = [tid for _, tid in answers]
    assert len(set(ids)) == 200
    with server.client() as c:
        done = wait_all(c, ids, timeout_s=180)
        assert {t["status"] for t in done.values()} == {"COMPLETED"}
        assert sorted(t["label"] for t in done.values()) == sorted(f"c{i}" for i in range(200))
        energies = {c.get(f"/tasks/{tid}/result").json()["data"]["result"]["energy_eV"] for tid in ids[::20]}
        assert all(e == pytest.approx(e_ref, abs=1e-8) for e in energies)
        assert all(t["attempts"] == 1 for t in done.values())


# ----------------------------------------------------------------------------- PostgreSQL
@pytest.mark.skipif(not os.environ.get("MATCALC_TEST_PG_URL"), reason="MATCALC_TEST_PG_URL not set")
def test_live_postgres_backend(tmp_path):
    """The same server on PostgreSQL: concurrent submissions stored and completed, requeue after SIGKILL."""
    from test_store import _reset_pg

    url = os.environ["MATCALC_TEST_PG_URL"]
    _reset_pg(url)
    srv = LiveServer(tmp_path, url, "--workers", "2")
    srv.start()
    try:
        cif = text_of(CU)
        with ThreadPoolExecutor(8) as pool, srv.client() as c:
            ids = list(pool.map(lambda i: submit(c, "single-point", structure=cif, model="emt", label=f"pg{i}"),
                                range(40)))
            slow = submit(c, "optimization", **_relax_body(5))
            done = wait_all(c, ids, timeout_s=120)
            assert {t["status"] for t in done.values()} == {"COMPLETED"}
        srv.kill(signal.SIGKILL)
        srv.start()
        with srv.client() as c:
            t = wait_all(c, [slow], timeout_s=120)[slow]
            assert t["status"] == "COMPLETED" and t["attempts"] in (1, 2)
            assert c.get("/tasks", params={"status": "COMPLETED", "page_size": 1}).json()["data"]["total"] == 41
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- crash and restart
def _relax_body(seed: int) -> dict:
    atoms = bulk("Cu", "fcc", a=3.66, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.1, seed=seed)
    return {"structure": text_of(atoms), "model": "emt", "fmax": 1e-4, "optimizer": "FIRE", "max_steps": 5000,
            "label": f"seed{seed}"}


@pytest.mark.slow
def test_live_sigkill_restart_and_graceful_shutdown(tmp_path):
    """SIGKILL with tasks queued and running, restart: every task completes exactly once. Then SIGTERM
    with a short shutdown timeout: the running task is left QUEUED and completes after the next start."""
    srv = LiveServer(tmp_path, f"sqlite:///{tmp_path / 'restart.db'}", "--workers", "1",
                     "--shutdown-timeout", "0.5")
    srv.start()
    try:
        with srv.client() as c:
            ids = [submit(c, "optimization", **_relax_body(s)) for s in (1, 2, 3)]
            deadline = time.monotonic() + 60
            while c.get(f"/tasks/{ids[0]}").json()["data"]["status"] != "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.05)
            states = [c.get(f"/tasks/{t}").json()["data"]["status"] for t in ids]
        assert states == ["RUNNING", "QUEUED", "QUEUED"], states
        assert srv.kill(signal.SIGKILL) == -signal.SIGKILL

        srv.start()
        with srv.client() as c:
            messages = [entry["message"] for entry in c.get(f"/tasks/{ids[0]}/logs").json()["data"]]
            assert "task requeued: server restarted" in messages
            extra = submit(c, "optimization", **_relax_body(4))
            deadline = time.monotonic() + 60
            while c.get(f"/tasks/{extra}").json()["data"]["status"] != "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.05)
            done_before_term = wait_all(c, ids, timeout_s=120)
        srv.kill(signal.SIGTERM)  # uvicorn shuts down gracefully, then re-raises the signal
        log2 = srv.log.read_text()
        assert "shutdown: 1 running task(s) left QUEUED" in log2 and "Application shutdown complete" in log2

        srv.start()
        with srv.client() as c:
            done = wait_all(c, [*ids, extra], timeout_s=120)
            assert {t["status"] for t in done.values()} == {"COMPLETED"}
            assert done[ids[0]]["attempts"] == 2  # interrupted by SIGKILL, run again
            assert done[extra]["attempts"] == 2  # interrupted by SIGTERM, run again
            assert done[ids[1]]["attempts"] == done[ids[2]]["attempts"] == 1
            for tid in [*ids, extra]:
                messages = [entry["message"] for entry in c.get(f"/tasks/{tid}/logs").json()["data"]]
                assert messages.count("task completed") == 1, messages
                assert messages.count("task submitted") == 1
                assert sum(m.startswith("task started") for m in messages) == done[tid]["attempts"]
            # the results equal a local run of the same relaxation
            res = Result.from_dict(c.get(f"/tasks/{ids[0]}/result").json()["data"]["result"])
            atoms = bulk("Cu", "fcc", a=3.66, cubic=True).repeat((2, 1, 1))
            atoms.rattle(0.1, seed=1)
            local = mc.relax(parsed(text_of(atoms)), "emt", fmax=1e-4, optimizer="FIRE", max_steps=5000)
            assert res.converged and res.final_energy_eV == pytest.approx(local.final_energy_eV, abs=1e-6)
            assert done_before_term[ids[0]]["finished_at"] == done[ids[0]]["finished_at"]  # immutable
            q = c.get("/system/queue").json()["data"]["by_status"]
            assert q["COMPLETED"] == 4 and q["QUEUED"] == q["RUNNING"] == q["PENDING"] == 0
        srv.kill(signal.SIGTERM)

        # with a long enough shutdown timeout, SIGTERM waits for the running task to finish
        srv.args = ["--workers", "1", "--shutdown-timeout", "120"]
        srv.start()
        with srv.client() as c:
            last = submit(c, "optimization", **_relax_body(6))
            deadline = time.monotonic() + 60
            while c.get(f"/tasks/{last}").json()["data"]["status"] != "RUNNING" and time.monotonic() < deadline:
                time.sleep(0.05)
        srv.kill(signal.SIGTERM, timeout_s=120)
        from matcalc.store import Store

        store = Store(srv.db_url, migrate=False)
        try:
            row = store.get_task(last)
            assert row.status == "COMPLETED" and row.attempts == 1
        finally:
            store.close()
        assert f"[task:{last}]" in srv.log.read_text()  # the task's own log lines carry its id
    finally:
        srv.stop()
