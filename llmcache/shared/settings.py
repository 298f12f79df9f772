"""`Shared`: where the shared tier lives (a Redis URL) and how politely it uses it.

    llmcache.accelerate(model, shared="redis://cache-host:6379/0")
    llmcache.accelerate(model, shared=llmcache.Shared("redis://tenant-a@cache-host:6379/0", ttl=3600))

Credentials come from the URL (`redis://user:password@host:port/db`, `rediss://` for TLS) or,
when the URL has none, from `LLMCACHE_REDIS_USERNAME` / `LLMCACHE_REDIS_PASSWORD`. They are
never printed: `repr`, `stats` and errors show the URL with the password masked.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

LOOKUPS = ("auto", "always")
_SAFE_NAMESPACE = re.compile(r"[A-Za-z0-9_.\-]*")


def mask(url: str) -> str:
    """`url` with its password (in the netloc or a `password=` query parameter) replaced by ***."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    if parts.query:
        query = [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="*"))
    return urlunsplit(parts)


@dataclass(frozen=True)
class Shared:
    """A shared tier on Redis behind the device bank (exact entries only: lossless).

    Attributes:
        url: "redis://[user[:password]@]host[:port][/db]" (or "rediss://", "unix://").
        ttl: seconds an entry lives in Redis after it is written (None: until evicted by the
            server's memory policy; run the server with `maxmemory` and `allkeys-lru` either way).
        timeout: seconds the server may stay silent during a lookup (per socket read: a large
            reply that keeps arriving is read to its end) before the forward computes without
            it (and the tier counts an error and backs off).
        connect_timeout: seconds a (re)connection may take.
        queue: computed entries waiting for the background writer; more are dropped and counted.
        queue_bytes: the same bound in bytes of states.
        lookup: "auto": look up only where a round trip costs less than the work it can save
            (both measured as the model runs; a probe every `probe_every` forwards keeps the
            estimate fresh); "always": every forward with a local miss looks up.
        backoff: (first, longest) seconds the tier stays away from a server that failed; it
            doubles per consecutive failure and resets at the first success.
        prefix: the first part of every key: "<prefix>:<namespace>:<digest>" (a namespace
            outside [A-Za-z0-9_.-] is written as "~" and its UTF-8 hex).
        probe_every: with lookup="auto", a forward looks up at least this often.
        wait: seconds a decoder's forward may wait for pages another replica is computing
            (0: never). With wait > 0, a forward about to compute two or more pages of a row
            claims the first of them in Redis (`SET NX`, expiring after `wait`); a forward that
            finds that claim held waits until the holder's pages are written (its writer drops
            the claim with them) or `wait` passes, then reads what was written and computes only
            the rest. For replicas that start on the same long prompt at once (a fleet's first
            requests after a deploy); the wait holds the model cache's lock.
    """

    url: str = field(repr=False)
    ttl: float | None = 86400.0
    timeout: float = 0.05
    connect_timeout: float = 0.25
    queue: int = 1024
    queue_bytes: int = 64 << 20
    lookup: str = "auto"
    backoff: tuple = (0.25, 30.0)
    prefix: str = "llmcache"
    probe_every: int = 32
    wait: float = 0.0

    def __post_init__(self):
        def need(ok, name, allowed):
            if not ok:
                shown = mask(self.url) if name == "url" and isinstance(self.url, str) else getattr(self, name)
                raise ValueError(f"Shared.{name} = {shown!r} is invalid: expected {allowed}")

        need(isinstance(self.url, str) and urlsplit(self.url).scheme in ("redis", "rediss", "unix"), "url",
             "a redis://, rediss:// or unix:// URL")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        need(self.ttl is None or (number(self.ttl) and self.ttl > 0), "ttl", "None or seconds > 0")
        need(number(self.timeout) and self.timeout > 0, "timeout", "seconds > 0")
        need(number(self.connect_timeout) and self.connect_timeout > 0, "connect_timeout", "seconds > 0")
        need(isinstance(self.queue, int) and self.queue > 0, "queue", "an int > 0")
        need(isinstance(self.queue_bytes, int) and self.queue_bytes > 0, "queue_bytes", "an int > 0")
        need(self.lookup in LOOKUPS, "lookup", f"one of {LOOKUPS}")
        need(isinstance(self.backoff, tuple) and len(self.backoff) == 2 and all(number(b) and b > 0 for b in self.backoff)
             and self.backoff[0] <= self.backoff[1], "backoff", "(first, longest) seconds, 0 < first <= longest")
        need(isinstance(self.prefix, str) and bool(_SAFE_NAMESPACE.fullmatch(self.prefix)) and self.prefix != "",
             "prefix", "a non-empty str of [A-Za-z0-9_.-]")
        need(isinstance(self.probe_every, int) and self.probe_every > 0, "probe_every", "an int > 0")
        need(number(self.wait) and self.wait >= 0, "wait", "seconds >= 0")

    def __repr__(self) -> str:
        return (f"Shared(url={mask(self.url)!r}, ttl={self.ttl}, timeout={self.timeout}, lookup={self.lookup!r}, "
                f"queue={self.queue}, prefix={self.prefix!r}, wait={self.wait})")

    @property
    def masked_url(self) -> str:
        return mask(self.url)

    def credentials(self) -> dict:
        """username/password for the client: the URL's, else the environment's, else none."""
        parts = urlsplit(self.url)
        if parts.password is not None or parts.username or "password" in parts.query.lower():
            return {}  # redis-py reads them from the URL
        out = {}
        if os.environ.get("LLMCACHE_REDIS_USERNAME"):
            out["username"] = os.environ["LLMCACHE_REDIS_USERNAME"]
        if os.environ.get("LLMCACHE_REDIS_PASSWORD"):
            out["password"] = os.environ["LLMCACHE_REDIS_PASSWORD"]
        return out

    def key_prefix(self, namespace: str) -> bytes:
        """b"<prefix>:<namespace>:" (the part of a key an ACL pattern `~<prefix>:<namespace>:*` matches)."""
        shown = namespace if _SAFE_NAMESPACE.fullmatch(namespace) else "~" + namespace.encode().hex()
        return f"{self.prefix}:{shown}:".encode()
