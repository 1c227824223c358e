"""What every task submission takes besides the property's own parameters, declared once.

`TASK_OPTIONS` (a `Param` table, like a property's) is the
source of the shared fields of every REST task request (``matcalc.server.schemas``) and of the keywords
every client submit method takes (``matcalc.client``); `TASK_EVENTS` are the webhook events.
"""

from __future__ import annotations

from matcalc.calculations.contract import (
    PROTOCOL_NAMES,
    Choice,
    Flag,
    Names,
    Number,
    Param,
    Text,
)
from matcalc.structures import INPUT_FORMATS
from matcalc.tasks import PRIORITIES, Priority

TASK_EVENTS: tuple[str, ...] = ("task.started", "task.progress", "task.completed", "task.failed", "task.cancelled",
                                "task.timeout")
"""Webhook events of a task."""
DEFAULT_EVENTS: tuple[str, ...] = tuple(e for e in TASK_EVENTS if e != "task.progress")
"""The events sent when ``notify_events`` is not given."""

IDEMPOTENCY_HEADER = "Idempotency-Key"
"""The request header that makes a task submission safe to retry."""
MAX_TIMEOUT_S = 30 * 86400.0
"""Longest ``timeout_s`` a task may ask for (30 days)."""

TASK_OPTIONS: tuple[Param, ...] = (
    Param("protocol", Choice(PROTOCOL_NAMES), "parameter preset (default: the first); an explicit keyword "
          "always wins over it"),
    Param("priority", Choice(PRIORITIES), "queue priority (FIFO within a level)", default=Priority.NORMAL.value),
    Param("timeout_s", Number(0.0, MAX_TIMEOUT_S, lo_open=True), "wall-clock limit once running; the task "
          "ends TIMEOUT after it", unit="s"),
    Param("label", Text(256), "your name for the task (listings, results)"),
    Param("format", Choice(INPUT_FORMATS), "format of inline structure text (default: detected)"),
    Param("notify_url", Text(2048, r"^https?://", "an http(s) URL"), "webhook receiver"),
    Param("notify_events", Names(TASK_EVENTS), "webhook events to send (default: all but task.progress)"),
    Param("notify_secret", Text(256), "HMAC-SHA256 key of the webhook signatures"),
    Param("cache", Flag(), "use the result cache (default: on unless the server runs with MATCALC_CACHE=0); "
          "false always computes and stores nothing"),
    Param("idempotency_key", Text(255, r"^[!-~]+$", "visible ASCII, e.g. a UUID"),
          "the Idempotency-Key header: the server answers a repeated submission with the same key with the "
          "task it stored the first time, so submissions are retried safely"),
)
"""Options every task type takes, after the property's own parameters."""
HEADER_OPTIONS: dict[str, str] = {"idempotency_key": IDEMPOTENCY_HEADER}
"""Options sent as request headers, not in the body."""
BODY_OPTIONS: tuple[Param, ...] = tuple(o for o in TASK_OPTIONS if o.name not in HEADER_OPTIONS)
"""The options that are fields of a task request body."""


def option(name: str) -> Param:
    """The task option ``name``."""
    return next(o for o in TASK_OPTIONS if o.name == name)

__all__ = ["BODY_OPTIONS", "DEFAULT_EVENTS", "HEADER_OPTIONS", "IDEMPOTENCY_HEADER", "MAX_TIMEOUT_S", "TASK_EVENTS",
           "TASK_OPTIONS", "option"]
