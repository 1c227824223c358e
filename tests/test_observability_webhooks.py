"""Webhooks: a local HTTP receiver (a tiny server in a thread) gets signed task webhooks from a live
uvicorn server; the HMAC is recomputed here with hmac/hashlib; a receiver answering 500 gets the
delivery again (exponential backoff) and every attempt is a row of webhook_deliveries; a receiver
that never answers delays nothing; pending deliveries survive kill -9 and SIGTERM of a live
`matcalc serve` (SQLite, and PostgreSQL with MATCALC_TEST_PG_URL); nothing follows task.cancelled."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import socket
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

pytest.importorskip("uvicorn")

from test_observability_logs import LiveApp, cif_of, submit, wait_for, wait_status  # noqa: E402

from matcalc.server.webhooks import WebhookDispatcher, destination, signature, verify_signature  # noqa: E402
from matcalc.store.models import WebhookDelivery  # noqa: E402

SECRET = "webhook-secret-42"
PAYLOAD_KEYS = {"event", "task_id", "status", "timestamp", "result_url", "summary"}


class Receiver:
    """Records every POST; answers the statuses scripted per event (then 200)."""

    def __init__(self, script: dict[str, list[int]] | None = None, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.received: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.gate is not None:
                    outer.gate.wait(120)
                event = self.headers.get("X-Matcalc-Event", "")
                with outer.lock:
                    codes = outer.script.get(event, [])
                    code = codes.pop(0) if codes else 200
                    outer.received.append({"t": time.monotonic(), "wall": time.time(), "headers": dict(self.headers),
                                           "body": body,
                                           "status": code, "event": event})
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def of(self, event: str) -> list[dict]:
        with self.lock:
            return [r for r in self.received if r["event"] == event]


def hmac_ok(secret: str, rec: dict) -> bool:
    """Independent check: HMAC-SHA256(secret, timestamp + "." + raw body) as sent in the header."""
    ts = rec["headers"]["X-Matcalc-Timestamp"]
    expected = "sha256=" + hmac.new(secret.encode(), ts.encode() + b"." + rec["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, rec["headers"]["X-Matcalc-Signature"])


def deliveries(srv: LiveApp, task_id: str | None = None) -> list[WebhookDelivery]:
    with srv.state.store.read() as s:
        q = select(WebhookDelivery).order_by(WebhookDelivery.id)
        if task_id is not None:
            q = q.where(WebhookDelivery.task_id == task_id)
        return list(s.scalars(q).all())


def cu_cif() -> str:
    from ase.build import bulk

    return cif_of(bulk("Cu", "fcc", a=3.6, cubic=True))


def test_signed_webhooks_with_retries_all_recorded(tmp_path):
    with Receiver({"task.completed": [500, 500]}) as rx, \
            LiveApp(tmp_path, webhook_backoff_s=0.05, webhook_max_attempts=4) as srv, srv.client() as c:
        tid = submit(c, "single-point", structure=cu_cif(), model="emt", notify_url=rx.url,
                     notify_events=["task.started", "task.completed"], notify_secret=SECRET)
        wait_status(c, tid, {"COMPLETED"})
        wait_for(lambda: any(r["status"] == 200 for r in rx.of("task.completed")), 30, "the completed webhook")
        assert srv.state.observability.webhooks.wait_idle(10)
        assert srv.state.observability.tracked_tasks == 0  # the completed task left nothing in memory
        result = c.get(f"/tasks/{tid}/result").json()["data"]["result"]
        rows = deliveries(srv, tid)
        metrics = srv.state.metrics
        failures = metrics.webhook_attempts.labels("task.completed", "failure")._value.get()
        successes = metrics.webhook_attempts.labels("task.completed", "success")._value.get()
        completed = rx.of("task.completed")
        result_url = json.loads(completed[-1]["body"])["result_url"]
        fetched = c.get(result_url)  # absolute URL that works
    started = rx.of("task.started")
    assert len(started) == 1 and [r["status"] for r in completed] == [500, 500, 200]
    now = time.time()
    for rec in started + completed:
        assert hmac_ok(SECRET, rec), rec["headers"]
        assert not hmac_ok("wrong-secret", rec)
        assert abs(now - int(rec["headers"]["X-Matcalc-Timestamp"])) < 300
        assert verify_signature(SECRET, rec["body"], rec["headers"]["X-Matcalc-Timestamp"],
                                rec["headers"]["X-Matcalc-Signature"])
        payload = json.loads(rec["body"])
        assert set(payload) == PAYLOAD_KEYS and payload["task_id"] == tid
    # one delivery id for the three attempts, retried after >= 0.05 s then >= 0.1 s (exponential backoff)
    assert len({r["headers"]["X-Matcalc-Delivery"] for r in completed}) == 1
    assert completed[1]["t"] - completed[0]["t"] >= 0.05 and completed[2]["t"] - completed[1]["t"] >= 0.1
    p_started, p_done = json.loads(started[0]["body"]), json.loads(completed[-1]["body"])
    assert p_started["event"] == "task.started" and p_started["status"] == "RUNNING"
    assert p_started["result_url"] is None and p_started["summary"]["attempt"] == 1
    assert p_done["event"] == "task.completed" and p_done["status"] == "COMPLETED"
    assert p_done["result_url"].endswith(f"/api/v1/tasks/{tid}/result")
    assert fetched.status_code == 200 and fetched.json()["data"]["result"]["energy_eV"] == result["energy_eV"]
    assert p_done["summary"]["energy_eV"] == result["energy_eV"] and p_done["summary"]["n_atoms"] == 4
    # every attempt recorded
    by_event = {e: [r for r in rows if r.event == e] for e in ("task.started", "task.completed")}
    assert [(r.attempt, r.status_code, r.success) for r in by_event["task.started"]] == [(1, 200, True)]
    assert [(r.attempt, r.status_code, r.success) for r in by_event["task.completed"]] == [
        (1, 500, False), (2, 500, False), (3, 200, True)]
    assert all(r.url == rx.url and r.payload["task_id"] == tid and r.duration_s >= 0 for r in rows)
    assert by_event["task.completed"][0].error == "HTTP 500"
    assert (failures, successes) == (2, 1)


def test_dead_receivers_never_block_tasks(tmp_path):
    gate = threading.Event()  # the receiver hangs on every request until the gate opens
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_url = f"http://127.0.0.1:{closed.getsockname()[1]}/hook"
    closed.close()  # nothing listens there: connection refused
    with Receiver(gate=gate) as rx, LiveApp(tmp_path, webhook_timeout_s=60, webhook_max_attempts=2,
                                           webhook_backoff_s=0.05, workers=2) as srv, srv.client() as c:
        try:
            urls = (rx.url, rx.url, refused_url, rx.url)
            ids = [submit(c, "single-point", structure=cu_cif(), model="emt", notify_url=url, notify_secret=SECRET)
                   for url in urls]
            # every task completes while its receiver has not answered a single request
            tasks = [wait_status(c, t, {"COMPLETED", "FAILED"}, timeout_s=50) for t in ids]
            hanging = [t for t, u in zip(ids, urls, strict=True) if u == rx.url]
            assert not [r for r in deliveries(srv) if r.task_id in hanging]  # all still in flight or queued
            assert srv.state.observability.webhooks.pending > 0
        finally:
            gate.set()
        assert srv.state.observability.webhooks.wait_idle(60)
        rows = deliveries(srv)
    assert all(t["status"] == "COMPLETED" for t in tasks)
    for tid in hanging:
        mine = sorted((r.event, r.attempt, r.status_code, r.success) for r in rows if r.task_id == tid)
        assert mine == [("task.completed", 1, 200, True), ("task.started", 1, 200, True)]
    refused = [r for r in rows if r.task_id == ids[2]]
    assert sorted((r.event, r.attempt) for r in refused) == [("task.completed", 1), ("task.completed", 2),
                                                             ("task.started", 1), ("task.started", 2)]
    assert all(not r.success and r.status_code is None and "refused" in r.error.lower() for r in refused)


def test_dispatcher_rules_and_signature_helpers(tmp_path):
    from matcalc.store import Store

    hole = socket.socket()  # accepts connections into its backlog and never answers
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    store = Store(f"sqlite:///{tmp_path / 'w.db'}")
    d = WebhookDispatcher(store, max_attempts=2, backoff_s=0.01, timeout_s=0.3, concurrency=1)
    d.start()
    try:
        d.enqueue(f"http://127.0.0.1:{hole.getsockname()[1]}/x", "alert.opened", {"n": 1}, secret="k")
        assert d.wait_idle(20)
    finally:
        d.stop()
        hole.close()
    with store.read() as s:
        rows = list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all())
    store.close()
    assert [(r.attempt, r.success, r.status_code) for r in rows] == [(1, False, None), (2, False, None)]
    assert all("timed out" in r.error for r in rows) and rows[0].payload == {"n": 1} and rows[0].task_id is None
    with Receiver({"task.failed": [400], "task.timeout": [429, 503]}) as rx:
        d = WebhookDispatcher(None, max_attempts=5, backoff_s=0.01, backoff_max_s=0.02, concurrency=2)
        d.start()
        try:
            d.enqueue(rx.url, "task.failed", {"event": "task.failed"}, task_id="a")  # 4xx: not retried
            d.enqueue(rx.url, "task.timeout", {"event": "task.timeout"}, task_id="b")  # 429, 503: retried
            assert d.wait_idle(20)
        finally:
            d.stop()
    assert [r["status"] for r in rx.of("task.failed")] == [400]
    assert [r["status"] for r in rx.of("task.timeout")] == [429, 503, 200]
    assert "X-Matcalc-Signature" not in rx.of("task.failed")[0]["headers"]  # no secret, no signature
    assert [d.backoff(n) for n in (1, 2, 3, 4)] == [0.01, 0.02, 0.02, 0.02]
    body, ts = b'{"a":1}', 1_700_000_000
    sig = signature("k", ts, body)
    assert verify_signature("k", body, str(ts), sig, now=ts + 10)
    assert not verify_signature("k", body, str(ts), sig, now=ts + 301)  # a replay after the tolerance
    assert not verify_signature("k", b'{"a":2}', str(ts), sig, now=ts)  # tampered body
    assert not verify_signature("k", body, str(ts + 1), sig, now=ts)  # timestamp changed
    assert not verify_signature("other", body, str(ts), sig, now=ts)
    with pytest.raises(ValueError, match="max_attempts"):
        WebhookDispatcher(None, max_attempts=0)


def test_progress_webhooks_throttled_per_task(tmp_path):
    from test_observability_logs import RELAX, rattled_cu

    with Receiver() as rx, LiveApp(tmp_path, webhook_progress_interval_s=0) as srv, srv.client() as c:
        every = submit(c, "optimization", structure=rattled_cu(1, (2, 1, 1)), notify_url=rx.url,
                       notify_events=["task.progress"], **RELAX)
        wait_status(c, every, {"COMPLETED"})
        assert srv.state.observability.webhooks.wait_idle(30)
        steps = c.get(f"/tasks/{every}/result").json()["data"]["result"]["steps"]
        srv.state.observability.settings.webhook_progress_interval_s = 3600  # then at most one per task
        once = submit(c, "optimization", structure=rattled_cu(2, (2, 1, 1)), notify_url=rx.url,
                      notify_events=["task.progress"], **RELAX)
        wait_status(c, once, {"COMPLETED"})
        assert srv.state.observability.webhooks.wait_idle(30)
    got = [json.loads(r["body"]) for r in rx.of("task.progress")]
    mine = [p for p in got if p["task_id"] == every]
    assert [p["summary"]["step"] for p in mine] == list(range(steps + 1))  # every step, in order (one shard)
    assert all(p["status"] == "RUNNING" and p["summary"]["stage"] == "relax" for p in mine)
    assert len([p for p in got if p["task_id"] == once]) == 1
    assert not rx.of("task.completed")  # only the subscribed events


# ----------------------------------------------------------------------------- durable outbox (live `matcalc serve`)
PG_URL = os.environ.get("MATCALC_TEST_PG_URL", "").strip()
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not PG_URL, reason="MATCALC_TEST_PG_URL not set"))]


def _outbox_row(db_url: str, task_id: str):
    from matcalc.store import Store
    from matcalc.store.models import WebhookOutbox

    st = Store(db_url, migrate=False)
    try:
        with st.read() as s:
            return s.scalars(select(WebhookOutbox).where(WebhookOutbox.task_id == task_id)).one_or_none()
    finally:
        st.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_pending_deliveries_survive_kill9_and_sigterm(tmp_path, backend):
    """A delivery in its backoff when the server is killed (-9, then SIGTERM) completes after the
    restart, once, with the same delivery id; GET /tasks/{id}/webhooks lists every attempt; a terminal
    event lost before it reached the outbox is queued again at start."""
    from live_server import LiveServer, wait_tasks

    if backend == "sqlite":
        db_url = f"sqlite:///{tmp_path / 'outbox.db'}"
    else:
        from test_store import _reset_pg

        _reset_pg(PG_URL)
        db_url = PG_URL
    # settings from the command line: a 3 s backoff to kill the server in
    srv = LiveServer(tmp_path, db_url, "--cluster", "inprocess", "--workers", "1", "--webhook-backoff-s", "3",
                     "--webhook-timeout-s", "5", "--shutdown-timeout", "1")
    with Receiver({"task.completed": [500]}) as rx_kill, Receiver({"task.completed": [500]}) as rx_term, \
            Receiver() as rx_lost:
        try:
            srv.start()
            with srv.client() as c:
                a = submit(c, "single-point", structure=cu_cif(), model="emt", notify_url=rx_kill.url,
                           notify_events=["task.completed"], notify_secret=SECRET)
                wait_tasks(c, [a], prefix="")
                wait_for(lambda: (row := _outbox_row(db_url, a)) is not None and row.attempts == 1, 30,
                         "the failed first attempt to be recorded")
            row = _outbox_row(db_url, a)
            assert row.status == "PENDING" and row.last_status_code == 500 and row.secret == SECRET
            srv.kill(signal.SIGKILL)  # during the 3 s backoff
            srv.start()
            with srv.client() as c:
                wait_for(lambda: any(r["status"] == 200 for r in rx_kill.of("task.completed")), 30, "the retry")
                # SIGTERM during a backoff: the delivery stays PENDING in the outbox, nothing is dropped
                b = submit(c, "single-point", structure=cu_cif(), model="emt", notify_url=rx_term.url,
                           notify_events=["task.completed"], notify_secret=SECRET)
                lost = submit(c, "single-point", structure=cu_cif(), model="emt", notify_url=rx_lost.url)
                wait_tasks(c, [b, lost], prefix="")
                wait_for(lambda: (row := _outbox_row(db_url, b)) is not None and row.attempts == 1, 30, "attempt 1")
                wait_for(lambda: len(rx_lost.of("task.completed")) == 1, 30, "the lost task's webhook")
            srv.kill(signal.SIGTERM)
            assert _outbox_row(db_url, b).status == "PENDING"
            _forget_webhooks(db_url, lost)  # as if the server died between the status change and the outbox write
            srv.start()
            with srv.client() as c:
                wait_for(lambda: any(r["status"] == 200 for r in rx_term.of("task.completed")), 30, "the retry")
                wait_for(lambda: len(rx_lost.of("task.completed")) == 2, 30, "the lost event, queued again at start")
                listed = {t: c.get(f"/tasks/{t}/webhooks").json()["data"] for t in (a, b)}
                admin = c.get("/system/webhooks", params={"status": "DELIVERED"}).json()["data"]
                assert c.get("/tasks/nope/webhooks").json()["code"] == 30001
        finally:
            srv.stop()
    for rx, tid in ((rx_kill, a), (rx_term, b)):
        got = rx.of("task.completed")
        assert [r["status"] for r in got] == [500, 200]  # completed once
        assert len({r["headers"]["X-Matcalc-Delivery"] for r in got}) == 1  # with the same delivery id
        assert [r["headers"]["X-Matcalc-Attempt"] for r in got] == ["1", "2"]
        assert got[1]["t"] - got[0]["t"] >= 3  # the backoff was kept across the restart
        assert all(hmac_ok(SECRET, r) for r in got) and got[0]["body"] == got[1]["body"]
        page = listed[tid]
        assert page["total"] == 1
        d = page["items"][0]
        assert d["id"] == got[0]["headers"]["X-Matcalc-Delivery"] and d["status"] == "DELIVERED"
        assert [(x["attempt"], x["status_code"], x["success"]) for x in d["attempts"]] == [(1, 500, False),
                                                                                          (2, 200, True)]
        assert d["attempts"][0]["at"] < d["attempts"][1]["at"] and d["next_attempt_at"] is None
        assert d["payload"]["task_id"] == tid and d["event"] == "task.completed"
        assert _outbox_row(db_url, tid).secret is None  # forgotten once delivered
    assert {x["task_id"] for x in admin["items"]} >= {a, b, lost}
    lost_ids = [r["headers"]["X-Matcalc-Delivery"] for r in rx_lost.of("task.completed")]
    assert lost_ids[0] != lost_ids[1]  # a new delivery (the first was forgotten with its row)


def _forget_webhooks(db_url: str, task_id: str) -> None:
    from sqlalchemy import delete

    from matcalc.store import Store
    from matcalc.store.models import WebhookDelivery, WebhookOutbox

    st = Store(db_url, migrate=False)
    try:
        with st.write() as s:
            s.execute(delete(WebhookDelivery).where(WebhookDelivery.task_id == task_id))
            s.execute(delete(WebhookOutbox).where(WebhookOutbox.task_id == task_id))
    finally:
        st.close()


# ----------------------------------------------------------------------------- fairness
def test_hung_receiver_delays_only_its_own_deliveries(tmp_path):
    """Receivers that accept connections and never answer hold 30 s attempts; a healthy receiver's
    webhooks still arrive within 1 s of their events, and each task's events arrive in order."""
    hole = socket.socket()  # accepts into its backlog, never answers
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    hung_url = f"http://127.0.0.1:{hole.getsockname()[1]}/hook"
    try:
        with Receiver() as rx, LiveApp(tmp_path, workers=2, webhook_timeout_s=30, webhook_concurrency=2) as srv, \
                srv.client() as c:
            hung = [submit(c, "single-point", structure=cu_cif(), model="emt", notify_url=hung_url)
                    for _ in range(6)]  # 12 deliveries, 2 in flight for 30 s each
            wait_for(lambda: srv.state.observability.webhooks.in_flight == 2, 30, "the hung attempts")
            from test_observability_logs import RELAX, rattled_cu

            healthy = [submit(c, "optimization", structure=rattled_cu(i, (2, 1, 1)), notify_url=rx.url, **RELAX)
                       for i in range(4)]
            for t in healthy:
                wait_status(c, t, {"COMPLETED"})
            wait_for(lambda: len(rx.of("task.completed")) == 4, 10, "the healthy receiver's webhooks")
            hooks = srv.state.observability.webhooks
            wait_for(lambda: hooks.pending == 12, 10, "the healthy deliveries to be recorded")
            dests = hooks.destinations()
            pending = c.get("/system/webhooks", params={"status": "PENDING"}).json()["data"]
    finally:
        hole.close()
    delays = []
    for r in rx.received:
        sent = datetime.fromisoformat(json.loads(r["body"])["timestamp"].replace("Z", "+00:00")).timestamp()
        delays.append(r["wall"] - sent)
    print(f"\nhealthy receiver beside a hung one: {len(delays)} webhooks, delay max {max(delays) * 1000:.0f} ms, "
          f"median {sorted(delays)[len(delays) // 2] * 1000:.0f} ms")
    assert max(delays) < 1.0
    for t in healthy:  # in order per task
        assert [json.loads(r["body"])["event"] for r in rx.received
                if json.loads(r["body"])["task_id"] == t] == ["task.started", "task.completed"]
    assert dests.get(destination(hung_url), 0) == 12 and not dests.get(destination(rx.url))
    assert pending["total"] == 12 and {x["task_id"] for x in pending["items"]} == set(hung)


