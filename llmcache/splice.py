"""The block splice, shared by every tier: run a block on some rows of its batch, hand K/V around.

A tier that serves some rows of a batch runs a cached block on the others only: `slice_rows` cuts
the block's batch-major arguments (masks, position embeddings) to those rows, memoised per
forward (the blocks of one forward get the same masks). A decoder block writes its K/V into a
KV cache: `CacheParam` says where the block takes it, `KVStandIn` takes its place while the
block runs on the computing rows and records their K/V, and `give_kv` hands the model's own
cache the K/V of every row (computed and served) in the batch's layout. Stored K/V are rows of
[T, heads x head dim] per position (`per_position`); `kv_split` turns them back.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .adapters import BLOCK_CACHE_NAMES


def _each_tensor(value, cut, memo: dict):
    """`value` (a tensor, or a tuple/list of them) with `cut(tensor)` in place of each tensor (None:
    the tensor as it is); memoised in `memo` (id -> (tensor, its cut)) for the forward: the blocks
    of one forward get the same masks and position embeddings."""
    if isinstance(value, torch.Tensor):
        seen = memo.get(id(value))
        if seen is None or seen[0] is not value:
            made = cut(value)
            seen = memo[id(value)] = (value, value if made is None else made)
        return seen[1]
    if isinstance(value, tuple):
        return tuple(_each_tensor(v, cut, memo) for v in value)
    if isinstance(value, list):
        return [_each_tensor(v, cut, memo) for v in value]
    return value


def slice_rows(value, rows: torch.Tensor, batch: int, memo: dict):
    """`value` (a tensor, or a tuple/list of them) with every batch-major tensor (ndim >= 2,
    size(0) == batch) cut to `rows` int64 [M], memoised in `memo`."""
    return _each_tensor(value, lambda t: t.index_select(0, rows) if t.dim() >= 2 and t.shape[0] == batch else None,
                        memo)


def positions_cut(value, seq: int) -> bool:
    """Whether every tensor in `value` (a tensor, or a tuple/list of them) keeps its meaning when
    cut to its first W of `seq` positions by `cut_positions`: one with no dimension of `seq`
    (after the batch), or an attention mask [B | 1, seq] or [B | 1, heads | 1, seq | 1, seq]."""
    if isinstance(value, torch.Tensor):
        dims = [d for d in range(1, value.dim()) if value.shape[d] == seq]
        return not dims or (value.dim() == 2 and dims == [1]) or (value.dim() == 4 and dims in ([3], [2, 3]))
    if isinstance(value, (tuple, list)):
        return all(positions_cut(v, seq) for v in value)
    return True


def cut_positions(value, width: int, seq: int, memo: dict):
    """`value` with every attention mask (`positions_cut`) cut to its first `width` positions
    (queries and keys), memoised in `memo`."""
    def cut(t):
        if t.dim() not in (2, 4) or t.shape[-1] != seq:
            return None
        return t[:, :, :width, :width] if t.dim() == 4 and t.shape[2] == seq else t[..., :width]

    return _each_tensor(value, cut, memo)


class KVStandIn:
    """Stands in for the model's KV cache while a block runs on the computing rows: records K, V."""

    def __init__(self, real):
        self.real = real
        self.keys = self.values = None
        self.layer_idx = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys, self.values, self.layer_idx = key_states, value_states, layer_idx
        return key_states, value_states

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0

    def __getattr__(self, name):
        if self.real is None:
            raise AttributeError(name)
        return getattr(self.real, name)


