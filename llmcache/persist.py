"""`save` / `load`: the banks of an accelerated model to and from a safetensors file.

Never pickle: safetensors holds only tensors and a string-to-string header, so loading a file
runs no code. The header names the format version, the model's architecture and a fingerprint
of its weights, the cache config, and the namespace table; `load` refuses a file written for a
different model, weights or config, or one that is corrupt or truncated, and builds the new
banks beside the live ones, so a refused load leaves the live cache exactly as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import torch
from torch import nn

FORMAT = "llmcache-banks"
VERSION = 1
_BANK_FIELDS = ("codes", "keys", "tags", "valid", "last_used", "hit_count", "rate", "rate_tick", "divergence",
                "values")


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
        value = getattr(config, f.name)
        record[f.name] = list(value) if isinstance(value, (range, tuple, list)) else value
    return record


def _architecture(model: nn.Module) -> str:
    return f"{type(model).__name__}/{getattr(model.config, 'model_type', '?')}"


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every bank of an accelerated `model` to `path` (safetensors; written atomically)."""
    from safetensors.torch import save_file

    from .api import _owner

    owner = _owner(model)
    tensors = {}
    layers = {}
    with owner.lock:
        for index, layer in owner.layers.items():
            bank = layer.bank
            if bank is None:
                continue
            layers[str(index)] = {"tick": bank.tick, "capacity": bank.capacity}
            for name in _BANK_FIELDS:
                # Each layer gets its own copy of an index it shares (safetensors stores no aliases;
                # `load` links equal copies again).
                tensor = getattr(bank, name).detach().contiguous().cpu()
                tensors[f"layer{index}.{name}"] = tensor if name == "values" else tensor.clone()
            # Slots never written hold uninitialised memory: never let it reach the file.
            free = ~bank.valid.cpu()
            tensors[f"layer{index}.values"] = tensors[f"layer{index}.values"].clone()
            tensors[f"layer{index}.values"][free] = 0
        header = {
            "format": FORMAT,
            "version": str(VERSION),
            "architecture": _architecture(model),
            "weights": weights_fingerprint(model),
            "config": json.dumps(_config_record(owner.config), sort_keys=True),
            "namespaces": json.dumps(owner.namespaces, sort_keys=True),
            "layers": json.dumps(layers, sort_keys=True),
        }
    tmp = f"{os.fspath(path)}.tmp"
    save_file(tensors, tmp, metadata=header)
    os.replace(tmp, path)


def load(model: nn.Module, path: str | os.PathLike) -> None:
    """Replace the banks of an accelerated `model` with those saved in `path`.

    Raises ValueError (and leaves the live cache untouched) when the file is not an llmcache
    bank file of this format version, was written for another architecture, other weights or
    another config, or is corrupt or truncated.
    """
    from safetensors import SafetensorError, safe_open

    from .api import _owner
    from .ring_buffer import RingBuffer

    owner = _owner(model)
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            _check_header(header, model, owner)
            layers = json.loads(header["layers"])
            banks = {}
            for key, meta in layers.items():
                index = int(key)
                if index not in owner.layers:
                    raise ValueError(f"the file holds layer {index}, which this config does not cache")
                saved = {name: f.get_tensor(f"layer{index}.{name}") for name in _BANK_FIELDS}
                banks[index] = _rebuild(saved, meta, owner, RingBuffer)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError) as err:
        raise ValueError(f"cannot load llmcache banks from {os.fspath(path)!r}: {err}") from err
    banks = _relink(owner, banks, RingBuffer)
    # Everything checked and built: swap in one step under the lock.
    with owner.lock:
        for index, layer in owner.layers.items():
            layer.bank = banks.get(index)
            layer.stats.bytes = layer.bank.nbytes if layer.bank is not None else 0
        owner.shared_index = banks.get(owner.layer_ids[0]) if owner.lockstep else None
        owner.namespaces = json.loads(header["namespaces"])


def _relink(owner, banks: dict, ring_buffer_cls) -> dict:
    """Lockstep configs: banks saved with one shared index share it again after loading (each
    layer's copy of the index is in the file; copies that differ stay separate banks)."""
    root = banks.get(owner.layer_ids[0])
    if not owner.lockstep or root is None:
        return banks
    linked = dict(banks)
    for index, bank in banks.items():
        same = (bank is not root and bank.capacity == root.capacity and bank.eviction == root.eviction
                and all(torch.equal(getattr(bank, n), getattr(root, n)) for n in ring_buffer_cls._INDEX_FIELDS))
        if same:
            shared = ring_buffer_cls(bank.capacity, bank.codes.shape[1], tuple(bank.values.shape[1:]),
                                     bank.values.dtype, bank.values.device, bank.eviction, bank.half_life,
                                     bank.backend, root)
            shared.values.copy_(bank.values)
            linked[index] = shared
    return linked


def _check_header(header: dict, model: nn.Module, owner) -> None:
    if header.get("format") != FORMAT:
        raise ValueError(f"not an llmcache bank file (format {header.get('format')!r})")
    if header.get("version") != str(VERSION):
        raise ValueError(f"bank file format version {header.get('version')} is not supported (this is {VERSION})")
    if header.get("architecture") != _architecture(model):
        raise ValueError(f"the file was written for {header.get('architecture')}, this model is {_architecture(model)}")
    if header.get("weights") != weights_fingerprint(model):
        raise ValueError("the file was written for other weights (the weights fingerprint differs)")
    config = json.dumps(_config_record(owner.config), sort_keys=True)
    if header.get("config") != config:
        raise ValueError(f"the file was written with another cache config: {header.get('config')} vs {config}")


def _rebuild(saved: dict, meta: dict, owner, ring_buffer_cls):
    values = saved["values"]
    capacity, words = saved["codes"].shape
    if capacity != int(meta["capacity"]) or any(saved[n].shape[0] != capacity for n in _BANK_FIELDS):
        raise ValueError("the bank tensors disagree on the capacity")
    device = owner.planes.device
    bank = ring_buffer_cls(capacity, words, tuple(values.shape[1:]), values.dtype, device, owner.config.eviction,
                           owner.config.staleness_half_life, owner.config.backend)
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
