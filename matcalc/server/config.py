"""Server settings: defaults < config file (TOML) < environment (``MATCALC_*``) < command-line flags.

The config file is ``--config PATH``, else ``$MATCALC_CONFIG``, else ``~/.matcalc/config.toml`` if it
exists. Keys are the field names of `Settings`, at top level or in a ``[server]`` table.
Environment variables are ``MATCALC_`` + the upper-case field name (``MATCALC_PORT=9000``);
list fields take comma-separated values (``MATCALC_API_KEYS=k1,k2``; ``MATCALC_API_KEY`` adds one).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_CONFIG_FILE = Path("~/.matcalc/config.toml")
SECRET_FIELDS = ("api_keys", "admin_api_keys")
CLUSTER_TABLE = "cluster"
"""The config file's table of cluster options (``[cluster]``: ``kind`` and the keywords of
``matcalc.cluster.start``)."""


class Settings(BaseModel):
    """Everything ``matcalc serve`` can be configured with (units in the names)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db_url: str | None = None
    """Database URL (default ``$MATCALC_DB_URL`` or ``sqlite:///~/.matcalc/matcalc.db``)."""
    cluster: str = "process"
    """Where tasks run: ``process`` (supervised worker processes, the default: a task that crashes its
    process fails alone), ``inprocess`` (threads of the server itself: tests, debugging), ``local`` (a dask
    cluster started here), ``slurm`` or ``pbs`` (dask workers in batch jobs, laid out by ``cluster_options``)
    or a dask scheduler address (``tcp://host:8786``)."""
    cluster_options: dict[str, Any] = Field(default_factory=dict)
    """Keywords of ``matcalc.cluster.start`` for ``local``/``slurm``/``pbs`` (``jobs``, ``cores``, ``memory``,
    ``walltime``, ``queue``, ``account``, ``gpus_per_job``, ``minimum_jobs``, ``maximum_jobs``, ``interface``...)
    or of ``matcalc.cluster.connect`` for an address (``timeout_s``): the ``[cluster]`` table of the config
    file, or JSON (``MATCALC_CLUSTER_OPTIONS='{"jobs": 2}'``)."""
    workers: int | None = Field(None, ge=0, le=1024)
    """Worker processes (``process``, ``local``) or threads (``inprocess``); default: one per CPU (at most
    one per 2 GiB of memory), or one per GPU; ``0``: accept and queue tasks without running them."""
    slots_per_worker: int | None = Field(None, ge=1, le=256)
    """Tasks one worker process runs at once (default 1 on a CPU, 4 on a GPU, whose batching engine fuses
    their force calls)."""
    max_crashes: int = Field(2, ge=1, le=100)
    """A task whose execution died this many times (its worker process aborted, segfaulted or was killed, or
    the server stopped under it) is FAILED ("worker crashed: ...") instead of being run again."""
    stop_grace_s: float = Field(10.0, gt=0)
    """A cancelled or timed-out task that has not stopped after this long has its worker process killed."""
    device: str | None = None
    blas_threads: int | None = Field(1, ge=1, le=1024)
    """BLAS threads in each worker (many small concurrent tasks run far faster single-threaded; ``None``
    leaves the library default)."""
    api_keys: list[str] = Field(default_factory=list)
    """Accepted ``X-API-Key`` values; required when ``host`` is not a loopback address."""
    rate_limit_per_s: float = Field(50.0, ge=0)
    """Sustained requests per second per API key (or client address); ``0`` disables the limit."""
    rate_limit_burst: int = Field(500, ge=1)
    """Requests a key may make at once before the sustained rate applies."""
    max_upload_mb: float = Field(100.0, gt=0)
    max_model_upload_mb: float = Field(4096.0, gt=0)
    """Largest model file accepted by ``POST /models/custom`` (MB)."""
    custom_models_dir: str | None = None
    """Where uploaded model files are kept (default ``~/.matcalc/custom_models``)."""
    validation_timeout_s: float = Field(900.0, gt=0)
    """A custom model's validation (in its own process) is stopped after this long."""
    max_atoms: int = Field(10_000, ge=1)
    max_batch: int = Field(1000, ge=1)
    """Most tasks in one ``POST /tasks/batch``."""
    shutdown_timeout_s: float = Field(30.0, ge=0)
    """Graceful shutdown waits this long for running tasks, then leaves them to be requeued."""
    default_timeout_s: float | None = Field(None, gt=0)
    """Wall-clock limit of a running task that gives no ``timeout_s`` (default: none)."""
    progress_interval_s: float = Field(0.5, ge=0)
    """Store at most one progress update per task per interval (s)."""
    log_level: str = "info"
    """Level of the server's log (debug, info, warning, error)."""
    config_file: str | None = None
    """The TOML config file read (``--config``, ``$MATCALC_CONFIG`` or ``~/.matcalc/config.toml``)."""
    admin_api_keys: list[str] = Field(default_factory=list)
    """Keys allowed on admin endpoints (``/system/logs/stream``); they are valid API keys too. Without
    any, every accepted key (or anyone on an open loopback server) is an admin."""
    public_url: str | None = Field(None, pattern=r"^https?://")
    """Base URL receivers should use (webhook ``result_url``); default ``http://host:port``."""
    # ---- logs
    log_dir: str | None = None
    """Directory of the JSON log files (``matcalc.jsonl``, rotated daily); ``None``: no log files."""
    log_format: Literal["text", "json"] = "text"
    """Format of the stderr log of ``matcalc serve`` (files are always JSON lines)."""
    log_compress_after_days: int = Field(7, ge=0)
    """Daily log files older than this are gzipped."""
    log_pack_after_days: int = Field(30, ge=0)
    """Daily log files older than this are packed into one tar per month."""
    log_stream_backlog: int = Field(200, ge=1, le=100_000)
    """System log records kept in memory for ``/system/logs/stream`` replay."""
    sse_heartbeat_s: float = Field(15.0, gt=0)
    """Keep-alive comment interval of the SSE streams (also how soon a vanished client is noticed)."""
    sse_poll_s: float = Field(2.0, gt=0)
    """A task's log feed re-reads the store (and the task's status) after this long without an event."""
    # ---- webhooks
    webhook_max_attempts: int = Field(5, ge=1, le=100)
    """Attempts per delivery before it is given up (FAILED)."""
    webhook_backoff_s: float = Field(1.0, ge=0)
    """Wait after the first failed attempt; doubles after each further failure."""
    webhook_backoff_max_s: float = Field(300.0, ge=0)
    """Longest wait between two attempts."""
    webhook_timeout_s: float = Field(10.0, gt=0)
    """Limit of one attempt (connect, send, answer); a receiver that does not answer in time is retried."""
    webhook_concurrency: int = Field(4, ge=1, le=256)
    """Attempts in flight at once per destination (scheme, host, port); other receivers never wait for it."""
    webhook_progress_interval_s: float = Field(10.0, ge=0)
    """At most one ``task.progress`` webhook per task per interval."""
    # ---- alerts
    alert_interval_s: float = Field(30.0, gt=0)
    """How often the alert rules are evaluated (s)."""
    alert_gpu_free_memory_gb: float = Field(2.0, ge=0)
    """``gpu_memory_low`` fires when a GPU has less free memory than this (GB)."""
    alert_gpu_temperature_c: float = Field(85.0)
    """``gpu_temperature_high`` fires above this temperature (°C)."""
    alert_queue_backlog: int = Field(100, ge=0)
    """``queue_backlog`` fires when more tasks than this wait to run (PENDING, QUEUED, ASSIGNED)."""
    alert_consecutive_failures: int = Field(5, ge=1)
    """``model_failures`` fires when this many tasks of one model in a row FAILED or timed out."""
    alert_disk_free_gb: float = Field(50.0, ge=0)
    """``disk_free_low`` fires when a watched file system has less free space than this (GB)."""
    alert_disk_paths: list[str] = Field(default_factory=list)
    """Paths whose file systems are watched (default: the SQLite file's directory and ``log_dir``)."""
    alert_api_p99_s: float = Field(5.0, gt=0)
    """``api_latency_p99`` fires when the p99 of API request durations over the window exceeds this (s)."""
    alert_api_window_s: float = Field(300.0, gt=0)
    """The window of the API latency p99 (s)."""
    alert_api_min_samples: int = Field(20, ge=1)
    """Requests the window must hold before ``api_latency_p99`` is judged."""
    alert_expected_gpus: int | None = Field(None, ge=0)
    """GPUs that must be present (default: every GPU seen since start)."""
    alert_rules_disabled: list[str] = Field(default_factory=list)
    """Rules not evaluated (names as in ``GET /system/alerts/rules``)."""
    alert_webhook_urls: list[str] = Field(default_factory=list)
    """Receivers of ``alert.opened`` / ``alert.resolved`` webhooks."""
    alert_webhook_signing_key: str | None = Field(None, min_length=1)
    """HMAC-SHA256 key signing the alert webhooks (like a task's ``notify_secret``)."""
    alert_file: str | None = None
    """Append alert events as JSON lines to this file."""
    metrics_public: bool = False
    """Serve ``GET /metrics`` without an API key (for scrapers that cannot send headers)."""

    @field_validator("api_keys", "admin_api_keys", "alert_webhook_urls", "alert_rules_disabled", "alert_disk_paths",
                     mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @field_validator("cluster_options", mode="before")
    @classmethod
    def _parse_cluster_options(cls, v: Any) -> Any:
        if isinstance(v, str):
            import json

            try:
                v = json.loads(v) if v.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"cluster_options: not a JSON object ({exc})") from exc
        if isinstance(v, dict):
            bad = [k for k in v if not isinstance(k, str) or not k.isidentifier()]
            if bad:
                raise ValueError(f"cluster_options: keys must be keyword names, got {bad}")
        return v

    @field_validator("alert_webhook_urls")
    @classmethod
    def _check_urls(cls, v: list[str]) -> list[str]:
        for u in v:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"alert_webhook_urls: {u!r} is not an http(s) URL")
        return v

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _check_keys(cls, v: list[str]) -> list[str]:
        for k in v:
            if len(k) < 8 or any(c.isspace() for c in k):
                raise ValueError("api keys must be at least 8 characters without spaces")
        return v

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_model_upload_bytes(self) -> int:
        return int(self.max_model_upload_mb * 1024 * 1024)

    @property
    def custom_models_path(self) -> Path:
        return Path(self.custom_models_dir or "~/.matcalc/custom_models").expanduser()

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def check_security(self) -> None:
        """Refuse to serve beyond loopback without an API key."""
        if not self.loopback and not self.api_keys and not self.admin_api_keys:
            raise ValueError(
                f"refusing to bind to {self.host!r} without an API key: set --api-key, MATCALC_API_KEY(S) "
                "or api_keys in the config file (only loopback addresses may run without one)")

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets replaced by ``***``."""
        from matcalc.store.db import redact_url

        d = self.model_dump()
        for name in SECRET_FIELDS:
            d[name] = ["***"] * len(d[name])
        if d.get("alert_webhook_signing_key"):
            d["alert_webhook_signing_key"] = "***"
        if d.get("db_url"):
            d["db_url"] = redact_url(d["db_url"])
        if "://" in d["cluster"] and "@" in d["cluster"]:
            d["cluster"] = redact_url(d["cluster"])
        return d


def env_var(name: str) -> str:
    """The environment variable of a setting: ``MATCALC_`` + upper-case name (``MATCALC_CONFIG`` for the file)."""
    return "MATCALC_CONFIG" if name == "config_file" else f"MATCALC_{name.upper()}"


def cli_flag(name: str) -> str:
    """The ``matcalc serve`` flag of a setting without a hand-named one: ``--webhook-timeout-s``."""
    return "--" + name.replace("_", "-")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        key = env_var(name)
        if key in env and env[key].strip() != "":
            out[name] = env[key]
    if env.get("MATCALC_API_KEY", "").strip():
        keys = Settings._split_keys(out.get("api_keys", "")) or []
        out["api_keys"] = [*keys, env["MATCALC_API_KEY"].strip()]
    return out


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from exc
    section = data.get("server", data)
    if not isinstance(section, dict):
        raise ValueError(f"config file {path}: [server] must be a table")
    out = {k: v for k, v in section.items() if k != "server"}
    # [cluster] (top level or [server.cluster]): kind = "slurm" and the keywords of matcalc.cluster.start
    table = out.pop(CLUSTER_TABLE) if isinstance(out.get(CLUSTER_TABLE), dict) else None
    if table is None and section is not data and isinstance(data.get(CLUSTER_TABLE), dict):
        table = data[CLUSTER_TABLE]
    if table is not None:
        options = dict(table)
        kind = options.pop("kind", None)
        if kind is not None:
            if not isinstance(kind, str):
                raise ValueError(f"config file {path}: [cluster] kind must be a string, got {kind!r}")
            out.setdefault("cluster", kind)
        out["cluster_options"] = {**options, **(out.get("cluster_options") or {})}
    unknown = sorted(set(out) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return out


def load_settings(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                  config_file: str | Path | None = None) -> Settings:
    """Merge defaults, the config file, ``MATCALC_*`` variables and ``flags`` (``None`` values = unset)."""
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path: Path | None = None
    if config_file is not None:
        path = Path(config_file).expanduser()
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
    elif env.get("MATCALC_CONFIG"):
        path = Path(env["MATCALC_CONFIG"]).expanduser()
        if not path.is_file():
            raise ValueError(f"config file not found: {path} (from MATCALC_CONFIG)")
    elif DEFAULT_CONFIG_FILE.expanduser().is_file():
        path = DEFAULT_CONFIG_FILE.expanduser()
    merged: dict[str, Any] = {}
    if path is not None:
        merged.update(_from_file(path))
        merged["config_file"] = str(path)
    merged.update(_from_env(env))
    merged.update(flags)
    return Settings(**merged)
