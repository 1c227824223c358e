"""Provenance on every result and the content-addressed result cache (matcalc.cache).

Every property is covered by generated tests over ``matcalc.calculations.properties()``: the second call
returns the same result (``to_dict()`` equal but ``provenance["cached"]``) with no model call (the model's
call counter), and the provenance of the first is checked field by field against this process (installed
versions, host, the model file's own sha256, the resolved parameters). Then: each key component changed
-> a miss; a weights file rewritten -> a miss (touched only -> hashed again, same key); corrupt entries and an
unreadable database -> a warning and a recomputation; 8 processes writing one key -> one entry; threads
computing one key -> one computation; the server completing a resubmission at once (SQLite, and
PostgreSQL with MATCALC_TEST_PG_URL); ``matcalc cache`` and ``matcalc run``.

The session has the cache off (tests/conftest.py); the ``cache_on`` fixture turns it on with a fresh database.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import socket
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from test_custom_models import LJ_OPTIONS, RC_A, SIGMA_A, TorchLJ, argon

import matcalc as mc
from matcalc import cache as result_cache
from matcalc.calculations import contract, properties
from matcalc.models import get_model
from matcalc.models.identity import hashes_computed, package_version
from matcalc.models.registry import model_identity

PG_URL = os.environ.get("MATCALC_TEST_PG_URL", "").strip()
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL,
                                                                          reason="MATCALC_TEST_PG_URL not set"))]


def db_url(backend: str, tmp_path: Path, name: str) -> str:
    """A fresh database: a SQLite file of the test, or the emptied PostgreSQL test database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / name}"
    from test_store import _reset_pg

    _reset_pg(PG_URL)
    return PG_URL


@pytest.fixture
def cache_on(tmp_path, monkeypatch) -> str:
    """The cache on, in a database of this test only; returns its URL."""
    url = f"sqlite:///{tmp_path / 'cache.db'}"
    monkeypatch.setenv(result_cache.ENABLE_ENV, "1")
    monkeypatch.setenv(result_cache.URL_ENV, url)
    yield url
    result_cache.close_all()


def cu(seed: int = 3) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.62, cubic=True)
    atoms.rattle(0.02, seed=seed)
    return atoms


def host() -> Atoms:
    """Two Cu atoms in a 10 Å box: room for a CO2 guest (what test_contract probes guests in)."""
    return Atoms("Cu2", positions=[[1, 1, 1], [3.5, 1, 1]], cell=np.eye(3) * 10.0, pbc=True)


SMALL: dict[str, dict[str, Any]] = {
    "bulk_modulus": {"n_points": 5},
    "heat_capacity": {"mesh": 8.0, "t_step": 100.0},
    "phonons": {"mesh": 8.0, "t_step": 100.0, "band_points": 5},
    "stability": {"nvt_steps": 20, "npt_steps": 20, "interval": 10},
    "thermal_expansion": {"n_volumes": 5, "mesh": 8.0, "t_step": 100.0},
    "henry_coefficient": {"n_insertions": 40, "n_blocks": 2},
    "binding_sites": {"n_sites": 1, "n_candidates": 2, "n_orientations": 2, "n_insertions": 40, "max_steps": 20},
}
"""Smaller knobs where the ``fast`` preset is still more work than a cache test needs (a property not
listed runs with ``fast`` as it is)."""


def call_for(spec: contract.Property[Any]) -> tuple[Atoms, dict[str, Any]]:
    """A cheap EMT call of any property: a guest-taking property gets CO2 in a roomy Cu cell."""
    kwargs = {"protocol": "fast", **SMALL.get(spec.name, {})}
    molecules = [p for p in spec.params if isinstance(p.kind, contract.Molecule)]
    if molecules:
        kwargs[molecules[0].name] = "CO2"
        return host(), kwargs
    return cu(), kwargs


def _without_cached(d: dict[str, Any]) -> dict[str, Any]:
    return {**d, "provenance": {k: v for k, v in d["provenance"].items() if k != "cached"}}


