"""`save` / `load`: what an accelerated model's cache holds, to and from a safetensors file.

Never pickle: safetensors holds only tensors and a string-to-string header, so loading a file
runs no code. The header names the format version, the model's architecture and a fingerprint
of its weights, the cache config and the namespace table; `load` refuses a file written for
another model, weights, config or format, or one that is corrupt or truncated, and builds the
new cache beside the live one, so a refused load leaves the live cache exactly as it was.

Exact tier: the live entries only, compacted (`save` writes what is held, not what is reserved):
their keys (bytes), token counts, hit and reference counts, and their tokens' states
[sum of n, F]. Semantic tier: every layer's RingBuffer fields.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import torch
from torch import nn

FORMAT = "llmcache-banks"
VERSION = 4  # 4: the semantic banks no longer hold a `divergence` tensor
_BANK_FIELDS = ("codes", "keys", "tags", "valid", "last_used", "hit_count", "rate", "rate_tick", "values")


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, shape, dtype and a strided sample of its values."""
    digest = hashlib.sha256()
    for name, param in model.state_dict().items():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _config_record(config) -> dict:
    record = {}
    for f in dataclasses.fields(config):
        if f.name == "shared":  # where replicas share entries, not what an entry holds (and it may hold credentials)
            continue
        value = getattr(config, f.name)
        record[f.name] = list(value) if isinstance(value, (range, tuple, list)) else value
    return record


