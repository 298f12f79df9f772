"""`save` / `load`: what an accelerated model's cache holds, to and from a safetensors file.

Never pickle: safetensors holds only tensors and a string-to-string header, so loading a file
runs no code. The header names the format version, the base model's architecture, the
fingerprint the shared tier uses (`state.model_fingerprint`: the class, config and attention
implementation, every byte of every weight and buffer, dtype, cached blocks, entry layout and
platform), the cache config and the table of key headers. Every stored entry carries a checksum
(BLAKE2b over the fingerprint, its key and its states' bytes). `load` refuses, saying why, a file
of another format, architecture, fingerprint or config, or one whose entries do not match their
checksums or are not finite, and builds the new cache beside the live one: a refused load leaves
the live cache exactly as it was.

Exact tier: the live entries only, compacted (`save` writes what is held, not what is reserved):
their keys (bytes: namespace and model state included, so entries of every adapter, autocast
setting and namespace travel), token counts, hit and reference counts, their tokens' states
[sum of n, F], and per state the K/V dtype. Semantic (threshold) tier: every layer's RingBuffer
fields, with a checksum per slot.
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
VERSION = 5  # 5: keys carry the model state; the full fingerprint; a checksum per entry
_BANK_FIELDS = ("codes", "keys", "tags", "valid", "last_used", "hit_count", "rate", "rate_tick", "values")


def _config_record(config) -> dict:
    record = {}
    for f in dataclasses.fields(config):
        if f.name == "shared":  # where replicas share entries, not what an entry holds (and it may hold credentials)
            continue
        value = getattr(config, f.name)
        record[f.name] = list(value) if isinstance(value, (range, tuple, list)) else value
    return record


def _architecture(base: nn.Module) -> str:
    return f"{type(base).__name__}/{getattr(getattr(base, 'config', None), 'model_type', '?')}"


def _fingerprint(owner) -> bytes:
    from .state import model_fingerprint

    if owner.exact is not None:
        tier = owner.exact
        return model_fingerprint(owner.base, tier.span, tier.arena.features, tier.arena.dtype)
    return model_fingerprint(owner.base, owner.layer_ids, 0, owner.state.dtype)


def _checksum(fingerprint: bytes, *parts) -> np.ndarray:
    digest = hashlib.blake2b(fingerprint, digest_size=16)
    for part in parts:
        digest.update(part)
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def _raw(t: torch.Tensor) -> np.ndarray:
    """A host tensor's bytes as uint8 [rows, bytes per row] (any dtype, bfloat16 included)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(t.shape[0], -1).view(torch.uint8).numpy() if t.dim() else t.reshape(1).view(torch.uint8).numpy()


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write what the cache of an accelerated `model` holds to `path` (safetensors; written atomically)."""
    from safetensors.torch import save_file

    from .api import owner_of

    owner = owner_of(model)
    with owner.lock:
        fingerprint = _fingerprint(owner)
        tensors, meta = {}, {}
        if owner.exact is not None:
            owner.exact.resolve_pending()
            tensors, meta = _exact_tensors(owner.exact, fingerprint)
        for index, layer in owner.layers.items():
            bank = layer.bank
            if bank is None:
                continue
            meta[str(index)] = {"tick": bank.tick, "capacity": bank.capacity}
            fields = {name: getattr(bank, name).detach().contiguous().cpu().clone() for name in _BANK_FIELDS}
            fields["values"][~fields["valid"]] = 0  # slots never written hold uninitialised memory
            for name, t in fields.items():
                tensors[f"layer{index}.{name}"] = t
            tensors[f"layer{index}.checksums"] = torch.from_numpy(_slot_checksums(fingerprint, fields))
        header = {
            "format": FORMAT,
            "version": str(VERSION),
            "architecture": _architecture(owner.base),
            "fingerprint": fingerprint.hex(),
            "config": json.dumps(_config_record(owner.config), sort_keys=True),
            "namespaces": json.dumps({h.hex(): i for h, i in owner.namespaces.items()}, sort_keys=True),
            "meta": json.dumps(meta, sort_keys=True),
        }
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata=header)
    os.replace(tmp, path)


def _slot_checksums(fingerprint: bytes, fields: dict) -> np.ndarray:
    raw = [_raw(fields[name]) for name in _BANK_FIELDS]
    return np.stack([_checksum(fingerprint, *(r[slot].tobytes() for r in raw)) for slot in range(raw[0].shape[0])]) \
        if raw[0].shape[0] else np.zeros((0, 16), dtype=np.uint8)


def _exact_tensors(tier, fingerprint: bytes) -> tuple[dict, dict]:
    index, arena = tier.index, tier.arena
    state = index.state_dict()  # (a decoder page after the page it extends)
    live = state.pop("entries")
    meta = {"exact": {"kv_layout": {str(p): list(layout) for p, layout in tier.kv_layout.items()},
                      "kv_dtypes": {s.hex(): str(d) for s, d in tier.kv_dtypes.items()},
                      "formats": {str(p): n for p, n in tier.formats.items()}}}
    if not live:
        return {}, meta
    keys = state.pop("keys")
    rows = torch.from_numpy(np.concatenate([index.token_rows(e) for e in live])).to(arena.device)
    states = arena.read(rows).cpu().contiguous()
    raw, at, sums = _raw(states), 0, []
    for key, n in zip(keys, state["ntokens"].tolist()):
        sums.append(_checksum(fingerprint, key, raw[at : at + n].tobytes()))
        at += n
    tensors = {
        "exact.states": states,
        "exact.keys": torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).copy()),
        "exact.key_lengths": torch.tensor([len(k) for k in keys], dtype=torch.int64),
        "exact.checksums": torch.from_numpy(np.stack(sums)),
    }
    for name, values in state.items():
        tensors[f"exact.{name}"] = torch.from_numpy(values)
    return tensors, meta


def load(model: nn.Module, path: str | os.PathLike) -> None:
    """Replace the cache of an accelerated `model` with what `path` holds.

    Raises ValueError, saying why, and leaves the live cache untouched when the file is not an
    llmcache file of this format version, was written for another architecture, other weights
    (any byte), dtype, cached blocks, platform or cache config, or holds an entry that does not
    match its checksum (a corrupted or edited file) or is not finite.
    """
    from safetensors import SafetensorError, safe_open

    from .api import owner_of

    owner = owner_of(model)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            fingerprint = _check_header(header, owner)
            meta = json.loads(header["meta"])
            saved = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        if owner.exact is not None:
            built = _rebuild_exact(owner, saved, meta.get("exact", {}), fingerprint)
        else:
            built = {}
            for key, layer_meta in meta.items():
                index = int(key)
                if index not in owner.layers:
                    raise ValueError(f"the file holds layer {index}, which this config does not cache")
                fields = {name: saved[f"layer{index}.{name}"] for name in _BANK_FIELDS}
                if not np.array_equal(_slot_checksums(fingerprint, fields), saved[f"layer{index}.checksums"].numpy()):
                    raise ValueError(f"layer {index}'s bank does not match its checksums (a corrupted or edited file)")
                built[index] = _rebuild_bank(fields, layer_meta, owner)
        namespaces = {bytes.fromhex(h): int(i) for h, i in json.loads(header["namespaces"]).items()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError, TypeError) as err:
        raise ValueError(f"cannot load llmcache banks from {os.fspath(path)!r}: {err}") from err
    # Everything checked and built: swap in one step under the lock.
    with owner.lock:
        if owner.exact is not None:
            tier = owner.exact
            tier.index, tier.arena, tier.kv_layout, tier.kv_dtypes, formats = built
            tier.formats.update(formats)
            tier.pending.clear()
        for index, layer in owner.layers.items():
            layer.bank = built.get(index)
            layer.stats.bytes = layer.bank.nbytes if layer.bank is not None else 0
        owner.namespaces = namespaces


def _check_header(header: dict, owner) -> bytes:
    """The live model's fingerprint, once the header is found to match it."""
    if header.get("format") != FORMAT:
        raise ValueError(f"not an llmcache bank file (format {header.get('format')!r})")
    if header.get("version") != str(VERSION):
        raise ValueError(f"bank file format version {header.get('version')} is not supported (this is {VERSION}): "
                         "rebuild the cache and save it again")
    if header.get("architecture") != _architecture(owner.base):
        raise ValueError(f"the file was written for {header.get('architecture')}, this model is "
                         f"{_architecture(owner.base)}")
    config = json.dumps(_config_record(owner.config), sort_keys=True)
    if header.get("config") != config:
        raise ValueError(f"the file was written with another cache config: {header.get('config')} vs {config}")
    fingerprint = _fingerprint(owner)
    if header.get("fingerprint") != fingerprint.hex():
        raise ValueError("the file was written for other weights, dtype, cached blocks or platform (the model "
                         "fingerprint, over every byte of every weight, differs)")
    return fingerprint


