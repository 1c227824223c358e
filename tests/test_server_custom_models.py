"""Custom models over REST: upload, refusal of unsafe/corrupt/oversized files, validation, tasks, delete, restart.

The model is the TorchScript Lennard-Jones of test_custom_models; ASE's LennardJones is the reference.
Every refused upload must leave no row and no file behind.
"""

from __future__ import annotations

import importlib.util
import io
import json
import time

import pytest
import torch
from ase.calculators.lj import LennardJones
from ase.io import write

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from matcalc.models import model_names  # noqa: E402
from matcalc.server import Settings, create_app  # noqa: E402
from matcalc.server.errors import ErrorCode  # noqa: E402
from matcalc.store import CustomModel, Task  # noqa: E402
from test_custom_models import EPS_EV, LJ_OPTIONS, RC_A, SIGMA_A, Evil, TorchLJ, argon  # noqa: E402
from live_server import wait_tasks  # noqa: E402
from test_server import assert_error  # noqa: E402

API = "/api/v1"


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("upload")
    out = {}
    for name, scale in (("lj", 0.0), ("tilted", 0.05)):
        path = folder / f"{name}.pt"
        torch.jit.script(TorchLJ(EPS_EV, SIGMA_A, RC_A, scale_x=scale)).save(str(path))
        out[name] = path.read_bytes()
    evil = folder / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": Evil(folder / "pwned")}, evil)
    out["evil"] = evil.read_bytes()
    out["marker"] = str(folder / "pwned").encode()
    return out


def _settings(tmp_path, **kw) -> Settings:
    return Settings(db_url=f"sqlite:///{tmp_path / 'api.db'}", workers=1, custom_models_dir=str(tmp_path / "models"), **kw)


def upload(c: TestClient, data: bytes, name: str, family: str = "torchscript", **meta):
    metadata = {"name": name, "family": family, "options": LJ_OPTIONS, **meta}
    return c.post(f"{API}/models/custom", files={"file": (f"{name}.pt", data, "application/octet-stream")},
                  data={"metadata": json.dumps(metadata)})


def _nothing_stored(c: TestClient, tmp_path) -> None:
    assert c.app.state.store.count(CustomModel) == 0
    folder = tmp_path / "models"
    assert not folder.exists() or not any(folder.iterdir())


def _argon_task(c: TestClient, model: str):
    buf = io.StringIO()
    write(buf, argon(), format="extxyz")
    return c.post(f"{API}/tasks/single-point", json={"structure": buf.getvalue(), "format": "extxyz", "model": model})


def test_upload_validate_run_delete_and_restart(tmp_path, model_bytes):
    with TestClient(create_app(_settings(tmp_path))) as c:
        r = upload(c, model_bytes["lj"], "srv-lj", description="argon LJ")
        assert r.status_code == 201, r.json()
        row = r.json()["data"]
        assert row["status"] == "UPLOADED" and row["format"] == "torchscript" and row["options"] == LJ_OPTIONS
        mid = row["id"]
        assert [m["id"] for m in c.get(f"{API}/models/custom").json()["data"]] == [mid]

        # not validated yet: refused, nothing stored
        assert_error(_argon_task(c, "srv-lj"), 409, ErrorCode.MODEL_NOT_VALIDATED, "validate")
        assert c.app.state.store.count(Task) == 0
        assert_error(upload(c, model_bytes["lj"], "srv-lj"), 409, ErrorCode.MODEL_NAME_TAKEN)

        r = c.post(f"{API}/models/custom/{mid}/validate", params={"wait": "true"})
        assert r.status_code == 200, r.json()
        done = r.json()["data"]
        assert done["status"] == "VALIDATED" and done["validation"]["passed"], done["validation"]
        assert "srv-lj" in [m["name"] for m in c.get(f"{API}/models").json()["data"]]

        tid = _argon_task(c, "srv-lj").json()["data"]["id"]
        t = wait_tasks(c, [tid])[tid]
        assert t["status"] == "COMPLETED", t
        energy = c.get(f"{API}/tasks/{t['id']}/result").json()["data"]["result"]["energy_eV"]
        ref = argon()
        ref.calc = LennardJones(epsilon=EPS_EV, sigma=SIGMA_A, rc=RC_A, smooth=False)
        assert energy == pytest.approx(ref.get_potential_energy(), abs=1e-6)  # extxyz keeps ~1e-8 Å

    # restart on the same database: the validated model is registered again and runs
    with TestClient(create_app(_settings(tmp_path))) as c:
        tid = _argon_task(c, "srv-lj").json()["data"]["id"]
        t = wait_tasks(c, [tid])[tid]
        assert t["status"] == "COMPLETED", t
        assert_error(c.get(f"{API}/models/custom/nope"), 404, ErrorCode.CUSTOM_MODEL_NOT_FOUND)
        r = c.delete(f"{API}/models/custom/{mid}")
        assert r.status_code == 200 and r.json()["data"]["name"] == "srv-lj"
        assert_error(c.get(f"{API}/models/custom/{mid}"), 404, ErrorCode.CUSTOM_MODEL_NOT_FOUND)
        assert "srv-lj" not in model_names()
        assert_error(_argon_task(c, "srv-lj"), 422, ErrorCode.UNKNOWN_MODEL)
        assert c.app.state.store.count(Task) == 2  # the finished tasks and their results stay
        _nothing_stored(c, tmp_path)


