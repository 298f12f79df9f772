"""The shared tier's client: one batched lookup per forward, a background writer, a circuit breaker.

`SharedTier.fetch` (under the model cache's lock, at routing) sends one MGET for the rows that
missed the device bank and returns, per row, the checked states or None; a value that fails
`values.decode` is refused, counted by reason and recomputed. `put` hands computed entries to a
daemon writer (bounded queue, in items and bytes; what does not fit is dropped and counted),
which writes them in pipelines with the TTL.

Never fails a forward: a connection error or a timeout (`Shared.timeout`) counts an error and
opens the breaker; while it is open the tier neither reads nor writes (rows compute, entries are
dropped and counted) and after `backoff` (doubling per consecutive failure) one lookup probes
the server again. Errors the server answers (out of memory, no permission) are counted and do
not open it.
"""

from __future__ import annotations

import atexit
import collections
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import values
from .settings import Shared

_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:  # a replica that exits cleanly hands its last entries over
    for tier in list(_LIVE):
        tier.flush(timeout=2.0)


def _after_fork() -> None:  # a forked worker (a prefork server) gets writers of its own
    for tier in list(_LIVE):
        tier._start_writer()


os.register_at_fork(after_in_child=_after_fork)


@dataclass
class SharedStats:
    """The shared tier's counters since `accelerate` (or `reset`).

    state: "up", "down" (breaker open: no reads or writes until `retry_in_s`), "probing".
    lookups / hits: rows looked up in Redis / served from it (copied into the device bank).
    round_trips: lookups sent (one per forward at most); latency_s: their total wall time
    (the MGET and the checks of what it returned),
    latency_p50_s / latency_p99_s over the last 1024, latency_max_s.
    skipped: rows not looked up, by reason ("down": breaker open, "not_worth": a round trip
    costs more than the rows could save, by the measured estimate).
    refused: values found and not served, by reason (`llmcache.shared.values.REASONS`).
    bytes_read / bytes_written: value bytes received / sent. writes: entries written.
    write_drops: computed entries not written, by reason ("queue_full", "down", "non_finite").
    errors: failed round trips, by kind ("connection", "timeout", "oom", "permission", "other");
    last_error: the last one's message (credentials masked). queued: entries waiting now.
    compute_s_per_token / round_trip_s: the estimates "auto" lookups decide by (None: unmeasured):
    seconds a computed token costs at the margin (`MarginalCost`), and an exponentially weighted
    mean of a lookup's round trip with its checks.
    """

    url: str
    state: str = "up"
    retry_in_s: float = 0.0
    lookups: int = 0
    hits: int = 0
    round_trips: int = 0
    latency_s: float = 0.0
    latency_max_s: float = 0.0
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    skipped: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int = 0
    writes: int = 0
    write_drops: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    last_error: str = ""
    queued: int = 0
    compute_s_per_token: float | None = None
    round_trip_s: float | None = None

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


def worth_looking_up(tokens: int, hit_rate: float, compute_s_per_token: float | None,
                     round_trip_s: float | None) -> bool:
    """Whether a lookup of rows with `tokens` real tokens in all pays: its expected saving
    (hit_rate x tokens x compute_s_per_token) exceeds a round trip. Unmeasured: look up."""
    if compute_s_per_token is None or round_trip_s is None:
        return True
    return hit_rate * tokens * compute_s_per_token > round_trip_s


def _kind(err: Exception) -> str:
    import redis

    text = str(err)
    if isinstance(err, (redis.exceptions.NoPermissionError, redis.exceptions.AuthenticationError,
                        redis.exceptions.AuthorizationError)) or "NOPERM" in text or "WRONGPASS" in text:
        return "permission"
    if isinstance(err, redis.exceptions.TimeoutError):
        return "timeout"
    if isinstance(err, redis.exceptions.ConnectionError):
        return "connection"
    if isinstance(err, redis.exceptions.OutOfMemoryError) or text.startswith("OOM") or "'maxmemory'" in text:
        return "oom"
    return "other"


class MarginalCost:
    """Seconds per computed token at the margin: the slope b of y = a + b x fitted by
    exponentially weighted least squares to forwards' (tokens computed x, seconds y), so that
    what every forward pays whatever it computes (embeddings, the call itself) is not counted
    as saved by a hit. Until the tokens vary enough to tell a from b: the mean y / x."""

    def __init__(self, decay: float = 0.97):
        self.decay = decay
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w, self.x, self.y = d * self.w + 1, d * self.x + x, d * self.y + y
        self.xx, self.xy = d * self.xx + x * x, d * self.xy + x * y

    def per_token(self) -> float | None:
        if self.w == 0:
            return None
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if self.w < 4 or var <= (0.05 * mx) ** 2:
            return my / mx
        return min(max((self.xy / self.w - mx * my) / var, 0.0), my / mx)