# ----------------------------------------------------------------------------- nothing after the end
def test_nothing_after_task_cancelled(tmp_path):
    from test_observability_logs import ENDLESS, rattled_cu

    with Receiver() as rx, LiveApp(tmp_path, webhook_progress_interval_s=0, progress_interval_s=0) as srv, \
            srv.client() as c:
        tid = submit(c, "stability", structure=rattled_cu(3), notify_url=rx.url, notify_secret=SECRET,
                     notify_events=["task.started", "task.progress", "task.cancelled"], **ENDLESS)
        wait_for(lambda: len(rx.of("task.progress")) >= 5, 60, "progress webhooks")
        obs = srv.state.observability
        assert obs.tracked_tasks == 1
        assert c.post(f"/tasks/{tid}/cancel").status_code == 200
        wait_for(lambda: srv.state.service.executor.info()["running"] == 0, 60, "the MD to stop")
        assert obs.webhooks.wait_idle(30)
        time.sleep(0.5)  # anything late would be queued by now
        assert obs.webhooks.wait_idle(30)
        logs = c.get(f"/tasks/{tid}/logs", params={"limit": 10000}).json()["data"]
        listed = c.get(f"/tasks/{tid}/webhooks", params={"page_size": 500}).json()["data"]["items"]
        tracked, throttles = obs.tracked_tasks, set(srv.state.service._last_progress)
    events = [r["event"] for r in rx.received]
    assert events[0] == "task.started" and events[-1] == "task.cancelled" and events.count("task.cancelled") == 1
    assert set(events[1:-1]) == {"task.progress"}
    stamps = [json.loads(r["body"])["timestamp"] for r in rx.received]
    assert stamps == sorted(stamps)  # sent in the order they happened
    assert [d["event"] for d in listed] == events and all(d["status"] == "DELIVERED" for d in listed)
    assert logs[-1]["message"] == "task cancelled"  # no log line after the terminal status
    assert tracked == 0 and tid not in throttles  # nothing of the finished task left in memory


