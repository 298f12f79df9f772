"""The exact tier's storage: the host index and the device arena, the finiteness of what was
written, and the commit that publishes a forward's entries.

`ExactIndex` (bank/index.py) says which entry holds which key, in which pages; `PagedArena`
(bank/arena.py) holds the pages of token states on the model's device. A forward reserves
entries at routing and writes their states after its last cached block (`commit`); whether
those states were finite is known on the device only, so the flags wait in `pending` and come
to the host with the next forward's one copy (`take_pending` / `check_pending`), which drops
the entries that were not.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ... import rows
from ...bank import ExactIndex, PagedArena, new_index
from ...integrity import checksum, raw
from ...ops import _library as ops_library


def _split(blob: torch.Tensor, lengths: torch.Tensor) -> list:
    """The byte strings of a concatenated uint8 `blob`, `lengths` int64 [n] each."""
    if int(lengths.sum()) != blob.numel() or bool((lengths < 0).any()):
        raise ValueError("the entry keys or labels are corrupt")
    data, offsets = blob.numpy().tobytes(), np.concatenate([[0], np.cumsum(lengths.numpy())]).tolist()
    return [data[offsets[i] : offsets[i + 1]] for i in range(len(lengths))]


class Store:
    """Index, arena and pending checks of one exact tier.

    Args:
        config: the CacheConfig (page_tokens, max_bytes, capacity, eviction).
        features, dtype, device: what one stored token takes, and where the states live.
    """

    def __init__(self, config, features: int, dtype: torch.dtype, device: torch.device):
        self.config = config
        self.arena = self.new_arena(features, dtype, device)
        self.index = self.new_index()
        self.pending: list = []  # ((entries committed, their keys, their ntokens), per-token finite flags on the device)
        self.local = threading.local()

    def new_arena(self, features: int, dtype: torch.dtype, device: torch.device) -> PagedArena:
        """An empty arena of this config's pages, as many as `max_bytes` allows."""
        cfg = self.config
        arena = PagedArena(cfg.page_tokens, features, dtype, device, max_pages=0)
        arena.max_pages = cfg.max_bytes // arena.page_bytes if cfg.max_bytes is not None else 1 << 40
        return arena

    def new_index(self, arena: PagedArena | None = None) -> ExactIndex:
        """An empty index sized for the arena (`bank.new_index`: the C++ one where the extension is loaded)."""
        cfg = self.config
        return new_index(cfg.page_tokens, (arena or self.arena).max_pages, cfg.capacity, cfg.eviction)

    def clear(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        """Forget every entry; with `dtype`/`device` (the weights moved), store in those from now on."""
        self.pending.clear()
        self.arena = self.new_arena(self.arena.features, dtype or self.arena.dtype, device or self.arena.device)
        self.index = self.new_index()

    @property
    def held_bytes(self) -> int:
        return self.index.held_pages * self.arena.page_bytes

    def read_buffer(self, numel: int) -> torch.Tensor:
        """This thread's flat buffer [>= numel] of the arena's dtype for the states a decoder's
        forward reads from the arena (`suffix`: its cached prefix, which the caller's KV cache may go
        on to hold as K/V): the kept one once no other tensor holds its storage (the caller dropped
        that cache, or its next update replaced them), else a new one, kept from then on. Where a
        fresh large tensor costs page faults (the CPU's), reusing it saves more than the read itself
        costs."""
        buf = getattr(self.local, "buffer", None)
        arena = self.arena
        ext = ops_library.extension()
        if buf is None or buf.numel() < numel or buf.dtype != arena.dtype or buf.device != arena.device \
                or ext is None or ext.storage_use_count(buf) != 1:
            with torch.inference_mode(False), torch.no_grad():
                buf = torch.empty(numel + numel // 4, dtype=arena.dtype, device=arena.device)  # (room to grow)
            self.local.buffer = buf
        return buf

    # ---- finiteness ---------------------------------------------------------------------
    def take_pending(self) -> tuple[list, torch.Tensor | None]:
        """Entries written since the last routing whose finiteness the host does not know yet,
        with their per-token flags (bool [W] on the device); the caller brings the flags to the
        host in the same copy as the batch and hands both to `check_pending`."""
        if not self.pending:
            return [], None
        batches = [batch for batch, _ in self.pending]
        flags = self.pending[0][1] if len(self.pending) == 1 else torch.cat([f for _, f in self.pending])
        self.pending.clear()
        return batches, flags

    def check_pending(self, batches: list, flags: np.ndarray | None, counts: dict) -> None:
        """Drop entries whose written tokens were not all finite (counted as "non_finite")."""
        if not batches or np.asarray(flags).all():  # (nearly always: every token finite)
            return
        written = [item for batch in batches for item in zip(*batch)]
        sizes = np.array([n for _, _, n in written], dtype=np.int64)
        finite = np.minimum.reduceat(np.asarray(flags[: int(sizes.sum())]), np.cumsum(sizes) - sizes)
        for i in np.flatnonzero(finite == 0).tolist():  # (nearly always none)
            entry, key, _ = written[i]
            if self.index.discard(entry, key):
                counts["non_finite"] = counts.get("non_finite", 0) + 1

    def resolve_pending(self, counts: dict) -> None:
        """Check the pending flags now (a host read: for `save` and `held`, not the hot path)."""
        batches, flags = self.take_pending()
        if flags is not None:
            self.check_pending(batches, flags.cpu().numpy(), counts)

    # ---- writing ------------------------------------------------------------------------
    def commit(self, entries: list, ntokens: list, dst: torch.Tensor, pieces: list, src: torch.Tensor | None) -> list:
        """Write the reserved `entries`' tokens (in order: token src[i], or i, of `pieces`, as
        `PagedArena.write_tokens` takes them) at arena rows `dst` and publish the entries (parents
        before children); their finiteness is checked at the next routing. Returns the entries
        committed, -1 where another thread stored the same row meanwhile (its copy stays). Call
        under the lock."""
        self.arena.grow(self.index.num_pages)
        finite = self.arena.write_tokens(dst, pieces, src)
        committed, keys = self.index.commit_many(entries)
        self.pending.append(((committed, keys, ntokens), finite))
        return committed

    def insert(self, items: list) -> list:
        """Store whole entries [(key, states [n, F], label, parent key: b"" or the page it
        extends, inserted or held before it)] at once (from the shared tier), pinned for the
        routing under way; per item its entry, -1 where there was no room (or no parent)."""
        entries, states = [], []
        for key, held, label, parent_key in items:
            parent = self.index.find(parent_key) if parent_key else -1
            if parent_key and parent < 0:
                entries.append(-1)
                continue
            entry = self.index.insert(key, held.shape[0], parent, label=label)
            entries.append(entry)
            if entry >= 0:
                self.index.pin((entry,))  # (a later insert must not evict it before routing reads it)
                states.append(held)
        if states:
            self.arena.grow(self.index.num_pages)
            device = self.arena.device
            dst = self.index.token_rows([e for e in entries if e >= 0])
            self.arena.write(torch.from_numpy(dst).to(device), _joined(states).to(device))
        return entries

    def release(self, entries: list) -> None:
        """Give back reserved entries that will not be written (children first)."""
        for entry in reversed(entries):
            self.index.release(entry)

    # ---- save / load ----------------------------------------------------------------------
    def state_dict(self, fingerprint: bytes) -> dict:
        """The live entries as tensors: keys and labels (bytes, concatenated, and their lengths), the
        index's per-entry fields, their tokens' states [sum n, F] and a checksum per entry."""
        state = self.index.state_dict()  # (a decoder page after the page it extends)
        live, keys = state.pop("entries"), state.pop("keys")
        labels = [rows.label_bytes(label) if label is not None else b"" for label in state.pop("labels")]
        if not live:
            return {}
        token_rows = torch.from_numpy(self.index.token_rows(live)).to(self.arena.device)
        states = self.arena.read(token_rows).cpu().contiguous()
        data, at, sums = raw(states), 0, []
        for key, label, n in zip(keys, labels, state["ntokens"].tolist()):
            sums.append(checksum(fingerprint, key + label, data[at : at + n].tobytes()))
            at += n
        tensors = {"states": states, "keys": torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).copy()),
                   "key_lengths": torch.tensor([len(k) for k in keys], dtype=torch.int64),
                   "labels": torch.from_numpy(np.frombuffer(b"".join(labels), dtype=np.uint8).copy()),
                   "label_lengths": torch.tensor([len(b) for b in labels], dtype=torch.int64),
                   "checksums": torch.from_numpy(np.stack(sums))}
        tensors.update({name: torch.from_numpy(values) for name, values in state.items()})
        return tensors

    def load_state_dict(self, saved: dict, fingerprint: bytes) -> tuple[ExactIndex, PagedArena]:
        """A new (index, arena) holding what `state_dict` wrote, checked (ValueError saying why)."""
        arena = self.new_arena(self.arena.features, self.arena.dtype, self.arena.device)
        index = self.new_index(arena)
        if "states" not in saved:
            return index, arena
        states, lengths, counts = saved["states"], saved["key_lengths"], saved["ntokens"]
        if states.dim() != 2 or counts.shape != lengths.shape or int(counts.sum()) != states.shape[0]:
            raise ValueError("the entry tensors disagree on the number of tokens")
        if int(lengths.sum()) != saved["keys"].numel() or bool((counts <= 0).any()):
            raise ValueError("the entry keys or token counts are corrupt")
        if states.dtype != arena.dtype or states.shape[1] != arena.features:
            raise ValueError(f"the file holds {states.dtype} states of {states.shape[1]} features per token; this "
                             f"model's entries hold {arena.dtype}, {arena.features}")
        checksums = saved["checksums"].numpy()
        if checksums.shape != (len(counts), 16):
            raise ValueError("the file holds no checksum for some entries")
        keys = _split(saved["keys"], lengths)
        labels = _split(saved.get("labels", torch.zeros(0, dtype=torch.uint8)),
                        saved.get("label_lengths", torch.zeros(len(counts), dtype=torch.int64)))
        if len(labels) != len(keys):
            raise ValueError("the entry labels are corrupt")
        data, start = raw(states), 0
        for i, n in enumerate(counts.tolist()):
            if not np.array_equal(checksum(fingerprint, keys[i] + labels[i], data[start : start + n].tobytes()),
                                  checksums[i]):
                raise ValueError(f"entry {i} does not match its checksum (a corrupted or edited file)")
            start += n
        labels = [rows.parse_label(b) if b else None for b in labels]
        entries = index.load_state_dict({"keys": keys, "labels": labels, **{name: saved[name].numpy() for name in ExactIndex.FIELDS}})
        if not bool(torch.isfinite(states).all()):
            raise ValueError("the file holds non-finite cached states")
        arena.grow(index.num_pages)
        token_rows = torch.from_numpy(index.token_rows(entries)).to(arena.device)
        arena.write(token_rows, states.to(arena.device))
        return index, arena

    def adopt(self, index: ExactIndex, arena: PagedArena) -> None:
        """Swap in what `load_state_dict` built (under the owner's lock)."""
        self.index, self.arena = index, arena
        self.pending.clear()


def _joined(parts: list) -> torch.Tensor:
    """`parts` ([n_i, F] each) one after another: a view where they already lie so in one buffer
    (the shared tier decodes a fetch's pages into one), else a concatenated copy."""
    first = parts[0]
    at, size = first.data_ptr(), first.element_size()
    storage = first.untyped_storage().data_ptr()
    for part in parts:
        if not part.is_contiguous() or part.data_ptr() != at or part.untyped_storage().data_ptr() != storage:
            return torch.cat(parts)
        at += part.numel() * size
    rows = sum(part.shape[0] for part in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