class Breaker:
    """The circuit breaker of one shared tier: open (no reads or writes) for `backoff` seconds
    after a failed round trip, doubling per consecutive failure; then one lookup probes again.
    Keeps the tier's `stats.state`, `retry_in_s`, `errors` and `last_error`."""

    def __init__(self, tier: SharedTier):
        self.tier = weakref.proxy(tier)
        self.failures = 0
        self.open_until = 0.0

    def is_open(self) -> bool:
        return time.monotonic() < self.open_until

    def usable(self) -> bool:
        stats, now = self.tier.stats, time.monotonic()
        if now < self.open_until:
            stats.state, stats.retry_in_s = "down", self.open_until - now
            return False
        if self.failures:
            stats.state, stats.retry_in_s = "probing", 0.0
        return True

    def failed(self, err: Exception) -> None:
        import redis

        kind, settings = _kind(err), self.tier.settings
        with self.tier.lock:
            stats = self.tier.stats
            stats.errors[kind] = stats.errors.get(kind, 0) + 1
            stats.last_error = settings.masked_url + ": " + str(err).replace(settings.url, "")
            # (No answer, or a refused login: back off. An answered command error: the server is up.)
            if isinstance(err, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
                first, longest = settings.backoff
                self.failures += 1
                wait = min(longest, first * 2 ** (self.failures - 1))
                self.open_until = time.monotonic() + wait
                stats.state, stats.retry_in_s = "down", wait

    def succeeded(self) -> None:
        with self.tier.lock:
            self.failures = 0
            self.open_until = 0.0
            self.tier.stats.state, self.tier.stats.retry_in_s = "up", 0.0


class SharedTier:
    """The Redis client of one accelerated model (see the module docstring)."""

    def __init__(self, settings: Shared):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.settings = settings
        self.client = redis.Redis.from_url(
            settings.url, socket_timeout=settings.timeout, socket_connect_timeout=settings.connect_timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, **settings.credentials())
        self.stats = SharedStats(url=settings.masked_url)
        self.latencies: collections.deque = collections.deque(maxlen=1024)
        self.breaker = Breaker(self)
        self.forwards = 0
        self.recent_hits = 0.5  # an exponentially weighted hit rate of lookups
        self.cost = MarginalCost()
        self.closed = False
        self._start_writer()
        _LIVE.add(self)

    def _start_writer(self) -> None:
        """A fresh queue and writer thread (at start, and in a forked child, where the parent's
        threads do not exist and its locks may be held)."""
        self.lock = threading.Lock()
        self.queue: queue.Queue = queue.Queue()
        self.queued_bytes = 0
        # (The thread holds the tier weakly: a tier nobody holds any more ends its writer.)
        self.writer = threading.Thread(target=SharedTier._write_loop, args=(weakref.ref(self), self.queue),
                                       name="llmcache-shared-writer", daemon=True)
        self.writer.start()

    # ---- reading ----------------------------------------------------------------------
    def fetch(self, key_prefix: bytes, fingerprint: bytes, wanted: list, features: int, dtype) -> list:
        """Per (row key, ntokens) of `wanted`, its checked host states [ntokens, features] from
        Redis or None. One MGET; never raises."""
        s = self.stats
        tokens = sum(n for _, n in wanted)
        if not self.breaker.usable():
            self._skip("down", len(wanted))
            return [None] * len(wanted)
        self.forwards += 1
        if self.settings.lookup == "auto" and self.breaker.failures == 0 and self.forwards % self.settings.probe_every \
                and not worth_looking_up(tokens, self.recent_hits, s.compute_s_per_token, s.round_trip_s):
            self._skip("not_worth", len(wanted))
            return [None] * len(wanted)
        keys = [values.redis_key(key_prefix, fingerprint, k) for k, _ in wanted]
        start = time.perf_counter()
        try:
            found = self.client.mget(keys)
        except Exception as err:  # noqa: BLE001 (any failure of the server: the rows compute)
            self.breaker.failed(err)
            return [None] * len(wanted)
        self.breaker.succeeded()
        out, hits, read, refused = [], 0, 0, []
        for (row_key, n), value in zip(wanted, found):
            if value is None:
                out.append(None)
                continue
            read += len(value)
            states = values.decode(value, fingerprint, row_key, n, features, dtype)
            if isinstance(states, str):
                refused.append(states)
                out.append(None)
                continue
            hits += 1
            out.append(states)
        elapsed = time.perf_counter() - start  # (the round trip and the checks: what a lookup costs)
        with self.lock:
            self._count(elapsed, len(wanted), hits, read, refused)
        return out

    def _count(self, elapsed: float, looked_up: int, hits: int, read: int, refused: list) -> None:
        s = self.stats
        for reason in refused:
            s.refused[reason] = s.refused.get(reason, 0) + 1
        s.bytes_read += read
        s.lookups += looked_up
        s.hits += hits
        s.round_trips += 1
        s.latency_s += elapsed
        s.latency_max_s = max(s.latency_max_s, elapsed)
        self.latencies.append(elapsed)
        s.round_trip_s = elapsed if s.round_trip_s is None else 0.9 * s.round_trip_s + 0.1 * elapsed
        self.recent_hits = 0.9 * self.recent_hits + 0.1 * (hits / looked_up)

    def _skip(self, reason: str, n: int) -> None:
        with self.lock:
            self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + n

    def computed(self, seconds: float, tokens: int) -> None:
        """A forward computed `tokens` real tokens in `seconds` (the cost a shared hit saves)."""
        if tokens > 0:
            with self.lock:
                self.cost.add(tokens, seconds)
                self.stats.compute_s_per_token = self.cost.per_token()

    # ---- writing ----------------------------------------------------------------------
    def put(self, key_prefix: bytes, fingerprint: bytes, items: list, dtype) -> None:
        """Queue computed entries [(row key, states [n, F] on any device, not written to again:
        the caller's copy)] for the writer; those that do not fit in the queue, or while the
        server is down, are dropped and counted."""
        with self.lock:
            for row_key, states in items:
                size = states.numel() * states.element_size()
                reason = None
                if self.breaker.is_open():
                    reason = "down"
                elif self.queue.qsize() >= self.settings.queue or self.queued_bytes + size > self.settings.queue_bytes:
                    reason = "queue_full"
                if reason is not None:
                    self.stats.write_drops[reason] = self.stats.write_drops.get(reason, 0) + 1
                    continue
                self.queued_bytes += size
                self.queue.put((key_prefix, fingerprint, row_key, states, dtype, size))

    @staticmethod
    def _write_loop(ref: weakref.ref, pending: queue.Queue) -> None:
        while True:
            try:
                first = pending.get(timeout=0.5)
            except queue.Empty:
                if ref() is None:
                    return
                continue
            if first is None:
                pending.task_done()
                return
            batch = [first]
            while len(batch) < 64:
                try:
                    item = pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    pending.put(None)  # (seen after this batch)
                    pending.task_done()
                    break
                batch.append(item)
            tier = ref()
            try:
                if tier is not None:
                    tier._write(batch)
            finally:
                if tier is not None:
                    with tier.lock:
                        tier.queued_bytes -= sum(item[5] for item in batch)
                for _ in batch:
                    pending.task_done()
                del tier

    def _write(self, batch: list) -> None:
        pipe = self.client.pipeline(transaction=False)
        sizes, written = [], 0
        ttl = self.settings.ttl
        dropped = 0
        for key_prefix, fingerprint, row_key, states, dtype, _ in batch:
            host = states.cpu()
            if not bool(host.isfinite().all()):
                dropped += 1
                continue
            value = values.encode(fingerprint, row_key, values.host_bytes(host), dtype)
            pipe.set(values.redis_key(key_prefix, fingerprint, row_key), value,
                     px=int(ttl * 1000) if ttl is not None else None)
            sizes.append(len(value))
            written += 1
        if dropped:
            with self.lock:
                self.stats.write_drops["non_finite"] = self.stats.write_drops.get("non_finite", 0) + dropped
        if not written:
            return
        if self.breaker.is_open():
            with self.lock:
                self.stats.write_drops["down"] = self.stats.write_drops.get("down", 0) + written
            return
        try:
            replies = pipe.execute(raise_on_error=False)
        except Exception as err:  # noqa: BLE001
            self.breaker.failed(err)
            with self.lock:
                self.stats.write_drops["down"] = self.stats.write_drops.get("down", 0) + written
            return
        failed = [r for r in replies if isinstance(r, Exception)]
        for err in failed[:1]:
            self.breaker.failed(err)
        with self.lock:
            if failed:
                kind = _kind(failed[0])
                self.stats.write_drops[kind] = self.stats.write_drops.get(kind, 0) + len(failed)
            self.stats.writes += written - len(failed)
            self.stats.bytes_written += sum(n for n, r in zip(sizes, replies) if not isinstance(r, Exception))

    # ---- lifetime ---------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the writer has sent everything queued (at most `timeout` s). True: done."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline and self.writer.is_alive():
            time.sleep(0.002)
        return not self.queue.unfinished_tasks

    def close(self) -> None:
        """Flush briefly, stop the writer and close the connections."""
        if self.closed:
            return
        self.closed = True
        self.flush(timeout=1.0)
        self.queue.put(None)
        self.writer.join(timeout=1.0)
        self.client.close()
        _LIVE.discard(self)

    def snapshot(self) -> SharedStats:
        with self.lock:
            self.breaker.usable()
            s = SharedStats(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.stats.__dict__.items()})
            s.queued = self.queue.qsize()
            if self.latencies:
                ordered = np.sort(np.fromiter(self.latencies, dtype=np.float64))
                s.latency_p50_s = float(ordered[len(ordered) // 2])
                s.latency_p99_s = float(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])
            return s

    def reset_stats(self) -> None:
        with self.lock:
            self.stats = SharedStats(url=self.settings.masked_url, compute_s_per_token=self.stats.compute_s_per_token,
                                     round_trip_s=self.stats.round_trip_s)
            self.latencies.clear()
