"""A forward's computed tokens into the arena's rows, every row's finiteness checked on the way.

The exact tier stores each computed token as one arena row: the span's output and, for decoders,
every block's K and V. `write_rows` takes them where the model left them ([M, heads, T, head dim]
per block, [M, T, D] for the output, as 4-D pieces) and writes each token's row in one pass,
flagging rows that hold an inf or a NaN (the store checks the flags at the next routing, so the
forward never waits on them). Kernels: csrc/cpu/write_rows.cpp (bound for eager CPU calls
without the dispatcher, as hamming_topk's is); elsewhere `reference.write_rows`.
"""

from __future__ import annotations

import torch

from . import reference
from ._library import LIB, direct, fill_missing_kernels, resolve_backend

LIB.define("write_rows(Tensor(a!) arena, Tensor dst, Tensor? src, Tensor[] pieces) -> Tensor")


@torch.library.register_fake("llmcache::write_rows")
def _write_rows_fake(arena, dst, src, pieces):
    return dst.new_empty(dst.shape, dtype=torch.bool)


fill_missing_kernels("write_rows", None, reference.write_rows)


def write_rows(arena: torch.Tensor, dst: torch.Tensor, src: torch.Tensor | None, pieces: list, *,
               backend: str | None = None) -> torch.Tensor:
    """Arena row dst[i] = token src[i] (or i) of every piece, in order; bool [S]: each row finite.
    (`reference.write_rows` states the contract.)

    Args:
        arena: [R, F] float16/bfloat16/float32/float64, rows contiguous; written in place.
        dst: int64 [S], distinct rows of the arena.
        src: int64 [S] tokens (m * T + t) of the pieces, or None for tokens 0..S-1.
        pieces: [M, A, T, C] tensors (last dimension contiguous; cast to the arena's dtype here
            where they differ), A * C adding up to F.
    """
    pieces = [p if p.dtype == arena.dtype else p.to(arena.dtype) for p in pieces]
    name = resolve_backend(backend, arena.device)
    if name == "reference":
        return reference.write_rows(arena, dst, src, pieces)
    # (Plain CPU tensors outside compile and export call the kernel without the dispatcher; fake
    # and functional subclasses go through the op.)
    ext = direct(arena) if name in ("auto", "cpp") else None
    if ext is not None:
        return ext.write_rows(arena, dst, src, pieces)
    return torch.ops.llmcache.write_rows(arena, dst, src, pieces)
