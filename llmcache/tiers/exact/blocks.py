"""The exact tier's block splice: the span's blocks run on the computing rows only.

`BlockSplice.forward` is every span block's forward while the cache is on: the first block drops
the served rows, each block gets its batch-major arguments sliced to the computing rows
(`splice.slice_rows`), decoder blocks write their K/V into a stand-in (`splice.KVStandIn`) and the
model's own KV cache gets every row's K/V; the last block merges the served rows' stored output,
the computed rows and the in-batch repeats back to [B, T, D] and writes the new entries.
"""

from __future__ import annotations

import torch

from ...ops import write_rows
from ...splice import CacheParam, KVStandIn, give_kv, kv_split, per_position, positions_cut
from .plan import Plan


class BlockSplice:
    """The spliced forwards of one exact tier's span blocks (`forwards`: their own forwards)."""

    def __init__(self, tier, forwards: list):
        self.tier = tier
        self.originals = forwards
        self.cache_params = [CacheParam.of(f) for f in forwards]

    @torch.compiler.disable(recursive=False)
    def forward(self, position: int, hidden_states, *args, **kwargs):
        """The spliced forward of span block `position` (torch.compile: this frame runs eagerly,
        the block's own forward is compiled)."""
        original = self.originals[position]
        call = self.tier.owner.current()
        if call is not None and call.pixels is not None and position == 0:
            self.tier.owner.route_pixels(call, hidden_states.shape[1])
        plan = call.route if call is not None else None
        last = position == len(self.tier.span) - 1
        if not isinstance(plan, Plan):
            output = original(hidden_states, *args, **kwargs)
            if call is not None and call.capture is not None and last:
                call.capture.append(output[0] if isinstance(output, tuple) else output)  # suffix.suffix_forward
            return output
        if position == 0:
            if plan.width < plan.seq and not (positions_cut(args, plan.seq) and positions_cut(tuple(kwargs.values()), plan.seq)):
                plan.untrim()  # (an argument with positions that is not a mask: never cut this model's rows again)
                self.tier.cuts_positions = False
            if plan.width < plan.seq:
                hidden_states = hidden_states[:, : plan.width]
            if plan.compute is not None:
                hidden_states = hidden_states.index_select(0, plan.compute)
        stand_in = real = None
        if self.tier.geometry.decoder:
            real = self.cache_params[position].given(args, kwargs)  # the model's own KV cache, if any
        if plan.m:
            if plan.cuts:
                args, kwargs = plan.slice(args, kwargs)
            if self.tier.geometry.decoder:
                stand_in = KVStandIn(real)
                args, kwargs = self.cache_params[position].hand(stand_in, args, kwargs)
            output = original(hidden_states, *args, **kwargs)
            self.tier.formats[position] = len(output) if isinstance(output, tuple) else 1
        else:
            # No row computes. What a block passes on besides its hidden state (T5's position
            # bias) only feeds the next blocks, which compute nothing either.
            arity = self.tier.formats.get(position, 1)
            output = hidden_states if arity == 1 else (hidden_states,) + (None,) * (arity - 1)
        out = output[0] if isinstance(output, tuple) else output
        if self.tier.geometry.decoder and plan.served_all:
            # Every position served, in order: the first block gives the model's cache every
            # block's stored K|V at once (views); the others, given the same cache, have nothing to do.
            if real is not None and (position == 0 or real is not plan.served_kv_to):
                self._give_served(plan, real, out.dtype, call.switches, range(len(self.tier.span)) if position == 0
                                  else (position,))
        elif self.tier.geometry.decoder:
            self._kv(position, plan, real, stand_in, out, call.switches)
        if not last:
            return output
        merged = self._merge(plan, out, call.switches)
        if plan.zeros is not None:  # (an encoder's computing rows' padding: zeros, as served rows hold there)
            merged = _zeroed(merged, plan.zeros)
        self._insert(plan, out)
        return (merged,) + tuple(output[1:]) if isinstance(output, tuple) else merged

    @torch.compiler.disable
    def _kv(self, position: int, plan: Plan, real, stand_in, out, switches: bytes) -> None:
        """Keep the computed rows' K|V for the insert and give the real cache all B rows'."""
        if stand_in is not None and stand_in.keys is not None:
            keys, values = stand_in.keys, stand_in.values  # [M, heads, T, head dim]
            computed = (keys, values)
            layout = (keys.shape[1], keys.shape[3], stand_in.layer_idx)
            self.tier.kv_dtypes[switches] = keys.dtype
        else:  # no row computes: everything comes from the entries
            computed, layout = None, self.tier.layout(position)
        self.tier.kv_layout[position] = layout
        plan.kv.append(computed)
        if real is None:
            return
        heads, head_dim, layer_idx = layout
        if plan.compute is None:  # every row computed: the real cache takes the block's own K, V
            give_kv(real, keys, values, layer_idx, keys.dtype)
            return
        if plan.placed:  # (given at the last block, once every block's K|V are placed: `_place`)
            plan.kv_to.append((position, real))
            return
        width = 2 * heads * head_dim
        full = out.new_zeros((plan.batch, plan.seq, width))
        if plan.m:
            flat = torch.cat([per_position(keys), per_position(values)], dim=-1).to(out.dtype)
            full.index_copy_(0, plan.compute, flat)
            if plan.repeat_rows is not None:
                full.index_copy_(0, plan.repeat_rows, flat.index_select(0, plan.repeat_src))
        if plan.served:  # the served tokens' K|V of this block, stored after the output
            hidden = plan.served_states.shape[1] - len(self.tier.span) * width
            served = plan.served_states[:, hidden + position * width : hidden + (position + 1) * width]
            full.view(-1, width).index_copy_(0, plan.served_dst, served.to(out.dtype))
        give_kv(real, *kv_split(full, heads), layer_idx, self.tier.kv_dtype(switches))

    @torch.compiler.disable
    def _give_served(self, plan: Plan, real, dtype: torch.dtype, switches: bytes, positions) -> None:
        """A batch served whole (`plan.served_all`): give the model's cache `real` the stored K and V
        of the span blocks at `positions`, [B, heads, T, head dim] each, views of the states read."""
        if plan.served_kv is None:  # (every block's at once: [blocks, B, heads, T, head dim] each)
            heads, head_dim, _ = self.tier.layout(0)
            blocks, width = len(self.tier.span), 2 * heads * head_dim
            flat = plan.served_states[:, plan.served_states.shape[1] - blocks * width :].to(dtype)
            both = flat.view(plan.batch, plan.seq, blocks, 2, heads, -1).permute(3, 2, 0, 4, 1, 5)
            plan.served_kv = (both[0].unbind(0), both[1].unbind(0))
        keys, values = plan.served_kv
        kv_dtype = self.tier.kv_dtype(switches)
        for position in positions:
            give_kv(real, keys[position], values[position], self.tier.layer_idx(position), kv_dtype)
        plan.served_kv_to = real

    def _merge(self, plan: Plan, out: torch.Tensor, switches: bytes) -> torch.Tensor:
        """[B, T, D]: computed rows, served rows' stored output (zeros at padding), repeats."""
        if plan.compute is None and plan.width == plan.seq:
            return out
        hidden = out.shape[-1]
        if plan.served_all:
            return plan.served_states[:, :hidden].to(out.dtype).reshape(plan.batch, plan.seq, hidden)
        if plan.placed:
            return self._place(plan, out, switches)
        merged = out.new_zeros((plan.batch, plan.seq, hidden))
        computed = merged[:, : plan.width]  # (the computing rows' positions after `width` are padding: zeros)
        if plan.compute is None:
            computed.copy_(out)
        elif plan.m:
            computed.index_copy_(0, plan.compute, out)
        if plan.served:
            merged.view(-1, hidden).index_copy_(0, plan.served_dst, plan.served_states[:, :hidden].to(out.dtype))
        if plan.repeat_rows is not None:
            computed.index_copy_(0, plan.repeat_rows, out.index_select(0, plan.repeat_src))
        return merged

    def _place(self, plan: Plan, out: torch.Tensor, switches: bytes) -> torch.Tensor:
        """A placed decoder plan's [B, T, D] (`plan.finish`: the served states read in the output's
        layout): the computing rows' tokens and their repeats written into it, the output and every
        block's K|V in one pass (`ops.write_rows`, as the insert writes the arena), then the model's
        caches given each block's K and V (views). Where the computed tokens do not fill a row as
        stored (another dtype, a block without K/V), the output and each block's K|V are placed apart."""
        states, hidden, (batch, seq, width) = plan.served_states, out.shape[-1], (plan.batch, plan.seq, plan.width)
        blocks, features = len(self.tier.span), states.shape[1]
        # (column of each piece: the output at 0, block p's K|V at features - (blocks - p) * its width)
        pieces = [(0, out.unsqueeze(1))]
        for position, pair in enumerate(plan.kv):
            if pair is not None:
                at = features - (blocks - position) * 2 * pair[0].shape[1] * pair[0].shape[3]
                pieces += [(at, pair[0]), (at + pair[0].shape[1] * pair[0].shape[3], pair[1])]
        steps = torch.arange(width, device=out.device)
        rows, src = plan.compute, None
        if plan.repeat_rows is not None:
            rows = torch.cat([rows, plan.repeat_rows])
            sources = torch.cat([torch.arange(plan.m, device=out.device), plan.repeat_src])
            src = (sources[:, None] * width + steps).view(-1)
        dst = (rows[:, None] * seq + steps).view(-1)
        fills = sum(p.shape[1] * p.shape[3] for _, p in pieces) == features
        if fills and all(p.dtype == states.dtype for _, p in pieces):
            write_rows(states, dst, src, [p for _, p in pieces])
        else:  # (in the output's dtype, each piece at its columns, as the unplaced merge does)
            states = states.to(out.dtype)
            for at, p in pieces:
                flat = p.transpose(1, 2).reshape(plan.m * width, -1).to(out.dtype)
                flat = flat if src is None else flat.index_select(0, src)
                states[:, at : at + flat.shape[1]].index_copy_(0, dst, flat)
        for position, real in plan.kv_to:
            heads, head_dim, layer_idx = self.tier.layout(position)
            at = features - (blocks - position) * 2 * heads * head_dim
            full = states[:, at : at + 2 * heads * head_dim].view(batch, seq, -1)
            give_kv(real, *kv_split(full, heads), layer_idx, self.tier.kv_dtype(switches))
        return states[:, :hidden].to(out.dtype).view(batch, seq, hidden)

    @torch.compiler.disable
    def _insert(self, plan: Plan, out: torch.Tensor) -> None:
        """Write the reserved entries' tokens (the computing rows' real tokens) and publish them."""
        if not plan.entries:
            return
        if self.tier.geometry.decoder and (len(plan.kv) != len(self.tier.span) or any(kv is None for kv in plan.kv)):
            self.tier.release(plan)
            return
        # A token's row: the output, then per block K then V [M, heads, T, head dim] (`ops.write_rows`).
        pieces = [out.unsqueeze(1)] + ([x for pair in plan.kv for x in pair] if self.tier.geometry.decoder else [])
        features = sum(p.shape[1] * p.shape[3] for p in pieces)
        if features != self.tier.store.arena.features or out.dtype != self.tier.store.arena.dtype:
            self.tier.owner.count_reasons({"layout_changed": len(plan.entries)})
            self.tier.release(plan)
            return
        # (store_all: every computed token stored, in order, no selection.)
        self.tier.commit(plan, plan.store_dst, pieces, None if plan.store_all else plan.store_src)


@torch.compiler.disable
def _zeroed(states: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`states` [B, T, D] with zeros at flat rows `rows` (row * T + t): in place (a block's own
    output or the merge's buffer, which nothing else reads), a copy if it is not contiguous."""
    if states.is_contiguous():
        states.view(-1, states.shape[-1]).index_fill_(0, rows, 0)
        return states
    return states.reshape(-1, states.shape[-1]).index_fill(0, rows, 0).view(states.shape)