# ----------------------------------------------------------------------------- every property
@pytest.mark.parametrize("name", sorted(properties()))
def test_second_call_is_served_identical_with_no_model_call(name, cache_on):
    spec = properties()[name]
    atoms, kwargs = call_for(spec)
    emt = get_model("emt", "cpu")
    emt.reset_stats()
    t0 = datetime.now(UTC)
    first = spec.function(atoms, model="emt", device="cpu", **kwargs)
    t1 = datetime.now(UTC)
    calls = emt.stats.calls
    assert calls > 0
    second = spec.function(atoms, model="emt", device="cpu", **kwargs)
    assert emt.stats.calls == calls, "the cached call evaluated the model"
    assert type(second) is type(first)
    assert first.provenance["cached"] is False and second.provenance["cached"] is True
    assert _without_cached(second.to_dict()) == _without_cached(first.to_dict())
    assert second.provenance["started_at"] == first.provenance["started_at"]  # the original timestamps

    # provenance: every field present, and true
    p = first.provenance
    assert p["matcalc_version"] == mc.__version__
    assert p["property"] == name and p["protocol"] == "fast"
    _, resolved = spec.resolve("fast", {k: v for k, v in kwargs.items() if k != "protocol"})
    assert set(resolved) <= set(p["parameters"])  # every resolved parameter (and any the run chose, e.g. a position)
    assert p["parameters"] == result_cache.provenance_parameters(spec, first.parameters)
    assert p["structure_hash"] == mc.structure_hash(mc.load_structure(atoms))  # of the input
    assert t0 <= datetime.fromisoformat(p["started_at"]) <= datetime.fromisoformat(p["finished_at"]) <= t1
    assert p["host"] == socket.gethostname()
    assert p["device"] == "cpu" and p["dtype"] == emt.dtype == "float64"
    assert p["model"]["name"] == "emt" and p["model"]["family"] == "emt" and p["model"]["weights_sha256"] is None
    assert p["model"]["package"] == "ase"
    import importlib.metadata

    import ase
    import phonopy

    assert p["versions"]["ase"] == p["model"]["package_version"] == ase.__version__
    assert p["versions"]["torch"] == torch.__version__ and p["versions"]["numpy"] == np.__version__
    assert p["versions"]["phonopy"] == phonopy.__version__
    # pymatgen.core.__version__ lags its releases (a hard-coded string): the installed distribution is the truth
    assert p["versions"]["pymatgen"] == importlib.metadata.version("pymatgen")
    assert p["cache_key"] == second.provenance["cache_key"] and len(p["cache_key"]) == 64
    row = first.to_frame().iloc[0]
    assert row["matcalc_version"] == mc.__version__ and row["device"] == "cpu" and not row["cached"]
    assert bool(second.to_frame().iloc[0]["cached"]) is True
    # the REST client rebuilds results with Result.from_dict: the provenance comes back whole
    assert type(first).from_dict(json.loads(json.dumps(first.to_dict()))).provenance == p


def test_cache_off_per_call_and_globally(cache_on, monkeypatch):
    emt = get_model("emt", "cpu")
    atoms = cu(5)
    mc.single_point(atoms, "emt", cache=False)
    assert len(result_cache.open_cache()) == 0
    emt.reset_stats()
    mc.single_point(atoms, "emt")
    mc.single_point(atoms, "emt", cache=False)  # computes although the entry exists
    assert emt.stats.calls == 2
    monkeypatch.setenv(result_cache.ENABLE_ENV, "0")
    r = mc.single_point(atoms, "emt")
    assert emt.stats.calls == 3 and r.provenance["cached"] is False and r.provenance["cache_key"] is None
    assert "cache" in mc.single_point.__signature__.parameters and "    cache: " in mc.single_point.__doc__