def _rebuild_exact(owner, saved: dict, meta: dict, fingerprint: bytes):
    """A new (index, arena, kv_layout, kv_dtypes, block output forms) holding the saved entries, checked."""
    from .bank import ExactIndex

    tier = owner.exact
    kv_layout = {int(p): tuple(int(v) for v in layout) for p, layout in meta.get("kv_layout", {}).items()}
    kv_dtypes = {bytes.fromhex(s): getattr(torch, d.split(".")[-1]) for s, d in meta.get("kv_dtypes", {}).items()}
    arena = tier.new_arena(tier.arena.features, tier.arena.dtype, tier.arena.device)
    index = tier.new_index()
    formats = {int(p): int(n) for p, n in meta.get("formats", {}).items()}
    if "exact.states" not in saved:
        return index, arena, kv_layout, kv_dtypes, formats
    states, lengths = saved["exact.states"], saved["exact.key_lengths"]
    counts = saved["exact.ntokens"]
    if states.dim() != 2 or counts.shape != lengths.shape or int(counts.sum()) != states.shape[0]:
        raise ValueError("the entry tensors disagree on the number of tokens")
    if int(lengths.sum()) != saved["exact.keys"].numel() or bool((counts <= 0).any()):
        raise ValueError("the entry keys or token counts are corrupt")
    if states.dtype != arena.dtype or states.shape[1] != arena.features:
        raise ValueError(f"the file holds {states.dtype} states of {states.shape[1]} features per token; this "
                         f"model's entries hold {arena.dtype}, {arena.features}")
    checksums = saved["exact.checksums"].numpy()
    if checksums.shape != (len(counts), 16):
        raise ValueError("the file holds no checksum for some entries")
    blob = saved["exact.keys"].numpy().tobytes()
    offsets = np.concatenate([[0], np.cumsum(lengths.numpy())])
    raw = _raw(states)
    keys, start = [], 0
    for i, n in enumerate(counts.tolist()):
        keys.append(blob[offsets[i] : offsets[i + 1]])
        if not np.array_equal(_checksum(fingerprint, keys[-1], raw[start : start + n].tobytes()), checksums[i]):
            raise ValueError(f"entry {i} does not match its checksum (a corrupted or edited file)")
        start += n
    state = {"keys": keys, **{name: saved[f"exact.{name}"].numpy() for name in ExactIndex.FIELDS}}
    entries = index.load_state_dict(state)
    dst = [index.token_rows(e) for e in entries]
    if not bool(torch.isfinite(states).all()):
        raise ValueError("the file holds non-finite cached states")
    arena.grow(index.num_pages)
    rows = torch.from_numpy(np.concatenate(dst)).to(arena.device)
    arena.write(rows, states.to(arena.device))
    return index, arena, kv_layout, kv_dtypes, formats


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
