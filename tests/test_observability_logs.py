"""Logs: the SSE stream of a task's log against a live uvicorn server (backlog replay, live follow,
end at completion, resume, disconnects), the admin system-log stream, structured JSON log files,
and daily rotation / gzip / monthly packing with injected dates.

`LiveApp` (uvicorn in a thread of this process, so tests can look at the app's state) is shared
with the other test_observability_* files.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import socket
import tarfile
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from ase.build import bulk
from ase.io import write

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from matcalc.server import Settings, create_app  # noqa: E402
from matcalc.server.logs import DailyJsonFileHandler, JsonFormatter, maintain_log_dir  # noqa: E402

from live_server import API, TERMINAL  # noqa: E402


def cif_of(atoms) -> str:
    buf = io.BytesIO()
    write(buf, atoms, format="cif")
    return buf.getvalue().decode()


def rattled_cu(seed: int = 1, repeat=(2, 2, 2)) -> str:
    atoms = bulk("Cu", "fcc", a=3.66, cubic=True).repeat(repeat)
    atoms.rattle(0.1, seed=seed)
    return cif_of(atoms)


RELAX = {"model": "emt", "fmax": 1e-3, "optimizer": "FIRE", "max_steps": 3000, "relax_cell": False}
ENDLESS = {"model": "emt", "ensemble": "nvt", "nvt_steps": 10_000_000, "relax_first": False, "interval": 10}
"""Stability (MD) body that runs until cancelled."""


class LiveApp:
    """``create_app(settings)`` served by uvicorn in a background thread on a loopback port."""

    def __init__(self, tmp_path: Path, **settings) -> None:
        settings.setdefault("db_url", f"sqlite:///{tmp_path / 'obs.db'}")
        settings.setdefault("workers", 1)
        settings.setdefault("cluster", "inprocess")  # tests look at the executor's state in this process
        settings.setdefault("rate_limit_per_s", 0)
        settings.setdefault("shutdown_timeout_s", 2)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        settings.setdefault("port", self.port)
        self.settings = Settings(**settings)
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def state(self):
        return self.app.state

    def client(self, key: str | None = None, **kw) -> httpx.Client:
        headers = {"X-API-Key": key} if key else {}
        return httpx.Client(base_url=self.url + API, headers=headers, timeout=60, **kw)

    def __enter__(self) -> LiveApp:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def submit(c: httpx.Client, task_type: str, **body) -> str:
    r = c.post(f"/tasks/{task_type}", json=body)
    assert r.status_code == 201, r.text
    return r.json()["data"]["id"]


def wait_status(c: httpx.Client, task_id: str, statuses: set[str], timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        t = c.get(f"/tasks/{task_id}").json()["data"]
        if t["status"] in statuses:
            return t
        assert time.monotonic() < deadline, f"task {task_id} still {t['status']}"
        time.sleep(0.05)


def wait_for(predicate, timeout_s: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def read_events(response) -> tuple[list[dict], list[str]]:
    """All events of an SSE response: (data records with their `id:`, names of data-less events)."""
    records, named, data, event, eid = [], [], [], "", None
    for line in response.iter_lines():
        if line == "":
            if data:
                rec = json.loads("\n".join(data))
                rec["_sse_id"] = eid
                records.append(rec)
            elif event:
                named.append(event)
            data, event, eid = [], "", None
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("id:"):
            eid = line[3:].strip()
    return records, named


# ----------------------------------------------------------------------------- task log stream
def test_sse_stream_follows_a_relaxation_to_its_end(tmp_path):
    with LiveApp(tmp_path, progress_interval_s=0) as srv, srv.client() as c:
        blocker = submit(c, "stability", structure=rattled_cu(7), **ENDLESS)  # holds the only worker
        wait_status(c, blocker, {"RUNNING"})
        tid = submit(c, "optimization", structure=rattled_cu(1), **RELAX)
        received_at: list[datetime] = []
        with c.stream("GET", f"/tasks/{tid}/logs/stream") as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            c.post(f"/tasks/{blocker}/cancel")  # the task starts only now: its steps arrive live
            records, named = [], []
            buf: list[str] = []
            for line in r.iter_lines():
                buf.append(line)
                if line.startswith("data:"):
                    received_at.append(datetime.now(UTC))
            records, named = read_events(_Lines(buf))
        task = c.get(f"/tasks/{tid}").json()["data"]
        stored = c.get(f"/tasks/{tid}/logs", params={"limit": 10000}).json()["data"]
        result = c.get(f"/tasks/{tid}/result").json()["data"]["result"]
    assert task["status"] == "COMPLETED" and named == ["end"]
    # exactly the stored log, in order, every record with its id (the SSE `id:` too)
    assert [r["id"] for r in records] == [s["id"] for s in stored]
    assert all(r["_sse_id"] == str(r["id"]) and r["task_id"] == tid for r in records)
    assert [r["message"] for r in records] == [s["message"] for s in stored]
    steps = [r["data"]["step"] for r in records if r["event"] == "progress"]
    assert steps == list(range(steps[0], steps[0] + len(steps))), steps  # every step, in order
    assert steps[-1] == result["steps"] and len(steps) >= 50  # FIRE needs ~76 steps here
    energies = [r["data"]["energy_eV"] for r in records if r["event"] == "progress"]
    assert energies[-1] == pytest.approx(result["final_energy_eV"], abs=1e-9)
    assert records[0]["message"] == "task submitted" and records[-1]["data"]["status"] == "COMPLETED"
    # followed live: step lines arrived before the task finished
    finished = datetime.fromisoformat(task["finished_at"].replace("Z", "+00:00"))
    first_step = next(i for i, r in enumerate(records) if r["event"] == "progress")
    assert received_at[first_step] < finished


class _Lines:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def iter_lines(self):
        return iter(self.lines)


def test_sse_replays_backlog_of_finished_task_and_resumes(tmp_path):
    with LiveApp(tmp_path) as srv, srv.client() as c:
        tid = submit(c, "single-point", structure=rattled_cu(2, (1, 1, 1)), model="emt")
        wait_status(c, tid, TERMINAL)
        stored = c.get(f"/tasks/{tid}/logs").json()["data"]
        with c.stream("GET", f"/tasks/{tid}/logs/stream") as r:
            records, named = read_events(r)
        assert [x["id"] for x in records] == [s["id"] for s in stored] and named == ["end"]
        mid = stored[len(stored) // 2]["id"]
        with c.stream("GET", f"/tasks/{tid}/logs/stream", params={"after": mid}) as r:
            tail, _ = read_events(r)
        assert [x["id"] for x in tail] == [s["id"] for s in stored if s["id"] > mid]
        with c.stream("GET", f"/tasks/{tid}/logs/stream", headers={"Last-Event-ID": str(mid)}) as r:
            assert [x["id"] for x in read_events(r)[0]] == [x["id"] for x in tail]
        with c.stream("GET", f"/tasks/{tid}/logs/stream", params={"level": "info"}) as r:
            info = read_events(r)[0]
        assert info and all(x["level"] != "DEBUG" for x in info)
        r = c.get("/tasks/nope123/logs/stream")
        assert r.status_code == 404 and r.json()["code"] == 30001


def test_sse_disconnecting_clients_cost_nothing(tmp_path):
    with LiveApp(tmp_path, workers=1, sse_heartbeat_s=0.5) as srv, srv.client() as c:
        tid = submit(c, "stability", structure=rattled_cu(3), **ENDLESS)
        wait_status(c, tid, {"RUNNING"})
        bus = srv.state.bus
        clients = []
        for _ in range(10):  # ten clients read a little and walk away
            cm = c.stream("GET", f"/tasks/{tid}/logs/stream")
            r = cm.__enter__()
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            clients.append((cm, lines))  # keep the line iterator: dropping it closes the response
        feeds = srv.state.log_feeds.feeds
        assert len(feeds[tid].streams) == 10 and bus.n_watches == 1  # ten streams, one shared feed
        assert srv.state.metrics.sse_clients["task"] == 10
        for cm, _ in clients:
            cm.__exit__(None, None, None)
        wait_for(lambda: not feeds and bus.n_watches == 0 and srv.state.metrics.sse_clients["task"] == 0, 30,
                 "streams of disconnected clients to end")
        # the server and the task go on
        step = wait_for(lambda: c.get(f"/tasks/{tid}").json()["data"]["progress"], 60, "progress")["step"]
        wait_for(lambda: c.get(f"/tasks/{tid}").json()["data"]["progress"]["step"] > step, 30, "more steps")
        assert c.get("/health").json()["data"]["ready"] is True
        # a stream open when the task is cancelled ends with it
        with c.stream("GET", f"/tasks/{tid}/logs/stream", params={"level": "info"}) as r:
            c.post(f"/tasks/{tid}/cancel")
            records, named = read_events(r)
        assert named == ["end"] and "task cancelled" in [x["message"] for x in records]


# ----------------------------------------------------------------------------- system log stream, files
def test_system_log_stream_for_admins_and_json_log_files(tmp_path):
    user, admin = "user-key-123456", "admin-key-123456"
    logs = tmp_path / "logs"
    with LiveApp(tmp_path, api_keys=[user], admin_api_keys=[admin], log_dir=str(logs)) as srv:
        with srv.client(user) as c:
            r = c.get("/system/logs/stream")
            assert r.status_code == 403 and r.json()["code"] == 20004
            tid = submit(c, "single-point", structure=rattled_cu(4, (1, 1, 1)), model="emt")
            wait_status(c, tid, TERMINAL)
        with srv.client(admin) as a, a.stream("GET", "/system/logs/stream", params={"kind": "access"}) as r:
            assert r.status_code == 200
            seen = []
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data:"):
                    rec = json.loads(line[5:])
                    seen.append(rec)
                    if "/tasks/" + tid in rec["message"]:
                        break
            assert all(x["kind"] == "access" for x in seen)
            rec = seen[-1]
            assert rec["level"] == "INFO" and rec["request_id"] and rec["extra"]["status"] in (200, 201)
            with srv.client(user) as c:  # live: a request made now shows up
                c.get("/system/queue", headers={"X-Request-ID": "live-probe-1"})
            for line in lines:
                if line.startswith("data:") and json.loads(line[5:])["request_id"] == "live-probe-1":
                    break
        assert srv.state.metrics.sse_clients["system"] == 0 or wait_for(
            lambda: srv.state.metrics.sse_clients["system"] == 0, 10, "system stream closed")
    lines = [json.loads(x) for x in (logs / "matcalc.jsonl").read_text().splitlines()]
    fields = {"timestamp", "level", "logger", "kind", "message", "task_id", "request_id", "worker", "gpu"}
    assert fields <= set(lines[0])
    kinds = {x["kind"] for x in lines}
    assert {"access", "system", "audit"} <= kinds, kinds
    assert any(x["kind"] == "audit" and x["task_id"] == tid for x in lines)
    assert any(x["kind"] == "access" and "/tasks/single-point" in x["message"] for x in lines)


def test_json_formatter_fields():
    rec = logging.LogRecord("matcalc.calculations.relax", logging.INFO, __file__, 1, "step %d", (3,), None)
    rec.energy_eV = -1.5
    rec.task_id = "abc"
    d = json.loads(JsonFormatter().format(rec))
    assert d["message"] == "step 3" and d["task_id"] == "abc" and d["kind"] == "task"
    assert d["extra"] == {"energy_eV": -1.5} and d["level"] == "INFO"
    assert datetime.fromisoformat(d["timestamp"].replace("Z", "+00:00")).timestamp() == pytest.approx(rec.created)


# ----------------------------------------------------------------------------- rotation & housekeeping
def test_daily_rotation_writes_dated_file(tmp_path):
    h = DailyJsonFileHandler(tmp_path, compress_after_days=7, pack_after_days=30)
    lg = logging.getLogger("matcalc.test.rotation")
    lg.propagate = False
    lg.addHandler(h)
    lg.setLevel(logging.INFO)
    try:
        lg.info("before midnight")
        forced = int(time.time()) - 1
        h.rolloverAt = forced  # as if UTC midnight just passed
        lg.info("after midnight")
    finally:
        lg.removeHandler(h)
        h.close()
    day = datetime.fromtimestamp(forced - 86400, UTC).date()  # the file is named after the day it covers
    rotated = tmp_path / f"matcalc-{day:%Y-%m-%d}.jsonl"
    assert [json.loads(x)["message"] for x in rotated.read_text().splitlines()] == ["before midnight"]
    current = (tmp_path / "matcalc.jsonl").read_text().splitlines()
    assert [json.loads(x)["message"] for x in current] == ["after midnight"]


def test_maintenance_gzips_after_7_days_and_packs_by_month_after_30(tmp_path):
    today = date(2026, 3, 15)
    ages = [0, 1, 7, 8, 29, 30, 31, 45, 60]
    for age in ages:
        d = today - timedelta(days=age)
        (tmp_path / f"matcalc-{d:%Y-%m-%d}.jsonl").write_text(json.dumps({"day": str(d)}) + "\n")
    old_gz = today - timedelta(days=40)  # gzipped earlier, now old enough to pack
    with gzip.open(tmp_path / f"matcalc-{old_gz:%Y-%m-%d}.jsonl.gz", "wt") as f:
        f.write(json.dumps({"day": str(old_gz)}) + "\n")
    (tmp_path / "matcalc.jsonl").write_text("current\n")
    (tmp_path / "notes-2020-01-01.txt").write_text("not a log\n")

    report = maintain_log_dir(tmp_path, today=today, compress_after_days=7, pack_after_days=30)
    names = sorted(p.name for p in tmp_path.iterdir())
    for age in (0, 1, 7):
        assert f"matcalc-{today - timedelta(days=age):%Y-%m-%d}.jsonl" in names
    for age in (8, 29, 30):
        d = today - timedelta(days=age)
        gz = tmp_path / f"matcalc-{d:%Y-%m-%d}.jsonl.gz"
        assert json.loads(gzip.open(gz, "rt").read()) == {"day": str(d)}
        assert f"matcalc-{d:%Y-%m-%d}.jsonl" not in names
    packed = {}
    for tar_path in tmp_path.glob("matcalc-*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                packed[m.name] = (tar_path.name, json.loads(gzip.decompress(tar.extractfile(m).read())))
    expected = {today - timedelta(days=a) for a in (31, 45, 60)} | {old_gz}
    assert {n: v[1]["day"] for n, v in packed.items()} == {f"matcalc-{d:%Y-%m-%d}.jsonl.gz": str(d) for d in expected}
    assert all(v[0] == f"matcalc-{k[8:15]}.tar" for k, v in packed.items())  # one archive per month
    assert not any(f"matcalc-{d:%Y-%m-%d}" in n for d in expected for n in names if not n.endswith(".tar"))
    assert "matcalc.jsonl" in names and "notes-2020-01-01.txt" in names
    assert sum(len(v) for v in report.packed.values()) == 4
    # idempotent; a later day moves the next files along
    assert maintain_log_dir(tmp_path, today=today).gzipped == []
    later = maintain_log_dir(tmp_path, today=today + timedelta(days=1))
    assert later.gzipped == [f"matcalc-{today - timedelta(days=7):%Y-%m-%d}.jsonl.gz"]
    assert later.packed == {f"matcalc-{today - timedelta(days=30):%Y-%m}.tar":
                            [f"matcalc-{today - timedelta(days=30):%Y-%m-%d}.jsonl.gz"]}
    with pytest.raises(ValueError, match="compress_after_days"):
        maintain_log_dir(tmp_path, compress_after_days=-1)


def test_serve_cli_json_logs_to_stderr_and_files(tmp_path):
    import signal
    import subprocess
    import sys

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "matcalc.cli", "serve", "--port", str(port), "--db", f"sqlite:///{tmp_path / 'c.db'}",
           "--workers", "0", "--log-format", "json", "--log-dir", str(logs)]
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: proc.poll() is not None or _up(url), 90, "matcalc serve")
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        assert httpx.get(url + "/metrics", headers={"X-Request-ID": "cli-probe"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    out = [json.loads(x) for x in (tmp_path / "stderr.txt").read_text().splitlines() if x.startswith("{")]
    assert any(r["request_id"] == "cli-probe" and r["kind"] == "access" for r in out)
    assert any(r["message"].startswith("matcalc server ready") for r in out)
    files = [json.loads(x) for x in (logs / "matcalc.jsonl").read_text().splitlines()]
    assert any(r["request_id"] == "cli-probe" for r in files) and any(r["message"].startswith("matcalc server ready")
                                                                       for r in files)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + API + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ----------------------------------------------------------------------------- shared feed, hostile headers
class _LogReads:
    """Counts SELECTs on task_logs by the app's engine (an independent tally of the store reads)."""

    def __init__(self, engine) -> None:
        from sqlalchemy import event

        self.n = 0
        self.engine = engine
        self._event = event
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, conn, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "task_logs" in statement:
            self.n += 1

    def close(self) -> None:
        self._event.remove(self.engine, "before_cursor_execute", self._count)