@dataclass(frozen=True)
class CacheParam:
    """Where a block's forward takes its KV cache: `name` (None: it takes none) and, when it can
    come by position, its `index` in the arguments after the hidden states."""

    name: str | None
    index: int | None

    @classmethod
    def of(cls, forward) -> CacheParam:
        signature = inspect.signature(forward)
        names = [n for n in BLOCK_CACHE_NAMES if n in signature.parameters]
        if not names:
            return cls(None, None)
        params = list(signature.parameters.values())
        param = signature.parameters[names[0]]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if param.kind in positional and all(p.kind in positional for p in params[: params.index(param)]):
            return cls(names[0], params.index(param) - 1)
        return cls(names[0], None)

    def given(self, args: tuple, kwargs: dict):
        """The KV cache this call of the block was given, or None."""
        if self.index is not None and self.index < len(args):
            return args[self.index]
        return kwargs.get(self.name) if self.name is not None else None

    def hand(self, stand_in, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The arguments with `stand_in` where the block takes its KV cache."""
        if self.index is not None and self.index < len(args):
            return args[: self.index] + (stand_in,) + args[self.index + 1 :], kwargs
        return args, {**kwargs, self.name: stand_in}


def per_position(x: torch.Tensor) -> torch.Tensor:
    """K or V [B, heads, T, head dim] as [B, T, heads x head dim] (a copy)."""
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, -1)


def kv_split(flat: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K|V per position [B, T, 2 x heads x head dim] -> K, V [B, heads, T, head dim] (views)."""
    b, t, width = flat.shape
    half = width // 2
    keys = flat[..., :half].reshape(b, t, heads, -1).transpose(1, 2)
    values = flat[..., half:].reshape(b, t, heads, -1).transpose(1, 2)
    return keys, values


def give_kv(cache, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, dtype: torch.dtype) -> None:
    """Hand the model's KV cache a block's K, V [B, heads, T, head dim] in `dtype`. An empty
    DynamicLayer takes them as they are (views of the states read: its update would copy them
    onto its empty tensors, and its next update copies them anyway); other caches update."""
    layer_class, initialized = _dynamic_layer()
    if keys.dtype != dtype or values.dtype != dtype:  # (`to` costs a dispatch even where it changes nothing)
        keys, values = keys.to(dtype), values.to(dtype)
    layers = getattr(cache, "layers", None)
    if layers is not None and not getattr(cache, "offloading", False):
        if getattr(cache, "layer_class_to_replicate", None) is layer_class:
            while len(layers) <= layer_idx:  # (as its update makes the layers up to layer_idx)
                layers.append(layer_class())
        layer = layers[layer_idx] if layer_idx < len(layers) else None
        if type(layer) is layer_class and (not layer.is_initialized or layer.keys.numel() == 0):
            if initialized is None:
                layer.lazy_initialization(keys, values)
            else:
                for name, of in initialized:
                    setattr(layer, name, of(keys))
            layer.keys, layer.values = keys, values
            return
    cache.update(keys, values, layer_idx)


_DYNAMIC_LAYER: tuple | None = None
_LAZY_FIELDS = {"device": lambda t: t.device, "dtype": lambda t: t.dtype, "is_initialized": lambda t: True}


def _dynamic_layer() -> tuple:
    """(transformers' DynamicLayer, what its `lazy_initialization` sets besides keys and values as
    [(name, value of the keys)], or None). Learned once, on a probe layer: that method builds
    two empty tensors (µs each, an allocation per block on a GPU) that `give_kv` replaces at
    once, so it sets the rest itself; None (call the method) where it sets anything else."""
    global _DYNAMIC_LAYER
    if _DYNAMIC_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        layer, probe = DynamicLayer(), torch.zeros(1, 1, 1, 1, dtype=torch.float16)
        before = dict(vars(layer))
        layer.lazy_initialization(probe, probe)
        changed = {k for k, v in vars(layer).items() if k not in before or before[k] is not v} - {"keys", "values"}
        fields = [(name, _LAZY_FIELDS[name]) for name in sorted(changed) if name in _LAZY_FIELDS]
        same = len(fields) == len(changed) and all(getattr(layer, name) == of(probe) for name, of in fields)
        _DYNAMIC_LAYER = (DynamicLayer, fields if same else None)
    return _DYNAMIC_LAYER