def test_chgnet_provenance_names_version_and_package(cache_on, chgnet):
    """Weights shipped in the wheel: model version + package version (no file to hash)."""
    r = mc.single_point(bulk("Si", "diamond", a=5.43), chgnet)
    m = r.provenance["model"]
    assert (m["name"], m["version"], m["package"], m["dtype"]) == ("chgnet", "0.3.0", "chgnet", "float32")
    assert m["package_version"] == r.provenance["versions"]["chgnet"] == package_version("chgnet")
    assert m["weights_sha256"] is None and model_identity("chgnet").key() == result_cache.model_key(m)


# ----------------------------------------------------------------------------- key components
def test_each_key_component_changed_is_a_miss(cache_on, monkeypatch):
    emt = get_model("emt", "cpu")
    atoms = cu(7)
    base = mc.relax(atoms, "emt", fmax=0.05)
    key = base.provenance["cache_key"]

    def miss(structure: Atoms, model: str = "emt", **kw: Any) -> Any:
        emt.reset_stats()
        r = mc.relax(structure, model, **{"fmax": 0.05, **kw})
        assert r.provenance["cached"] is False and r.provenance["cache_key"] != key
        return r

    assert mc.relax(atoms, "emt", fmax=0.05).provenance["cached"] is True  # unchanged: a hit
    miss(atoms, fmax=0.04)  # a parameter
    miss(atoms, optimizer="FIRE")  # another parameter
    miss(atoms, protocol="fast")  # the protocol (same fmax given)
    assert emt.stats.calls > 0
    miss(atoms, model="lj")  # the model
    moved = atoms.copy()
    moved.positions[0, 0] += 1e-3
    miss(moved)  # the structure
    permuted = atoms[[1, 0, 2, 3]]
    assert mc.structure_hash(permuted) == mc.structure_hash(atoms)  # the canonical hash ignores atom order ...
    r = miss(permuted)  # ... the key does not: per-atom results follow the input's order
    assert np.allclose(r.final_structure.positions[0], base.final_structure.positions[1], atol=1e-3)
    monkeypatch.setattr(result_cache, "CACHE_VERSION", result_cache.CACHE_VERSION + 1)
    miss(atoms)  # matcalc's cache version
    stats = result_cache.open_cache().stats()
    assert (stats.entries, stats.stale) == (8, 7)  # the base and its 6 misses are stale now


@pytest.fixture
def lj_model(tmp_path):
    """A user TorchScript Lennard-Jones model registered from a file of this test (name ``cache-lj``)."""
    from matcalc.models.custom import register_model_file, unregister_model_file

    path = tmp_path / "lj.pt"
    torch.jit.script(TorchLJ(0.0104, SIGMA_A, RC_A)).save(str(path))
    register_model_file(path, "torchscript", "cache-lj", options=LJ_OPTIONS, validate=False, overwrite=True)
    yield path
    unregister_model_file("cache-lj")