def test_model_that_fails_validation_cannot_run(tmp_path, model_bytes):
    with TestClient(create_app(_settings(tmp_path))) as c:
        mid = upload(c, model_bytes["tilted"], "srv-tilted").json()["data"]["id"]
        r = c.post(f"{API}/models/custom/{mid}/validate")
        assert r.status_code == 202 and r.json()["data"]["status"] == "VALIDATING"
        deadline = time.monotonic() + 120
        while (row := c.get(f"{API}/models/custom/{mid}").json()["data"])["status"] == "VALIDATING":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert row["status"] == "FAILED"
        failed = {ch["name"] for ch in row["validation"]["checks"] if not ch["passed"]}
        assert "rotation_energy" in failed
        assert_error(_argon_task(c, "srv-tilted"), 409, ErrorCode.MODEL_NOT_VALIDATED, "FAILED")
        assert c.app.state.store.count(Task) == 0
        assert c.delete(f"{API}/models/custom/{mid}").status_code == 200
        _nothing_stored(c, tmp_path)


def test_refused_uploads_leave_nothing(tmp_path, model_bytes):
    with TestClient(create_app(_settings(tmp_path, max_model_upload_mb=0.5))) as c:
        body = assert_error(upload(c, model_bytes["evil"], "evil"), 422, ErrorCode.MODEL_FILE_UNSAFE, "run code")
        assert body["data"]["reason"] == "unsafe"
        assert not (tmp_path / model_bytes["marker"].decode()).exists()
        assert_error(upload(c, b"garbage bytes", "junk"), 422, ErrorCode.MODEL_FILE_INVALID)
        assert_error(upload(c, b"", "empty"), 422, ErrorCode.MODEL_FILE_INVALID, "empty")
        assert_error(upload(c, model_bytes["lj"][:1000], "cut"), 422, ErrorCode.MODEL_FILE_INVALID)
        assert_error(upload(c, b"\0" * (600 * 1024), "big"), 413, ErrorCode.PAYLOAD_TOO_LARGE)
        assert_error(upload(c, model_bytes["lj"], "chgnet"), 409, ErrorCode.MODEL_NAME_TAKEN, "built-in")
        assert_error(upload(c, model_bytes["lj"], "d3"), 409, ErrorCode.MODEL_NAME_TAKEN, "built-in")
        assert_error(upload(c, model_bytes["lj"], "x", family="nope"), 422, ErrorCode.UNKNOWN_MODEL, "family")
        if importlib.util.find_spec("mace") is None:  # the main environment has no MACE (its own env)
            assert_error(upload(c, model_bytes["lj"], "m", family="mace"), 409, ErrorCode.MODEL_UNAVAILABLE,
                         "mace")
        assert_error(upload(c, model_bytes["lj"], "Bad Name"), 422, ErrorCode.VALIDATION_ERROR, "metadata")
        assert_error(upload(c, model_bytes["lj"], "x", format="weights_only"), 422,
                     ErrorCode.UNSUPPORTED_MODEL_FORMAT, "declared")
        r = c.post(f"{API}/models/custom", files={"file": ("m.pt", model_bytes["lj"])}, data={"metadata": "{oops"})
        assert_error(r, 400, ErrorCode.MALFORMED_JSON)
        assert_error(c.post(f"{API}/models/custom", json={"name": "x"}), 415, ErrorCode.UNSUPPORTED_MEDIA_TYPE)
        assert_error(c.post(f"{API}/models/custom/nope/validate"), 404, ErrorCode.CUSTOM_MODEL_NOT_FOUND)
        _nothing_stored(c, tmp_path)
