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
import threading
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
    """How one forward is routed by the exact tier. Made on the host once per forward; its index
    tensors reach the device in one non-blocking upload (`_upload`)."""

    batch: int
    seq: int
    m: int  # rows that run the span
    served: int  # rows served from the bank
    entries: list  # reserved entries this forward writes, with `store`
    store: list  # (position among computing rows, start, ntokens) of the rows written into `entries`
    repeats: int = 0  # rows repeating an earlier row of the batch: computed once, copied
    compute: torch.Tensor | None = None  # int64 [M] rows that run the span; None: all rows, unsliced
    served_dst: torch.Tensor | None = None  # int64 [S]: flat output rows (row * T + t) of served tokens
    served_states: torch.Tensor | None = None  # [S, F] their stored states, read at routing
    repeat_rows: torch.Tensor | None = None  # int64 [R] rows that copy an earlier computing row
    repeat_src: torch.Tensor | None = None  # int64 [R] that row, among the computing rows
    store_src: torch.Tensor | None = None  # int64 [W] flat rows (among computing rows) of tokens to write
    store_dst: torch.Tensor | None = None  # int64 [W] their arena rows
    sliced: dict = field(default_factory=dict)  # id(argument) -> (argument, its computing rows)
    kv: list = field(default_factory=list)  # decoders: per span block, the computed (K, V) [M, heads, T, head dim]
    tokens: tuple | None = None  # (real tokens served, real tokens computed)
    store_all: bool = False  # store_src is every computed token in order (0..M*T-1)

    def place(self, parts: dict, device: torch.device, arena) -> None:
        """Upload the host index arrays `parts` (compute, served_src/dst, repeat_rows/src,
        store_src/dst) in one copy and read the served rows' states from `arena`."""
        on_device = _upload(parts, device)
        self.compute = on_device.get("compute")
        self.served_dst = on_device.get("served_dst")
        self.repeat_rows, self.repeat_src = on_device.get("repeat_rows"), on_device.get("repeat_src")
        self.store_src, self.store_dst = on_device.get("store_src"), on_device.get("store_dst")
        if "served_src" in on_device:
            self.served_states = arena.read(on_device["served_src"])

    @torch.compiler.disable
    def slice(self, value):
        """`value` with every batch-major tensor cut to the computing rows (ndim >= 2, size(0) == B)."""
        if self.compute is None:
            return value
        if isinstance(value, torch.Tensor):
            if value.dim() < 2 or value.shape[0] != self.batch:
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


def every_token(src: np.ndarray, total: int) -> bool:
    """`src` is 0..total-1 in order (a plan stores every computed token: no selection needed)."""
    return len(src) == total and bool((src == np.arange(total)).all())


def _upload(parts: dict, device: torch.device) -> dict:
    """int64 host arrays -> device tensors in one copy (pinned and non-blocking on CUDA, so it
    does not wait for the device: the cache's routing adds no synchronisation of its own)."""
    names = [n for n, a in parts.items() if a is not None]
    if not names:
        return {}
    flat = torch.from_numpy(np.concatenate([np.asarray(parts[n], dtype=np.int64).ravel() for n in names]))
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        flat = flat.to(device)
    out, at = {}, 0
    for n in names:
        size = np.asarray(parts[n]).size
        out[n] = flat[at : at + size]
        at += size
    return out


