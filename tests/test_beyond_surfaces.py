"""elastic_tensor, phonons and thermal_expansion on every surface: the REST routes and their OpenAPI schemas
come from the declarations, bad input is refused with 422 before anything is stored, and a live
`matcalc serve` runs each end to end (EMT, tiny cells) through both clients, with progress in the widget,
giving the same numbers as the local calls."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.io import write

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

import matcalc as mc  # noqa: E402
from live_server import KEY, LiveServer  # noqa: E402
from matcalc.server import Settings, create_app  # noqa: E402
from matcalc.server.errors import ErrorCode  # noqa: E402
from matcalc.store import Structure, Task, TaskLog  # noqa: E402

API = "/api/v1"


def cif_of(atoms: Atoms) -> str:
    buf = io.BytesIO()
    write(buf, atoms, format="cif")
    return buf.getvalue().decode()


CU_PRIM = bulk("Cu", "fcc", a=3.6)
CU_CUBIC = bulk("Cu", "fcc", a=3.6, cubic=True)
MOLECULE_XYZ = "2\nCu dimer\nCu 0 0 0\nCu 0 0 2.5\n"
ELASTIC = {"n_strains": 2}
PHONONS = {"supercell": [2, 2, 2], "mesh": 8, "band_points": 11, "t_max": 300.0, "t_step": 50.0}
QHA = {"supercell": [2, 2, 2], "mesh": 8, "n_volumes": 5, "volume_range": [0.97, 1.06], "t_max": 300.0,
       "t_step": 50.0}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """Queue-only server (workers=0): tasks are stored and queued, nothing runs."""
    db = tmp_path_factory.mktemp("api") / "api.db"
    app = create_app(Settings(db_url=f"sqlite:///{db}", workers=0))
    with TestClient(app) as c:
        yield c


def counts(client: TestClient) -> tuple[int, int, int]:
    store = client.app.state.store
    return store.count(Task), store.count(Structure), store.count(TaskLog)


def test_routes_and_schemas_come_from_the_declarations(client):
    spec = client.get("/openapi.json").json()
    for route in ("elastic-tensor", "phonons", "thermal-expansion"):
        assert f"{API}/tasks/{route}" in spec["paths"], route
    schemas = spec["components"]["schemas"]

    def prop(model: str, name: str) -> dict:
        return schemas[model]["properties"][name]["anyOf"][0]

    assert prop("ElasticTensorRequest", "strain_max") == {"type": "number", "exclusiveMinimum": 0.0,
                                                          "exclusiveMaximum": 0.1}
    assert prop("ThermalExpansionRequest", "n_volumes")["minimum"] == 5
    assert prop("PhononsRequest", "band_path")["type"] == "string"
    r = client.post(f"{API}/tasks/elastic-tensor", json={"structure": cif_of(CU_CUBIC), "model": "emt",
                                                          "strain_max": 0.02})
    assert r.status_code == 201, r.text  # a valid request is stored and queued


@pytest.mark.parametrize(("route", "body", "words"), [
    ("elastic-tensor", {"strain_max": 0}, ["strain_max"]),
    ("elastic-tensor", {"strain_max": -0.01}, ["strain_max"]),
    ("elastic-tensor", {"strain_max": 0.1}, ["strain_max"]),
    ("elastic-tensor", {"n_strains": 3}, ["n_strains"]),
    ("phonons", {"band_path": "GQ"}, ["band_path"]),
    ("phonons", {"band_path": "G-X"}, ["band_path"]),
    ("phonons", {"supercell": [20, 20, 20]}, ["supercell"]),
    ("thermal-expansion", {"n_volumes": 4}, ["n_volumes"]),
    ("thermal-expansion", {"volume_range": [1.01, 1.1]}, ["volume_range"]),
    ("thermal-expansion", {"t_min": 300, "t_max": 300}, ["t_max"]),
])
def test_bad_input_is_refused_and_nothing_stored(client, route, body, words):
    before = counts(client)
    r = client.post(f"{API}/tasks/{route}", json={"structure": cif_of(CU_PRIM), "model": "emt", **body})
    data = r.json()
    assert r.status_code == 422 and data["code"] == int(ErrorCode.VALIDATION_ERROR), data
    for w in words:
        assert w in data["message"], data["message"]
    assert counts(client) == before


@pytest.mark.parametrize("route", ["elastic-tensor", "phonons", "thermal-expansion"])
def test_non_periodic_structure_is_refused_and_nothing_stored(client, route):
    before = counts(client)
    r = client.post(f"{API}/tasks/{route}", json={"structure": MOLECULE_XYZ, "format": "xyz", "model": "emt"})
    data = r.json()
    assert r.status_code == 422 and data["code"] == int(ErrorCode.INVALID_STRUCTURE), data
    assert "periodic" in data["message"] and "structure" in data["message"], data["message"]
    assert counts(client) == before


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("beyond")
    srv = LiveServer(work, f"sqlite:///{work / 'live.db'}", "--workers", "2")
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_live_server_clients_and_widget(server):
    """All three through a live server with the sync client, the widget following them (progress of each),
    phonons again through the async client; results equal the local calls."""
    import httpx

    from matcalc.client import AsyncClient, Client
    from matcalc.widgets import progress

    with Client(server.url, api_key=KEY, poll_interval=0.2) as c:
        tasks = [c.elastic_tensor(CU_CUBIC, "emt", **ELASTIC), c.phonons(CU_PRIM, "emt", **PHONONS),
                 c.thermal_expansion(CU_PRIM, "emt", **QHA)]
        w = progress(tasks, mode="widget", display=False, max_rate_hz=50)
        assert w.wait(240)
        assert w.counts() == {"COMPLETED": 3}
        elastic_remote, phonon_remote, qha_remote = (t.result(timeout=60) for t in tasks)
        for t in tasks:  # each row showed the task's own progress (stage and step)
            row = w.state.row(t.id)
            assert row.status == "COMPLETED" and row.step is not None and row.stage, (t.id, row)
        w.close()

    async def phonons_async():
        async with AsyncClient(server.url, api_key=KEY, poll_interval=0.2) as ac:
            task = await ac.phonons(CU_PRIM, "emt", **PHONONS)
            return await task.result(timeout=180)

    phonon_async = asyncio.run(phonons_async())

    with httpx.Client(base_url=server.url + API, headers={"X-API-Key": KEY}, timeout=30) as h:
        for t in tasks:  # progress reports reached the server's task log of each
            entries = h.get(f"/tasks/{t.id}/logs").json()["data"]
            assert any(e["event"] == "progress" for e in entries), t.id

    local_el = mc.elastic_tensor(CU_CUBIC, "emt", cache=False, **ELASTIC)
    assert type(elastic_remote).__name__ == "ElasticTensorResult"
    np.testing.assert_allclose(elastic_remote.C_GPa, local_el.C_GPa, rtol=1e-6, atol=1e-6)
    assert elastic_remote.mechanically_stable

    local_ph = mc.phonons(CU_PRIM, "emt", cache=False, **{**PHONONS, "supercell": (2, 2, 2)})
    for remote in (phonon_remote, phonon_async):
        assert type(remote).__name__ == "PhononResult" and remote.band_labels == local_ph.band_labels
        np.testing.assert_allclose(remote.band_frequencies_THz, local_ph.band_frequencies_THz, atol=1e-6)
        np.testing.assert_allclose(remote.to_phonopy().force_constants, local_ph.force_constants_eV_per_A2,
                                   atol=1e-9)

    local_te = mc.thermal_expansion(CU_PRIM, "emt", cache=False,
                                    **{**QHA, "supercell": (2, 2, 2), "volume_range": (0.97, 1.06)})
    assert type(qha_remote).__name__ == "ThermalExpansionResult"
    np.testing.assert_allclose(qha_remote.volume_A3, local_te.volume_A3, rtol=1e-9)
    np.testing.assert_allclose(qha_remote.volumetric_expansion_per_K, local_te.volumetric_expansion_per_K,
                               rtol=1e-6, atol=1e-12)
