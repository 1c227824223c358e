"""REST API in-process (FastAPI TestClient): envelope, error codes, validation, auth, limits, config.

Bad input must come back as a 4xx envelope with its 5-digit code and change nothing stored.
The real-uvicorn tests (every task type, concurrency, kill/restart) are in test_server_live.py.
"""

from __future__ import annotations

import io
import time

import pytest
from ase.build import bulk
from ase.io import write

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from matcalc.server import Settings, create_app, load_settings  # noqa: E402
from matcalc.server.config import is_loopback  # noqa: E402
from matcalc.server.errors import ErrorCode  # noqa: E402
from matcalc.store import Store, Structure, Task, TaskLog  # noqa: E402
from matcalc.structures import structure_hash  # noqa: E402

API = "/api/v1"
KEY = "test-key-0123456789"


def cif_of(atoms) -> str:
    buf = io.BytesIO()
    write(buf, atoms, format="cif")
    return buf.getvalue().decode()


CU_CIF = cif_of(bulk("Cu", "fcc", a=3.6, cubic=True))


def _counts(client: TestClient) -> tuple[int, int, int]:
    store: Store = client.app.state.store
    return store.count(Task), store.count(Structure), store.count(TaskLog)


@pytest.fixture
def client(tmp_path):
    """Queue-only server (workers=0): tasks are stored and queued, nothing runs."""
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'api.db'}", cluster="inprocess", workers=0,
                              max_upload_mb=0.05, max_atoms=50))
    with TestClient(app) as c:
        yield c


def assert_error(r, status: int, code: ErrorCode, *words: str) -> dict:
    body = r.json()
    assert r.status_code == status, body
    assert body["success"] is False and body["code"] == int(code), body
    assert set(body) == {"success", "code", "message", "data", "timestamp", "request_id"}
    assert body["request_id"] == r.headers["x-request-id"]
    for w in words:
        assert w.lower() in body["message"].lower(), body["message"]
    return body


# ----------------------------------------------------------------------------- envelope & ids
def test_envelope_and_request_id(client):
    r = client.get(f"{API}/health")
    body = r.json()
    assert r.status_code == 200 and body["success"] is True and body["code"] == 0
    assert body["data"]["live"] and body["data"]["ready"]
    assert body["data"]["checks"]["database"]["ok"] and body["data"]["checks"]["executor"]["ok"]
    assert len(r.headers["x-request-id"]) == 32 and body["request_id"] == r.headers["x-request-id"]
    r2 = client.get(f"{API}/system/config", headers={"X-Request-ID": "my-trace.42"})
    assert r2.headers["x-request-id"] == "my-trace.42" and r2.json()["request_id"] == "my-trace.42"
    r3 = client.get(f"{API}/health", headers={"X-Request-ID": "bad id with spaces"})
    assert r3.headers["x-request-id"] != "bad id with spaces"
    assert_error(client.get(f"{API}/no/such/route"), 404, ErrorCode.NOT_FOUND)
    assert_error(client.delete(f"{API}/tasks/batch"), 405, ErrorCode.METHOD_NOT_ALLOWED)
    r = client.put(f"{API}/structures")
    assert_error(r, 405, ErrorCode.METHOD_NOT_ALLOWED)
    assert r.headers["allow"] == "GET, POST"  # both routes of the path, not only the first match
    assert_error(client.get(f"{API}/tasks", params={"created_before": "0.5"}), 422, ErrorCode.VALIDATION_ERROR,
                 "created_before")
    assert_error(client.get(f"{API}/tasks", params={"created_before": "2026-01-01T00:00:00"}), 422,
                 ErrorCode.VALIDATION_ERROR, "timezone")


