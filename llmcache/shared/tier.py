"""The shared tier's client: one batched lookup per forward, a background writer, a circuit breaker.

`SharedTier.fetch` (under the model cache's lock, at routing) sends one MGET for the rows that
missed the device bank and returns, per row, the checked states or None; `fetch_pages` looks a
decoder batch's missing pages up as chains (`reads`). A value that fails `values.decode` is
refused, counted by reason and recomputed. `put` hands computed entries to a daemon writer
(bounded queue, in items and bytes; what does not fit is dropped and counted), which writes
them in pipelines with the TTL and `SET NX` (a key is content-addressed: what another replica
wrote there is the same; a key whose value was refused is overwritten). A page whose parent was
dropped is dropped too: no page is written before the page it extends.

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

from . import claims, reads, values
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
    lookups / hits: entries (an encoder's rows, a decoder's pages) looked up in Redis / served
    from it (copied into the device bank); tokens_served: the tokens of those served.
    round_trips: requests sent (one per forward for rows, two at most for pages: which pages
    are held, then the runs of them); latency_s: their total wall time (with the checks of
    what they returned),
    latency_p50_s / latency_p99_s over the last 1024, latency_max_s.
    skipped: entries not looked up, by reason ("down": breaker open, "not_worth": a round trip
    costs more than the rows could save, by the measured estimate).
    refused: values found and not served, by reason (`llmcache.shared.values.REASONS`).
    bytes_read / bytes_written: value bytes received / sent. writes: entries written.
    write_drops: computed entries not written, by reason ("queue_full", "down", "non_finite",
    "parent": the page it extends was not written, "exists": another replica wrote it first).
    errors: failed round trips, by kind ("connection", "timeout", "oom", "permission", "other");
    last_error: the last one's message (credentials masked). queued: entries waiting now.
    claims / waits / wait_s (`Shared.wait`): pages this replica claimed before computing them;
    forwards that waited on another replica's claim, and the seconds they waited.
    compute_s_per_token / round_trip_s: the estimates "auto" lookups decide by (None: unmeasured):
    seconds a computed token costs at the margin (`MarginalCost`), and an exponentially weighted
    mean of a lookup's round trip with its checks.
    """

    url: str
    state: str = "up"
    retry_in_s: float = 0.0
    lookups: int = 0
    hits: int = 0
    tokens_served: int = 0
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
    claims: int = 0
    waits: int = 0
    wait_s: float = 0.0
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
        # (Reads of 256 KiB, not redis-py's 64: a decoder page is hundreds of KiB, and a fetch of
        # a 512-token prefix's pages (24 MB for SmolLM2) took a quarter less time in fewer reads.)
        self.client = redis.Redis.from_url(
            settings.url, socket_timeout=settings.timeout, socket_connect_timeout=settings.connect_timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, socket_read_size=1 << 18, **settings.credentials())
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
        self.dropped: collections.OrderedDict = collections.OrderedDict()  # keys of pages not written (recent)
        self.overwrite: collections.OrderedDict = collections.OrderedDict()  # Redis keys whose value was refused
        # (The thread holds the tier weakly: a tier nobody holds any more ends its writer.)
        self.writer = threading.Thread(target=SharedTier._write_loop, args=(weakref.ref(self), self.queue),
                                       name="llmcache-shared-writer", daemon=True)
        self.writer.start()

    # ---- reading (`reads`) ---------------------------------------------------------------
    def fetch(self, key_prefix: bytes, fingerprint: bytes, wanted: list, features: int, dtype) -> list:
        """Per (row key, ntokens) of `wanted`, its checked host states [ntokens, features] from
        Redis or None. One MGET; never raises."""
        return reads.fetch_rows(self, key_prefix, fingerprint, wanted, features, dtype)

    def fetch_pages(self, key_prefix: bytes, fingerprint: bytes, pages: dict, chains: list, features: int,
                    dtype) -> dict:
        """Decoder pages (`pages`: page key -> (parent key, ntokens); `chains`: per row, the page
        keys it lacks, in order): page key -> checked host states, for the longest run of each
        chain held in Redis from its first page (views of this thread's staging buffer: valid until
        its next `fetch_pages`). Two round trips at most; never raises."""
        return reads.fetch_pages(self, key_prefix, fingerprint, pages, chains, features, dtype)

    def claim(self, key_prefix: bytes, fingerprint: bytes, names: list) -> list:
        """Claim pages this replica is about to compute (`claims.claim`): those another holds."""
        return claims.claim(self, key_prefix, fingerprint, names)

    def await_release(self, key_prefix: bytes, fingerprint: bytes, names: list) -> float:
        """Wait for other replicas' claims on `names` to end (`claims.await_release`)."""
        return claims.await_release(self, key_prefix, fingerprint, names)

    def usable(self, wanted: int, tokens: int) -> bool:
        """Whether a lookup of `wanted` entries (`tokens` tokens) goes to the server: the breaker
        is closed and, with lookup="auto", it is worth a round trip (else counted as skipped)."""
        s = self.stats
        if not self.breaker.usable():
            self._skip("down", wanted)
            return False
        self.forwards += 1
        if self.settings.lookup == "auto" and self.breaker.failures == 0 and self.forwards % self.settings.probe_every \
                and not worth_looking_up(tokens, self.recent_hits, s.compute_s_per_token, s.round_trip_s):
            self._skip("not_worth", wanted)
            return False
        return True

    def refused(self, redis_keys: list) -> None:
        """Values refused at these keys: the next write of each replaces what is there."""
        with self.lock:
            for key in redis_keys:
                self.overwrite[key] = None
                if len(self.overwrite) > 4096:
                    self.overwrite.popitem(last=False)

    def _count(self, elapsed: float, looked_up: int, hits: int, read: int, refused: list, tokens: int,
               trips: int = 1) -> None:
        s = self.stats
        for reason in refused:
            s.refused[reason] = s.refused.get(reason, 0) + 1
        s.bytes_read += read
        s.lookups += looked_up
        s.hits += hits
        s.tokens_served += tokens
        s.round_trips += trips
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
        """Queue computed entries [(key, states [n, F] on any device, not written to again: the
        caller's copy, parent key: b"" but for a page after another)] for the writer, parents
        before children; those that do not fit in the queue, or while the server is down, are
        dropped and counted, and so are the pages after them."""
        with self.lock:
            for row_key, states, parent in items:
                size = states.numel() * states.element_size()
                reason = None
                if self.breaker.is_open():
                    reason = "down"
                elif parent and parent in self.dropped:
                    reason = "parent"
                elif self.queue.qsize() >= self.settings.queue or self.queued_bytes + size > self.settings.queue_bytes:
                    reason = "queue_full"
                if reason is not None:
                    self.stats.write_drops[reason] = self.stats.write_drops.get(reason, 0) + 1
                    self._forget(row_key)
                    continue
                self.queued_bytes += size
                self.queue.put((key_prefix, fingerprint, row_key, states, dtype, size, parent))

    def _forget(self, key: bytes) -> None:
        """`key` was not written: neither are the pages after it (under the lock)."""
        self.dropped[key] = None
        if len(self.dropped) > 4096:
            self.dropped.popitem(last=False)

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
        sizes, written, claimed = [], 0, []
        ttl = self.settings.ttl
        dropped = {"non_finite": 0, "parent": 0}
        for key_prefix, fingerprint, row_key, states, dtype, _, parent in batch:
            host = states.cpu()
            reason = "parent" if parent and parent in self.dropped else None
            if reason is None and not bool(host.isfinite().all()):
                reason = "non_finite"
            if reason is not None:
                dropped[reason] += 1
                with self.lock:
                    self._forget(row_key)
                continue
            value = values.encode(fingerprint, row_key, values.host_bytes(host), dtype, parent)
            key = values.redis_key(key_prefix, fingerprint, row_key)
            with self.lock:
                replace = self.overwrite.pop(key, 1) is None
            pipe.set(key, value, px=int(ttl * 1000) if ttl is not None else None, nx=not replace)
            claimed.append(key + claims.SUFFIX)
            sizes.append(len(value))
            written += 1
        with self.lock:
            for reason, n in dropped.items():
                if n:
                    self.stats.write_drops[reason] = self.stats.write_drops.get(reason, 0) + n
        if not written:
            return
        pipe.delete(*claimed)  # (a claim on a page ends when the page is written, or already was)
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
        replies = replies[:-1]  # (the DEL of the claims)
        failed = [r for r in replies if isinstance(r, Exception)]
        for err in failed[:1]:
            self.breaker.failed(err)
        exists = sum(r is None for r in replies)  # (SET NX: another replica wrote it first)
        with self.lock:
            if failed:
                kind = _kind(failed[0])
                self.stats.write_drops[kind] = self.stats.write_drops.get(kind, 0) + len(failed)
            if exists:
                self.stats.write_drops["exists"] = self.stats.write_drops.get("exists", 0) + exists
            self.stats.writes += written - len(failed) - exists
            self.stats.bytes_written += sum(n for n, r in zip(sizes, replies) if r is True)

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