def _architecture(model: nn.Module) -> str:
    return f"{type(model).__name__}/{getattr(model.config, 'model_type', '?')}"


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write what the cache of an accelerated `model` holds to `path` (safetensors; written atomically)."""
    from safetensors.torch import save_file

    from .api import _owner

    owner = _owner(model)
    tensors = {}
    meta: dict = {}
    with owner.lock:
        if owner.exact is not None:
            owner.exact.resolve_pending()
            tensors, meta = _exact_tensors(owner.exact)
        for index, layer in owner.layers.items():
            bank = layer.bank
            if bank is None:
                continue
            meta[str(index)] = {"tick": bank.tick, "capacity": bank.capacity}
            for name in _BANK_FIELDS:
                tensors[f"layer{index}.{name}"] = getattr(bank, name).detach().contiguous().cpu().clone()
            # Slots never written hold uninitialised memory: never let it reach the file.
            tensors[f"layer{index}.values"][~bank.valid.cpu()] = 0
        header = {
            "format": FORMAT,
            "version": str(VERSION),
            "architecture": _architecture(model),
            "weights": weights_fingerprint(model),
            "config": json.dumps(_config_record(owner.config), sort_keys=True),
            "namespaces": json.dumps(owner.namespaces, sort_keys=True),
            "meta": json.dumps(meta, sort_keys=True),
        }
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata=header)
    os.replace(tmp, path)


def _exact_tensors(tier) -> tuple[dict, dict]:
    index, arena = tier.index, tier.arena
    live = sorted(index.live(), key=lambda e: int(index.serial[e]))  # a decoder page after the page it extends
    meta = {"exact": {"kv_layout": {str(p): [h, d, str(t), i] for p, (h, d, t, i) in tier.kv_layout.items()},
                      "formats": {str(p): n for p, n in tier.formats.items()}}}
    if not live:
        return {}, meta
    keys = [index.keys[e] for e in live]
    rows = torch.from_numpy(np.concatenate([index.token_rows(e) for e in live])).to(arena.device)
    tensors = {
        "exact.states": arena.read(rows).cpu().contiguous(),
        "exact.keys": torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).copy()),
        "exact.key_lengths": torch.tensor([len(k) for k in keys], dtype=torch.int64),
    }
    for name in index.FIELDS:
        tensors[f"exact.{name}"] = torch.from_numpy(getattr(index, name)[live].copy())
    return tensors, meta


def load(model: nn.Module, path: str | os.PathLike) -> None:
    """Replace the cache of an accelerated `model` with what `path` holds.

    Raises ValueError (and leaves the live cache untouched) when the file is not an llmcache
    file of this format version, was written for another architecture, other weights or
    another config, or is corrupt or truncated.
    """
    from safetensors import SafetensorError, safe_open

    from .api import _owner

    owner = _owner(model)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            _check_header(header, model, owner)
            meta = json.loads(header["meta"])
            names = set(f.keys())
            saved = {name: f.get_tensor(name) for name in names}
        if owner.exact is not None:
            built = _rebuild_exact(owner, saved, meta.get("exact", {}))
        else:
            built = {}
            for key, layer_meta in meta.items():
                index = int(key)
                if index not in owner.layers:
                    raise ValueError(f"the file holds layer {index}, which this config does not cache")
                fields = {name: saved[f"layer{index}.{name}"] for name in _BANK_FIELDS}
                built[index] = _rebuild_bank(fields, layer_meta, owner)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError, TypeError) as err:
        raise ValueError(f"cannot load llmcache banks from {os.fspath(path)!r}: {err}") from err
    # Everything checked and built: swap in one step under the lock.
    with owner.lock:
        if owner.exact is not None:
            owner.exact.index, owner.exact.arena, owner.exact.kv_layout, formats = built
            owner.exact.formats.update(formats)
            owner.exact.pending.clear()
        for index, layer in owner.layers.items():
            layer.bank = built.get(index)
            layer.stats.bytes = layer.bank.nbytes if layer.bank is not None else 0
        owner.namespaces = json.loads(header["namespaces"])


def _check_header(header: dict, model: nn.Module, owner) -> None:
    if header.get("format") != FORMAT:
        raise ValueError(f"not an llmcache bank file (format {header.get('format')!r})")
    if header.get("version") != str(VERSION):
        raise ValueError(f"bank file format version {header.get('version')} is not supported (this is {VERSION}): "
                         "rebuild the cache and save it again")
    if header.get("architecture") != _architecture(model):
        raise ValueError(f"the file was written for {header.get('architecture')}, this model is {_architecture(model)}")
    if header.get("weights") != weights_fingerprint(model):
        raise ValueError("the file was written for other weights (the weights fingerprint differs)")
    config = json.dumps(_config_record(owner.config), sort_keys=True)
    if header.get("config") != config:
        raise ValueError(f"the file was written with another cache config: {header.get('config')} vs {config}")


def _rebuild_exact(owner, saved: dict, meta: dict):
    """A new (index, arena, kv_layout, block output forms) holding the saved entries, checked."""
    from .bank import ExactIndex

    tier = owner.exact
    kv_layout = {int(p): (int(h), int(d), getattr(torch, t.split(".")[-1]), int(i))
                 for p, (h, d, t, i) in meta.get("kv_layout", {}).items()}
    arena = tier.new_arena(tier.arena.features, tier.arena.dtype, tier.arena.device)
    index = tier.new_index()
    formats = {int(p): int(n) for p, n in meta.get("formats", {}).items()}
    if "exact.states" not in saved:
        return index, arena, kv_layout, formats
    states, lengths = saved["exact.states"], saved["exact.key_lengths"]
    counts = saved["exact.ntokens"]
    if states.dim() != 2 or counts.shape != lengths.shape or int(counts.sum()) != states.shape[0]:
        raise ValueError("the entry tensors disagree on the number of tokens")
    if int(lengths.sum()) != saved["exact.keys"].numel() or bool((counts <= 0).any()):
        raise ValueError("the entry keys or token counts are corrupt")
    if not bool(torch.isfinite(states).all()):
        raise ValueError("the file holds non-finite cached states")
    if states.dtype != arena.dtype or states.shape[1] != arena.features:
        raise ValueError(f"the file holds {states.dtype} states of {states.shape[1]} features per token; this "
                         f"model's entries hold {arena.dtype}, {arena.features}")
    blob = saved["exact.keys"].numpy().tobytes()
    offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
    dst, src, start = [], [], 0
    by_serial: dict[int, int] = {}
    for i, n in enumerate(counts.tolist()):
        parent_serial = int(saved["exact.parent_serial"][i])
        parent = by_serial.get(parent_serial, -1)
        if parent_serial >= 0 and parent < 0:
            raise ValueError("the file holds a page whose prefix page it does not hold")
        entry = index.insert(blob[offsets[i] : offsets[i + 1]], n, parent)
        if entry < 0 or index.evictions:
            raise ValueError("the file holds more (or longer) entries than this config's budget fits")
        for name in ExactIndex.FIELDS:
            if name != "ntokens":
                getattr(index, name)[entry] = int(saved[f"exact.{name}"][i])
        by_serial[int(index.serial[entry])] = entry
        index.next_serial = max(index.next_serial, int(index.serial[entry]) + 1)
        dst.append(index.token_rows(entry))
        src.append(np.arange(start, start + n))
        start += n
    arena.grow(index.num_pages)
    rows = torch.from_numpy(np.concatenate(dst)).to(arena.device)
    arena.write(rows, states[torch.from_numpy(np.concatenate(src))].to(arena.device))
    return index, arena, kv_layout, formats


def _rebuild_bank(saved: dict, meta: dict, owner):
    from .ring_buffer import RingBuffer

    values = saved["values"]
    capacity, words = saved["codes"].shape
    if capacity != int(meta["capacity"]) or any(saved[n].shape[0] != capacity for n in _BANK_FIELDS):
        raise ValueError("the bank tensors disagree on the capacity")
    bank = RingBuffer(capacity, words, tuple(values.shape[1:]), values.dtype, owner.planes.device,
                      owner.config.eviction, owner.config.staleness_half_life, owner.config.backend)
    for name in _BANK_FIELDS:
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
