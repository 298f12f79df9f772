"""Claims on pages being computed (`Shared.wait`): a forward about to compute a row's pages
claims the first of them (`SET NX` of "<page's key>:claim", expiring after `wait`); a forward
that finds the claim held waits until it is gone (the holder's writer deletes it in the pipeline
that writes the page) or `wait` passes, polling with one `EXISTS` per round. Neither raises: a
failed round trip answers the breaker, and the forward computes.
"""

from __future__ import annotations

import time

from . import values

SUFFIX = b":claim"
POLL_S = 0.005


def claim(tier, key_prefix: bytes, fingerprint: bytes, names: list) -> list:
    """Claim the pages `names` (page keys) for `tier.settings.wait` seconds; the names another
    replica holds a claim on (an error: none, the forward computes them)."""
    if not names or not tier.breaker.usable():
        return []
    ttl_ms = max(1, int(tier.settings.wait * 1000))
    try:
        pipe = tier.client.pipeline(transaction=False)
        for name in names:
            pipe.set(values.redis_key(key_prefix, fingerprint, name) + SUFFIX, b"1", px=ttl_ms, nx=True)
        won = pipe.execute()
    except Exception as err:  # noqa: BLE001 (the forward computes: nothing waits on a claim that failed)
        tier.breaker.failed(err)
        return []
    with tier.lock:
        tier.stats.claims += sum(bool(w) for w in won)
    return [name for name, w in zip(names, won) if not w]


def await_release(tier, key_prefix: bytes, fingerprint: bytes, names: list) -> float:
    """Wait until no claim on `names` is held, at most `tier.settings.wait` seconds; the seconds waited."""
    keys = [values.redis_key(key_prefix, fingerprint, name) + SUFFIX for name in names]
    start = time.monotonic()
    deadline = start + tier.settings.wait
    try:
        while tier.client.exists(*keys) and time.monotonic() < deadline:
            time.sleep(POLL_S)
    except Exception as err:  # noqa: BLE001
        tier.breaker.failed(err)
    waited = time.monotonic() - start
    with tier.lock:
        tier.stats.waits += 1
        tier.stats.wait_s += waited
    return waited
