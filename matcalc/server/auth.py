"""API-key check (``X-API-Key`` header) and a per-key token-bucket rate limit (in memory)."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time

from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from matcalc.server.errors import ApiError, ErrorCode

API_KEY_HEADER = "X-API-Key"
api_key_scheme = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                              description="required when the server has API keys configured")


class RateLimiter:
    """Token bucket per client: ``rate_per_s`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = float(rate_per_s)
        self.burst = max(1, int(burst))
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Take one token; returns 0 when allowed, else the seconds until a token is available."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate


def _fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _matches(key: str, keys: list[str]) -> bool:
    return any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)


async def require_api_key(request: Request, key: str | None = Security(api_key_scheme)) -> str:
    """Check the key (when keys are configured) and the rate limit; returns the client identity."""
    settings = request.app.state.settings
    if settings.api_keys or settings.admin_api_keys:
        if not key:
            raise ApiError(ErrorCode.API_KEY_MISSING, f"missing {API_KEY_HEADER} header")
        if not _matches(key, [*settings.api_keys, *settings.admin_api_keys]):
            raise ApiError(ErrorCode.API_KEY_INVALID, f"invalid {API_KEY_HEADER}")
        client = f"key:{_fingerprint(key)}"
    else:
        client = f"addr:{request.client.host if request.client else 'unknown'}"
    request.state.client_id = client
    wait = request.app.state.rate_limiter.take(client)
    if wait > 0:
        raise ApiError(ErrorCode.RATE_LIMITED, f"rate limit of {settings.rate_limit_per_s:g} requests/s exceeded",
                       data={"retry_after_s": round(wait, 3)}, headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return client


async def require_admin(request: Request, key: str | None = Security(api_key_scheme)) -> str:
    """Like `require_api_key`; with ``admin_api_keys`` configured the key must be one of them."""
    client = await require_api_key(request, key)
    admins = request.app.state.settings.admin_api_keys
    if admins and not (key and _matches(key, admins)):
        raise ApiError(ErrorCode.ADMIN_REQUIRED, "this endpoint needs an admin API key")
    return client
