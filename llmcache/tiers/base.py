"""What every tier is to the router: one protocol, one per-call record, typed routes.

The router (`llmcache.router.ModelCache`) knows tiers only through `Tier`'s verbs. Per forward
it builds one `Call`, gathers each tier's `payload` (device integers it needs on the host) into
the forward's single host copy, then asks each tier in order to `route` the call; the first
route returned decides how the forward runs. A route is a `Route` subclass, matched by type, and
says what it served in the fields the router counts. After the forward, `finish` gives every
tier the output (the verified tier judges its checks there). `clear`, `invalidate`, `report`,
`held`, `state_dict`/`load_state_dict`/`adopt`, `reset_stats` and `close` are how `reset`,
`state.ModelState`'s watch, `stats`, `held`, `save`/`load` and `disable` reach every tier
without naming one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Route:
    """How a tier routes one forward; what the router counts for it."""

    served: int = 0  # rows served from the bank (whole rows, semantic hits included)
    semantic_rows: tuple = ()  # of them, the rows served a neighbour's entry by the verified tier
    repeats: int = 0  # rows repeating an earlier row of their batch (computed once, copied)
    prefix_rows: int = 0  # decoder rows that compute only the tokens after their cached prefix
    tokens: tuple = (0, 0)  # (real tokens served, real tokens computed)


@dataclass
class Call:
    """One base-model forward that the cache routes (built by the router, read by the tiers)."""

    arguments: dict  # the call's bound arguments
    kv_cache: object | None  # the KV cache it was given
    switches: bytes  # the model's state header (llmcache.state)
    header: bytes  # the key header: namespace and state (rows.key_header)
    padding: tuple = (False, False)  # whether the caller sees a row's (leading, trailing) padding
    seq: int = 0  # T: positions of the hidden states the blocks see
    device: torch.device | None = None  # where the batch is
    inputs: tuple | None = None  # (ids, mask, positions, token types) as given, None where not (None: pixels)
    batch: torch.Tensor | None = None  # `device_batch()`'s, once made
    host: np.ndarray | None = None  # the same on the host, once the router has copied it
    parts: dict = field(default_factory=dict)  # tier -> its payload's host copy
    counts: dict = field(default_factory=dict)  # reason -> rows not cached, found while routing
    pixels: torch.Tensor | None = None  # int64 [B, 2]: a pixel model's image hashes (routed at its first block)
    route: Route | None = None
    near: object | None = None  # verified.Neighbours: the verified tier's part of this forward
    capture: list | None = None  # the last block's outputs, recorded during a suffix call or a decode step
    track: object | None = None  # a decoder's prefill: the following of its KV cache it started (`exact.extend`)
    elapsed: float = 0.0  # seconds the model's own forward took


    def device_batch(self) -> torch.Tensor | None:
        """int64 [4, B, T] on the batch's device: ids, mask (1 where not given), position ids (0..T-1
        where not given) and token types (0 where not given); None for a pixel model. Made on first
        use (the exact tier routes on the host copy and never asks for it)."""
        if self.batch is None and self.inputs is not None:
            ids, mask, positions, types = self.inputs
            mask = torch.ones_like(ids) if mask is None else mask.expand_as(ids)
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids) if positions is None \
                else positions.expand_as(ids)
            types = torch.zeros_like(ids) if types is None else types.expand_as(ids)
            self.batch = torch.stack([ids.long(), mask.long(), positions.long(), types.long()])
        return self.batch


class Tier:
    """A tier of the cache. Every verb has a do-nothing default; a tier implements what it does.
    `host`: its `route` reads the router's host copy of the batch (False: it routes on the device)."""

    host = True

    def payload(self, call: Call) -> torch.Tensor | None:
        """Device integers (int64, any shape) this tier needs on the host to route `call`; they
        come back in `call.parts[self]` from the forward's one host copy."""
        return None

    def route(self, call: Call) -> Route | None:
        """How this tier serves `call` (under the owner's lock), or None: not this tier's."""
        return None

    def run(self, call: Call, forward):
        """Run a forward whose route this tier made and runs itself (None: the model's own
        forward runs, through the patched blocks). `forward(**kwargs)`: the model's own."""
        return

    def follows(self, cache) -> bool:
        """Whether this tier follows the KV cache `cache` through decode steps."""
        return False

    def step(self, call: Call, reason: str | None) -> Route | None:
        """The route of a decode step on a cache it follows (`reason`: why the model's state
        rules caching out, or None), or None: the step runs unrecorded and the following ends."""
        return None

    def finish(self, call: Call, output, top: bool) -> None:
        """The forward ran: `output` is the base model's (`top`: the accelerated wrapper's)."""

    def abort(self, call: Call) -> None:
        """The forward raised (or never reached the last cached block): give back what it reserved."""

    def clear(self) -> None:
        """Forget every entry (and what was measured about them)."""

    def invalidate(self, dtype: torch.dtype, device: torch.device) -> None:
        """The model's function changed (weights, module tree): nothing computed before may be
        served; store in `dtype` on `device` from now on."""
        self.clear()

    def report(self, counters) -> dict:
        """This tier's part of `llmcache.CacheStats`, as field -> value (`counters`: the router's
        `Counters`); the seconds fields (`fingerprint_s`, `lookup_s`) add up over tiers."""
        return {}

    def held(self) -> list:
        """The `llmcache.HeldEntry`s it holds (the exact tier), or []."""
        return []

    def held_layers(self) -> dict:
        """Block index -> entries held there (the per-block tier), or {}."""
        return {}

    def fingerprint(self, base) -> bytes | None:
        """The model fingerprint its entries are valid for (`state.model_fingerprint`), or None."""
        return None

    def state_dict(self, fingerprint: bytes) -> tuple[dict, dict]:
        """(tensors, meta) of what it holds, for `llmcache.save`."""
        return {}, {}

    def load_state_dict(self, tensors: dict, meta: dict, fingerprint: bytes):
        """What `state_dict` wrote, rebuilt and checked beside the live state (ValueError saying
        why when it does not fit); `adopt` swaps it in."""
        return

    def adopt(self, built) -> None:
        """Swap in what `load_state_dict` built."""

    def flush(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) for its background writes; True when none is left."""
        return True

    def reset_stats(self) -> None:
        """Zero its counters (`llmcache.reset`)."""

    def close(self) -> None:
        """Free what it holds for good (`llmcache.disable`)."""
        self.clear()