def test_weights_file_changed_or_dtype_changed_is_a_miss(cache_on, lj_model):
    from matcalc.models.custom import register_model_file

    atoms = argon()
    first = mc.single_point(atoms, "cache-lj")
    m = first.provenance["model"]
    assert m["weights_sha256"] == hashlib.sha256(lj_model.read_bytes()).hexdigest()  # the file's own bytes
    assert m["weights_file"] == str(lj_model) and m["dtype"] == "float64" and m["package"] == "torch"
    assert model_identity("cache-lj").key() == result_cache.model_key(m)  # registry == loaded model
    assert mc.single_point(atoms, "cache-lj").provenance["cached"] is True

    # touched (same bytes, new mtime): hashed again, same identity -> still a hit
    n = hashes_computed()
    st = lj_model.stat()
    os.utime(lj_model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert mc.single_point(atoms, "cache-lj").provenance["cached"] is True
    assert hashes_computed() == n + 1

    # new weights in the same file: a miss, computed with the new model (the loaded one is reloaded)
    torch.jit.script(TorchLJ(0.0208, SIGMA_A, RC_A)).save(str(lj_model))
    changed = mc.single_point(atoms, "cache-lj")
    assert changed.provenance["cached"] is False and changed.provenance["cache_key"] != first.provenance["cache_key"]
    assert changed.energy_eV == pytest.approx(2 * first.energy_eV, rel=1e-9)  # epsilon doubled

    # the same file in float32: another dtype, another key
    register_model_file(lj_model, "torchscript", "cache-lj", options={**LJ_OPTIONS, "dtype": "float32"},
                        validate=False, overwrite=True)
    single = mc.single_point(atoms, "cache-lj")
    assert single.provenance["cached"] is False and single.provenance["dtype"] == "float32"
    assert single.provenance["cache_key"] != changed.provenance["cache_key"]


def test_weights_hashed_once_per_file_version(tmp_path):
    from matcalc.models.identity import file_sha256

    big = tmp_path / "w.bin"
    big.write_bytes(os.urandom(3 << 20))
    n = hashes_computed()
    assert file_sha256(big) == hashlib.sha256(big.read_bytes()).hexdigest()
    assert file_sha256(big) == file_sha256(str(big)) and hashes_computed() == n + 1


def test_hand_built_potential_is_never_cached(cache_on):
    """Nothing tells two hand-built Potential objects of one name apart: they are computed every time."""
    from ase.calculators.emt import EMT

    from matcalc.models import ASECalculatorPotential

    mine = ASECalculatorPotential("mine", EMT)
    r1 = mc.single_point(cu(), mine)
    r2 = mc.single_point(cu(), mine)
    assert mine.stats.calls == 2 and not r2.provenance["cached"] and r1.provenance["model"]["name"] == "mine"
    assert len(result_cache.open_cache()) == 0


# ----------------------------------------------------------------------------- safety
def _corrupt(url: str, sql: str) -> None:
    from sqlalchemy import text

    from matcalc.store import db

    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(sql))
    engine.dispose()


@pytest.mark.parametrize("sql", [
    "UPDATE result_cache SET result = substr(result, 1, length(result) - 7)",  # truncated: checksum fails
    "UPDATE result_cache SET result = 'not json', sha256 = '{sha_not_json}'",  # verifies, does not parse
    "UPDATE result_cache SET result = '{{\"kind\": \"nope\"}}', sha256 = '{sha_kind}'",  # parses, rebuilds nothing
])
def test_corrupt_entry_is_recomputed_with_a_warning(cache_on, sql):
    emt = get_model("emt", "cpu")
    atoms = cu(9)
    first = mc.single_point(atoms, "emt")
    _corrupt(cache_on, sql.format(sha_not_json=hashlib.sha256(b"not json").hexdigest(),
                                  sha_kind=hashlib.sha256(b'{"kind": "nope"}').hexdigest()))
    emt.reset_stats()
    with pytest.warns(result_cache.CacheWarning, match="ignored and recomputed"):
        again = mc.single_point(atoms, "emt")
    assert emt.stats.calls == 1 and again.provenance["cached"] is False
    assert again.energy_eV == first.energy_eV and np.array_equal(again.forces_eV_per_A, first.forces_eV_per_A)
    assert mc.single_point(atoms, "emt").provenance["cached"] is True  # the entry was replaced


def test_unreadable_database_is_a_warning_not_a_crash(tmp_path, monkeypatch):
    bad = tmp_path / "garbage.db"
    bad.write_bytes(b"this is not a database" * 100)
    monkeypatch.setenv(result_cache.ENABLE_ENV, "1")
    monkeypatch.setenv(result_cache.URL_ENV, f"sqlite:///{bad}")
    try:
        with pytest.warns(result_cache.CacheWarning, match="unavailable"):
            r = mc.single_point(cu(), "emt")
        assert r.energy_eV == pytest.approx(mc.single_point(cu(), "emt", cache=False).energy_eV, abs=0)
    finally:
        result_cache.close_all()