def _duration(t: dict) -> float:
    return (datetime.fromisoformat(t["finished_at"].replace("Z", "+00:00"))
            - datetime.fromisoformat(t["started_at"].replace("Z", "+00:00"))).total_seconds()


def test_twenty_streams_share_one_read_per_batch(tmp_path):
    """20 SSE streams of one relaxation (every step stored) all get exactly the stored log, from one
    shared store read per new batch of lines; the same relaxation also runs with no stream at all
    (wall times printed, as a ratio; the timing proper is benchmarks/bench_sse.py)."""
    n = 20
    with LiveApp(tmp_path, progress_interval_s=0) as srv, srv.client() as c:
        alone = submit(c, "optimization", structure=rattled_cu(1), **RELAX)
        wait_status(c, alone, TERMINAL)
        blocker = submit(c, "stability", structure=rattled_cu(7), **ENDLESS)  # holds the only worker
        wait_status(c, blocker, {"RUNNING"})
        tid = submit(c, "optimization", structure=rattled_cu(1), **RELAX)
        got: list[list[dict]] = [[] for _ in range(n)]
        opened = threading.Barrier(n + 1)

        def follow(i: int) -> None:
            with srv.client() as ci, ci.stream("GET", f"/tasks/{tid}/logs/stream") as r:
                lines = r.iter_lines()
                buf = [next(lines)]  # the first record: the stream is open
                opened.wait(60)
                buf.extend(lines)
                got[i] = read_events(_Lines(buf))[0]

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        opened.wait(60)
        feed = srv.state.log_feeds.feeds[tid]
        assert len(feed.streams) == n and srv.state.bus.n_watches == 1
        reads = _LogReads(srv.state.store.engine)
        reads_before, cursor0 = feed.reads, feed.cursor
        c.post(f"/tasks/{blocker}/cancel")  # the relaxation starts now, followed by 20 streams
        for t in threads:
            t.join(120)
        reads.close()
        feed_reads, batches = feed.reads - reads_before, feed.batches
        stored = c.get(f"/tasks/{tid}/logs", params={"limit": 10000}).json()["data"]
        tasks = {t: c.get(f"/tasks/{t}").json()["data"] for t in (alone, tid)}
        left = (dict(srv.state.log_feeds.feeds), srv.state.bus.n_watches)
    assert tasks[tid]["status"] == "COMPLETED" and all(g for g in got)
    assert all([r["id"] for r in g] == [s["id"] for s in stored] for g in got)  # every stream: the whole log
    written = sum(1 for s in stored if s["id"] > cursor0)
    print(f"\n{n} streams: {written} lines written while streaming, {feed_reads} feed reads ({batches} batches), "
          f"{reads.n} task_logs SELECTs in all; run {_duration(tasks[tid]):.2f} s vs {_duration(tasks[alone]):.2f} s "
          f"with no stream (ratio {_duration(tasks[tid]) / _duration(tasks[alone]):.2f}; loaded machine, see "
          "benchmarks/bench_sse.py)")
    # one read per new batch of lines, plus at most a few wake-ups without a line (ASSIGNED, the end)
    assert batches <= written and feed_reads <= batches + 5
    assert reads.n == feed_reads  # and no stream read on its own: 20 streams cost one reader
    assert left == ({}, 0)  # the finished task's feed is gone


