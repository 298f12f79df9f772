"""The per-block tier (`CacheConfig.threshold`, the paper's design) as one `Tier`: its layers'
banks, the forward's context, and the fingerprint of the input embeddings.

The raw `threshold` tier is an experts' tool: semantic hits change outputs and it keeps no error
bound. The bounded tier is `llmcache.Semantic` (tiers/verified.py), behind the exact tier.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ...integrity import checksum, raw
from ...ops.simhash import simhash_pooled_unchecked
from ...state import model_fingerprint
from ..base import Call, Tier
from .context import LayerwiseRoute, token_context
from .layer import CachedLayer, LayerStats
from .ring_buffer import RingBuffer

BANK_FIELDS = ("codes", "keys", "tags", "valid", "last_used", "hit_count", "rate", "rate_tick", "values")


class LayerwiseTier(Tier):
    """Per-block banks of the cached layers `layer_ids` (block index -> `CachedLayer`)."""

    host = False  # (it routes on the device: every row's tag and key are made there)

    def __init__(self, owner, blocks, layer_ids: list[int]):
        self.owner = owner
        self.layer_ids = layer_ids
        self.layers = {index: CachedLayer(owner, index, position, blocks[index])
                       for position, index in enumerate(layer_ids)}

    def route(self, call: Call) -> LayerwiseRoute:
        if call.pixels is not None:  # (its context is made at its first block)
            return LayerwiseRoute()
        ids, mask, positions, types = call.device_batch()
        return LayerwiseRoute(context=token_context(self.owner, call.header, ids, mask, positions, types,
                                                    call.kv_cache))

    def embed(self, original, *args, **kwargs):
        """The input embedding's forward (`original`), fingerprinted for the semantic lookups:
        SimHash of the mean over real tokens; for a pixel model, of all its patches."""
        embeds = original(*args, **kwargs)
        call = self.owner.current()
        route = call.route if call is not None else None
        if not isinstance(route, LayerwiseRoute) or self.owner.config.layerwise.fingerprint != "embeddings" or embeds.dim() != 3:
            return embeds
        ctx = route.context
        if ctx is not None and embeds.shape[:2] == ctx.mask.shape:
            mask = ctx.mask
        elif call.pixels is not None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.int64, device=embeds.device)
        else:
            return embeds
        start = time.perf_counter()
        # Unchecked: embeds, mask and planes are the cache's own, valid by construction.
        codes = simhash_pooled_unchecked(embeds, mask, self.owner.planes, backend=self.owner.config.backend)
        if ctx is not None:
            ctx.codes = codes
        else:
            route.pixel_codes = codes
        self.owner.counters.fingerprint_s += time.perf_counter() - start
        return embeds

    # ---- the Tier verbs -------------------------------------------------------------------
    def clear(self) -> None:
        for layer in self.layers.values():
            if layer.bank is not None:
                layer.bank.reset()

    def reset_stats(self) -> None:
        for layer in self.layers.values():
            layer.stats = LayerStats(layer=layer.index, bytes=layer.stats.bytes)

    def report(self, counters) -> dict:
        layers = [LayerStats(**vars(layer.stats)) for layer in self.layers.values()]
        for layer, snapshot in zip(self.layers.values(), layers):
            snapshot.bytes = layer.bank.nbytes if layer.bank is not None else 0
        total = lambda name: sum(getattr(s, name) for s in layers)
        held = total("bytes")
        return {"tier": "semantic", "layers": layers, "lookups": total("lookups"), "hits": total("hits"),
                "exact_hits": total("exact_hits"), "semantic_hits": total("semantic_hits"),
                "insertions": total("insertions"), "evictions": total("evictions"),
                "entries": sum(layer.bank.occupied for layer in self.layers.values() if layer.bank is not None),
                "bytes": held, "bytes_reserved": held, "fingerprint_s": total("fingerprint_s"),
                "lookup_s": total("lookup_s")}

    def held_layers(self) -> dict:
        return {i: (layer.bank.occupied if layer.bank is not None else 0) for i, layer in self.layers.items()}

    def fingerprint(self, base) -> bytes:
        return model_fingerprint(base, self.layer_ids, 0, self.owner.state.dtype)

    def state_dict(self, fingerprint: bytes) -> tuple[dict, dict]:
        tensors, meta = {}, {}
        for index, layer in self.layers.items():
            bank = layer.bank
            if bank is None:
                continue
            meta[str(index)] = {"tick": bank.tick, "capacity": bank.capacity}
            fields = {name: getattr(bank, name).detach().contiguous().cpu().clone() for name in BANK_FIELDS}
            fields["values"][~fields["valid"]] = 0  # slots never written hold uninitialised memory
            for name, t in fields.items():
                tensors[f"layer{index}.{name}"] = t
            tensors[f"layer{index}.checksums"] = torch.from_numpy(_slot_checksums(fingerprint, fields))
        return tensors, meta

    def load_state_dict(self, tensors: dict, meta: dict, fingerprint: bytes) -> dict:
        built = {}
        for key, layer_meta in meta.items():
            if not key.isdigit():
                continue
            index = int(key)
            if index not in self.layers:
                raise ValueError(f"the file holds layer {index}, which this config does not cache")
            fields = {name: tensors[f"layer{index}.{name}"] for name in BANK_FIELDS}
            if not np.array_equal(_slot_checksums(fingerprint, fields), tensors[f"layer{index}.checksums"].numpy()):
                raise ValueError(f"layer {index}'s bank does not match its checksums (a corrupted or edited file)")
            built[index] = self._rebuild_bank(fields, layer_meta)
        return built

    def adopt(self, built: dict) -> None:
        for index, layer in self.layers.items():
            layer.bank = built.get(index)
            layer.stats.bytes = layer.bank.nbytes if layer.bank is not None else 0

    def _rebuild_bank(self, saved: dict, meta: dict) -> RingBuffer:
        cfg = self.owner.config
        values = saved["values"]
        capacity, words = saved["codes"].shape
        if capacity != int(meta["capacity"]) or any(saved[n].shape[0] != capacity for n in BANK_FIELDS):
            raise ValueError("the bank tensors disagree on the capacity")
        bank = RingBuffer(capacity, words, tuple(values.shape[1:]), values.dtype, self.owner.planes.device,
                          cfg.layerwise.eviction, cfg.layerwise.staleness_half_life, cfg.backend)
        for name in BANK_FIELDS:
            target = getattr(bank, name)
            if target.shape != saved[name].shape or target.dtype != saved[name].dtype:
                raise ValueError(f"bank tensor {name} has shape {tuple(saved[name].shape)} {saved[name].dtype}, "
                                 f"expected {tuple(target.shape)} {target.dtype}")
            target.copy_(saved[name])
        if not torch.isfinite(bank.values[bank.valid]).all():
            raise ValueError("the file holds non-finite cached states")
        bank.tick = int(meta["tick"])
        bank.filled = capacity  # which slots were ever used is not saved: victims by policy from now on
        return bank


def _slot_checksums(fingerprint: bytes, fields: dict) -> np.ndarray:
    data = [raw(fields[name]) for name in BANK_FIELDS]
    return np.stack([checksum(fingerprint, *(d[slot].tobytes() for d in data)) for slot in range(data[0].shape[0])]) \
        if data[0].shape[0] else np.zeros((0, 16), dtype=np.uint8)