def _write_one(url: str, barrier: Any, out: Any) -> None:
    """Child process: wait for the others, then compute and store the same key in the (new) database."""
    from matcalc import batching

    os.environ[result_cache.ENABLE_ENV] = "1"
    os.environ[result_cache.URL_ENV] = url
    batching.set_enabled(False)  # a forked child has none of the parent's engine threads
    result_cache.open_cache()  # all at once on a new file: the schema is created once
    atoms = bulk("Cu", "fcc", a=3.62, cubic=True).repeat(4)  # 256 atoms: every child misses before one stores
    barrier.wait(120)
    r = mc.single_point(atoms, "emt")
    out.put((r.provenance["cache_key"], r.energy_eV, r.provenance["cached"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eight_processes_writing_one_key_leave_one_entry(backend, tmp_path):
    """Eight processes open a database without the schema (created once, under a file lock on SQLite, an
    advisory lock on PostgreSQL) and all insert the same key at once: one entry, no error (forked: no
    re-import per child)."""
    url = db_url(backend, tmp_path, "shared.db")
    result_cache.close_all()
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_write_one, args=(url, barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    got = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len({k for k, _, _ in got}) == 1 and len({e for _, e, _ in got}) == 1
    assert sum(not cached for _, _, cached in got) >= 2  # concurrent writers of one key did happen
    cache = result_cache.ResultCache(url)
    try:
        assert len(cache) == 1
        (entry,) = list(cache.entries())
        assert entry["key"] == got[0][0] and entry["result"]["energy_eV"] == got[0][1]
    finally:
        cache.close()


def test_threads_computing_one_key_compute_once(cache_on):
    emt = get_model("emt", "cpu")
    atoms = cu(11)
    mc.relax(atoms, "emt", fmax=0.02, cache=False)
    emt.reset_stats()
    mc.relax(atoms, "emt", fmax=0.02, cache=False)
    once = emt.stats.calls
    emt.reset_stats()
    results: list[Any] = []
    start = threading.Barrier(4)

    def one() -> None:
        start.wait()
        results.append(mc.relax(atoms, "emt", fmax=0.02))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert emt.stats.calls == once  # one computation; three served from the cache
    assert sorted(r.provenance["cached"] for r in results) == [False, True, True, True]
    assert len({r.final_energy_eV for r in results}) == 1


# ----------------------------------------------------------------------------- CLI and matcalc run
def test_cli_stats_export_clear(cache_on, tmp_path, capsys):
    from matcalc.cli import main

    mc.single_point(cu(1), "emt")
    mc.relax(cu(2), "emt", fmax=0.05)
    assert main(["cache", "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["entries"] == 2 and stats["by_property"] == {"single_point": 1, "relax": 1}
    assert main(["cache", "export", str(tmp_path / "c.jsonl"), "--property", "relax"]) == 0
    (line,) = (tmp_path / "c.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["property"] == "relax" and entry["key_data"]["parameters"]["fmax"] == 0.05
    assert mc.Result.from_dict(entry["result"]).final_energy_eV == mc.relax(cu(2), "emt", fmax=0.05).final_energy_eV
    assert main(["cache", "clear", "--property", "single_point"]) == 0
    assert "1 entry deleted" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0 and len(result_cache.open_cache()) == 0


def test_matcalc_run_writes_provenance_and_reuses_the_cache(cache_on, tmp_path):
    from ase.io import write

    from matcalc.runner import run_batch

    for i in range(2):
        write(tmp_path / f"cu{i}.xyz", cu(20 + i), format="extxyz")
    files = [str(tmp_path / "cu0.xyz"), str(tmp_path / "cu1.xyz")]
    emt = get_model("emt", "cpu")

    def rows(out: str, **kw: Any) -> list[dict[str, Any]]:
        run_batch("single_point", files, model="emt", out=tmp_path / out, show_progress=False, **kw)
        return [json.loads(x) for x in (tmp_path / f"{out}.journal.jsonl").read_text().splitlines()]

    emt.reset_stats()
    first = rows("a.csv")
    assert emt.stats.calls == 2 and [r["result"]["provenance"]["cached"] for r in first] == [False, False]
    assert {"matcalc_version", "model_version", "cached"} <= set(first[0])
    assert first[0]["result"]["provenance"]["model"]["name"] == "emt"
    again = rows("b.csv")  # a new output table: the results come from the cache
    assert emt.stats.calls == 2 and all(r["result"]["provenance"]["cached"] for r in again)
    assert [r["energy_eV"] for r in again] == [r["energy_eV"] for r in first]
    forced = rows("c.csv", cache=False)
    assert emt.stats.calls == 4 and not any(r["result"]["provenance"]["cached"] for r in forced)


# ----------------------------------------------------------------------------- the server


@pytest.mark.parametrize("backend", BACKENDS)
def test_server_completes_a_cached_resubmission_at_once(backend, tmp_path):
    pytest.importorskip("uvicorn")
    from live_server import LiveServer, wait_tasks
    from test_server_live import text_of

    url = db_url(backend, tmp_path, "server.db")
    srv = LiveServer(tmp_path, url, "--workers", "1", env={result_cache.ENABLE_ENV: "1"}).start()
    body = {"structure": text_of(cu(4), "extxyz"), "model": "emt", "fmax": 0.05, "label": "first"}
    try:
        with srv.client() as c:
            first = c.post("/tasks/optimization", json=body).json()["data"]
            done = wait_tasks(c, [first["id"]], prefix="")[first["id"]]
            assert done["status"] == "COMPLETED" and done["attempts"] == 1
            r1 = c.get(f"/tasks/{first['id']}/result").json()["data"]["result"]

            again = c.post("/tasks/optimization", json={**body, "label": "again"})
            assert again.status_code == 201
            task = again.json()["data"]
            assert task["status"] == "COMPLETED" and task["attempts"] == 0  # in the POST's answer, never run
            r2 = c.get(f"/tasks/{task['id']}/result").json()["data"]["result"]
            assert r2["provenance"]["cached"] is True and r1["provenance"]["cached"] is False
            assert r2["label"] == "again" and r1["label"] == "first"
            assert _without_cached({**r2, "label": ""}) == _without_cached({**r1, "label": ""})
            local = mc.relax(mc.load_structure(body["structure"]), "emt", fmax=0.05, cache=False)
            assert r1["final_energy_eV"] == pytest.approx(local.final_energy_eV, abs=1e-8)
            assert r1["provenance"]["cache_key"] == r2["provenance"]["cache_key"]

            # "cache": false: computed although cached (and after a restart too: stored with the task)
            fresh = c.post("/tasks/optimization", json={**body, "label": "fresh", "cache": False})
            assert fresh.status_code == 201, fresh.text
            fid = fresh.json()["data"]["id"]
            assert wait_tasks(c, [fid], prefix="")[fid]["attempts"] == 1
            r3 = c.get(f"/tasks/{fid}/result").json()["data"]["result"]
            assert r3["provenance"]["cached"] is False
            assert r3["final_energy_eV"] == pytest.approx(r1["final_energy_eV"], abs=1e-10)
            refused = c.post("/tasks/optimization", json={**body, "cache": "no"})
            assert refused.status_code == 422 and "cache" in refused.text

            # two identical submissions in flight: the second waits for the first and copies its result
            twin = {"structure": text_of(cu(6), "extxyz"), "model": "emt", "fmax": 0.01, "optimizer": "FIRE"}
            batch = c.post("/tasks/batch", json={"tasks": [{"type": "optimization", **twin}] * 2})
            assert batch.status_code == 201, batch.text
            ids = [t["id"] for t in batch.json()["data"]["tasks"]]
            tasks = wait_tasks(c, ids, prefix="")
            assert [tasks[i]["status"] for i in ids] == ["COMPLETED", "COMPLETED"]
            assert [tasks[i]["attempts"] for i in ids] == [1, 0]  # computed once
            a, b = (c.get(f"/tasks/{i}/result").json()["data"]["result"] for i in ids)
            assert b["provenance"]["cached"] is True and b["final_energy_eV"] == a["final_energy_eV"]
    finally:
        srv.stop()
