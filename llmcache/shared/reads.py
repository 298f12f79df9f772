"""The shared tier's lookups: whole rows (one MGET) and decoder pages as chains (one pipeline of
EXISTS over every page a batch lacks, then one MGET of the runs found), checked by
`values.decode` before anything is served. Both count into the one `SharedTier`'s stats and
answer its breaker; neither raises.
"""

from __future__ import annotations

import threading
import time

import torch

from . import values

_local = threading.local()  # per thread: the host buffer fetched pages are decoded into


def _staging(rows: int, features: int, dtype) -> torch.Tensor:
    """This thread's host buffer [rows, features] of `dtype` (grown, kept: a fresh one of a
    fetch's size costs more in page faults than the copy into it)."""
    size = rows * features * torch.empty((), dtype=dtype).element_size()
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.numel() < size:
        with torch.inference_mode(False), torch.no_grad():
            buf = torch.empty(max(size, 2 * (buf.numel() if buf is not None else 0)), dtype=torch.uint8)
        _local.buffer = buf
    return buf[:size].view(dtype).view(rows, features)


def fetch_rows(tier, key_prefix: bytes, fingerprint: bytes, wanted: list, features: int, dtype) -> list:
    """`SharedTier.fetch`."""
    if not tier.usable(len(wanted), sum(n for _, n in wanted)):
        return [None] * len(wanted)
    keys = [values.redis_key(key_prefix, fingerprint, k) for k, _ in wanted]
    start = time.perf_counter()
    try:
        found = tier.client.mget(keys)
    except Exception as err:  # noqa: BLE001 (any failure of the server: the rows compute)
        tier.breaker.failed(err)
        return [None] * len(wanted)
    tier.breaker.succeeded()
    out, read, refused, bad = [], 0, [], []
    for (row_key, n), key, value in zip(wanted, keys, found):
        states = None
        if value is not None:
            read += len(value)
            states = values.decode(value, fingerprint, row_key, n, features, dtype)
            if isinstance(states, str):
                refused.append(states)
                bad.append(key)
                states = None
        out.append(states)
    served = [s for s in out if s is not None]
    tier.refused(bad)
    with tier.lock:  # (the round trip and the checks: what a lookup costs)
        tier._count(time.perf_counter() - start, len(wanted), len(served), read, refused,
                    sum(s.shape[0] for s in served))
    return out


def fetch_pages(tier, key_prefix: bytes, fingerprint: bytes, pages: dict, chains: list, features: int,
                dtype) -> dict:
    """`SharedTier.fetch_pages`: a chain's run stops at its first page that is missing or refused;
    pages held after it are orphans (counted, not read). The states are views of this thread's
    staging buffer, valid until its next fetch of pages."""
    names = list(pages)
    if not names or not tier.usable(len(names), sum(n for _, n in pages.values())):
        return {}
    keys = {name: values.redis_key(key_prefix, fingerprint, name) for name in names}
    start = time.perf_counter()
    try:
        pipe = tier.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(keys[name])
        held = dict(zip(names, (bool(h) for h in pipe.execute())))
        runs = [_run(chain, held) for chain in chains]
        wanted = list(dict.fromkeys(name for run in runs for name in run))
        found = dict(zip(wanted, tier.client.mget([keys[n] for n in wanted]))) if wanted else {}
    except Exception as err:  # noqa: BLE001 (any failure of the server: the pages compute)
        tier.breaker.failed(err)
        return {}
    tier.breaker.succeeded()
    checked, read, refused, bad = _decode_pages(found, pages, fingerprint, features, dtype)
    bad = [keys[name] for name in bad]
    out = {}
    for chain, run in zip(chains, runs):
        good = _run(run, {name: True for name in run if name in checked})
        out.update((name, checked[name]) for name in good)
        refused += ["orphan"] * sum(held[name] for name in chain[len(good) + 1 :] if name not in out)
    tier.refused(bad)
    with tier.lock:
        tier._count(time.perf_counter() - start, len(names), len(out), read, refused,
                    sum(s.shape[0] for s in out.values()), trips=2 if wanted else 1)
    return out


def _decode_pages(found: dict, pages: dict, fingerprint: bytes, features: int, dtype) -> tuple:
    """Check the values `found` (page key -> value or None) into one host buffer (one copy of
    each payload, one finiteness pass over all): (page key -> states, bytes read, refusal
    reasons, refused page keys)."""
    present = [name for name, value in found.items() if value is not None]  # (None: expired since EXISTS)
    counts = [pages[name][1] for name in present]
    buffer = _staging(sum(counts), features, dtype)
    checked, refused, bad, read, at = {}, [], [], 0, 0
    for name, n in zip(present, counts):
        value = found[name]
        read += len(value)
        states = values.decode(value, fingerprint, name, n, features, dtype, pages[name][0], out=buffer[at : at + n])
        if isinstance(states, str):
            refused.append(states)
            bad.append(name)
        else:
            checked[name] = (states, at)
        at += n
    if checked:
        finite = values.finite_rows(buffer).numpy()
        for name in [name for name, (states, first) in checked.items()
                     if not finite[first : first + states.shape[0]].all()]:
            del checked[name]
            refused.append("non_finite")
            bad.append(name)
    return {name: states for name, (states, _) in checked.items()}, read, refused, bad


def _run(chain: list, present) -> list:
    """The leading names of `chain` that `present` holds (truthy)."""
    for i, name in enumerate(chain):
        if not present.get(name):
            return chain[:i]
    return chain