class ExactTier:
    """Index, arena and splice of the exact tier for the blocks `span` of one model.

    `features` and `dtype`: what one stored token takes (the hidden size, plus for decoders
    2 x kv_dim per span block), known from the config before anything is stored.
    """

    def __init__(self, owner, blocks: list[nn.Module], span: list[int], decoder: bool, features: int,
                 dtype: torch.dtype, device: torch.device):
        self.owner = owner
        self.span = span
        self.modules = [blocks[i] for i in span]
        self.decoder = decoder
        self.arena = self.new_arena(features, dtype, device)
        self.index = self.new_index()
        self.pending: list = []  # (entries, per-token finite flags on the device) not yet checked
        self.kv_layout: dict = {}  # decoders: span position -> (kv heads, head dim, layer_idx)
        # Decoders: the K/V dtype under each model state (`Forward.switches`): autocast computes
        # K/V in its own dtype, which the entries (in the arena's dtype) must be handed back in.
        self.kv_dtypes: dict = {}
        self.originals = [m.forward for m in self.modules]
        self.cache_param = [self._cache_param(f) for f in self.originals]
        self.formats: dict = {}  # span position -> number of outputs of the block (1: a tensor)
        # Decoders (set by `accelerate`): per-block K|V width, KV heads and dtype, the final norm
        # (None: no prefix reuse, whole rows only).
        self.kv_width = self.kv_heads = 0
        self.cache_name = None  # the base model's KV cache argument
        self.final_norm = None
        self.shared = None  # shared.SharedTier (CacheConfig.shared): Redis behind the index
        self.shared_fingerprint = None  # its model fingerprint (bytes), made at the first lookup

    # ---- the shared tier -----------------------------------------------------------------
    def _fingerprint(self) -> bytes:
        if self.shared_fingerprint is None:
            from .state import model_fingerprint

            self.shared_fingerprint = model_fingerprint(self.owner.base, self.span, self.arena.features,
                                                        self.arena.dtype)
        return self.shared_fingerprint

    def _warm(self, row_keys: list) -> None:
        """Look the rows that miss the index up in the shared tier (one round trip) and copy
        what it serves into the index and arena, so that routing serves them as local hits."""
        wanted, seen = [], set()
        for key, _, n in row_keys:
            if key is not None and self.index.find(key) < 0 and key not in seen:
                seen.add(key)
                wanted.append((key, n))
        if not wanted:
            return
        prefix = self.shared.settings.key_prefix(rows.current_namespace())
        found = self.shared.fetch(prefix, self._fingerprint(), wanted, self.arena.features, self.arena.dtype)
        dst, states = [], []
        for (key, n), held in zip(wanted, found):
            entry = self.index.insert(key, n) if held is not None else -1
            if entry >= 0:
                self.index.pin((entry,))  # (a later insert must not evict it before routing reads it)
                dst.append(self.index.token_rows(entry))
                states.append(held)
        if states:
            self.arena.grow(self.index.num_pages)
            device = self.arena.device
            self.arena.write(torch.from_numpy(np.concatenate(dst)).to(device), torch.cat(states).to(device))

    def _share(self, entries: list, ntokens: list, parts: list) -> None:
        """Hand the committed entries' states to the shared tier's writer."""
        # One copy of the batch's stored tokens (the forward's tensors may be reused after it);
        # the queue holds views of it.
        full = (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).detach().clone()
        items, at = [], 0
        for entry, n in zip(entries, ntokens):
            if entry >= 0:
                items.append((self.index.key(entry), full[at : at + n]))
            at += n
        if items:
            prefix = self.shared.settings.key_prefix(rows.current_namespace())
            self.shared.put(prefix, self._fingerprint(), items, self.arena.dtype)

    def read_buffer(self, rows_needed: int) -> torch.Tensor:
        """This thread's buffer for states read from the arena, [>= rows_needed, F] (grown, kept):
        a forward's prefix states live in it until the forward ends."""
        local = self.__dict__.setdefault("_local", threading.local())
        buf = getattr(local, "buffer", None)
        arena = self.arena
        if buf is None or buf.shape[0] < rows_needed or buf.dtype != arena.dtype or buf.device != arena.device \
                or buf.shape[1] != arena.features:
            with torch.inference_mode(False), torch.no_grad():
                buf = torch.empty((max(rows_needed, 2 * (buf.shape[0] if buf is not None else 0)), arena.features),
                                  dtype=arena.dtype, device=arena.device)
            local.buffer = buf
        return buf

    def layer_idx(self, position: int) -> int:
        """The KV cache layer of span block `position`."""
        layout = self.kv_layout.get(position)
        return layout[2] if layout is not None else self.span[position]

    def kv_dtype(self, switches: bytes) -> torch.dtype:
        """The dtype of the K/V the blocks compute under the model state `switches`."""
        return self.kv_dtypes.get(switches, self.arena.dtype)

    # ---- memory ----------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        return self.index.held_pages * self.arena.page_bytes

    @property
    def reserved_bytes(self) -> int:
        return self.arena.reserved_bytes

    def new_arena(self, features: int, dtype: torch.dtype, device: torch.device) -> PagedArena:
        """An empty arena of this config's pages, as many as `max_bytes` allows."""
        cfg = self.owner.config
        arena = PagedArena(cfg.page_tokens, features, dtype, device, max_pages=0)
        arena.max_pages = cfg.max_bytes // arena.page_bytes if cfg.max_bytes is not None else 1 << 40
        return arena

    def new_index(self) -> ExactIndex:
        """An empty index sized for the arena."""
        cfg = self.owner.config
        return ExactIndex(cfg.page_tokens, self.arena.max_pages, cfg.capacity, cfg.eviction)

    def clear(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        """Forget every entry; with `dtype`/`device` (the weights moved), store in those from now on."""
        self.pending.clear()
        self.kv_dtypes.clear()
        self.arena = self.new_arena(self.arena.features, dtype or self.arena.dtype, device or self.arena.device)
        self.index = self.new_index()

    def resolve_pending(self) -> None:
        """Check the pending finiteness flags now (a host read: for `save` and `held`, not the hot path)."""
        batches, flags = self.take_pending()
        if flags is not None:
            counts: dict = {}
            self._check_pending(batches, flags.cpu().numpy(), counts)
            self.owner.count_reasons(counts)

    # ---- routing ---------------------------------------------------------------------
    def take_pending(self) -> tuple[list, torch.Tensor | None]:
        """Entries written since the last routing whose finiteness the host does not know yet,
        with their per-token flags (int64 [W] on the device); the caller brings the flags to the
        host in the same copy as the batch and hands both to `route`."""
        if not self.pending:
            return [], None
        entries = [batch for batch, _ in self.pending]
        flags = torch.cat([f for _, f in self.pending])
        self.pending.clear()
        return entries, flags

    @staticmethod
    def token_row_keys(header: bytes, host: np.ndarray, ids_before: bool, counts: dict,
                       padding: tuple[bool, bool] = (False, False)) -> list:
        """(key or None, start, ntokens) per row of a batch whose ids/mask/positions/types are
        `host` int64 [4, B, T]; None for a row that cannot be keyed (no real token, gaps).
        `ids_before`: the ids left of a row's first real token decide its positions. `padding`:
        whether the caller sees a row's (leading, trailing) padding: such a row is keyed and
        stored with it (`rows.exact_key`'s `pads`), all T positions, so that what it serves at
        its padding is what the uncached model computes there."""
        ids, mask, positions, types = host
        start, count, contiguous = rows.real_spans(mask)
        seq = ids.shape[1]
        out = []
        for r in range(ids.shape[0]):
            n, s = int(count[r]), int(start[r])
            if n == 0 or not contiguous[r]:
                reason = "no_tokens" if n == 0 else "mask_gaps"
                counts[reason] = counts.get(reason, 0) + 1
                out.append((None, s, n))
                continue
            lead, trail = s if padding[0] else 0, seq - s - n if padding[1] else 0
            if lead or trail:
                s, n = s - lead, n + lead + trail
            before = ids[r, :s] if ids_before else ids[r, :0]
            out.append((rows.exact_key(header, ids[r, s : s + n], positions[r, s : s + n], types[r, s : s + n],
                                       before, (lead, trail) if lead or trail else None), s, n))
        return out

    def route(self, row_keys: list, seq: int, device: torch.device, counts: dict,
              pending: tuple[list, np.ndarray] = ([], None), near=None) -> Plan | None:
        """The plan of a forward: `row_keys` (key or None, start, ntokens) per row, `seq` the
        hidden states' length T. `pending`: from `take_pending`, its flags on the host. `near`:
        the verified semantic tier's part, (SemanticTier, its Pending, group key per row, codes
        uint64 [B, W]): rows that miss may be served a neighbour's entry. Call under the owner's
        lock. None: nothing to route (every row computes, none stores)."""
        self._check_pending(*pending, counts)
        with self.index.pinned():
            if self.shared is not None:
                self._warm(row_keys)
            return self._route(row_keys, seq, device, counts, near)

    def _route(self, row_keys: list, seq: int, device: torch.device, counts: dict, near=None) -> Plan | None:
        batch = len(row_keys)
        start = [s for _, s, _ in row_keys]
        served_rows, served_entries, compute, repeat_rows, repeat_src = [], [], [], [], []
        pooled = []  # (row, entry): served the entry's pooled state at each real token (Semantic.serve "pooled")
        entries, store = [], []
        first_row: dict[bytes, int] = {}
        for r, (key, s, n) in enumerate(row_keys):
            if key is None:
                compute.append(r)
                continue
            entry = self.index.lookup(key)
            if entry >= 0:
                self.index.pin((entry,))  # a later row's reservation must not evict it before it is read
                served_rows.append(r)
                served_entries.append(entry)
            elif key in first_row:
                repeat_rows.append(r)
                repeat_src.append(first_row[key])
            else:
                if near is not None:
                    entry = near[0].consider(near[1], r, near[2][r], near[3][r], self.index)
                    if entry is not None:  # a neighbour's entry, served by the verified semantic tier
                        self.index.pin((entry,))
                        if near[0].semantic.serve == "pooled":
                            pooled.append((r, entry))
                        else:
                            served_rows.append(r)
                            served_entries.append(entry)
                        continue
                first_row[key] = r
                entry = self.index.reserve(key, n)
                if entry >= 0:
                    if near is not None and near[2][r] is not None:
                        near[0].stored(near[1], r, near[2][r], entry, key, near[3][r])
                    entries.append(entry)
                    store.append((len(compute), s, n))
                elif self.index.find(key) < 0:
                    counts["too_long"] = counts.get("too_long", 0) + 1
                compute.append(r)
        if not served_rows and not repeat_rows and not entries and not pooled:
            return None
        plan = Plan(batch, seq, len(compute), len(served_rows) + len(pooled), entries, store, repeats=len(repeat_rows))
        plan.tokens = (sum(row_keys[r][2] for r in served_rows + [r for r, _ in pooled]),
                       sum(row_keys[r][2] for r in compute))
        sliced = bool(served_rows or repeat_rows or pooled)
        parts = {"compute": compute if sliced else None}
        if served_rows:
            src = [self.index.token_rows(e) for e in served_entries]
            parts["served_src"] = np.concatenate(src)
            parts["served_dst"] = np.concatenate(
                [r * seq + int(start[r]) + np.arange(len(t), dtype=np.int64) for r, t in zip(served_rows, src)])
        if repeat_rows:
            position = {r: i for i, r in enumerate(compute)}
            parts["repeat_rows"] = repeat_rows
            parts["repeat_src"] = [position[r] for r in repeat_src]
        if entries:
            parts["store_src"] = np.concatenate([row * seq + s + np.arange(n, dtype=np.int64) for row, s, n in store])
            parts["store_dst"] = np.concatenate([self.index.token_rows(e) for e in entries])
            plan.store_all = every_token(parts["store_src"], len(compute) * seq)
        plan.place(parts, device, self.arena)
        if pooled:
            self._place_pooled(plan, pooled, row_keys, near[0].pooling, device)
        return plan

    def _place_pooled(self, plan: Plan, pooled: list, row_keys: list, pooling: str, device) -> None:
        """Add to the plan's served tokens rows served a neighbour's pooled state: each real
        token of row r holds the mean (pooling "mean") or the first token (pooling "cls") of the
        entry's stored output, so the caller's pooling of the row gives the entry's pooled output."""
        vectors, dst = [], []
        for r, entry in pooled:
            _, s, n = row_keys[r]
            states = self.arena.read(torch.from_numpy(self.index.token_rows(entry)).to(device))
            vector = states[:1] if pooling == "cls" else states.float().mean(0, keepdim=True).to(states.dtype)
            vectors.append(vector.expand(n, -1))
            dst.append(r * plan.seq + s + np.arange(n, dtype=np.int64))
        states = torch.cat(vectors)
        dst = torch.from_numpy(np.concatenate(dst)).to(device)
        if plan.served_states is None:
            plan.served_states, plan.served_dst = states, dst
        else:
            plan.served_states = torch.cat([plan.served_states, states])
            plan.served_dst = torch.cat([plan.served_dst, dst])

    def _check_pending(self, batches: list, flags: np.ndarray | None, counts: dict) -> None:
        """Drop entries whose written tokens were not all finite."""
        at = 0
        for batch in batches:
            for entry, key, n in batch:
                # (An entry evicted and reused since is another row's now: leave it.)
                if not flags[at : at + n].all() and self.index.discard(entry, key):
                    counts["non_finite"] = counts.get("non_finite", 0) + 1
                at += n

    def abort(self, plan) -> None:
        """The forward failed before its last block: give back what it reserved (children first)."""
        with self.owner.lock:
            for entry in reversed(plan.entries):
                self.index.release(entry)
            plan.entries = []

    # ---- the splice ------------------------------------------------------------------
    @torch.compiler.disable(recursive=False)
    def block_forward(self, position: int, hidden_states, *args, **kwargs):
        """The spliced forward of span block `position` (torch.compile: this frame runs eagerly,
        the block's own forward is compiled)."""
        original = self.originals[position]
        forward = self.owner.current()
        if forward is not None and forward.pixels is not None and position == 0:
            self.owner.route_pixels(forward, hidden_states.shape[1])
        plan = forward.plan if forward is not None else None
        if plan is None:
            output = original(hidden_states, *args, **kwargs)
            if forward is not None and forward.capture is not None and position == len(self.span) - 1:
                forward.capture.append(output[0] if isinstance(output, tuple) else output)  # prefix.suffix_forward
            return output
        first, last = position == 0, position == len(self.span) - 1
        if first and plan.compute is not None:
            hidden_states = hidden_states.index_select(0, plan.compute)
        stand_in = real = None
        if self.decoder:
            real = self._given_cache(position, args, kwargs)  # the model's own KV cache, if any
        args = plan.slice(args)
        kwargs = {k: plan.slice(v) for k, v in kwargs.items()}
        if plan.m:
            if self.decoder:
                stand_in = KVStandIn(real)
                args, kwargs = self._hand(position, stand_in, args, kwargs)
            output = original(hidden_states, *args, **kwargs)
            self.formats[position] = len(output) if isinstance(output, tuple) else 1
        else:
            # No row computes. What a block passes on besides its hidden state (T5's position
            # bias) only feeds the next blocks, which compute nothing either.
            arity = self.formats.get(position, 1)
            output = hidden_states if arity == 1 else (hidden_states,) + (None,) * (arity - 1)
        out = output[0] if isinstance(output, tuple) else output
        if self.decoder:
            self._kv(position, plan, real, stand_in, out, forward.switches)
        if not last:
            return output
        merged = self._merge(plan, out)
        self._insert(plan, out)
        return (merged,) + tuple(output[1:]) if isinstance(output, tuple) else merged

    def _given_cache(self, position: int, args: tuple, kwargs: dict):
        name, index = self.cache_param[position]
        if index is not None and index < len(args):
            return args[index]
        return kwargs.get(name) if name is not None else None

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

    @torch.compiler.disable
    def _kv(self, position: int, plan: Plan, real, stand_in, out, switches: bytes) -> None:
        """Keep the computed rows' K|V for the insert and give the real cache all B rows'."""
        if stand_in is not None and stand_in.keys is not None:
            keys, values = stand_in.keys, stand_in.values  # [M, heads, T, head dim]
            computed = (keys, values)
            layout = (keys.shape[1], keys.shape[3], stand_in.layer_idx)
            self.kv_dtypes[switches] = keys.dtype
        else:  # no row computes: everything comes from the entries
            computed, layout = None, self.kv_layout.get(position)
        if layout is None:
            return
        self.kv_layout[position] = layout
        plan.kv.append(computed)
        if real is None:
            return
        heads, head_dim, layer_idx = layout
        dtype = self.kv_dtype(switches)
        if plan.compute is None:  # every row computed: the real cache takes the block's own K, V
            real.update(keys, values, layer_idx)
            return
        width = 2 * heads * head_dim
        full = out.new_zeros((plan.batch, plan.seq, width))
        if plan.m:
            m, t = out.shape[:2]
            flat = torch.cat([keys.transpose(1, 2).reshape(m, t, -1), values.transpose(1, 2).reshape(m, t, -1)],
                             dim=-1).to(out.dtype)
            full.index_copy_(0, plan.compute, flat)
            if plan.repeat_rows is not None:
                full.index_copy_(0, plan.repeat_rows, flat.index_select(0, plan.repeat_src))
        if plan.served:
            hidden = plan.served_states.shape[1] - len(self.span) * width
            cols = plan.served_states[:, hidden + position * width : hidden + (position + 1) * width]
            full.view(-1, width).index_copy_(0, plan.served_dst, cols.to(full.dtype))
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

    @torch.compiler.disable
    def _insert(self, plan: Plan, out: torch.Tensor) -> None:
        """Write the reserved entries' tokens (the computing rows' real tokens) and publish them."""
        if not plan.entries:
            return
        if self.decoder and (len(plan.kv) != len(self.span) or any(kv is None for kv in plan.kv)):
            self.abort(plan)
            return
        pieces = [out]
        if self.decoder:  # per block, K then V as [M, T, heads * head dim] (a copy of the transposed K/V)
            m, t = out.shape[:2]
            pieces += [x.transpose(1, 2).reshape(m, t, -1) for kv in plan.kv for x in kv]
        features = sum(p.shape[-1] for p in pieces)
        if features != self.arena.features or out.dtype != self.arena.dtype:
            self.owner.count_not_cached("layout_changed", len(plan.entries))
            self.abort(plan)
            return
        # (Every computed token stored, in order: the pieces as they are, no selection.)
        everything = plan.store_src.numel() == out.shape[0] * out.shape[1] and plan.store_all
        parts = [p.reshape(-1, p.shape[-1]) if everything else p.reshape(-1, p.shape[-1]).index_select(0, plan.store_src)
                 for p in pieces]
        self.commit_states(plan.entries, [n for _, _, n in plan.store], plan.store_dst, parts)
        plan.entries = []

    def commit_states(self, entries: list, ntokens: list, dst: torch.Tensor, parts: list) -> None:
        """Write `parts` ([W, F_i], widths adding up to F: the reserved `entries`' tokens, in
        order) at arena rows `dst` and publish the entries (parents before children); their
        finiteness is checked at the next routing."""
        finite = torch.isfinite(sum(p.float().sum(1) for p in parts)).long()
        with self.owner.lock:
            self.arena.grow(self.index.num_pages)
            self.arena.write(dst, parts)
            committed = []
            for entry, n in zip(entries, ntokens):
                key = self.index.key(entry)
                # (False: another thread stored the same row meanwhile; its copy stays.)
                committed.append((entry if self.index.commit(entry) else -1, key, n))
            self.pending.append((committed, finite))
            self.owner.counters.inserted += sum(e >= 0 for e, _, _ in committed)
            if self.shared is not None:
                self._share([e for e, _, _ in committed], ntokens, parts)
