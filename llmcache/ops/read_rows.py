"""Stored tokens read straight into the tensors a forward uses them as: the inverse of `write_rows`.

A decoder's cached prefix is read into one [blocks, 2, M, heads, Tcap, head dim] tensor, so that
each block's K and V ([M, heads, Tcap, head dim], room left after the prefix for the tokens the
forward computes) are contiguous where the model's attention reads them, and the span's output
into [M, Tcap, D]; views of whole rows read at once would leave every block's K/V spread over the
rows. Kernels: csrc/cpu/read_rows.cpp (bound for eager CPU calls without the dispatcher, as
write_rows's is); elsewhere `reference.read_rows` (three kernels: an index_select and two copies).
"""

from __future__ import annotations

import torch

from . import reference
from ._library import LIB, direct, fill_missing_kernels, resolve_backend

LIB.define("read_rows(Tensor arena, Tensor rows, Tensor(a!) out, Tensor(b!)? kv) -> ()")


@torch.library.register_fake("llmcache::read_rows")
def _read_rows_fake(arena, rows, out, kv):
    return None


fill_missing_kernels("read_rows", None, reference.read_rows)


def read_rows(arena: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, kv: torch.Tensor | None = None, *,
              backend: str | None = None) -> None:
    """Token i = m * T + t (T = len(rows) / M) of `out` and `kv` takes arena row rows[i], in place.
    (`reference.read_rows` states the contract.)

    Args:
        arena: [R, F] rows contiguous.
        rows: int64 [M * T] rows of the arena; -1 (CPU tensors): zeros (a position no token is held for).
        out: [M, Tcap >= T, D] of the arena's dtype, last dimension contiguous.
        kv: [blocks, 2, M, heads, Tcap, head dim] of the arena's dtype, last dimension contiguous,
            or None; D + blocks x 2 x heads x head dim = F.
    """
    name = resolve_backend(backend, arena.device)
    if name == "reference":
        return reference.read_rows(arena, rows, out, kv)
    ext = direct(arena, rows) if name in ("auto", "cpp") else None
    if ext is not None:
        return ext.read_rows(arena, rows, out, kv)
    return torch.ops.llmcache.read_rows(arena, rows, out, kv)