def test_openapi_docs_and_error_codes(client):
    spec = client.get("/openapi.json").json()
    for path in ("/tasks/optimization", "/tasks/stability", "/tasks/bulk-modulus", "/tasks/heat-capacity",
                 "/tasks/interaction-energy", "/tasks/single-point", "/tasks/batch", "/tasks", "/tasks/{task_id}",
                 "/tasks/{task_id}/result", "/tasks/{task_id}/cancel", "/tasks/{task_id}/logs", "/models",
                 "/models/{name}", "/models/{name}/load", "/models/{name}/unload", "/structures",
                 "/structures/builtin", "/structures/{structure_id}", "/health", "/system/gpus", "/system/queue",
                 "/system/config"):
        assert API + path in spec["paths"], path
    assert client.get("/docs").status_code == 200 and client.get("/redoc").status_code == 200
    codes = client.get(f"{API}/system/error-codes").json()["data"]
    assert len({c["code"] for c in codes}) == len(codes)
    assert all(10000 <= c["code"] < 60000 for c in codes)
    first_digit_ok = {1: {500, 503}, 2: {401, 403, 429}, 3: {404, 409}, 4: {400, 405, 413, 415, 422}, 5: {409}}
    assert all(c["http_status"] in first_digit_ok[c["code"] // 10000] for c in codes), codes


def test_unexpected_errors_keep_the_envelope(client, monkeypatch):
    from sqlalchemy.exc import OperationalError

    store = client.app.state.store

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "list_tasks", boom)
    r = client.get(f"{API}/tasks", headers={"X-Request-ID": "req-500"})
    body = assert_error(r, 500, ErrorCode.INTERNAL_ERROR, "RuntimeError", "req-500")
    assert body["request_id"] == "req-500"

    def db_down(*a, **k):
        raise OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(store, "list_tasks", db_down)
    assert_error(client.get(f"{API}/tasks"), 503, ErrorCode.DATABASE_UNAVAILABLE)
    monkeypatch.setattr(store, "ping", db_down)
    r = client.get(f"{API}/health")
    body = assert_error(r, 503, ErrorCode.DATABASE_UNAVAILABLE, "not ready")
    assert body["data"]["live"] is True and body["data"]["ready"] is False
    assert body["data"]["checks"]["database"]["ok"] is False


# ----------------------------------------------------------------------------- bad input
def test_task_submission_bad_inputs_change_nothing(client):
    before = _counts(client)
    malformed_cif = "data_broken\n_atom_site_label\n_atom_site_fract_x\nCu1 not-a-number\n_cell_length_a oops\n"
    cases = [
        ({"structure": malformed_cif, "model": "emt"}, 422, ErrorCode.INVALID_STRUCTURE, "structure"),
        ({"structure": "hello\nworld", "model": "emt"}, 422, ErrorCode.UNSUPPORTED_FORMAT, "format"),
        ({"structure": "/etc/passwd", "model": "emt"}, 422, ErrorCode.INVALID_STRUCTURE, "contents"),
        ({"structure": CU_CIF, "model": "no-such-model"}, 422, ErrorCode.UNKNOWN_MODEL, "no-such-model"),
        ({"structure": CU_CIF, "model": "emt", "fmax": -0.1}, 422, ErrorCode.VALIDATION_ERROR, "fmax"),
        ({"structure": CU_CIF, "model": "emt", "optimizer": "Newton"}, 422, ErrorCode.VALIDATION_ERROR, "optimizer"),
        ({"structure": CU_CIF, "model": "emt", "max_steps": 0}, 422, ErrorCode.VALIDATION_ERROR, "max_steps"),
        ({"structure": CU_CIF, "model": "emt", "relax_cell": 0}, 422, ErrorCode.VALIDATION_ERROR, "relax_cell"),
        ({"structure": CU_CIF, "model": "emt", "fixed_atoms": [False]}, 422, ErrorCode.VALIDATION_ERROR, "fixed_atoms"),
        ({"structure": CU_CIF, "model": "emt", "temperature_K": 300}, 422, ErrorCode.VALIDATION_ERROR, "temperature_K"),
        ({"model": "emt"}, 422, ErrorCode.VALIDATION_ERROR, "exactly one way"),
        ({"structure": CU_CIF, "builtin": "CALF-20", "model": "emt"}, 422, ErrorCode.VALIDATION_ERROR, "exactly one"),
        ({"builtin": "NOT-A-MOF", "model": "emt"}, 422, ErrorCode.VALIDATION_ERROR, "builtin"),
        ({"structure_id": "a" * 64, "model": "emt"}, 422, ErrorCode.UNKNOWN_STRUCTURE, "structure_id"),
        ({"structure": CU_CIF, "model": "emt", "priority": "URGENT"}, 422, ErrorCode.VALIDATION_ERROR, "priority"),
        ({"structure": CU_CIF, "model": "emt", "timeout_s": -5}, 422, ErrorCode.VALIDATION_ERROR, "timeout_s"),
    ]
    for body, status, code, word in cases:
        assert_error(client.post(f"{API}/tasks/optimization", json=body), status, code, word)
    big = cif_of(bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 2)))  # 72 atoms > max_atoms=50
    assert_error(client.post(f"{API}/tasks/single-point", json={"structure": big, "model": "emt"}), 422,
                 ErrorCode.TOO_MANY_ATOMS, "72 atoms", "limit 50")
    assert_error(client.post(f"{API}/tasks/heat-capacity", json={"structure": CU_CIF, "model": "emt", "t_min": 500,
                                                                 "t_max": 100}),
                 422, ErrorCode.VALIDATION_ERROR, "t_max")
    assert_error(client.post(f"{API}/tasks/bulk-modulus", json={"structure": CU_CIF, "model": "emt", "n_points": 3}),
                 422, ErrorCode.VALIDATION_ERROR, "n_points")
    assert_error(client.post(f"{API}/tasks/interaction-energy", json={"structure": CU_CIF, "model": "emt",
                                                                      "guest": "XeF6"}),
                 422, ErrorCode.VALIDATION_ERROR, "guest must be one of CO2")
    assert_error(client.post(f"{API}/tasks/single-point", content=b"{not json", headers={"content-type": "application/json"}),
                 400, ErrorCode.MALFORMED_JSON)
    # a batch with one bad task stores nothing, not even the good tasks' structures
    good = {"type": "single-point", "structure": cif_of(bulk("Ni", "fcc", a=3.5, cubic=True)), "model": "emt"}
    bad = {"type": "optimization", "structure": CU_CIF, "model": "emt", "fmax": 0.01, "optimizer": "BFGS"}
    bad_model = dict(bad, model="nope")
    body = assert_error(client.post(f"{API}/tasks/batch", json={"tasks": [good, bad, bad_model]}), 422,
                        ErrorCode.UNKNOWN_MODEL, "tasks[2]")
    assert body["data"]["index"] == 2
    assert_error(client.post(f"{API}/tasks/batch", json={"tasks": []}), 422, ErrorCode.VALIDATION_ERROR)
    assert _counts(client) == before