HOSTILE = ["²".encode("latin-1"), "²".encode(), "١٢".encode(), b"-1", b"1e3", b"0x10", b"12 13", str(2**63).encode(),
           b"9" * 40, b"+5", b"1.0", b"1_000"]


def test_hostile_last_event_id_is_a_400(tmp_path):
    with LiveApp(tmp_path) as srv, srv.client() as c:
        tid = submit(c, "single-point", structure=rattled_cu(2, (1, 1, 1)), model="emt")
        wait_status(c, tid, TERMINAL)
        for header in HOSTILE:
            r = c.get(f"/tasks/{tid}/logs/stream", headers={"Last-Event-ID": header})
            assert r.status_code == 400 and r.json()["code"] == 40016, (header, r.text)
            assert "Last-Event-ID" in r.json()["message"]
        assert c.get("/health").json()["data"]["ready"] is True
        assert srv.state.metrics.sse_clients["task"] == 0  # refused before any stream opened


def test_last_event_id_bounds_and_after(tmp_path):
    with LiveApp(tmp_path) as srv, srv.client() as c:
        tid = submit(c, "single-point", structure=rattled_cu(2, (1, 1, 1)), model="emt")
        wait_status(c, tid, TERMINAL)
        stored = [x["id"] for x in c.get(f"/tasks/{tid}/logs").json()["data"]]
        for header, expected in ((str(2**63 - 1), []), ("0", stored), ("", stored), (str(stored[1]), stored[2:])):
            with c.stream("GET", f"/tasks/{tid}/logs/stream", headers={"Last-Event-ID": header}) as r:
                records, named = read_events(r)
            assert r.status_code == 200 and [x["id"] for x in records] == expected and named == ["end"], header
        # the later of `after` and Last-Event-ID wins (a reconnect keeps the URL it started with)
        with c.stream("GET", f"/tasks/{tid}/logs/stream", params={"after": stored[0]},
                      headers={"Last-Event-ID": str(stored[2])}) as r:
            assert [x["id"] for x in read_events(r)[0]] == stored[3:]
        r = c.get(f"/tasks/{tid}/logs/stream", params={"after": 2**63})
        assert r.status_code == 422 and r.json()["code"] == 40001
