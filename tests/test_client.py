"""matcalc.client against a real `matcalc serve` process on loopback: every method of the sync and
the async client, results equal to the same calculation run locally here, errors mapped to the
client's types; retries (503, connection errors, none for POST) and SSE decoding with
httpx.MockTransport; mypy --strict on the package.
"""

from __future__ import annotations

import asyncio
import builtins
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.io import write

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import matcalc as mc  # noqa: E402
from matcalc.client import (  # noqa: E402
    AsyncClient,
    AsyncRemoteTask,
    AuthError,
    Client,
    MatcalcError,
    NotFoundError,
    RemoteTask,
    ServerError,
    StructureInfo,
    TaskFailed,
    TaskInfo,
    TimeoutError,
    ValidationError,
)
from matcalc.client._base import SSEDecoder  # noqa: E402
from live_server import LiveServer  # noqa: E402

KEY = "client-test-key-7"
ROOT = Path(__file__).resolve().parents[1]


def cif_text(atoms) -> str:
    buf = io.BytesIO()
    write(buf, atoms, format="cif")
    return buf.getvalue().decode()


def emt_energy(atoms) -> float:
    a = atoms.copy()
    a.calc = EMT()
    return float(a.get_potential_energy())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m matcalc.cli serve` with an API key, 2 in-process worker threads, a temp SQLite DB."""
    work = tmp_path_factory.mktemp("client")
    srv = LiveServer(work, f"sqlite:///{work / 'c.db'}", "--workers", "2", api_key=KEY,
                     env={"OPENBLAS_NUM_THREADS": "1", "MATCALC_CUSTOM_MODELS_DIR": str(work / "models")})
    srv.start()
    yield srv.url
    srv.stop()


@pytest.fixture(scope="module")
def routes(server) -> set[str]:
    """Paths this server has (log streaming, alerts and custom models come with later issues)."""
    return set(httpx.get(server + "/openapi.json", timeout=30).json()["paths"])


STREAM = "/api/v1/tasks/{task_id}/logs/stream"
ALERTS = "/api/v1/system/alerts/active"


@pytest.fixture(scope="module")
def client(server):
    with Client(server, api_key=KEY, poll_interval=0.1) as c:
        yield c


# ----------------------------------------------------------------------------- the cases, run locally once
CU = bulk("Cu", "fcc", a=3.6, cubic=True)


def _cu8():
    a = CU.repeat((2, 1, 1))
    a.rattle(0.05, seed=3)
    return a


def _slab():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=8.0)
    slab.pbc = True
    top = slab.positions[:, 2].max()
    return slab, [*slab.cell[:2].sum(axis=0)[:2] / 2, top + 3.0]


SLAB, CENTRE = _slab()
CASES = {
    # name: (client method, structure, keyword arguments, local function)
    "single_point": ("single_point", CU, {}, mc.single_point),
    "optimization": ("optimization", _cu8(), {"fmax": 0.01, "optimizer": "BFGS", "label": "cu8"}, mc.relax),
    "bulk_modulus": ("bulk_modulus", CU, {"protocol": "fast", "n_points": 5}, mc.bulk_modulus),
    "heat_capacity": ("heat_capacity", bulk("Cu", "fcc", a=3.6),
                      {"supercell": [2, 2, 2], "mesh": 8, "protocol": "fast"}, mc.heat_capacity),
    "stability": ("stability", CU.repeat((2, 1, 1)),
                  {"nvt_steps": 20, "npt_steps": 20, "interval": 10, "seed": 5, "protocol": "fast"}, mc.stability),
    "interaction_energy": ("interaction_energy", SLAB, {"guest": "CO2", "position": CENTRE, "box_A": 25.0},
                           mc.interaction_energy),
}
# the numbers compared per result type (scalars and arrays)
FIELDS = {
    "single_point": ("energy_eV", "forces_eV_per_A", "stress_GPa"),
    "optimization": ("final_energy_eV", "final_volume_A3", "steps", "converged"),
    "bulk_modulus": ("bulk_modulus_GPa", "volumes_A3", "energies_eV"),
    "heat_capacity": ("cv_300K_J_per_K_g", "cv_J_per_K_g"),
    "stability": ("volume_A3", "temperature_K", "stable"),
    "interaction_energy": ("interaction_energy_eV", "host_energy_eV", "guest_energy_eV", "complex_energy_eV"),
}


def _local_kwargs(kw: dict) -> dict:
    out = {k: v for k, v in kw.items() if k != "label"}
    if "supercell" in out:
        out["supercell"] = tuple(out["supercell"])
    return out


@pytest.fixture(scope="module")
def local_results():
    """Every case computed in this process (plain matcalc functions, same model and parameters)."""
    return {name: fn(atoms, model="emt", **_local_kwargs(kw)) for name, (_, atoms, kw, fn) in CASES.items()}


def assert_same(name: str, remote, local) -> None:
    assert type(remote) is type(local), (type(remote), type(local))
    assert remote.model == "emt" and remote.n_atoms == local.n_atoms
    for f in FIELDS[name]:
        r, loc = getattr(remote, f), getattr(local, f)
        if isinstance(loc, (bool, int, np.bool_)) and not isinstance(loc, float):
            assert r == loc, f
        else:
            np.testing.assert_allclose(np.asarray(r, float), np.asarray(loc, float), rtol=1e-6, atol=1e-6,
                                       err_msg=f"{name}.{f}")


# ----------------------------------------------------------------------------- sync: tasks
def test_every_task_type_equals_local_run(client, local_results):
    tasks = {name: getattr(client, method)(atoms, "emt", **kw) for name, (method, atoms, kw, _) in CASES.items()}
    assert all(isinstance(t, RemoteTask) and len(t.id) >= 8 for t in tasks.values())
    for name, task in tasks.items():
        res = task.result(timeout=120, poll=0.1)
        assert_same(name, res, local_results[name])
        assert task.status == "COMPLETED" and task.done() and task.exception() is None
    assert tasks["optimization"].label == "cu8" and tasks["optimization"].result().label == "cu8"
    assert tasks["optimization"].property == "relax"
    # relax is optimization; the interaction energy is the difference of the three energies
    r = local_results["interaction_energy"]
    assert r.interaction_energy_eV == pytest.approx(r.complex_energy_eV - r.host_energy_eV - r.guest_energy_eV)
    assert Client.relax is Client.optimization and AsyncClient.relax is AsyncClient.optimization


def test_every_structure_form_reaches_the_server(client, tmp_path):
    atoms = CU.copy()
    atoms.rattle(0.02, seed=11)
    text = cif_text(atoms)
    path = tmp_path / "cu.cif"
    path.write_text(text)
    poscar = tmp_path / "POSCAR"
    write(poscar, atoms, format="vasp")
    from pymatgen.io.ase import AseAtomsAdaptor

    uploaded = client.upload_structure(path)
    forms = {"atoms": atoms, "cif text": text, "bytes": text.encode(), "path": path, "path str": str(path),
             "poscar file": poscar, "pymatgen": AseAtomsAdaptor.get_structure(atoms), "upload": uploaded,
             "upload id": uploaded.id}
    tasks = {k: client.single_point(v, "emt") for k, v in forms.items()}
    ref = emt_energy(atoms)
    for k, t in tasks.items():
        res = t.result(timeout=60, poll=0.1)
        assert res.n_atoms == 4, k
        assert res.energy_eV == pytest.approx(ref, abs=1e-5), k  # CIF/POSCAR text rounds positions
    assert tasks["upload"].info.structure_id == uploaded.id == tasks["upload id"].info.structure_id


@pytest.mark.slow
def test_chgnet_single_point_on_a_builtin(client):
    task = client.single_point("RSM0009", model="chgnet")
    res = task.result(timeout=180, poll=0.2)
    ref = mc.get_model("chgnet", device="cpu").evaluate([mc.load_structure("RSM0009")])[0]
    assert res.n_atoms == 22 and res.model == "chgnet" and task.label == "RSM0009"
    assert res.energy_eV == pytest.approx(ref.energy_eV, abs=1e-3)
    np.testing.assert_allclose(res.forces_eV_per_A, ref.forces_eV_per_A, atol=1e-3)


def _slow_relax_kwargs(seed: int = 1) -> tuple:
    slow = CU.repeat((2, 2, 2))
    slow.rattle(0.1, seed=seed)
    return slow, {"fmax": 1e-6, "optimizer": "FIRE", "max_steps": 100000}


def test_batch_list_get_logs_and_cancel(client):
    specs = [{"type": "single-point", "structure": CU, "model": "emt", "label": "b0"},
             {"type": "relax", "structure": _cu8(), "model": "emt", "fmax": 0.05, "label": "b1"},
             {"type": "bulk_modulus", "structure": CU, "model": "emt", "protocol": "fast", "n_points": 5,
              "label": "b2"}]
    batch = client.submit_batch(specs)
    assert [t.label for t in batch] == ["b0", "b1", "b2"]
    batch_id = batch[0].info.batch_id
    assert batch_id and {t.info.batch_id for t in batch} == {batch_id}
    assert [t.info.type for t in batch] == ["single-point", "optimization", "bulk-modulus"]
    for t in batch:
        assert t.wait(timeout=60, poll=0.1).status == "COMPLETED"
    page = client.list_tasks(batch_id=batch_id, page_size=2)
    assert page.total == 3 and len(page) == 2 and page.pages == 2
    page2 = client.list_tasks(batch_id=batch_id, page=2, page_size=2)
    assert {t.id for t in [*page, *page2]} == {t.id for t in batch}
    assert client.list_tasks(batch_id=batch_id, type="relax").total == 1
    assert client.list_tasks(batch_id=batch_id, status=["COMPLETED", "FAILED"]).total == 3
    assert client.list_tasks(batch_id=batch_id, status="RUNNING").total == 0
    hour = timedelta(hours=1)
    assert client.list_tasks(batch_id=batch_id, created_after=datetime.now(UTC) - hour).total == 3
    assert client.list_tasks(batch_id=batch_id, created_before=datetime.now(UTC) - hour).total == 0
    generic = client.submit("single_point", CU, "emt", priority="high", timeout_s=60)
    assert generic.info.priority == "HIGH" and generic.info.timeout_s == 60
    assert generic.result(timeout=60, poll=0.1).energy_eV == pytest.approx(emt_energy(CU), abs=1e-6)
    got = client.get_task(batch[1].id)
    assert got.info.parameters["fmax"] == 0.05 and got.status == "COMPLETED"
    assert got.result().converged

    logs = got.logs()
    assert logs[0].message == "task submitted" and logs[-1].message == "task completed"
    assert [r.id for r in got.logs(after=logs[0].id)] == [r.id for r in logs[1:]]
    steps = [r for r in got.logs(level="debug") if r.event == "progress"]
    assert steps and all(r.level == "DEBUG" for r in steps)
    streamed = list(got.stream_logs(poll=0.1))  # finished task: the whole log, then the end
    assert [r.message for r in streamed] == [r.message for r in logs]

    # cancel a running task: True, then False; its result() raises TaskFailed(CANCELLED)
    slow, kw = _slow_relax_kwargs()
    running = client.relax(slow, "emt", **kw)
    deadline = time.monotonic() + 60
    while running.status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.05)
    live = []
    reader = threading.Thread(target=lambda: live.extend(running.stream_logs(poll=0.1)))
    reader.start()
    time.sleep(0.5)
    assert running.cancel() is True
    assert running.status == "CANCELLED" and running.info.done
    assert running.cancel() is False and client.cancel(running.id) is False
    reader.join(30)
    assert not reader.is_alive() and live[0].message == "task submitted"
    assert any(r.message.startswith("task started") for r in live)
    assert any("cancel" in r.message.lower() for r in live)  # the worker may log its stop after it
    with pytest.raises(TaskFailed) as exc:
        running.result(timeout=30)
    assert exc.value.status == "CANCELLED" and exc.value.code == 50004 and exc.value.http_status == 409


# ----------------------------------------------------------------------------- sync: errors
def test_errors_are_mapped(client, server, routes, tmp_path):
    with pytest.raises(ValidationError) as e:
        client.single_point("data_broken\n_cell_length_a 3.6\n_atom_site_label\nnonsense\n", "emt")
    assert e.value.code in (40002, 40006) and e.value.http_status == 422 and e.value.request_id
    assert isinstance(e.value, ValueError) and e.value.message in str(e.value)
    with pytest.raises(ValidationError) as e:
        client.single_point(CU, "no-such-model")
    assert e.value.code == 40005 and "no-such-model" in e.value.message
    with pytest.raises(ValidationError) as e:
        client.optimization(CU, "emt", fmax=-1.0)
    assert e.value.code == 40001 and "fmax" in e.value.message
    assert e.value.http_status is None  # refused here, never sent; the server refuses it the same way:
    raw = httpx.post(f"{server}/api/v1/tasks/optimization", headers={"X-API-Key": KEY}, timeout=30,
                     json={"builtin": "RSM0009", "model": "emt", "fmax": -1.0})
    assert raw.status_code == 422 and raw.json()["code"] == 40001 and "fmax" in raw.text
    with pytest.raises(ValidationError):  # checked here, never sent
        client.single_point(str(tmp_path / "missing.cif"), "emt")
    with pytest.raises(NotFoundError) as e:
        client.get_task("0" * 32)
    assert e.value.code == 30001 and e.value.http_status == 404 and e.value.request_id
    with pytest.raises(NotFoundError):
        client.get_structure("f" * 64)
    with pytest.raises(NotFoundError) as e:
        client.get_model("no-such-model")
    assert e.value.code == 30002
    for key in ("wrong-key-123", None):
        with Client(server, api_key=key, retries=0) as bad:
            with pytest.raises(AuthError) as e:
                bad.list_tasks()
            assert e.value.code == (20002 if key else 20001) and e.value.http_status == 401
            assert bad.health()["ready"] is True  # health needs no key
    # a task that fails on the worker: EMT has no Zn
    zn = bulk("Zn", "hcp", a=2.66, c=4.95)
    task = client.single_point(zn, "emt")
    with pytest.raises(TaskFailed) as e:
        task.result(timeout=60, poll=0.1)
    assert e.value.code == 50002 and "Zn" in e.value.message and e.value.status == "FAILED"
    assert task.status == "FAILED" and "Zn" in (task.error or "")
    assert isinstance(task.exception(), TaskFailed)
    # waiting runs out: the client's TimeoutError, also a builtin TimeoutError; the task goes on
    slow, kw = _slow_relax_kwargs(2)
    long_task = client.relax(slow, "emt", **kw)
    with pytest.raises(TimeoutError) as e:
        long_task.wait(timeout=0.3, poll=0.1)
    assert isinstance(e.value, builtins.TimeoutError) and isinstance(e.value, MatcalcError)
    assert long_task.cancel() is True
    model_file = tmp_path / "model.pt"
    model_file.write_bytes(b"\x00" * 16)
    with pytest.raises(ValidationError) as e:  # 16 zero bytes are no model
        client.upload_model(model_file, name="mine", family="torchscript")
    assert e.value.code == 40014 and "model.pt" in e.value.message
    if ALERTS not in routes:
        with pytest.raises(NotFoundError):
            client.alerts()
    else:
        assert isinstance(client.alerts(), list)
        rules = client.alerts("rules")
        assert rules and all(isinstance(r, dict) for r in rules)
        assert isinstance(client.alerts("history", page_size=5), list)
    with pytest.raises(ValueError):
        client.alerts("sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Client("localhost:8000")


# ----------------------------------------------------------------------------- sync: structures, models, system
def test_structures_models_and_system(client):
    atoms = CU.copy()
    atoms.rattle(0.01, seed=4)
    first = client.upload_structure(atoms, name="cu-rattled")
    again = client.upload_structure(atoms, name="cu-rattled")
    assert first.created is True and again.created is False and first.id == again.id
    assert first.n_atoms == 4 and first.formula == "Cu4" and first.id == mc.structure_hash(
        mc.load_structure(mc.structures.to_text(atoms), require_cell=False))
    builtin = client.upload_structure("RSM0010")
    assert builtin.n_atoms == 22 and builtin.name == "RSM0010"
    listed = client.list_structures(source="upload", page_size=500)
    assert {first.id, builtin.id} <= {s.id for s in listed}
    full = client.get_structure(first.id)
    assert mc.load_structure(full.content, require_cell=False).get_chemical_formula() == "Cu4"
    names = {b["name"]: b["n_atoms"] for b in client.builtin_structures()}
    assert names["RSM0009"] == 22 and set(names) == set(mc.list_builtins())

    models = {m.name: m for m in client.list_models()}
    assert models["emt"].available and "chgnet+d3" in models
    assert "chgnet+d3" not in {m.name for m in client.list_models(include_d3=False)}
    loaded = client.load_model("lj")
    assert loaded.name == "lj" and loaded.loaded and loaded.loaded_on
    assert client.get_model("lj").loaded
    assert client.unload_model("lj") is True and client.unload_model("lj") is False
    assert client.get_model("lj").loaded is False

    health = client.health()
    assert health["ready"] is True and health["version"] == mc.__version__
    status = client.system_status()
    assert status["health"]["ready"] and sum(status["queue"]["by_status"].values()) >= 1
    assert client.config()["api_keys"] == ["***"]
    assert client.gpus() == []  # no GPU on this machine (NVML sees none)


def test_custom_model_upload_validate_run_delete(client, server, tmp_path):
    """The TorchScript LJ of test_custom_models: remote result == the same file registered locally."""
    import torch

    import matcalc as mc
    from matcalc.client import CustomModelInfo
    from matcalc.models.custom import register_model_file, unregister_model_file
    from test_custom_models import EPS_EV, LJ_OPTIONS, RC_A, SIGMA_A, Evil, TorchLJ, argon

    path = tmp_path / "lj.pt"
    torch.jit.script(TorchLJ(EPS_EV, SIGMA_A, RC_A)).save(str(path))
    info = client.upload_model(path, name="client-lj", family="torchscript", description="argon",
                               options=LJ_OPTIONS)
    assert isinstance(info, CustomModelInfo) and info.status == "UPLOADED" and not info.validated
    with pytest.raises(MatcalcError) as e:  # not validated: refused, with the server's code
        client.single_point(argon(), "client-lj")
    assert e.value.code == 30006 and e.value.http_status == 409
    info = client.validate_model(info.id, timeout=120, poll=0.2)
    assert info.validated and info.validation and info.validation["passed"]
    assert "client-lj" in {m.name for m in client.list_models()}
    remote = client.single_point(argon(), "client-lj").result(timeout=120, poll=0.1)
    register_model_file(path, "torchscript", "client-lj-local", options=LJ_OPTIONS, validate=False)
    try:
        local = mc.single_point(argon(), model="client-lj-local")
    finally:
        unregister_model_file("client-lj-local")
    assert type(remote) is type(local)
    assert remote.energy_eV == pytest.approx(local.energy_eV, abs=1e-6)
    assert np.allclose(remote.forces_eV_per_A, local.forces_eV_per_A, atol=1e-6)
    assert [m.id for m in client.list_custom_models()] == [info.id] == [client.get_custom_model(info.id).id]

    evil = tmp_path / "evil.pt"
    torch.save({"payload": Evil(tmp_path / "pwned")}, evil)
    with pytest.raises(ValidationError) as e:
        client.upload_model(evil, name="evil", family="torchscript")
    assert e.value.code == 40013 and not (tmp_path / "pwned").exists()

    async def main() -> None:
        async with AsyncClient(server, api_key=KEY) as c:
            up = await c.upload_model(path, name="async-lj", family="torchscript", options=LJ_OPTIONS,
                                      validate=True, timeout=120, poll=0.2)
            assert up.validated
            assert {m.name for m in await c.list_custom_models()} == {"client-lj", "async-lj"}
            assert (await c.delete_model(up.id)).name == "async-lj"
            with pytest.raises(NotFoundError) as e:
                await c.get_custom_model(up.id)
            assert e.value.code == 30005

    asyncio.run(main())
    assert client.delete_model(info.id).name == "client-lj"
    assert client.list_custom_models() == []


def test_remote_tasks_drive_the_progress_view(client):
    """RemoteTask has the task-like protocol: matcalc.widgets.progress follows it via the poller."""
    from matcalc.widgets import progress

    md = client.stability(CU, "emt", ensemble="nvt", nvt_steps=300, interval=50, relax_first=False, seed=1)
    quick = client.single_point(CU, "emt")
    events: list[dict] = []
    statuses: list[str] = []
    md.add_progress_callback(lambda t, ev: events.append(ev))
    md.add_status_callback(lambda t, s: statuses.append(s))
    out = io.StringIO()
    view = progress([md, quick], mode="tqdm", file=out)
    assert view.wait(timeout=120)
    assert view.counts() == {"COMPLETED": 2}
    # the run's last step is always stored, so at least that event arrives; steps only go forward
    assert events and all(ev.get("stage") and ev.get("step") is not None for ev in events)
    assert events[-1]["step"] == events[-1]["total_steps"] == 300
    assert [ev["step"] for ev in events] == sorted(ev["step"] for ev in events)
    assert statuses[-1] == "COMPLETED"
    done: list[str] = []
    quick.add_done_callback(lambda t: done.append(t.status))  # already finished: called at once
    assert done == ["COMPLETED"]
    row = view.state.row(md.id)
    assert row.property == "stability" and row.model == "emt" and row.done and row.step == 300
    assert row.elapsed_s() is not None and row.elapsed_s() >= 0


# ----------------------------------------------------------------------------- async twin
def test_async_client_end_to_end(server, routes, local_results, tmp_path):
    async def main() -> None:
        async with AsyncClient(server, api_key=KEY) as c:
            tasks = {name: await getattr(c, method)(atoms, "emt", **kw)
                     for name, (method, atoms, kw, _) in CASES.items()}
            assert all(isinstance(t, AsyncRemoteTask) for t in tasks.values())
            results = await asyncio.gather(*(t.result(timeout=120, poll=0.1) for t in tasks.values()))
            for (name, _), res in zip(tasks.items(), results, strict=True):
                assert_same(name, res, local_results[name])
            sp = tasks["single_point"]
            assert sp.status == "COMPLETED" and sp.done() and await sp.exception() is None

            batch = await c.submit_batch([{"type": "single_point", "structure": CU, "model": "emt"},
                                          {"type": "optimization", "builtin": "RSM0009", "model": "lj",
                                           "max_steps": 3, "fmax": 0.5}])
            infos = [await t.wait(timeout=60, poll=0.1) for t in batch]
            assert [i.status for i in infos] == ["COMPLETED", "COMPLETED"]
            page = await c.list_tasks(batch_id=batch[0].info.batch_id)
            assert page.total == 2 and all(isinstance(t, AsyncRemoteTask) for t in page)
            got = await c.get_task(batch[1].id)
            assert got.property == "relax" and (await got.result()).steps <= 3
            logs = await got.logs()
            assert logs[-1].message == "task completed"
            streamed = [r async for r in got.stream_logs(poll=0.1)]
            assert [r.message for r in streamed] == [r.message for r in logs]

            slow, kw = _slow_relax_kwargs(3)
            running = await c.relax(slow, "emt", **kw)
            assert await running.cancel() is True and running.status == "CANCELLED"
            assert await c.cancel(running.id) is False
            with pytest.raises(TaskFailed):
                await running.result()

            up = await c.upload_structure(CU)
            assert (await c.get_structure(up.id)).n_atoms == 4
            assert up.id in {s.id for s in await c.list_structures(page_size=500)}
            assert len(await c.builtin_structures()) == len(mc.list_builtins())
            assert (await c.single_point(up, "emt")).info.structure_id == up.id
            assert "emt" in {m.name for m in await c.list_models()}
            assert (await c.get_model("emt")).available
            assert (await c.load_model("lj")).loaded and await c.unload_model("lj") is True
            assert (await c.health())["ready"] and (await c.system_status())["health"]["ready"]
            assert (await c.config())["workers"] == 2 and await c.gpus() == []

            with pytest.raises(ValidationError):
                await c.single_point("data_x\nnot a cif\n", "emt")
            with pytest.raises(NotFoundError):
                await c.get_task("missing-task-id")
            with pytest.raises(TaskFailed):
                await (await c.single_point(bulk("Zn", "hcp", a=2.66, c=4.95), "emt")).result(timeout=60, poll=0.1)
            if ALERTS in routes:
                assert isinstance(await c.alerts("rules"), list)
            else:
                with pytest.raises(NotFoundError):
                    await c.alerts("rules")
            f = tmp_path / "m.pt"
            f.write_bytes(b"x")
            with pytest.raises(ValidationError):
                await c.upload_model(f, name="m", family="torchscript")
            slow2 = await c.relax(slow, "emt", **kw)
            with pytest.raises(TimeoutError):
                await slow2.wait(timeout=0.2, poll=0.05)
            assert await slow2.cancel()
        async with AsyncClient(server, api_key="bad-key-000") as bad:
            with pytest.raises(AuthError):
                await bad.list_models()

    asyncio.run(main())


# ----------------------------------------------------------------------------- retries (MockTransport)
def _envelope(code: int, data=None, message: str = "x") -> dict:
    return {"success": code == 0, "code": code, "message": message, "data": data, "timestamp": "2026-01-01T00:00:00Z",
            "request_id": "rid-1"}


TASK = {"id": "t1", "type": "single-point", "model": "emt", "status": "QUEUED", "priority": "NORMAL",
        "parameters": {}, "structure_id": "a" * 64, "created_at": "2026-01-01T00:00:00Z"}


class Flaky:
    """Answers 503 (or raises ConnectError) ``fails`` times, then succeeds; counts calls per method."""

    def __init__(self, fails: int, how: str = "503") -> None:
        self.fails, self.how, self.calls = fails, how, {"GET": 0, "POST": 0}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls[request.method] += 1
        if self.calls[request.method] <= self.fails:
            if self.how == "connect":
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(503, json=_envelope(10002, message="executor unavailable"))
        if request.url.path.endswith("/cancel"):
            return httpx.Response(200, json=_envelope(0, {"task_id": "t1", "status": "CANCELLED", "cancelled": True}))
        if request.url.path.endswith("/tasks/batch"):
            return httpx.Response(201, json=_envelope(0, {"batch_id": "b1", "tasks": [TASK]}))
        return httpx.Response(201 if request.method == "POST" else 200, json=_envelope(0, TASK))


def mock_client(handler, retries: int = 3) -> Client:
    return Client("http://mock", retries=retries, backoff_s=0.001, transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("how", ["503", "connect"])
def test_get_and_cancel_are_retried_with_backoff(how):
    flaky = Flaky(2, how)
    with mock_client(flaky) as c:
        assert c.get_task("t1").id == "t1"
    assert flaky.calls["GET"] == 3
    flaky = Flaky(2, how)
    with mock_client(flaky) as c:
        assert c.cancel("t1") is True
    assert flaky.calls["POST"] == 3
    flaky = Flaky(10, how)
    with mock_client(flaky, retries=2) as c, pytest.raises(ServerError) as e:
        c.get_task("t1")
    assert flaky.calls["GET"] == 3
    if how == "503":
        assert e.value.code == 10002 and e.value.http_status == 503 and e.value.request_id == "rid-1"


@pytest.mark.parametrize("how", ["503", "connect"])
def test_submissions_are_retried_under_one_key_and_uploads_never(how):
    """A task submission always carries an Idempotency-Key and is retried with it (the server answers
    the repetition with the task it stored); other POSTs (uploads) are never retried."""
    keys: list[str | None] = []

    def keyed(flaky: Flaky):
        def handler(request: httpx.Request) -> httpx.Response:
            keys.append(request.headers.get("idempotency-key"))
            return flaky(request)
        return handler

    flaky = Flaky(2, how)
    with mock_client(keyed(flaky)) as c:
        assert c.single_point(CU, "emt").id == "t1"
    assert flaky.calls["POST"] == 3 and len(set(keys)) == 1 and len(keys[0]) >= 16
    keys.clear()
    flaky = Flaky(1, how)
    with mock_client(keyed(flaky)) as c:
        c.submit_batch([{"type": "single-point", "structure": CU, "model": "emt"}])
    assert flaky.calls["POST"] == 2 and len(set(keys)) == 1
    keys.clear()
    flaky = Flaky(1, how)
    with mock_client(keyed(flaky)) as c, pytest.raises(ServerError):
        c.upload_structure(CU)
    assert flaky.calls["POST"] == 1 and keys == [None]


def test_async_retries_and_backoff_policy():
    flaky = Flaky(2)

    async def main() -> None:
        async with AsyncClient("http://mock", backoff_s=0.001, transport=httpx.MockTransport(flaky)) as c:
            assert (await c.get_task("t1")).id == "t1"
            assert (await c.relax(CU, "emt")).id == "t1"  # retried under its Idempotency-Key

    asyncio.run(main())
    assert flaky.calls == {"GET": 3, "POST": 3}
    from matcalc.client import RetryPolicy

    p = RetryPolicy(retries=5, backoff_s=0.5, max_backoff_s=4.0)
    delays = [p.delay(i) for i in range(6)]
    assert all(0.75 * min(4.0, 0.5 * 2**i) <= d <= 1.25 * min(4.0, 0.5 * 2**i) for i, d in enumerate(delays))
    assert p.delay(0, httpx.Response(429, headers={"Retry-After": "3"})) == 3.0
    with pytest.raises(ValueError):
        RetryPolicy(retries=-1)


def test_sse_stream_is_decoded():
    """The documented stream shape (text/event-stream, one JSON record per data line, ends with the
    task) against a mock server; the live server's fallback to polling is covered above."""
    records = [{"id": 1, "level": "INFO", "event": "log", "message": "task submitted"},
               {"id": 2, "level": "DEBUG", "event": "progress", "message": "relax: step 1", "data": {"step": 1}},
               {"id": 3, "level": "INFO", "event": "log", "message": "task completed"}]
    body = ": keep-alive\n\n" + "".join(f"id: {r['id']}\ndata: {json.dumps(r)}\n\n" for r in records)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/tasks/t1":  # the stream closed: the client checks the task ended
            return httpx.Response(200, json=_envelope(0, {**TASK, "status": "COMPLETED"}))
        assert request.url.path == "/api/v1/tasks/t1/logs/stream"
        assert request.headers["accept"] == "text/event-stream" and request.headers["x-api-key"] == "k"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    with Client("http://mock/api/v1/", api_key="k", transport=httpx.MockTransport(handler)) as c:
        task = RemoteTask(c, TaskInfo.from_json(TASK))
        got = list(task.stream_logs())
    assert [r.message for r in got] == [r["message"] for r in records]
    assert got[1].data == {"step": 1} and got[1].event == "progress" and got[2].id == 3

    async def amain() -> list:
        async with AsyncClient("http://mock", api_key="k", transport=httpx.MockTransport(handler)) as c:
            t = AsyncRemoteTask(c, TaskInfo.from_json(TASK))
            return [r async for r in t.stream_logs()]

    assert [r.message for r in asyncio.run(amain())] == [r["message"] for r in records]
    d = SSEDecoder()
    assert d.feed("data: {\"message\": \"a\",") is None and d.feed("data: \"level\": \"WARNING\"}") is None
    assert d.feed("") == {"message": "a", "level": "WARNING"}
    d.feed("event: end")
    assert d.feed("") is None and d.ended


def test_stream_falls_back_to_polling_without_the_route():
    """A server without GET /logs/stream (404, code 30000) is polled with GET /logs?after=."""
    calls: list[str] = []
    state = {"polls": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        calls.append(path)
        if path.endswith("/logs/stream"):
            return httpx.Response(404, json=_envelope(30000, message="Not Found"))
        if path.endswith("/logs"):
            after = int(request.url.params.get("after", 0))
            rows = [{"id": i, "message": f"m{i}"} for i in range(1, min(2 * state["polls"], 4) + 1) if i > after]
            return httpx.Response(200, json=_envelope(0, rows))
        state["polls"] += 1
        return httpx.Response(200, json=_envelope(0, {**TASK, "status": "COMPLETED" if state["polls"] >= 2
                                                      else "RUNNING"}))

    with Client("http://mock", transport=httpx.MockTransport(handler)) as c:
        task = RemoteTask(c, TaskInfo.from_json(TASK))
        got = [r.message for r in task.stream_logs(poll=0.01)]
    assert got == ["m1", "m2", "m3", "m4"]  # each record once, in order, the last after the end was seen
    assert calls[0].endswith("/logs/stream") and calls.count("/api/v1/tasks/t1/logs") >= 2

    async def amain() -> list[str]:
        state["polls"] = 0
        async with AsyncClient("http://mock", transport=httpx.MockTransport(handler)) as c:
            t = AsyncRemoteTask(c, TaskInfo.from_json(TASK))
            return [r.message async for r in t.stream_logs(poll=0.01)]

    assert asyncio.run(amain()) == ["m1", "m2", "m3", "m4"]


def test_stream_closed_early_resumes_by_polling():
    """A stream that closes before the task ended continues with GET /logs?after=<last id>."""
    seen: list[str] = []
    state = {"polls": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        seen.append(f"{path}?{request.url.query.decode()}")
        if path.endswith("/logs/stream"):
            body = "".join(f"data: {json.dumps({'id': i, 'message': f'm{i}'})}\n\n" for i in (1, 2))
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        if path.endswith("/logs"):
            after = int(request.url.params["after"])
            rows = [{"id": i, "message": f"m{i}"} for i in (3, 4) if i > after and i <= 2 + state["polls"]]
            return httpx.Response(200, json=_envelope(0, rows))
        state["polls"] += 1
        return httpx.Response(200, json=_envelope(0, {**TASK, "status": "RUNNING" if state["polls"] < 3
                                                      else "COMPLETED"}))

    with Client("http://mock", transport=httpx.MockTransport(handler)) as c:
        task = RemoteTask(c, TaskInfo.from_json(TASK))
        got = [r.message for r in task.stream_logs(poll=0.01)]
    assert got == ["m1", "m2", "m3", "m4"]
    assert any("after=2" in s for s in seen)


# ----------------------------------------------------------------------------- methods derived from the declarations
def _probes(kind) -> list:
    """Values at and just outside each bound of a declared kind, NaN/Infinity where numeric, and
    values of the wrong type; [] for a kind this test does not know (its keyword is still checked)."""
    import math

    from matcalc.calculations.contract import Choice, Either, Flag, Indices, Molecule, Number, Vector
    from matcalc.calculations.contract import Names, Text

    if isinstance(kind, Number):
        if kind.integer:
            lo, hi = int(kind.min_value), int(kind.max_value)
            return [lo, hi, lo - 1, hi + 1, lo + 0.5, True, "3"]
        inside = [math.nextafter(kind.lo, kind.hi) if kind.lo_open else kind.lo,
                  math.nextafter(kind.hi, kind.lo) if kind.hi_open else kind.hi]
        outside = [kind.lo if kind.lo_open else math.nextafter(kind.lo, -math.inf),
                   kind.hi if kind.hi_open else math.nextafter(kind.hi, math.inf)]
        return [*inside, *outside, math.nan, math.inf, -math.inf, "1"]
    if isinstance(kind, Flag):
        return [True, False, 1, "yes"]
    if isinstance(kind, Choice):
        return [kind.options[0], kind.options[-1].lower(), "no-such-choice", 3]
    if isinstance(kind, Vector):
        good = _probes(kind.item)[0]
        return [[good] * kind.length, [good] * (kind.length + 1), [math.nan] * kind.length, good]
    if isinstance(kind, Either):
        return [*_probes(kind.number), *_probes(kind.vector)]
    if isinstance(kind, Indices):
        return [[0, 2], [True, False], [-1], [0.5], "0"]
    if isinstance(kind, Molecule):
        return [kind.names[0], "", 5]
    if isinstance(kind, Text):
        return ["x", "x" * kind.max_length, "x" * (kind.max_length + 1), "  ", 5]
    if isinstance(kind, Names):
        return [["task.completed"], [], "task.completed", [""], ["task.nonsense"]]
    return []


def _local_outcome(check, value):
    try:
        return "ok", check(value)
    except (ValueError, TypeError) as exc:
        return type(exc), str(exc)


class Recorder:
    """A MockTransport handler: every request kept; each submission answered with a stored task."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content) if request.method == "POST" and request.content else {}
        data = {**TASK, "type": body.get("type", TASK["type"])}
        if request.url.path.endswith("/tasks/batch"):
            return httpx.Response(201, json=_envelope(0, {"batch_id": "b1", "tasks": [data] * len(body["tasks"])}))
        return httpx.Response(201, json=_envelope(0, data))


def _cases():
    """(property, keyword, value, what the local declaration makes of it) for every probe of every
    remote parameter and every task option: the local function's validation is the reference."""
    from matcalc.calculations import properties
    from matcalc.client import TASK_OPTIONS

    out = []
    for spec in properties().values():
        for p in spec.remote_params:
            for v in _probes(p.kind):
                out.append((spec, p.name, v, _local_outcome(lambda x, s=spec, n=p.name: s.resolve(None, {n: x})[1][n], v)))
        for o in TASK_OPTIONS:
            for v in _probes(o.kind):
                out.append((spec, o.name, v, _local_outcome(o.coerce, v)))
    return out


def _check_submission(spec, name, value, expected, outcome, sent: list[httpx.Request]) -> None:
    """Rejected locally -> the same error, nothing sent; accepted -> one POST whose value the server,
    reading it with the same declaration, takes for what the local function took."""
    from matcalc.client._submit import HEADERS, TASK_OPTIONS

    what = f"{spec.name}({name}={value!r})"
    if expected[0] != "ok":
        assert outcome == expected, what
        assert sent == [], what
        return
    assert outcome == ("ok", None), (what, outcome)
    assert len(sent) == 1 and sent[0].url.path == f"/api/v1/tasks/{spec.task_type}", what
    body = json.loads(sent[0].content)
    assert body["type"] == spec.task_type and body["model"] == "emt", what
    if name in HEADERS:
        assert sent[0].headers[HEADERS[name]] == expected[1], what
        return
    decl = next((o for o in TASK_OPTIONS if o.name == name), None) or spec.param(name)
    assert decl.coerce(body[name]) == expected[1], what


def seen(exc: Exception) -> tuple:
    """A client's refusal as the local one reads: a ValueError is a ValidationError with the local
    message and the server's code for it (40001), sent nowhere (no HTTP status, no request id)."""
    if isinstance(exc, ValueError):
        assert isinstance(exc, ValidationError) and exc.code == 40001, exc
        assert exc.http_status is None and exc.request_id is None
        return ValueError, exc.message
    return type(exc), str(exc)


def test_every_parameter_is_checked_locally_as_the_declaration_says():
    """For every remote parameter of every property and every task option, at and just outside its
    bounds and at NaN/Infinity: each client method accepts exactly what the local function accepts
    (and sends it so that the server reads the same value), and rejects the rest with the local
    function's error, naming the parameter, before any request. Sync and async alike; generated
    from the declarations, so a new property or parameter is covered with no new test code."""
    cases = _cases()
    assert len({c[0].name for c in cases}) == len(mc.calculations.properties())
    text = cif_text(CU)
    rec = Recorder()

    def outcome(call):
        try:
            call()
        except (ValueError, TypeError) as exc:
            return seen(exc)
        return "ok", None

    with Client("http://mock", transport=httpx.MockTransport(rec)) as c:
        for spec, name, value, expected in cases:
            rec.requests.clear()
            got = outcome(lambda s=spec, n=name, v=value: getattr(c, s.client_method)(text, "emt", **{n: v}))
            _check_submission(spec, name, value, expected, got, rec.requests)
        spec, name, value, expected = cases[0]
        rec.requests.clear()
        got = outcome(lambda: c.submit(spec.name, text, "emt", **{name: value}))  # the generic path: the same
        _check_submission(spec, name, value, expected, got, rec.requests)

    async def amain() -> None:
        async with AsyncClient("http://mock", transport=httpx.MockTransport(rec)) as ac:
            for spec, name, value, expected in cases:
                rec.requests.clear()
                try:
                    await getattr(ac, spec.client_method)(text, "emt", **{name: value})
                    got = ("ok", None)
                except (ValueError, TypeError) as exc:
                    got = seen(exc)
                _check_submission(spec, name, value, expected, got, rec.requests)

    asyncio.run(amain())
    rejected = [(spec, name, exp) for spec, name, _, exp in cases if exp[0] is ValueError]
    assert rejected and all(name in msg for _, name, (_, msg) in rejected if "must" in msg)


@pytest.mark.parametrize("prop", sorted(mc.calculations.PROPERTIES))
def test_every_property_has_a_method_on_both_clients(prop):
    """Each declared property has its method (client_method, and its name as an alias) on Client and
    AsyncClient with the declared keywords, docstring and handle type, and submits its task type."""
    import inspect

    from matcalc.calculations import get_property
    from matcalc.client import TASK_OPTIONS

    spec = get_property(prop)
    keywords = [p.name for p in spec.remote_params] + [o.name for o in TASK_OPTIONS]
    rec = Recorder()
    sync = Client("http://mock", transport=httpx.MockTransport(rec))
    asy = AsyncClient("http://mock", transport=httpx.MockTransport(rec))
    for client, handle in ((sync, RemoteTask), (asy, AsyncRemoteTask)):
        assert getattr(type(client), spec.client_method) is getattr(type(client), spec.name)
        method = getattr(client, spec.client_method)
        sig = inspect.signature(method)
        assert list(sig.parameters)[:2] == ["structure", "model"] and sig.parameters["model"].default == "chgnet"
        assert [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY] == keywords
        assert all(sig.parameters[n].default is None for n in keywords)
        assert sig.return_annotation == handle.__name__
        assert inspect.iscoroutinefunction(method) is (handle is AsyncRemoteTask)
        assert spec.summary in method.__doc__ and spec.result.__name__ in method.__doc__
        assert all(f"    {p.name}: {p.doc}" in method.__doc__ for p in spec.remote_params)
    rec.requests.clear()
    task = getattr(sync, spec.name)(CU, "emt", label="x")
    assert isinstance(task, RemoteTask) and task.info.type == spec.task_type
    atask = asyncio.run(getattr(asy, spec.client_method)(CU, "emt"))
    assert isinstance(atask, AsyncRemoteTask) and atask.info.type == spec.task_type
    bodies = [json.loads(r.content) for r in rec.requests]
    assert [b["type"] for b in bodies] == [spec.task_type] * 2 and bodies[0]["label"] == "x"
    assert all(r.url.path == f"/api/v1/tasks/{spec.task_type}" for r in rec.requests)
    sync.close()
    asyncio.run(asy.aclose())


def test_sync_and_async_surfaces_are_one_core():
    """The same public methods on both clients and both task handles (one core), and the local-only
    parameters are refused by name before any request."""
    def public(cls) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}

    assert public(Client) - {"close"} == public(AsyncClient) - {"close", "aclose"}
    callbacks = {"add_done_callback", "add_progress_callback", "add_status_callback"}
    assert public(RemoteTask) - callbacks == public(AsyncRemoteTask)
    assert Client.get_task.__doc__ and AsyncClient.get_task is Client.get_task
    rec = Recorder()
    with Client("http://mock", transport=httpx.MockTransport(rec)) as c:
        with pytest.raises(TypeError, match="trajectory"):
            c.stability(CU, "emt", trajectory="md.traj")  # a local file: not offered over REST
        with pytest.raises(TypeError, match="trajectory"):
            c.submit("stability", CU, "emt", trajectory="md.traj")
        with pytest.raises(ValueError, match=r"tasks\[1\].*fmax"):
            c.submit_batch([{"type": "relax", "structure": CU, "model": "emt"},
                            {"type": "relax", "structure": CU, "model": "emt", "fmax": -1.0}])
        with pytest.raises(ValueError, match="task type"):
            c.submit("no-such-property", CU, "emt")
    assert rec.requests == []


def test_submissions_with_an_idempotency_key_are_retried_with_it():
    """One place for headers and retries: a submission that carries an Idempotency-Key is retried on a
    connection error with the same key (the server answers the repetition with the stored task)."""
    rec = Recorder()
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("idempotency-key"))
        if len(seen) % 2:  # every first try is lost
            raise httpx.ConnectError("reset", request=request)
        return rec(request)

    with mock_client(handler) as c:
        assert c.single_point(CU, "emt", idempotency_key="k-1").id == "t1"
        assert c.submit_batch([{"type": "single-point", "structure": CU, "model": "emt"}],
                              idempotency_key="k-2")[0].id == "t1"
    assert seen == ["k-1", "k-1", "k-2", "k-2"] and len(rec.requests) == 2


def test_structure_fields_choose_the_reference():
    from matcalc.client._base import structure_fields

    assert structure_fields("calf-20") == {"builtin": "CALF-20"}
    assert structure_fields("ab" * 32) == {"structure_id": "ab" * 32}
    info = StructureInfo(id="cd" * 32, formula="Cu4", n_atoms=4, format="cif", periodic=True)
    assert structure_fields(info) == {"structure_id": "cd" * 32}
    f = structure_fields(CU)
    assert f["format"] == "extxyz" and mc.load_structure(f["structure"]).get_chemical_formula() == "Cu4"
    text = cif_text(CU)
    assert structure_fields(text) == {"structure": text}
    with pytest.raises(ValidationError):
        structure_fields("not-a-file-or-builtin")


@pytest.mark.skipif(shutil.which("mypy") is None and not (Path(sys.executable).parent / "mypy").exists(),
                    reason="mypy not installed")
def test_mypy_strict_is_clean():
    mypy = shutil.which("mypy") or str(Path(sys.executable).parent / "mypy")
    r = subprocess.run([mypy, "--strict", "matcalc/client"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
