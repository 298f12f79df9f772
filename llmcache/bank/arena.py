"""`PagedArena`: the exact tier's device-resident ring of pages of token states.

An entry of n tokens occupies ceil(n / page_tokens) pages of `page_tokens` rows of F features
each (vLLM's block tables are the model): no entry reserves positions it does not hold, and the
only length limit is the budget. The arena is one tensor [pages, page_tokens, F] on the model's
device, grown in chunks (doubling, capped) as entries arrive and never beyond `max_pages`; on the
CPU its first growth reserves address space for up to `RESERVE_BYTES` at once (the OS commits a
page of memory at its first write), so growing within it copies nothing. Which page holds what is
the host index's business (`bank.index`). Reads and writes move whole token
rows through one flat view [pages * page_tokens, F], addressed by token row numbers that the
index computes on the host, so a forward's reads are one `index_select` (or one `ops.read_rows`,
straight into the tensors a decoder's cached prefix is used as) and its writes one
`ops.write_rows`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops

RESERVE_BYTES = 1 << 30  # CPU: address space the first growth reserves (never more than the budget)
RUN_ROWS, MAX_RUNS = 64, 16  # CPU: writes of at least RUN_ROWS rows in at most MAX_RUNS runs are slice copies


class PagedArena:
    """Pages of F-wide token states.

    Args:
        page_tokens: tokens per page.
        features: F, the width of one token's stored state.
        dtype, device: of the states (the model's).
        max_pages: the most pages the arena may ever hold (the byte budget / page_bytes).
    """

    def __init__(self, page_tokens: int, features: int, dtype: torch.dtype, device: torch.device, max_pages: int):
        self.page_tokens = page_tokens
        self.features = features
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_pages = max_pages
        self.pages = self._empty(0)  # [capacity, page_tokens, F]: the first `num_pages` in use
        self.used = 0

    @property
    def page_bytes(self) -> int:
        return self.page_tokens * self.features * torch.empty((), dtype=self.dtype).element_size()

    @property
    def num_pages(self) -> int:
        return self.used

    @property
    def reserved_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    def _empty(self, pages: int) -> torch.Tensor:
        # An ordinary tensor even when first used under inference mode, which could only be
        # written inside inference mode after; never part of an autograd graph.
        with torch.inference_mode(False), torch.no_grad():
            return torch.empty((pages, self.page_tokens, self.features), dtype=self.dtype, device=self.device)

    def grow(self, pages: int) -> int:
        """Make room for at least `pages` pages (capped at max_pages); returns the page count now."""
        if pages <= self.num_pages:
            return self.num_pages
        target = min(self.max_pages, max(pages, 2 * self.num_pages, 16))
        if target > self.pages.shape[0]:
            capacity = target
            if self._reserves():
                capacity = max(target, min(self.max_pages, RESERVE_BYTES // self.page_bytes))
            bigger = self._empty(capacity)
            with torch.no_grad():
                bigger[: self.used].copy_(self.pages[: self.used])
            self.pages = bigger
        self.used = target
        return self.num_pages

    def _reserves(self) -> bool:
        """Whether an allocation costs memory only where it is written: the CPU's, unless
        deterministic mode fills fresh tensors (it would write every reserved byte)."""
        fills = torch.are_deterministic_algorithms_enabled() and torch.utils.deterministic.fill_uninitialized_memory
        return self.device.type == "cpu" and not fills

    def read(self, token_rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[S, F] the states at flat token rows int64 [S] (page * page_tokens + offset); into
        `out` ([>= S, F], reused: on the CPU a fresh large tensor costs more in page faults than
        the copy itself). One `index_select` on every device: on the CPU it reads as fast as slice
        copies of runs of rows or faster (16 to 512 rows of 192 B to 48 KB, one or two threads),
        without the numpy pass that finds the runs."""
        flat = self.pages.view(-1, self.features)
        if out is None:
            return flat.index_select(0, token_rows)
        return torch.index_select(flat, 0, token_rows, out=out[: token_rows.numel()])

    def write(self, token_rows: torch.Tensor, states: torch.Tensor) -> None:
        """Store states [S, F] at flat token rows int64 [S] (a forward's tokens go through
        `write_tokens`; this moves whole rows: loads, the shared tier's pages)."""
        flat = self.pages.view(-1, self.features)
        states = states if states.dtype == self.dtype else states.to(self.dtype)
        runs = self._runs(token_rows)
        with torch.no_grad():
            if runs is None:
                flat.index_copy_(0, token_rows, states)
                return
            for first, src, count in runs:
                flat[first : first + count].copy_(states[src : src + count])

    def read_tokens(self, token_rows: torch.Tensor, out: torch.Tensor, kv: torch.Tensor | None = None) -> None:
        """The states at flat token rows int64 [M * T] into out [M, >= T, D] and a decoder's kv
        [blocks, 2, M, heads, >= T, head dim], of the arena's dtype, in place (`ops.read_rows`)."""
        with torch.no_grad():
            ops.read_rows(self.pages.view(-1, self.features), token_rows, out, kv)

    def write_tokens(self, token_rows: torch.Tensor, pieces: list, src: torch.Tensor | None = None) -> torch.Tensor:
        """Store tokens at flat token rows int64 [S] from where the model left them (`ops.write_rows`:
        pieces [M, A, T, C] whose A * C add up to F, token src[i] or i of each); bool [S]: each row
        finite."""
        with torch.no_grad():
            return ops.write_rows(self.pages.view(-1, self.features), token_rows, src, pieces)

    def _runs(self, token_rows: torch.Tensor) -> list | None:
        """On the CPU, where `token_rows` fall in a few runs of consecutive rows (pages handed out
        one after another: a batch's new pages, a conversation's history): (first row, place in
        `token_rows`, rows) per run, written as slice copies, faster than an index_copy_ of
        large writes (5f5d507). None elsewhere (small writes too)."""
        if self.device.type != "cpu" or token_rows.numel() < RUN_ROWS:
            return None
        rows = token_rows.numpy()
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        if len(breaks) >= MAX_RUNS:
            return None
        starts = [0, *breaks.tolist()]
        ends = [*breaks.tolist(), len(rows)]
        return [(int(rows[a]), a, b - a) for a, b in zip(starts, ends)]

    def clear(self) -> None:
        """Free the memory (the index forgets every entry beside this)."""
        self.pages = self._empty(0)
        self.used = 0
