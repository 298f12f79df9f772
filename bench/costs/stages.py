"""Where the cache's own host time goes: microseconds per forward, stage by stage.

    with stages.timed(model) as timer:
        for _ in range(n):
            with timer.forward():
                model(**batch)
    timer.per_forward()   # {"watch": us, "keys": us, ..., "own": us}: medians over the forwards

It wraps the library's internal functions (bench code may; tests may not) with timers while the
block is open, and restores them after. Stages (exclusive times; per forward they add up to `own`):
  watch      the model-state check (`state.ModelState.check`: weights, switches, adapters)
  router     the rest of the router's per-call work: argument binding, the gate, the key header,
             the [4, B, T] batch, the call stack, counters
  host_copy  the forward's one copy of the batch (and each tier's payload) to the host
  keys       spans and content-addressed keys of every row / page (`rows.row_keys`, `rows.page_keys`;
             `rows.spans`, `rows.chain_keys`)
  index      routing on the index: lookups, reservations, evictions, the plan's host arrays
  upload     the plan's index arrays to the device
  read       the served states read from the arena (device work on a GPU: a gather kernel)
  splice     the per-block wrapper around the span blocks: argument slicing, K/V stand-ins (and
             an encoder's embeddings wrapper, its own computation excluded)
  merge      the last block's merge of served and computed rows; decoders' K/V for the model's cache
  commit     publishing the computed rows' entries (the index, the pending finiteness flags)
  write      their states written into the arena (device work on a GPU: a scatter kernel; on the
             CPU also the first touch of each 4 KiB of arena memory while the bank grows, which a
             full bank, reusing its pages, no longer pays: `bench.costs.cold`)
  suffix     a prefix hit's own work around the model's forward over the suffix (the prefix's
             K/V cache, the outputs at the prefix positions; its pages' arena write is "write")
The wrappers cost ~0.3 us a call themselves (about 30 calls a forward on a 16-block decoder).
Each stage is the median over the forwards timed, `own` the median of their sums (so the stages
need not add up to it exactly) and `host` that of their sums without `read` and `write`, the copies
a GPU makes on the device (their launches cost its host a few µs).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict

from llmcache import rows
from llmcache.bank.arena import PagedArena
from llmcache.patch import patched
from llmcache.router import ModelCache
from llmcache.state import ModelState
from llmcache.tiers.exact import plan as plans
from llmcache.tiers.exact.blocks import BlockSplice
from llmcache.tiers.exact.tier import ExactTier

# (timer name, owner, attribute): inclusive timers
TARGETS = [("begin", ModelCache, "_begin"), ("watch", ModelState, "check"),
           ("host_copy", ModelCache, "_host_copy"), ("route", ExactTier, "route"), ("keys", rows, "chain_keys"),
           # (one name for the key functions: the references call spans and chain_keys inside
           # row_keys / page_keys, and a name's nested calls are not timed again)
           ("keys", rows, "spans"), ("keys", rows, "row_keys"), ("keys", rows, "page_keys"),
           ("upload", plans, "upload"), ("read", PagedArena, "read"),
           ("read_tokens", PagedArena, "read_tokens"),
           ("merge", BlockSplice, "_merge"), ("kv", BlockSplice, "_kv"), ("kv", BlockSplice, "_give_served"),
           ("commit", BlockSplice, "_insert"),
           ("write", PagedArena, "write_tokens")]


class Timer:
    def __init__(self):
        self.total = defaultdict(float)
        self.depth = defaultdict(int)
        self.forwards: list[dict] = []  # per forward timed (`forward`): its exclusive µs by stage

    def wrap(self, name: str, fn):
        total, depth = self.total, self.depth

        def timed(*args, **kwargs):
            if depth[name]:  # (recursion: time the outermost call only)
                return fn(*args, **kwargs)
            depth[name] += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total[name] += time.perf_counter() - start
                depth[name] -= 1

        timed.__wrapped__ = fn
        return timed

    @contextlib.contextmanager
    def forward(self):
        """Around one forward: its stages are kept apart (`per_forward` takes medians over them)."""
        before = dict(self.total)
        yield
        self.forwards.append(_exclusive({k: v - before.get(k, 0.0) for k, v in self.total.items()}))

    def per_forward(self) -> dict:
        """Exclusive microseconds per forward of each stage and `own` (their sum), medians over the
        forwards timed: one cold or interrupted forward does not move them."""
        return {k: statistics.median(f[k] for f in self.forwards) for k in self.forwards[0]}


def _exclusive(seconds: dict) -> dict:
    """Exclusive µs by stage, and `own`, from one forward's inclusive timers (seconds)."""
    t = {k: 1e6 * v for k, v in seconds.items()}
    g = lambda k: t.get(k, 0.0)
    route_rest = g("route") - g("keys") - g("upload") - g("read") - g("read_tokens")
    out = {"watch": g("watch"), "router": g("begin") - g("watch") - g("host_copy") - g("route"),
           "host_copy": g("host_copy"), "keys": g("keys"), "index": route_rest, "upload": g("upload"),
           "read": g("read") + g("read_tokens"),
           "splice": g("splice") - g("blocks") - g("merge") - g("kv") - g("commit"),
           "merge": g("merge") + g("kv"), "commit": g("commit") - g("write"), "write": g("write"),
           # (a suffix forward writes its pages inside the run: "write" has them)
           "suffix": g("run") - g("model_in_run") - g("write") if g("run") else 0.0}
    out = {k: max(v, 0.0) for k, v in out.items()}
    out["own"] = sum(out.values())
    out["host"] = out["own"] - out["read"] - out["write"]
    return out


