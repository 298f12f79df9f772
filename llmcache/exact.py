"""The exact tier: one lookup per forward, served rows skip every cached block, only misses compute.

Routing (`ExactTier.route`, once per forward, before the embeddings run): the batch's ids, mask,
positions and token types come to the host in one copy (the forward's only synchronisation);
each row's key (`rows.exact_key`) is looked up in the host index. A row that hits is served: its
stored states are read from the arena right away (so a later eviction cannot touch them). A row
repeating an earlier row of the batch copies that row's result. The others compute.

The splice (`ExactTier.block_forward`, on every block of the span first..last cached layer):
the first block drops the served rows and the span runs on the M computing rows only, each block
getting its batch-major arguments sliced to those rows (memoised per forward); the last block
merges the served rows' stored output, the computed rows and the in-batch repeats back to
[B, T, D] and stores the computed rows' real tokens. For decoders each block also hands the
model's KV cache the K/V of all B rows (computed rows' from a stand-in that captures them, served
rows' from the entry), so `generate()` decodes from exact KV entries.

An entry holds what serving it needs: the last cached block's output at the row's real tokens
and, for decoders, every span block's K and V there, as [n, D + L * 2 * kv_dim] in pages of the
arena. Served rows are zero at padding positions (mask == 0) of the output.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import rows
from .bank import ExactIndex, PagedArena


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


@dataclass
class Plan:
    """How one forward is routed by the exact tier (host arrays, and their device copies)."""

    batch: int
    seq: int
    compute: torch.Tensor | None  # int64 [M] rows that run the span; None: all rows, unsliced
    m: int
    served: int  # rows served from the bank
    served_dst: torch.Tensor | None  # int64 [S]: flat output rows (row * T + t) of served tokens
    served_states: torch.Tensor | None  # [S, F] their stored states
    repeat_rows: torch.Tensor | None  # int64 [R] rows that copy an earlier computing row
    repeat_src: torch.Tensor | None  # int64 [R] that row
    store: list  # (position among computing rows, key, start, ntokens) of rows to insert
    sliced: dict = field(default_factory=dict)  # id(argument) -> (argument, its computing rows)
    kv: list = field(default_factory=list)  # decoders: per span block, [M, T, 2 * kv_dim] computed K|V

    def slice(self, value):
        """`value` with every batch-major tensor cut to the computing rows (ndim >= 2, size(0) == B)."""
        if self.compute is None:
            return value
        if isinstance(value, torch.Tensor):
            if value.dim() < 2 or value.shape[0] != self.batch or self.batch == 1:
                return value
            seen = self.sliced.get(id(value))
            if seen is None or seen[0] is not value:
                seen = self.sliced[id(value)] = (value, value.index_select(0, self.compute))
            return seen[1]
        if isinstance(value, tuple):
            return tuple(self.slice(v) for v in value)
        if isinstance(value, list):
            return [self.slice(v) for v in value]
        return value


class ExactTier:
    """Index, arena and splice of the exact tier for the blocks `span` of one model."""

    def __init__(self, owner, blocks: list[nn.Module], span: list[int], decoder: bool):
        cfg = owner.config
        self.owner = owner
        self.span = span
        self.modules = [blocks[i] for i in span]
        self.decoder = decoder
        self.index = ExactIndex(cfg.page_tokens, 0, cfg.capacity, cfg.eviction)
        self.arena: PagedArena | None = None  # made at the first insert, when F is known
        self.pending: list = []  # (entries, finite flags) of inserts not yet known to be finite
        self.kv_layout: dict = {}  # decoders: span position -> (kv heads, head dim, dtype, layer_idx)
        self.originals = [m.forward for m in self.modules]
        self.cache_param = [self._cache_param(f) for f in self.originals]

    # ---- memory ----------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        return self.index.held_pages * self.arena.page_bytes if self.arena is not None else 0

    @property
    def reserved_bytes(self) -> int:
        return self.arena.reserved_bytes if self.arena is not None else 0

    def clear(self) -> None:
        self.index.clear()
        self.pending.clear()
        if self.arena is not None:
            self.arena.clear()

    # ---- routing ---------------------------------------------------------------------
    def take_pending(self) -> tuple[list, torch.Tensor | None]:
        """The entries inserted since the last routing whose finiteness is not known on the host
        yet, and their flags (bool [E] on the device); the caller brings the flags to the host in
        the same copy as the batch and hands them to `route`."""
        if not self.pending:
            return [], None
        entries = [e for batch, _ in self.pending for e in batch]
        flags = torch.cat([f.to(self.arena.device) for _, f in self.pending])
        self.pending.clear()
        return entries, flags

    def route(self, header: bytes, host: np.ndarray, device: torch.device, counts: dict,
              pending: tuple[list, np.ndarray] = ([], None)) -> Plan | None:
        """The plan of a forward whose ids/mask/positions/types are `host` int64 [4, B, T].
        `pending`: entries from `take_pending` and their flags on the host. Call under the
        owner's lock. None: nothing to route (every row computes, none stores)."""
        for entry, ok in zip(*pending):
            if not ok and self.index.valid[entry]:
                self.index.evict(entry)
                counts["non_finite"] = counts.get("non_finite", 0) + 1
        ids, mask, positions, types = host
        batch, seq = ids.shape
        start, count, contiguous = rows.real_spans(mask)
        served_rows, served_entries, compute, repeat_rows, repeat_src, store = [], [], [], [], [], []
        first_row: dict[bytes, int] = {}
        limit = self.index.max_pages * self.index.page_tokens if self.arena is not None else None
        for r in range(batch):
            n = int(count[r])
            if n == 0 or not contiguous[r]:
                counts["no_tokens" if n == 0 else "mask_gaps"] = counts.get("no_tokens" if n == 0 else "mask_gaps", 0) + 1
                compute.append(r)
                continue
            s = int(start[r])
            key = rows.exact_key(header, ids[r, s : s + n], positions[r, s : s + n], types[r, s : s + n], ids[r, :s])
            entry = self.index.lookup(key)
            if entry >= 0:
                served_rows.append(r)
                served_entries.append(entry)
            elif key in first_row:
                repeat_rows.append(r)
                repeat_src.append(first_row[key])
            else:
                first_row[key] = r
                if limit is not None and n > limit:
                    counts["too_long"] = counts.get("too_long", 0) + 1
                else:
                    store.append((len(compute), key, s, n))
                compute.append(r)
        plan = Plan(batch, seq, None, batch, len(served_rows), None, None, None, None, [])
        plan.store = store
        if not served_rows and not repeat_rows:
            return plan if store else None
        to_dev = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64)).to(device)
        plan.compute, plan.m = to_dev(compute), len(compute)
        if served_rows:
            src = [self.index.token_rows(e) for e in served_entries]
            dst = [r * seq + int(start[r]) + np.arange(len(t), dtype=np.int64) for r, t in zip(served_rows, src)]
            plan.served_dst = to_dev(np.concatenate(dst))
            plan.served_states = self.arena.read(to_dev(np.concatenate(src)))
        if repeat_rows:
            position = {r: i for i, r in enumerate(compute)}
            plan.repeat_rows = to_dev(repeat_rows)
            plan.repeat_src = to_dev([position[r] for r in repeat_src])  # among the computed rows
        return plan

    # ---- the splice ------------------------------------------------------------------
    def block_forward(self, position: int, hidden_states, *args, **kwargs):
        original = self.originals[position]
        forward = self.owner.current()
        plan = forward.plan if forward is not None else None
        if plan is None:
            return original(hidden_states, *args, **kwargs)
        first, last = position == 0, position == len(self.span) - 1
        if first and plan.compute is not None:
            hidden_states = hidden_states.index_select(0, plan.compute)
        stand_in = None
        if plan.m:
            args = plan.slice(args)
            kwargs = {k: plan.slice(v) for k, v in kwargs.items()}
            if self.decoder:
                stand_in = KVStandIn(forward.kv_cache)
                args, kwargs = self._hand(position, stand_in, args, kwargs)
            output = original(hidden_states, *args, **kwargs)
        else:
            output = hidden_states
        out = output[0] if isinstance(output, tuple) else output
        if self.decoder:
            self._kv(position, plan, forward.kv_cache, stand_in, out)
        if not last:
            return output
        merged = self._merge(plan, out)
        self._insert(plan, out)
        return (merged,) + tuple(output[1:]) if isinstance(output, tuple) else merged

    def _hand(self, position, stand_in, args, kwargs):
        """Give the block the stand-in where it takes its KV cache (by position or by name)."""
        name, index = self.cache_param[position]
        if index is not None and index < len(args):
            return args[:index] + (stand_in,) + args[index + 1 :], kwargs
        return args, {**kwargs, name: stand_in}

    @staticmethod
    def _cache_param(forward) -> tuple[str | None, int | None]:
        signature = inspect.signature(forward)
        names = [n for n in ("cache", "past_key_values", "layer_past") if n in signature.parameters]
        if not names:
            return None, None
        params = list(signature.parameters.values())
        param = signature.parameters[names[0]]
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if param.kind in positional and all(p.kind in positional for p in params[: params.index(param)]):
            return names[0], params.index(param) - 1  # its index in `args`, after the hidden states
        return names[0], None

    def _kv(self, position: int, plan: Plan, real, stand_in, out) -> None:
        """Keep the computed rows' K|V for the insert and give the real cache all B rows'."""
        if stand_in is not None and stand_in.keys is not None:
            m, heads, t, head_dim = stand_in.keys.shape
            computed = torch.cat([stand_in.keys.transpose(1, 2).reshape(m, t, -1),
                                  stand_in.values.transpose(1, 2).reshape(m, t, -1)], dim=-1).to(out.dtype)
            layout = (heads, head_dim, stand_in.keys.dtype, stand_in.layer_idx)
        else:  # no row computes: everything comes from the entries
            computed, layout = None, self.kv_layout.get(position)
        if layout is None:
            return
        self.kv_layout[position] = layout
        plan.kv.append(computed)
        if real is None:
            return
        heads, head_dim, dtype, layer_idx = layout
        width = 2 * heads * head_dim
        if plan.compute is None:
            full = computed
        else:
            full = out.new_zeros((plan.batch, plan.seq, width))
            if plan.m:
                full.index_copy_(0, plan.compute, computed)
            if plan.served:
                hidden = plan.served_states.shape[1] - len(self.span) * width
                cols = plan.served_states[:, hidden + position * width : hidden + (position + 1) * width]
                full.view(-1, width).index_copy_(0, plan.served_dst, cols.to(full.dtype))
            if plan.repeat_rows is not None:
                full.index_copy_(0, plan.repeat_rows, computed.index_select(0, plan.repeat_src))
        b, t = full.shape[:2]
        keys = full[..., : width // 2].reshape(b, t, heads, head_dim).transpose(1, 2)
        values = full[..., width // 2 :].reshape(b, t, heads, head_dim).transpose(1, 2)
        real.update(keys.to(dtype).contiguous(), values.to(dtype).contiguous(), layer_idx)

    def _merge(self, plan: Plan, out: torch.Tensor) -> torch.Tensor:
        """[B, T, D]: computed rows, served rows' stored output (zeros at padding), repeats."""
        if plan.compute is None:
            return out
        hidden = out.shape[-1]
        merged = out.new_zeros((plan.batch, plan.seq, hidden))
        if plan.m:
            merged.index_copy_(0, plan.compute, out)
        if plan.served:
            merged.view(-1, hidden).index_copy_(0, plan.served_dst, plan.served_states[:, :hidden].to(out.dtype))
        if plan.repeat_rows is not None:
            merged.index_copy_(0, plan.repeat_rows, out.index_select(0, plan.repeat_src))
        return merged

    def _insert(self, plan: Plan, out: torch.Tensor) -> None:
        """Store the real tokens of the computing rows that may be stored."""
        if not plan.store or (self.decoder and len(plan.kv) != len(self.span)):
            return
        states = out if not self.decoder else torch.cat([out] + plan.kv, dim=-1)
        seq, features = plan.seq, states.shape[-1]
        with self.owner.lock:
            if self.arena is None:
                self._make_arena(features, states.dtype, states.device)
            if features != self.arena.features or states.dtype != self.arena.dtype:
                self.owner.count_not_cached("layout_changed", len(plan.store))
                return
            pinned: set[int] = set()
            src, dst, entries = [], [], []
            evicted = self.index.evictions
            for row, key, start, n in plan.store:
                entry = self.index.insert(key, n, pinned)
                if entry < 0:
                    if key not in self.index.table:
                        self.owner.count_not_cached("too_long", 1)
                    continue
                pinned.add(entry)
                entries.append(entry)
                src.append(row * seq + start + np.arange(n, dtype=np.int64))
                dst.append(self.index.token_rows(entry))
            if not entries:
                return
            device = states.device
            src_t = torch.from_numpy(np.concatenate(src)).to(device)
            self.arena.grow(self.index.num_pages)
            taken = states.reshape(-1, features).index_select(0, src_t)
            self.arena.write(torch.from_numpy(np.concatenate(dst)).to(device), taken)
            lengths = torch.tensor([len(s) for s in src], device=device)
            per_row = torch.segment_reduce(taken.float().sum(1), "sum", lengths=lengths)
            self.pending.append((entries, torch.isfinite(per_row)))  # read with the next forward's batch
            self.owner.count_insert(len(entries), self.index.evictions - evicted)

    def _make_arena(self, features: int, dtype: torch.dtype, device: torch.device) -> None:
        cfg = self.owner.config
        self.arena = PagedArena(cfg.page_tokens, features, dtype, device, max_pages=0)
        max_pages = cfg.max_bytes // self.arena.page_bytes if cfg.max_bytes is not None else 1 << 40
        self.arena.max_pages = self.index.max_pages = max_pages