# ----------------------------------------------------------------------------- request fields
def test_notify_fields_refused_and_delivery_routes_guarded(tmp_path):
    user, admin = "user-key-123456", "admin-key-123456"
    with LiveApp(tmp_path, api_keys=[user], admin_api_keys=[admin], workers=0) as srv, srv.client(user) as c:
        base = {"structure": cu_cif(), "model": "emt", "notify_url": "http://127.0.0.1:9/hook"}
        for extra, what in (({"notify_events": []}, "notify_events"), ({"notify_secret": ""}, "notify_secret"),
                            ({"notify_secret": "   "}, "notify_secret"),
                            ({"notify_events": ["task.done"]}, "notify_events")):
            r = c.post("/tasks/single-point", json={**base, **extra})
            assert r.status_code == 422 and r.json()["code"] == 40001 and what in r.text, (extra, r.text)
        r = c.post("/tasks/single-point", json={"structure": cu_cif(), "model": "emt", "notify_secret": "k"})
        assert r.status_code == 422 and "need notify_url" in r.json()["message"]
        assert c.get("/tasks", params={"page_size": 1}).json()["data"]["total"] == 0  # nothing stored
        tid = submit(c, "single-point", **base)
        assert c.get(f"/tasks/{tid}/webhooks").json()["data"] == {"items": [], "total": 0, "page": 1,
                                                                  "page_size": 100}
        r = c.get("/system/webhooks")
        assert r.status_code == 403 and r.json()["code"] == 20004
        with srv.client(admin) as a:
            assert a.get("/system/webhooks").json()["data"]["total"] == 0