def test_unknown_ids(client):
    before = _counts(client)
    assert_error(client.get(f"{API}/tasks/0123abc"), 404, ErrorCode.TASK_NOT_FOUND, "0123abc")
    assert_error(client.get(f"{API}/tasks/0123abc/result"), 404, ErrorCode.TASK_NOT_FOUND)
    assert_error(client.post(f"{API}/tasks/0123abc/cancel"), 404, ErrorCode.TASK_NOT_FOUND)
    assert_error(client.get(f"{API}/tasks/0123abc/logs"), 404, ErrorCode.TASK_NOT_FOUND)
    assert_error(client.get(f"{API}/structures/{'b' * 64}"), 404, ErrorCode.STRUCTURE_NOT_FOUND)
    assert_error(client.get(f"{API}/models/unobtainium"), 404, ErrorCode.MODEL_NOT_FOUND)
    assert_error(client.post(f"{API}/models/unobtainium/load"), 404, ErrorCode.MODEL_NOT_FOUND)
    assert _counts(client) == before


# ----------------------------------------------------------------------------- tasks (queue only)
def test_submit_list_cancel_and_result_states(client):
    r = client.post(f"{API}/tasks/optimization", json={"structure": CU_CIF, "model": "emt", "fmax": 0.02,
                                                       "priority": "HIGH", "label": "cu", "protocol": "fast"})
    assert r.status_code == 201, r.json()
    task = r.json()["data"]
    assert task["status"] == "QUEUED" and task["type"] == "optimization" and task["priority"] == "HIGH"
    assert task["parameters"] == {"fmax": 0.02, "protocol": "fast"} and task["label"] == "cu"
    assert task["structure_id"] == structure_hash(bulk("Cu", "fcc", a=3.6, cubic=True))
    # the task was committed before the response: a fresh store on the same file sees it
    other = Store(client.app.state.store.url, migrate=False)
    assert other.get_task(task["id"]).status == "QUEUED"
    other.close()
    body = assert_error(client.get(f"{API}/tasks/{task['id']}/result"), 409, ErrorCode.TASK_NOT_FINISHED, "QUEUED")
    assert body["data"]["status"] == "QUEUED"
    batch = client.post(f"{API}/tasks/batch", json={"tasks": [
        {"type": "single-point", "builtin": "RSM0009", "model": "chgnet", "priority": "LOW"},
        {"type": "stability", "structure_id": task["structure_id"], "model": "emt", "nvt_steps": 10, "npt_steps": 0},
    ]})
    assert batch.status_code == 201
    bdata = batch.json()["data"]
    assert [t["type"] for t in bdata["tasks"]] == ["single-point", "stability"]
    assert all(t["batch_id"] == bdata["batch_id"] for t in bdata["tasks"])
    assert bdata["tasks"][0]["label"] == "RSM0009"
    listing = client.get(f"{API}/tasks", params={"page_size": 2}).json()["data"]
    assert listing["total"] == 3 and len(listing["items"]) == 2
    assert listing["items"][0]["id"] == bdata["tasks"][1]["id"]  # newest first
    assert client.get(f"{API}/tasks", params={"type": "stability"}).json()["data"]["total"] == 1
    assert client.get(f"{API}/tasks", params={"status": ["QUEUED", "RUNNING"], "model": "emt"}).json()["data"]["total"] == 2
    assert client.get(f"{API}/tasks", params={"batch_id": bdata["batch_id"]}).json()["data"]["total"] == 2
    assert client.get(f"{API}/tasks", params={"created_after": "2000-01-01T00:00:00Z",
                                              "created_before": "2001-01-01T00:00:00Z"}).json()["data"]["total"] == 0
    assert_error(client.get(f"{API}/tasks", params={"status": "DONE"}), 422, ErrorCode.VALIDATION_ERROR, "status")
    assert_error(client.get(f"{API}/tasks", params={"page_size": 0}), 422, ErrorCode.VALIDATION_ERROR, "page_size")
    # cancel
    c = client.post(f"{API}/tasks/{task['id']}/cancel")
    assert c.status_code == 200 and c.json()["data"] == {"task_id": task["id"], "status": "CANCELLED", "cancelled": True}
    assert_error(client.post(f"{API}/tasks/{task['id']}/cancel"), 409, ErrorCode.TASK_ALREADY_FINISHED)
    assert_error(client.get(f"{API}/tasks/{task['id']}/result"), 409, ErrorCode.TASK_CANCELLED)
    logs = client.get(f"{API}/tasks/{task['id']}/logs").json()["data"]
    assert [entry["message"] for entry in logs] == ["task submitted", "task cancelled"]
    assert client.get(f"{API}/tasks/{task['id']}/logs", params={"level": "error"}).json()["data"] == []
    q = client.get(f"{API}/system/queue").json()["data"]
    assert q["by_priority"]["HIGH"]["CANCELLED"] == 1 and q["by_priority"]["LOW"]["QUEUED"] == 1
    assert q["by_status"]["QUEUED"] == 2 and q["executor"]["kind"] == "inprocess"