@contextlib.contextmanager
def timed(model):
    """Inside, the cache's stages are timed (each forward inside `timer.forward()`, then
    `Timer.per_forward`); `model` an accelerated model."""
    import llmcache

    timer, restore = Timer(), []
    owner = llmcache.api.owner_of(model)
    for name, holder, attr in TARGETS:
        original = getattr(holder, attr, None)
        if original is None:  # (an older checkout without this function: its stage reads 0)
            continue
        restore.append((holder, attr, original))
        setattr(holder, attr, timer.wrap(name, original))
    forward = owner.original_forward
    owner.original_forward = timer.wrap("model", forward)
    run = ExactTier.run

    def run_timed(self, call, fwd):  # the model's forward inside a suffix run, timed apart
        return run(self, call, timer.wrap("model_in_run", fwd))

    ExactTier.run = timer.wrap("run", run_timed)
    splices = [t.splice for t in owner.tiers if isinstance(t, ExactTier)]
    originals = [list(s.originals) for s in splices]
    for s in splices:
        s.originals = [timer.wrap("blocks", f) for f in s.originals]
    # (An encoder's embeddings, where they run, are the model's own work inside a patched forward.)
    embeddings = [t.embeddings for t in owner.tiers if isinstance(t, ExactTier) and t.embeddings is not None]
    for e in embeddings:
        e.original = timer.wrap("blocks", e.original)
    # (`patch.Patch`es of forwards: the base model's call, the blocks' splice; a decoder's generate apart)
    modules = list({id(m): m for m in owner.patched if patched(m) is not None}.values())
    patches = [patched(m) for m in modules]
    cached = [p.cached for p in patches]
    for m, p in zip(modules, patches):
        p.cached = timer.wrap("call" if m is owner.base else "splice", p.cached)
    try:
        yield timer
    finally:
        ExactTier.run = run
        for holder, attr, original in reversed(restore):
            setattr(holder, attr, original)
        owner.original_forward = forward
        for s, o in zip(splices, originals):
            s.originals = o
        for e in embeddings:
            e.original = e.original.__wrapped__
        for p, c in zip(patches, cached):
            p.cached = c
