"""The exact tier's plan of one forward for the block splice: which rows run, which are served.

Made on the host once per forward by one builder (`build`) for encoders and decoders alike (its
host arrays in one call, `plan_arrays`: the C++ index's, csrc/plan_arrays.cpp, or the numpy
reference here); its index arrays reach the device in one non-blocking upload (`upload`) and the
served rows' states are read from the arena right away (so a later eviction cannot touch them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from ...splice import cut_positions, slice_rows
from ..base import Route


@dataclass
class Plan(Route):
    """A forward the block splice serves (`ExactTier.block_forward`)."""

    batch: int = 0
    seq: int = 0
    width: int = 0  # positions the computing rows run (< seq: the padding after their last real token cut off)
    m: int = 0  # rows that run the span
    entries: list = field(default_factory=list)  # reserved entries this forward writes
    store_n: list = field(default_factory=list)  # their token counts
    compute: torch.Tensor | None = None  # int64 [M] rows that run the span; None: all rows, unsliced
    served_dst: torch.Tensor | None = None  # int64 [S]: flat output rows (row * T + t) of served tokens (None: placed)
    served_states: torch.Tensor | None = None  # [S, F] their stored states, read at routing ([B * T, F]: placed)
    repeat_rows: torch.Tensor | None = None  # int64 [R] rows that copy an earlier computing row
    repeat_src: torch.Tensor | None = None  # int64 [R] that row, among the computing rows
    store_src: torch.Tensor | None = None  # int64 [W] flat rows (row * width + t, computing rows) of tokens to write (None: store_all)
    store_dst: torch.Tensor | None = None  # int64 [W] their arena rows
    zeros: torch.Tensor | None = None  # int64 [Z]: flat output rows (row * T + t) that hold zeros (computing rows' padding)
    store_all: bool = False  # every computed token is stored, in order (0..M*width-1): no store_src
    placed: bool = False  # served_states are in the output's layout, [B * T, F], this forward's own (zeros: no token held)
    served_all: bool = False  # placed, and nothing computes
    served_kv: tuple | None = None  # decoders served whole: every block's stored (K, V), views (`BlockSplice`)
    served_kv_to: object | None = None  # the KV cache the first span block gave every block's K/V
    sliced: dict = field(default_factory=dict)  # id(argument) -> (argument, its computing rows)
    cut: dict = field(default_factory=dict)  # id(argument) -> (argument, cut to `width` positions)
    last_slice: tuple | None = None  # (args, kwargs) a block was last given, and what `slice` made of them
    kv: list = field(default_factory=list)  # decoders: per span block, the computed (K, V) [M, heads, T, head dim]
    kv_to: list = field(default_factory=list)  # placed decoders: (span block, its KV cache), given at the last block
    near: object | None = None  # verified.Neighbours: the verified tier's checks and records of this forward

    @property
    def cuts(self) -> bool:
        """Whether a block's arguments change for the computing rows (`slice`): some rows do not
        run, or the positions after `width` are cut."""
        return self.compute is not None or self.width != self.seq

    @torch.compiler.disable
    def slice(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """A block's arguments with every batch-major tensor cut to the computing rows (and masks
        to `width`), in one call (each call out of a compiled frame costs microseconds). The blocks
        of a forward are mostly given the same objects (the mask, the position embeddings, the
        cache): where every one is the last block's, the last block's slices (the objects are kept
        with them, so an identity cannot be another object's)."""
        last = self.last_slice
        if (last is not None and len(args) == len(last[0]) and kwargs.keys() == last[1].keys()
                and all(a is b for a, b in zip(args, last[0])) and all(v is last[1][k] for k, v in kwargs.items())):
            return last[2], last[3]
        made = self._cut(args), {k: self._cut(v) for k, v in kwargs.items()}
        self.last_slice = (args, kwargs, *made)
        return made

    def _cut(self, value):
        if self.compute is not None:
            value = slice_rows(value, self.compute, self.batch, self.sliced)
        return value if self.width == self.seq else cut_positions(value, self.width, self.seq, self.cut)

    def untrim(self) -> None:
        """Run the computing rows over all `seq` positions after all (a block's arguments cannot be cut)."""
        if self.width == self.seq:
            return
        if self.entries:
            src = self.store_src if self.store_src is not None else \
                torch.arange(self.m * self.width, device=self.store_dst.device)
            self.store_src, self.store_all = src // self.width * self.seq + src % self.width, False
        self.width = self.seq

    def add_served(self, states: torch.Tensor, dst: torch.Tensor) -> None:
        """More served tokens: `states` [S, F] at flat output rows `dst` int64 [S]."""
        if self.placed:  # (the served states are in the output's layout already: placed there)
            self.served_states.index_copy_(0, dst, states)
        elif self.served_states is None:
            self.served_states, self.served_dst = states, dst
        else:
            self.served_states = torch.cat([self.served_states, states])
            self.served_dst = torch.cat([self.served_dst, dst])


def runs(starts: list, lengths: list) -> np.ndarray:
    """int64: start, start + 1, ..., start + length - 1 for each (start, length), one after another."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


def upload(parts: dict, device: torch.device) -> dict:
    """int64 host arrays -> device tensors in one copy (pinned and non-blocking on CUDA, so it
    does not wait for the device: the cache's routing adds no synchronisation of its own)."""
    names = [n for n, a in parts.items() if a is not None]
    if not names:
        return {}
    if device.type == "cpu":  # (no copy to make: each array as a tensor)
        return {n: torch.from_numpy(np.ascontiguousarray(parts[n], dtype=np.int64).ravel()) for n in names}
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


def build(store, batch: int, seq: int, device: torch.device, serving: list, computing: list, copying: list,
          entries: list, writes: tuple, width: int | None = None, zeros: np.ndarray | None = None, kv: bool = False,
          **route) -> Plan:
    """The plan of a forward of `batch` rows of `seq` positions. `serving`: (rows served, ascending,
    their first positions, the entries holding their tokens (row after row, in order), how many
    entries each row takes (None: one each)); `computing`: the rows that run, ascending, over
    their first `width` positions (default all); `copying`: (row, the computing row it repeats);
    `entries`: reserved entries, written from `writes` (int64 arrays, one value per entry: its
    computing row, first position, ntokens); `zeros`: flat output rows the output holds zeros at
    (the padding of an encoder's computing rows, where the caller does not see it); `kv`: the rows
    hold K/V (a decoder's, `finish`); `route`: the `Route` counts."""
    width = seq if width is None else width
    plan = Plan(batch=batch, seq=seq, width=width, m=len(computing), entries=entries,
                store_n=writes[2].tolist() if entries else [], **route)
    arrays = getattr(store.index, "plan_arrays", None) or functools.partial(plan_arrays, store.index)
    served_rows, served_starts, held, sizes = serving
    parts, plan.served_all, plan.store_all = arrays(batch, seq, width, served_rows, served_starts, held, sizes,
                                                    computing, [r for r, _ in copying], [s for _, s in copying],
                                                    entries, *writes)
    if zeros is not None:
        parts["zeros"] = zeros
    return finish(store, plan, parts, device, kv)


def plan_arrays(index, batch: int, seq: int, width: int, served_rows: list, served_starts: list, held: list, sizes,
                computing: list, copy_rows: list, copy_src: list, entries: list, w_rows, w_first, w_n) -> tuple:
    """(parts: the plan's host arrays by name, served_all, store_all): the reference of the C++
    index's `plan_arrays` (csrc/plan_arrays.cpp), numpy over the batch; `build`'s arguments."""
    computing_rows = np.asarray(computing, dtype=np.int64)
    parts, served_all, store_all = {"compute": computing_rows if len(computing) < batch else None}, False, False
    if len(served_rows):
        parts["served_src"] = index.token_rows(held)
        lengths = index.token_counts(held)
        if sizes is not None:
            lengths = np.add.reduceat(lengths, np.cumsum(sizes) - sizes)
        # (Every position of every row served, in order: nothing to place, the states are the output.)
        served_all = len(served_rows) == batch and not any(served_starts) and bool((lengths == seq).all())
        if not served_all:
            parts["served_dst"] = runs(np.asarray(served_rows, dtype=np.int64) * seq + served_starts, lengths)
    if len(copy_rows):
        parts["repeat_rows"] = copy_rows
        parts["repeat_src"] = np.searchsorted(computing_rows, copy_src)
    if len(entries):
        parts["store_dst"] = index.token_rows(entries)
        # (position among the computing rows: they are ascending)
        starts = np.searchsorted(computing_rows, w_rows) * width + w_first
        # (Every token of every computing row written, in order, e.g. a row's pages one after
        # another: the block's output as it is.)
        ends = np.cumsum(w_n)
        store_all = bool(ends[-1] == len(computing) * width and starts[0] == 0 and (starts[1:] == ends[:-1]).all())
        if not store_all:
            parts["store_src"] = runs(starts, w_n)
    return parts, served_all, store_all


def finish(store, plan: Plan, parts: dict, device: torch.device, kv: bool = False) -> Plan:
    """`plan` with its index arrays `parts` (host int64, by field name; `served_src`: the arena rows
    of the served tokens) on the device, and the served states read. Where some position is not
    served (padding, rows of other lengths, rows that compute), the served tokens are read into
    the output's layout, [B * T, F] with zeros where no token is held (`placed`), where the rows
    hold K/V (`kv`), and on the CPU where no row computes: the block splice then writes the
    computing rows into it at the last block, in one pass, where placing them took a zeroed output
    and an `index_copy_` per block of a decoder's K/V (on the CPU tens of ns a row; on a GPU four
    kernels a block). On the CPU the read is one pass (`ops.read_rows` reads row -1 as zeros);
    elsewhere a zeroed tensor and an `index_copy_` of the rows read. An encoder's rows that compute
    keep its plain merge (a zeroed output, two `index_copy_`s): placed, its one output costs more
    (hostpath-stages-placed-cpu.json). A batch served whole is `served_all` too."""
    placed = "served_dst" in parts and (kv or (device.type == "cpu" and plan.m == 0))
    minus_one = placed and device.type == "cpu"
    if minus_one:
        rows = np.full(plan.batch * plan.seq, -1, dtype=np.int64)
        rows[parts["served_dst"]] = parts["served_src"]
        parts = {k: v for k, v in parts.items() if k != "served_dst"} | {"served_src": rows}
    on_device = upload(parts, device)
    plan.compute = on_device.get("compute")
    plan.repeat_rows, plan.repeat_src = on_device.get("repeat_rows"), on_device.get("repeat_src")
    plan.store_src, plan.store_dst = on_device.get("store_src"), on_device.get("store_dst")
    plan.zeros = on_device.get("zeros")
    arena = store.arena
    if placed:
        if minus_one:
            out = torch.empty((plan.batch, plan.seq, arena.features), dtype=arena.dtype, device=arena.device)
            arena.read_tokens(on_device["served_src"], out)
        else:
            out = torch.zeros((plan.batch, plan.seq, arena.features), dtype=arena.dtype, device=arena.device)
            out.view(-1, arena.features).index_copy_(0, on_device["served_dst"], arena.read(on_device["served_src"]))
        plan.served_states = out.view(plan.batch * plan.seq, -1)
        plan.served_all = plan.m == 0
    else:
        plan.served_dst = on_device.get("served_dst")
        if "served_src" in on_device:
            plan.served_states = arena.read(on_device["served_src"])
    plan.placed = placed or plan.served_all
    return plan
