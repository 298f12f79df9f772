"""`PagedArena`: the exact tier's device-resident ring of pages of token states.

An entry of n tokens occupies ceil(n / page_tokens) pages of `page_tokens` rows of F features
each (vLLM's block tables are the model): no entry reserves positions it does not hold, and the
only length limit is the budget. The arena is one tensor [pages, page_tokens, F] on the model's
device, grown in chunks (doubling, capped) as entries arrive and never beyond `max_pages`; which
page holds what is the host index's business (`bank.index`). Reads and writes move whole token
rows through one flat view [pages * page_tokens, F], addressed by token row numbers that the
index computes on the host, so a forward's reads are one `index_select` and its writes one
`index_copy_`.
"""

from __future__ import annotations

import torch


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
        self.pages = self._empty(0)

    @property
    def page_bytes(self) -> int:
        return self.page_tokens * self.features * torch.empty((), dtype=self.dtype).element_size()

    @property
    def num_pages(self) -> int:
        return self.pages.shape[0]

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
        bigger = self._empty(target)
        with torch.no_grad():
            bigger[: self.num_pages].copy_(self.pages)
        self.pages = bigger
        return self.num_pages

    def read(self, token_rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[S, F] the states at flat token rows int64 [S] (page * page_tokens + offset); into
        `out` ([>= S, F], reused: on the CPU a fresh large tensor costs more in page faults than
        the copy itself)."""
        flat = self.pages.view(-1, self.features)
        if out is None:
            return flat.index_select(0, token_rows)
        return torch.index_select(flat, 0, token_rows, out=out[: token_rows.numel()])

    def write(self, token_rows: torch.Tensor, states: torch.Tensor | list) -> None:
        """Store states [S, F] at flat token rows int64 [S]; or a list of parts [S, F_i] whose
        widths add up to F, each written to its columns (no concatenated copy)."""
        flat = self.pages.view(-1, self.features)
        with torch.no_grad():
            if isinstance(states, torch.Tensor):
                flat.index_copy_(0, token_rows, states.detach().to(self.dtype))
                return
            at = 0
            for part in states:
                flat[:, at : at + part.shape[1]].index_copy_(0, token_rows, part.detach().to(self.dtype))
                at += part.shape[1]

    def clear(self) -> None:
        """Free the memory (the index forgets every entry beside this)."""
        self.pages = self._empty(0)
