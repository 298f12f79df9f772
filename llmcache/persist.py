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
import json
import os

from torch import nn

from .api import owner_of

FORMAT = "llmcache-banks"
VERSION = 5  # 5: keys carry the model state; the full fingerprint; a checksum per entry


def _config_record(config) -> dict:
    record = {}
    for f in dataclasses.fields(config):
        if f.name == "shared":  # where replicas share entries, not what an entry holds (and it may hold credentials)
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):  # a section (llmcache.Layerwise)
            value = {k: list(v) if isinstance(v, (range, tuple, list)) else v for k, v in dataclasses.asdict(value).items()}
        record[f.name] = list(value) if isinstance(value, (range, tuple, list)) else value
    return record


def _architecture(base: nn.Module) -> str:
    return f"{type(base).__name__}/{getattr(getattr(base, 'config', None), 'model_type', '?')}"


def _fingerprint(owner) -> bytes:
    return next(f for tier in owner.tiers if (f := tier.fingerprint(owner.base)) is not None)


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write what the cache of an accelerated `model` holds to `path` (safetensors; written atomically)."""
    from safetensors.torch import save_file

    owner = owner_of(model)
    with owner.lock:
        fingerprint = _fingerprint(owner)
        tensors, meta = {}, {}
        for tier in owner.tiers:
            more, more_meta = tier.state_dict(fingerprint)
            tensors.update(more)
            meta.update(more_meta)
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


def load(model: nn.Module, path: str | os.PathLike) -> None:
    """Replace the cache of an accelerated `model` with what `path` holds.

    Raises ValueError, saying why, and leaves the live cache untouched when the file is not an
    llmcache file of this format version, was written for another architecture, other weights
    (any byte), dtype, cached blocks, platform or cache config, or holds an entry that does not
    match its checksum (a corrupted or edited file) or is not finite.
    """
    from safetensors import SafetensorError, safe_open

    owner = owner_of(model)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            fingerprint = _check_header(header, owner)
            meta = json.loads(header["meta"])
            saved = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        built = [(tier, tier.load_state_dict(saved, meta, fingerprint)) for tier in owner.tiers]
        namespaces = {bytes.fromhex(h): int(i) for h, i in json.loads(header["namespaces"]).items()}
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError, TypeError) as err:
        raise ValueError(f"cannot load llmcache banks from {os.fspath(path)!r}: {err}") from err
    # Everything checked and built: swap in one step under the lock.
    with owner.lock:
        for tier, state in built:
            tier.adopt(state)
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
