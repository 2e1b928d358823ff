"""API keys, access tokens and per-key rate limits for ``posebatch serve``.

Why signed tokens: the original API hands out 30-day access tokens from ``/oauth/2.0/token``.
Here a token carries its key id and expiry and is signed with HMAC-SHA256 under a key derived
from that key's secret, so any replica that knows the key list validates it without a shared
store, and changing a key's secret revokes every token issued for it. Secrets and signatures are
compared in constant time; neither appears in a repr, a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from pathlib import Path

from posebatch.errors import ConfigError

TOKEN_TTL_S = 30 * 24 * 3600
"""The original's ``expires_in``: 30 days."""
SCOPE = "public brain_all_scope brain_body_analysis"
"""The SDK checks for ``brain_all_scope``; without it, it switches to signing requests itself."""
_TOKEN_VERSION = "pb1"
_DERIVE_LABEL = b"posebatch access token v1"


@dataclass(frozen=True)
class ApiKey:
    """One client's credentials; ``qps`` 0 means no per-key limit."""

    key: str
    secret: str = field(repr=False)
    qps: float = 0.0


class TokenInvalid(Exception):
    """Unknown, malformed or forged token (the API's error 110)."""


class TokenExpired(Exception):
    """Well signed but past its expiry (the API's error 111)."""


class BadClient(Exception):
    """Token request with an unknown key or a wrong secret (OAuth ``invalid_client``)."""


def parse_keys(text: str, source: str) -> dict[str, ApiKey]:
    """``key:secret[:qps]`` entries separated by commas or new lines; ``#`` starts a comment."""
    keys: dict[str, ApiKey] = {}
    entries = [e.strip() for line in text.splitlines()
               for e in line.split("#", 1)[0].split(",")]
    for n, entry in enumerate((e for e in entries if e), start=1):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            # Never echo the entry: it holds a secret.
            raise ConfigError(f"{source}: entry {n} is not KEY:SECRET or KEY:SECRET:QPS")
        qps = 0.0
        if len(parts) == 3:
            try:
                qps = float(parts[2])
            except ValueError:
                qps = -1.0
            if not qps >= 0:
                raise ConfigError(f"{source}: entry {n} (key {parts[0]}): QPS must be a number "
                                  ">= 0 (0 = unlimited)")
        if parts[0] in keys:
            raise ConfigError(f"{source}: key {parts[0]} appears twice")
        keys[parts[0]] = ApiKey(parts[0], parts[1], qps)
    return keys


def load_keys(env_value: str | None, file_path: str | None,
              default_qps: float = 0.0) -> dict[str, ApiKey]:
    """Keys from ``POSEBATCH_API_KEYS`` and/or a file (same format); ``default_qps`` fills in
    keys without their own limit."""
    keys: dict[str, ApiKey] = {}
    if env_value:
        keys.update(parse_keys(env_value, "POSEBATCH_API_KEYS"))
    if file_path:
        try:
            text = Path(file_path).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read the API key file {file_path}: "
                              f"{err.strerror or err}") from err
        for k, v in parse_keys(text, file_path).items():
            if k in keys:
                raise ConfigError(f"key {k} is in both POSEBATCH_API_KEYS and {file_path}")
            keys[k] = v
    if default_qps:
        keys = {k: v if v.qps else ApiKey(v.key, v.secret, default_qps) for k, v in keys.items()}
    return keys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Authority:
    """Checks client credentials, issues and verifies access tokens."""

    def __init__(self, keys: dict[str, ApiKey], ttl_s: int = TOKEN_TTL_S) -> None:
        if not keys:
            raise ConfigError("no API keys")
        self._keys = keys
        self._signing = {k: hmac.new(v.secret.encode(), _DERIVE_LABEL, hashlib.sha256).digest()
                         for k, v in keys.items()}
        self.ttl_s = ttl_s

    def authenticate(self, client_id: str, client_secret: str) -> ApiKey:
        """The key for this id and secret, or BadClient with the original's description."""
        key = self._keys.get(client_id)
        if key is None:
            raise BadClient("unknown client id")
        if not hmac.compare_digest(key.secret.encode(), client_secret.encode("utf-8", "replace")):
            raise BadClient("Client authentication failed")
        return key

    def issue(self, key: ApiKey, now: float | None = None) -> str:
        expires = int(time.time() if now is None else now) + self.ttl_s
        body = f"{_TOKEN_VERSION}.{_b64(key.key.encode())}.{expires}"
        return f"{body}.{self._sign(key.key, body)}"

    def verify(self, token: str, now: float | None = None) -> ApiKey:
        """The key the token was issued to; TokenInvalid or TokenExpired otherwise."""
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _TOKEN_VERSION:
            raise TokenInvalid("malformed access token")
        try:
            key_id = _unb64(parts[1]).decode()
            expires = int(parts[2])
        except (binascii.Error, UnicodeDecodeError, ValueError) as err:
            raise TokenInvalid("malformed access token") from err
        key = self._keys.get(key_id)
        if key is None:
            raise TokenInvalid("access token of an unknown key")
        body = ".".join(parts[:3])
        if not hmac.compare_digest(self._sign(key_id, body).encode(),
                                   parts[3].encode("utf-8", "replace")):
            raise TokenInvalid("access token signature does not match")
        if expires <= (time.time() if now is None else now):
            raise TokenExpired("access token expired")
        return key

    def _sign(self, key_id: str, body: str) -> str:
        return _b64(hmac.new(self._signing[key_id], body.encode(), hashlib.sha256).digest())


class RateLimiter:
    """A token bucket per key, ``qps`` refill and a burst of one second's worth.

    Per process: with N replicas a key gets up to N x qps in total (documented in the README).
    Only touched from the event loop thread, so it needs no lock.
    """

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: ApiKey, now: float | None = None) -> bool:
        if key.qps <= 0:
            return True
        now = time.monotonic() if now is None else now
        burst = max(1.0, key.qps)
        tokens, last = self._buckets.get(key.key, (burst, now))
        tokens = min(burst, tokens + (now - last) * key.qps)
        if tokens < 1.0:
            self._buckets[key.key] = (tokens, now)
            return False
        self._buckets[key.key] = (tokens - 1.0, now)
        return True
