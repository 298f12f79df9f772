"""What the tests share to drive a model and judge its outputs: the one batch maker (`batch`),
the one record of the rows each block's own code computed (`computed_rows`), and the one
comparison of a cached model's outputs with the uncached model's (`assert_outputs`, whose
docstring holds the suite's tolerance rule). The tiny models themselves: tests/models.py."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping

import torch
from models import TINY, VOCAB
from torch import nn

# ---- inputs --------------------------------------------------------------------------------------


def batch(layout: str, rows: list, gen: torch.Generator | None = None, positions: bool | None = None) -> dict:
    """input_ids and attention_mask of `rows` padded to the longest: padding holds id 0, mask 0.

    layout: "left" or "right" padding, or a family of tests/models.py, padded the way its
    tokenizer pads for generation (decoders left, encoders right).
    rows: token counts (random ids in [5, VOCAB), drawn from `gen` as one [rows, width] tensor),
    or 1-D tensors of ids.
    positions: add position_ids counting real tokens, as generate() makes them (padding does not
    shift them); by default for left padding only.
    """
    if layout in ("left", "right"):
        side = layout
    else:
        side = "left" if TINY[layout][2] else "right"
    lengths = [n if isinstance(n, int) else len(n) for n in rows]
    width = max(lengths)
    drawn = all(isinstance(n, int) for n in rows)
    ids = torch.randint(5, VOCAB, (len(rows), width), generator=gen) if drawn else torch.zeros(
        len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        mask[r, span] = 1
        if not drawn:
            ids[r, span] = rows[r]
    inputs = {"input_ids": torch.where(mask.bool(), ids, 0), "attention_mask": mask}
    if side == "left" if positions is None else positions:
        inputs["position_ids"] = (mask.cumsum(1) - 1).clamp_min(0)
    return inputs


# ---- which rows the blocks computed ----------------------------------------------------------------


def block_list(model: nn.Module) -> nn.ModuleList:
    """The model's blocks, found the way a reader of its code would (not through llmcache)."""
    base = model.base_model
    for path in ("encoder.layer", "transformer.layer", "layers", "h"):
        module = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise AssertionError(f"no block list in {type(base).__name__}")


class Computed:
    """What `computed_rows` saw: `calls[i]`, the row count of each call of block i's own code."""

    def __init__(self, blocks: int):
        self.calls: list[list[int]] = [[] for _ in range(blocks)]

    @property
    def rows(self) -> list[int]:
        """Per block, the rows its own code computed (all calls together)."""
        return [sum(calls) for calls in self.calls]

    def take(self) -> list[int]:
        """`rows` since the last `take`, then forgets them."""
        rows = self.rows
        for calls in self.calls:
            calls.clear()
        return rows


