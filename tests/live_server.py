"""A real `matcalc serve` subprocess on a free loopback port, shared by the live-server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

API = "/api/v1"
KEY = "live-test-key-42"
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"})


def wait_tasks(client: Any, ids: list[str], *, prefix: str = API, timeout_s: float = 120) -> dict[str, dict]:
    """Poll ``GET {prefix}/tasks/{id}`` (a TestClient or an httpx client) until every task is terminal."""
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = {i: client.get(f"{prefix}/tasks/{i}").json()["data"] for i in ids}
        if all(t["status"] in TERMINAL for t in tasks.values()):
            return tasks
        assert time.monotonic() < deadline, f"tasks not finished: {[(i, t['status']) for i, t in tasks.items()]}"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A `python -m matcalc.cli serve` subprocess on a free loopback port."""

    def __init__(self, workdir: Path, db_url: str, *args: str, env: dict[str, str] | None = None,
                 api_key: str | None = KEY, key_flag: bool = True) -> None:
        self.workdir = workdir
        self.db_url = db_url
        self.args = list(args)
        self.api_key = api_key
        self.key_flag = key_flag
        self.env = {**os.environ, **(env or {})}  # BLAS threads: the server sets them (blas_threads=1)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.n_starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **kw) -> httpx.Client:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        return httpx.Client(base_url=self.url + API, headers=headers, timeout=60, **kw)

    def start(self, timeout_s: float = 90) -> LiveServer:
        self.port = free_port()
        self.n_starts += 1
        self.log = self.workdir / f"server-{self.n_starts}.log"
        cmd = [sys.executable, "-m", "matcalc.cli", "serve", "--port", str(self.port), "--db", self.db_url, *self.args]
        if self.api_key and self.key_flag:
            cmd += ["--api-key", self.api_key]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + API + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL, timeout_s: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
