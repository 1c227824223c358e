"""The server over a dask cluster (``--cluster local``): same endpoints, same results as in-process."""

from __future__ import annotations

import io
import time
import urllib.request

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import read, write

pytest.importorskip("distributed")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from matcalc.server import Settings, create_app  # noqa: E402

from live_server import wait_tasks  # noqa: E402

API = "/api/v1"


@pytest.mark.slow
def test_dask_executor_end_to_end(tmp_path):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.03, seed=2)
    buf = io.StringIO()
    write(buf, atoms, format="extxyz")
    text = buf.getvalue()
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'dask.db'}", cluster="local", workers=2))
    with TestClient(app) as c:
        health = c.get(f"{API}/health").json()["data"]
        assert health["ready"] and health["checks"]["executor"]["kind"] == "dask"
        cfg = c.get(f"{API}/system/config").json()["data"]  # dask's dashboard, linked where users look
        assert cfg["executor"]["cluster"] == "local" and cfg["dashboard"].endswith("/status")
        with urllib.request.urlopen(cfg["dashboard"], timeout=30) as page:
            assert page.status == 200
        sp = c.post(f"{API}/tasks/single-point", json={"structure": text, "model": "emt"}).json()["data"]["id"]
        rx = c.post(f"{API}/tasks/optimization", json={"structure": text, "model": "emt", "fmax": 0.01,
                                                       "priority": "HIGH"}).json()["data"]["id"]
        slow = bulk("Cu", "fcc", a=3.66, cubic=True).repeat((2, 2, 2))
        slow.rattle(0.1, seed=1)
        sbuf = io.StringIO()
        write(sbuf, slow, format="extxyz")
        long = c.post(f"{API}/tasks/optimization", json={"structure": sbuf.getvalue(), "model": "emt", "fmax": 1e-7,
                                                         "max_steps": 100000, "priority": "LOW"}).json()["data"]["id"]
        done = wait_tasks(c, [sp, rx])
        assert done[sp]["status"] == "COMPLETED" and done[sp]["worker"].startswith("tcp://")
        assert done[sp]["attempts"] == 1 and done[rx]["status"] == "COMPLETED"
        res = c.get(f"{API}/tasks/{sp}/result").json()["data"]["result"]
        ref = read(io.StringIO(text), format="extxyz")
        ref.calc = EMT()
        assert res["energy_eV"] == pytest.approx(ref.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(res["forces_eV_per_A"], ref.get_forces(), atol=1e-8)
        relaxed = c.get(f"{API}/tasks/{rx}/result").json()["data"]["result"]
        assert relaxed["converged"] and relaxed["final_energy_eV"] < relaxed["initial_energy_eV"]
        assert done[rx]["queued_at"] <= done[rx]["started_at"] <= done[rx]["finished_at"]
        logs = [entry["message"] for entry in c.get(f"{API}/tasks/{rx}/logs").json()["data"]]
        assert logs[0] == "task submitted" and logs[-1] == "task completed"
        assert any("converged" in m for m in logs)  # the worker's log lines reach the task log
        deadline = time.monotonic() + 60
        while c.get(f"{API}/tasks/{long}").json()["data"]["status"] != "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.post(f"{API}/tasks/{long}/cancel").json()["data"]["status"] == "CANCELLED"
        assert wait_tasks(c, [long])[long]["status"] == "CANCELLED"
        assert c.get(f"{API}/tasks/{long}/result").json()["code"] == 50004
        emt = c.get(f"{API}/models/emt").json()["data"]
        assert emt["loaded"] and all(w.startswith("tcp://") for w in emt["loaded_on"])
        q = c.get(f"{API}/system/queue").json()["data"]
        assert q["executor"]["kind"] == "dask" and q["executor"]["completed"] >= 2


@pytest.mark.slow
def test_dask_executor_runs_validated_custom_models(tmp_path):
    """A custom model validated on the server runs on the dask workers (registered there by a worker plugin,
    so a worker that joins later has it too) and is dropped from them when deleted."""
    import json

    import torch
    from ase.calculators.lj import LennardJones
    from test_custom_models import EPS_EV, LJ_OPTIONS, RC_A, SIGMA_A, TorchLJ, argon

    from matcalc.models import model_names

    path = tmp_path / "lj.pt"
    torch.jit.script(TorchLJ(EPS_EV, SIGMA_A, RC_A)).save(str(path))
    buf = io.StringIO()
    write(buf, argon(), format="extxyz")
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'dask.db'}", cluster="local", workers=1,
                              custom_models_dir=str(tmp_path / "models")))
    with TestClient(app) as c:
        meta = {"name": "dask-lj", "family": "torchscript", "options": LJ_OPTIONS}
        mid = c.post(f"{API}/models/custom", files={"file": ("lj.pt", path.read_bytes())},
                     data={"metadata": json.dumps(meta)}).json()["data"]["id"]
        assert c.post(f"{API}/models/custom/{mid}/validate", params={"wait": "true"}).json()["data"]["status"] \
            == "VALIDATED"
        mc_cluster = app.state.service.executor.cluster
        client = mc_cluster.client
        n = len(client.scheduler_info()["workers"])
        mc_cluster.cluster.scale(n + 1)  # a worker that joins after the validation
        client.wait_for_workers(n + 1, timeout=120)
        has = client.run(lambda: "dask-lj" in model_names())
        assert len(has) == n + 1 and all(has.values()), has
        tid = c.post(f"{API}/tasks/single-point", json={"structure": buf.getvalue(), "format": "extxyz",
                                                        "model": "dask-lj"}).json()["data"]["id"]
        done = wait_tasks(c, [tid])[tid]
        assert done["status"] == "COMPLETED" and done["worker"].startswith("tcp://"), done
        energy = c.get(f"{API}/tasks/{tid}/result").json()["data"]["result"]["energy_eV"]
        ref = argon()
        ref.calc = LennardJones(epsilon=EPS_EV, sigma=SIGMA_A, rc=RC_A, smooth=False)
        assert energy == pytest.approx(ref.get_potential_energy(), abs=1e-6)
        assert c.delete(f"{API}/models/custom/{mid}").status_code == 200
        assert not any(client.run(lambda: "dask-lj" in model_names()).values())