@contextlib.contextmanager
def computed_rows(blocks):
    """Yields a `Computed`: per block of `blocks` (a model: its `block_list`), the rows its own code
    computed, call by call. A pre-hook on the first submodule the block calls (its first child;
    T5Block: the first of its layer list) counts the rows of that call: it runs only when the
    block's own forward does, not when a cached row is served around it."""
    if not isinstance(blocks, (nn.ModuleList, list, tuple)):
        blocks = block_list(blocks)
    seen = Computed(len(blocks))

    def first_called(block: nn.Module) -> nn.Module:
        child = next(block.children())
        while isinstance(child, nn.ModuleList):  # (T5Block keeps its sublayers in a list)
            child = child[0]
        return child

    def hook(i):
        def record(module, args, kwargs):
            seen.calls[i].append(next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)).shape[0])
        return record

    handles = [first_called(block).register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, block in enumerate(blocks)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


# ---- outputs -------------------------------------------------------------------------------------
EXACT = {"rtol": 0.0, "atol": 0.0}
CLOSE = {"rtol": 1e-5, "atol": 1e-5}
PREFIX_TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
# Rows of the real 30-block SmolLM2 computed in another batch composition: the uncached model itself
# gives up to 1.0e-4 between a row computed alone and in a batch of two (|logits| up to 35: beyond
# CLOSE for 11 of 12 seeds, within 1e-4 + 1e-4|x| for all; bench/experiments/batch_noise.py,
# bench/results/experiments/batch-noise-smollm2-cpu.json).
CLOSE_DEEP = {"atol": 1e-4, "rtol": 1e-4}
_KV = re.compile(r"\.layers\[\d+\]\.(keys|values)$")


def leaves(out, path: str = "out"):
    """(path, tensor) of every tensor in a model output (KV caches as [B, T, heads, head_dim];
    None for a cache layer never written)."""
    if out is None:
        return
    if isinstance(out, torch.Tensor):
        yield path, out
    elif hasattr(out, "layers") and hasattr(out, "get_seq_length"):  # a transformers Cache
        for i, layer in enumerate(out.layers):
            for name in ("keys", "values"):
                value = getattr(layer, name)  # None: a layer that was never written
                yield f"{path}.layers[{i}].{name}", None if value is None else value.transpose(1, 2)
    elif isinstance(out, Mapping):
        for key, value in out.items():
            yield from leaves(value, f"{path}.{key}")
    elif isinstance(out, (tuple, list)):
        for i, value in enumerate(out):
            yield from leaves(value, f"{path}[{i}]")


def assert_outputs(got, want, mask: torch.Tensor | None = None, *, rows=None, close_rows=(), close=(),
                   tolerance: dict | None = None, full: bool = False, served: bool = False, kv: bool = True,
                   equal_nan: bool = False, close_tolerance: dict | None = None) -> None:
    """`got` (an accelerated model's output: a tensor, a ModelOutput, a tuple, ...) equals `want`
    (the uncached model's), tensor by tensor (`leaves`: KV caches included) and row by row.

    The tolerance rule of the suite, stated once:
    - EXACT (bit for bit: zero tolerance) wherever a row is served by the exact tier, or computed
      in a batch of the same composition as `want`'s (or served from an entry computed in one).
    - CLOSE (1e-5) for the rows in `close_rows` and the outputs named in `close` (the last part of
      their path, e.g. "pooler_output"): computed in another batch composition than `want`'s (a
      sub-batch of the misses or of in-batch repeats, another padded width, threads sharing the
      OpenMP pool, a pooler run on more rows), hence through matrix products of other shapes whose
      blocking can change the order of the float sums: a few ulps per product, below 1e-5 after
      the tiny configs' 2-4 fp32 blocks and MiniLM's 6; SmolLM2's 30 blocks reach 1.0e-4 on its
      logits uncached, so its rows are held to CLOSE_DEEP (1e-4 + 1e-4|x|), passed as `close_tolerance`.
      A wrongly served entry is off in every digit (0.1 to 3.3 in issue 12's measurements).
    - PREFIX_TOLERANCE (1e-4), passed as `tolerance`: rows computed against cached K/V (prefix
      reuse, tests/test_prefix.py) run their suffix as a shorter sequence than the uncached full
      prefill, so their products cover other row counts (as in vLLM's prefix caching). Measured:
      at most 6e-8 on fp32 logits of the tiny configs (|logits| ~ 0.1-1), 6.8e-5 on SmolLM2's
      (|logits| up to 37); generate's tokens must still be identical.
    `tolerance` holds every comparison of the call to it (also CLOSE, or a file's own bound); a
    tensor that is not batch-major (a loss) is held to CLOSE when any row is close, else EXACT.

    mask: [B, T] real tokens of the call. Per-token tensors ([B, T, ...]) compare at real
    positions unless `full` (a KV cache a decode step extended past T: also at the positions past
    T); None: whole rows.
    rows: the rows of `want` to compare (default: all, and then the shapes must be equal; else
    equal past the batch dimension).
    served: rows may be served, so what the docs say differs at padding positions is left out:
    a pooler reading position 0 of a left-padded row.
    kv: compare the KV caches too.
    equal_nan: NaN equals NaN.
    """
    got, want = dict(leaves(got)), dict(leaves(want))
    assert got.keys() == want.keys() and want, (sorted(got), sorted(want))
    real = None if mask is None else mask.bool()
    for path, w in want.items():
        if not kv and _KV.search(path):
            continue
        g = got[path]
        assert w is not None, f"{path}: the uncached model left it empty"
        assert g is not None, f"{path}: never written (the uncached model's holds {tuple(w.shape)})"
        shape = (g.shape, w.shape) if rows is None else (g.shape[1:], w.shape[1:])
        assert shape[0] == shape[1] and g.dtype == w.dtype, (path, g.shape, w.shape, g.dtype, w.dtype)
        approx = path.rsplit(".", 1)[-1] in close
        if w.dim() == 0 or (real is not None and rows is None and w.shape[0] != real.shape[0]):
            # a loss, or anything not batch-major
            whole = tolerance or ((close_tolerance or CLOSE) if approx or close_rows else EXACT)
            torch.testing.assert_close(g, w, equal_nan=equal_nan, msg=path, **whole)
            continue
        per_token = real is not None and not full and w.dim() >= 2 and w.shape[1] == real.shape[1]
        # (A KV cache a later decode step extended holds real positions past the mask.)
        extended = real is not None and not full and w.dim() == 4 and w.shape[1] > real.shape[1] and ".cache" in path
        for r in range(w.shape[0]) if rows is None else rows:
            if served and path.endswith("pooler_output") and not real[r, 0]:
                continue  # documented: BERT's pooler reads position 0, padding in a left-padded row
            if per_token:
                a, b = g[r][real[r]], w[r][real[r]]
            elif extended:
                keep = torch.cat([real[r], real.new_ones(w.shape[1] - real.shape[1])])
                a, b = g[r][keep], w[r][keep]
            else:
                a, b = g[r], w[r]
            tol = tolerance or ((close_tolerance or CLOSE) if approx or r in close_rows else EXACT)
            torch.testing.assert_close(a, b, equal_nan=equal_nan, msg=lambda m, p=path, r=r: f"{p} row {r}: {m}",
                                       **tol)