# ----------------------------------------------------------------------------- structures
def test_structure_upload_detection_dedup_and_limits(client):
    atoms = bulk("Ni", "fcc", a=3.52, cubic=True)
    xyz = io.StringIO()
    write(xyz, atoms, format="extxyz")
    poscar = io.StringIO()
    write(poscar, atoms[[2, 0, 3, 1]], format="vasp")
    r = client.post(f"{API}/structures", json={"content": xyz.getvalue(), "name": "ni"})
    assert r.status_code == 201, r.json()
    d = r.json()["data"]
    assert d["created"] and d["format"] == "extxyz" and d["formula"] == "Ni4" and d["id"] == structure_hash(atoms)
    # the same structure as POSCAR with permuted atoms, by multipart upload: deduplicated
    r2 = client.post(f"{API}/structures", files={"file": ("POSCAR.vasp", poscar.getvalue().encode())})
    assert r2.status_code == 200 and r2.json()["data"]["created"] is False and r2.json()["data"]["id"] == d["id"]
    r3 = client.post(f"{API}/structures", files={"file": ("cu.cif", CU_CIF.encode())}, data={"name": "copper"})
    assert r3.status_code == 201 and r3.json()["data"]["format"] == "cif" and r3.json()["data"]["name"] == "copper"
    got = client.get(f"{API}/structures/{d['id']}").json()["data"]
    assert got["content"] == xyz.getvalue() and got["n_atoms"] == 4
    listing = client.get(f"{API}/structures").json()["data"]
    assert listing["total"] == 2 and all(item["content"] is None for item in listing["items"])
    builtins = client.get(f"{API}/structures/builtin").json()["data"]
    assert {"name": "RSM0009", "formula": builtins[[b["name"] for b in builtins].index("RSM0009")]["formula"],
            "n_atoms": 22} in builtins and len(builtins) == 11

    before = _counts(client)
    assert_error(client.post(f"{API}/structures", json={"content": "data_x\n_atom_site_label\nbroken"}), 422,
                 ErrorCode.INVALID_STRUCTURE)
    assert_error(client.post(f"{API}/structures", json={"content": CU_CIF, "format": "pdb"}), 422,
                 ErrorCode.VALIDATION_ERROR, "format")
    assert_error(client.post(f"{API}/structures", files={"file": ("x.bin", b"\xff\xfe\x00binary")}), 422,
                 ErrorCode.INVALID_STRUCTURE, "utf-8")
    assert_error(client.post(f"{API}/structures", content=b"raw", headers={"content-type": "text/plain"}), 415,
                 ErrorCode.UNSUPPORTED_MEDIA_TYPE)
    overlap = bulk("Cu", "fcc", a=3.6, cubic=True)
    overlap.positions[1] = overlap.positions[0] + 0.1
    assert_error(client.post(f"{API}/structures", json={"content": cif_of(overlap)}), 422, ErrorCode.INVALID_STRUCTURE,
                 "too close")
    big = cif_of(bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 2)))
    assert_error(client.post(f"{API}/structures", json={"content": big}), 422, ErrorCode.TOO_MANY_ATOMS, "72")
    # over the 0.05 MB body limit: rejected from Content-Length, and when streamed without one
    huge = CU_CIF + "#" * 60_000 + "\n"
    body = assert_error(client.post(f"{API}/structures", json={"content": huge}), 413, ErrorCode.PAYLOAD_TOO_LARGE,
                        "upload limit")
    assert body["data"]["max_bytes"] == int(0.05 * 1024 * 1024)

    def chunks():
        yield b'{"content": "'
        for _ in range(80):
            yield b"#" * 1000

    assert_error(client.post(f"{API}/structures", content=chunks(), headers={"content-type": "application/json"}),
                 413, ErrorCode.PAYLOAD_TOO_LARGE)
    assert _counts(client) == before


# ----------------------------------------------------------------------------- models & system
def test_models_and_system(client):
    models = {m["name"]: m for m in client.get(f"{API}/models").json()["data"]}
    assert {"emt", "lj", "chgnet", "chgnet+d3"} <= set(models)
    assert models["emt"]["available"] and models["emt"]["family"] == "emt"
    assert "chgnet+d3" not in {m["name"] for m in client.get(f"{API}/models", params={"include_d3": False}).json()["data"]}
    r = client.post(f"{API}/models/lj/load")
    assert r.status_code == 200 and r.json()["data"]["loaded"] and r.json()["data"]["loaded_on"]
    assert client.get(f"{API}/models/lj").json()["data"]["loaded"]
    u = client.post(f"{API}/models/lj/unload").json()["data"]
    assert u == {"name": "lj", "unloaded": True}
    assert not client.get(f"{API}/models/lj").json()["data"]["loaded"]
    assert client.post(f"{API}/models/lj/unload").json()["data"]["unloaded"] is False
    assert client.get(f"{API}/system/gpus").json()["data"] == []  # CPU machine
    cfg = client.get(f"{API}/system/config").json()["data"]
    assert cfg["workers"] == 0 and cfg["max_atoms"] == 50


# ----------------------------------------------------------------------------- auth & rate limit
def test_api_key_and_rate_limit(tmp_path):
    app = create_app(Settings(db_url=f"sqlite:///{tmp_path / 'auth.db'}", workers=0, api_keys=[KEY],
                              rate_limit_per_s=1.0, rate_limit_burst=3))
    with TestClient(app) as c:
        before = _counts(c)
        assert_error(c.post(f"{API}/tasks/single-point", json={"structure": CU_CIF, "model": "emt"}), 401,
                     ErrorCode.API_KEY_MISSING, "X-API-Key")
        assert_error(c.get(f"{API}/tasks", headers={"X-API-Key": "wrong-key-123456"}), 401, ErrorCode.API_KEY_INVALID)
        assert_error(c.get(f"{API}/system/config"), 401, ErrorCode.API_KEY_MISSING)
        assert _counts(c) == before
        assert c.get(f"{API}/health").status_code == 200  # probes need no key
        h = {"X-API-Key": KEY}
        cfg = c.get(f"{API}/system/config", headers=h).json()["data"]
        assert cfg["api_keys"] == ["***"] and KEY not in str(cfg)
        assert c.get(f"{API}/tasks", headers=h).status_code == 200
        assert c.get(f"{API}/tasks", headers=h).status_code == 200
        r = c.get(f"{API}/tasks", headers=h)  # 4th request within a second: burst of 3 spent
        body = assert_error(r, 429, ErrorCode.RATE_LIMITED)
        assert int(r.headers["retry-after"]) >= 1 and body["data"]["retry_after_s"] > 0
        time.sleep(1.1)  # the bucket refills at 1 token/s
        assert c.get(f"{API}/tasks", headers=h).status_code == 200
    with pytest.raises(ValueError, match="without an API key"):
        create_app(Settings(host="0.0.0.0", db_url=f"sqlite:///{tmp_path / 'x.db'}"))
    create_app(Settings(host="0.0.0.0", api_keys=[KEY], db_url=f"sqlite:///{tmp_path / 'x.db'}"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_config_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "matcalc.toml"
    cfg.write_text('[server]\nport = 9001\nworkers = 3\nmax_atoms = 500\napi_keys = ["file-key-123456"]\n')
    env = {"MATCALC_PORT": "9002", "MATCALC_MAX_ATOMS": "600", "MATCALC_API_KEY": "env-key-1234567"}
    s = load_settings({"port": 9003, "host": None}, env=env, config_file=cfg)
    assert s.port == 9003  # flag > env > file
    assert s.max_atoms == 600  # env > file
    assert s.workers == 3  # file > default
    assert s.api_keys == ["env-key-1234567"] and s.host == "127.0.0.1"
    s2 = load_settings({}, env={"MATCALC_CONFIG": str(cfg)})
    assert s2.port == 9001 and s2.api_keys == ["file-key-123456"]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.matcalc/config.toml there
    assert load_settings({}, env={}).port == 8000
    with pytest.raises(ValueError, match="unknown setting"):
        bad = tmp_path / "bad.toml"
        bad.write_text("prot = 1\n")
        load_settings({}, env={}, config_file=bad)
    with pytest.raises(ValueError):
        load_settings({"port": 70000}, env={})
    with pytest.raises(ValueError, match="at least 8"):
        load_settings({"api_keys": ["short"]}, env={})
    red = Settings(db_url="postgresql+psycopg://u:secret@db/x", api_keys=[KEY]).redacted()
    assert "secret" not in str(red) and KEY not in str(red)


def test_serve_refuses_public_bind_without_key(tmp_path, capsys):
    from matcalc.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--db", f"sqlite:///{tmp_path / 'p.db'}"]) == 2
    assert "without an API key" in capsys.readouterr().err
