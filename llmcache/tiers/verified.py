"""The verified semantic tier: serves a neighbour's output only where checks bound the error.

It sits behind the exact tier (`tiers.exact.ExactTier`) and uses its entries: a row that misses there
looks for a neighbour among the cached rows of the same length, positions, token types and
namespace, by the Hamming distance of their SimHash codes (of the mean input token embedding).
Each cached row keeps, beside its states in the arena, the `Semantic.read` of its final output.

Neighbourhoods are bands of that distance (`EDGES`). For every row that computes while a
neighbour was in reach, the row's true output is judged against what the neighbour would have
served (free: the row computes anyway), and the band's counts grow. `bound.admit` decides, from
Clopper-Pearson bounds that hold together, which bands may serve so that the served hits' error
is <= max_error with the stated confidence. In serving bands a share `explore` of would-be hits
still computes and is checked: a uniform sample of what is served, whose failures give the
realised error; a neighbour that fails a check at distance d serves only rows closer than d from
then on (its own threshold); if the sample shows the error
above max_error (its lower bound past it) the tier stops serving and `stats` says so.

Assumption (stated in the README): the stream is exchangeable (its mix does not drift); bounds
are recomputed as evidence grows without correction for that repeated look.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import bound, rows
from ..ops.hamming_topk import hamming_topk_unchecked
from ..ops.simhash import simhash_pooled_unchecked
from ..promise import Semantic
from .base import Call, Tier

BIG = 1 << 20  # "no limit" for a distance
EDGES = (0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023)  # upper Hamming distance of each band


CANDIDATES = 8  # nearest records fetched per row in one batched search; a full scan past them


def _live(index, key, entry) -> bool:
    """The record's entry (a decoder's: every page of its chain) still holds its key."""
    if isinstance(entry, tuple):
        return all(index.is_live(e, k) for k, e in zip(key, entry))
    return index.is_live(entry, key)


def bands(max_distance: int) -> list[int]:
    """Upper edges of the bands up to `max_distance`."""
    edges = [e for e in EDGES if e < max_distance] + [max_distance]
    return sorted(set(edges))


class Records:
    """Cached rows that may answer others, all groups in one bank (the group is the tag: one
    length, positions, token types, namespace), searched with `ops.hamming_topk`.

    Per record: its code, its group's tag, its reach (it serves rows at most this far; -1: gone;
    a failed check at distance d lowers it to d - 1: the record's own threshold), the exact-tier
    entry it follows and its key (the entry is still this row's while the index says so) and the
    `Semantic.read` of its output. Records keep their order (a group's oldest first: ties go to it).
    """

    def __init__(self, words: int):
        self.codes = np.zeros((0, words), dtype=np.uint64)
        self.tags = np.zeros(0, dtype=np.int64)
        self.reach = np.zeros(0, dtype=np.int64)
        self.entries: list = []
        self.keys: list = []
        self.reads: list = []
        self.size = 0
        self.group_ids: dict = {}  # group key -> its tag

    def tag(self, group_key) -> int:
        """The group's tag (-1: a row without a group, which matches nothing)."""
        return -1 if group_key is None else self.group_ids.get(group_key, -2)

    def append(self, group_key, entry, key, codes: np.ndarray, read: torch.Tensor) -> None:
        n = self.size
        if n == len(self.tags):
            grow = max(4, n)
            self.codes = np.concatenate([self.codes, np.zeros((grow, self.codes.shape[1]), np.uint64)])
            self.tags = np.concatenate([self.tags, np.full(grow, -3)])
            self.reach = np.concatenate([self.reach, np.full(grow, BIG)])
        self.codes[n], self.reach[n] = codes, BIG
        self.tags[n] = self.group_ids.setdefault(group_key, len(self.group_ids))
        self.entries.append(entry)
        self.keys.append(key)
        self.reads.append(read)
        self.size = n + 1

    def keep(self, kept: list) -> None:
        """Only the records `kept` (ascending) remain, in order."""
        at = np.array(kept, dtype=np.int64)
        self.codes, self.tags, self.reach = self.codes[at], self.tags[at], self.reach[at]
        self.entries = [self.entries[i] for i in kept]
        self.keys = [self.keys[i] for i in kept]
        self.reads = [self.reads[i] for i in kept]
        self.size = len(kept)

    def candidates(self, groups: list, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per row (its group key and code), its k nearest records of its group not gone:
        (distance int64 [B, k], record int64 [B, k], -1 past the eligible ones), ascending."""
        n = self.size
        queries = torch.from_numpy(np.ascontiguousarray(codes).view(np.int64))
        bank = torch.from_numpy(self.codes[:n].view(np.int64))
        tags = torch.tensor([self.tag(g) for g in groups], dtype=torch.int64)
        dist, idx = hamming_topk_unchecked(queries, bank, min(k, n), torch.from_numpy(self.reach[:n] >= 0), tags,
                                           torch.from_numpy(self.tags[:n]))
        return dist.numpy().astype(np.int64), idx.numpy()

    def scan(self, group_key, codes: np.ndarray) -> np.ndarray:
        """Every record's distance to `codes` within its reach (BIG elsewhere and outside the group)."""
        n = self.size
        distance = np.bitwise_count(self.codes[:n] ^ codes).sum(1, dtype=np.int64)
        distance[(distance > self.reach[:n]) | (self.tags[:n] != self.tag(group_key))] = BIG
        return distance


@dataclass
class Pending:
    """One forward's checks and new records, finished once its output is known."""

    mask: torch.Tensor
    checks: list = field(default_factory=list)  # (row, record, band, distance, sampled, explored)
    records: list = field(default_factory=list)  # (row, group, entry, key, codes)
    served: int = 0
    served_rows: list = field(default_factory=list)  # rows served a neighbour's entry


@dataclass
class Neighbours:
    """The verified tier's part of one forward, handed to the exact tier's routing: per row, the
    group it may find neighbours in (None: none), its code and its nearest records (one batched
    search at routing, `Records.candidates`)."""

    tier: SemanticTier
    pending: Pending
    groups: list  # per row: its group key (rows.near_keys) or None
    codes: np.ndarray  # uint64 [B, W]
    near: tuple | None = None  # (distance, record) int64 [B, k] each, made at the first `consider`

    def consider(self, row: int, index):
        """The entry (a decoder's: the tuple of its pages) to serve `row` a neighbour's output, or None."""
        return self.tier.consider(self, row, index)

    def stored(self, row: int, entry, key) -> None:
        """`row` computes and is stored as `entry` under `key`: a neighbour for later rows."""
        if self.groups[row] is not None:
            self.pending.records.append((row, self.groups[row], entry, key, self.codes[row]))


@dataclass
class SemanticStats:
    """The verified semantic tier's state. None where nothing was ever measured (not zero)."""

    state: str  # "learning" (no band proven), "serving", "stopped" (the sample broke the promise)
    promise: str
    would_be: int  # rows that missed the exact tier with a neighbour in reach (with the prior's)
    served: int  # semantic hits served
    verified: int  # would-be hits checked (computed and judged) in this run; the prior's are in `bands`
    failed: int  # of them, outside tolerance
    explored: int  # checks drawn among hits that would have been served
    explored_failed: int
    error_bound: float | None  # upper bound on the served hits' error (admission), None: never measured
    realised_bound: float | None  # upper bound from the explored sample, None: never measured
    bands: list  # per band: dict(max_distance, would_be, verified and failed (the bound's sample), upper (of the
    # region "distance <= max_distance", pooled), serving)
    narrowed: int  # times a failed check narrowed a neighbour's reach (its own threshold)
    records: int  # rows held as neighbours (at most twice the exact tier's entries, plus 64)


class SemanticTier(Tier):
    """The verified tier of one accelerated model (see the module docstring).

    Args:
        semantic: the promise. store: the exact tier's `Store`, whose entries the records follow.
        embedding, planes, backend: the input embedding and SimHash planes rows are coded by.
        lock: the owner's. read_top: judge the accelerated wrapper's output, not the base model's.
    """

    def __init__(self, semantic: Semantic, num_bits: int, seed: int, store=None, embedding=None, planes=None,
                 backend=None, lock=None, read_top: bool = False, pooling: str | None = None):
        self.semantic = semantic
        self.store, self.embedding, self.planes, self.backend = store, embedding, planes, backend
        self.lock = lock or threading.RLock()
        self.read_top = read_top
        self.local = threading.local()
        self.fingerprint_s = 0.0
        self.words = num_bits // 64
        self.edges = bands(semantic.max_distance if semantic.max_distance is not None else num_bits // 4)
        self.rng = random.Random(seed)
        self.pooling = pooling or semantic.pooling  # what the caller pools by (a SentenceTransformer's own)
        if semantic.evidence is not None and len(semantic.evidence) != len(self.edges):
            raise ValueError(f"Semantic.evidence has {len(semantic.evidence)} bands and this tier {len(self.edges)} "
                             f"(num_bits {num_bits}, max_distance {self.edges[-1]}): accelerate with the num_bits and "
                             "max_distance the calibration used (Calibration.num_bits)")
        self.clear()

    def clear(self, prior: bool = True) -> None:
        """Forget every record and what this run measured; keep the calibration's evidence
        unless `prior` is False (the weights changed: nothing measured holds)."""
        self.records_ = Records(self.words)
        prior = list(self.semantic.evidence or ()) if prior else []
        self.counts = [list(prior[i]) if i < len(prior) else [0, 0, 0] for i in range(len(self.edges))]
        self.served = self.explored = self.explored_failed = self.narrowed = 0
        self.checked = self.check_failed = 0  # this run's checks (the counts add the prior's)
        self.stopped = False
        self._admitted = None

    # ---- the Tier verbs -------------------------------------------------------------------
    def payload(self, call: Call) -> torch.Tensor | None:
        """int64 [B, W]: SimHash of each row's mean input token embedding (its real tokens')."""
        batch = call.device_batch()
        if batch is None:
            return None
        start = time.perf_counter()
        ids, mask = batch[0], batch[1]
        codes = simhash_pooled_unchecked(self.embedding(ids), mask, self.planes, backend=self.backend)
        self.fingerprint_s += time.perf_counter() - start
        return codes

    def neighbours(self, call: Call, ids_before: bool) -> Neighbours:
        """This forward's `Neighbours` (its codes from the router's host copy); kept in `call.near`."""
        pooled = self.semantic.serve == "pooled"
        groups = rows.near_keys(call.header, call.host, ids_before, pooled, call.padding)
        codes = call.parts[self].reshape(len(groups), -1).view(np.uint64)
        call.near = Neighbours(self, Pending(call.device_batch()[1]), groups, codes)
        return call.near

    def finish(self, call: Call, output, top: bool) -> None:
        """Judge the forward's checks on `output` (the base model's, or with `top` the wrapper's,
        which `read_top` says the tier reads: the base forward's part waits for it)."""
        near = call.near
        if near is None:
            return
        if top != self.read_top:
            done = getattr(self.local, "done", None)
            if not top and done is not None:  # (None: the base model called without its wrapper: no output)
                done.append(call)
            return
        with self.lock:
            self.judge(near.pending, output, self.store.index)

    def wrap_top(self, top_forward):
        """The accelerated wrapper's forward (`read_top`): its output judges the base calls inside."""

        def forward(*args, **kwargs):
            done = getattr(self.local, "done", None)
            outer = done is None
            if outer:
                done = self.local.done = []
            depth = len(done)
            try:
                output = top_forward(*args, **kwargs)
                for call in done[depth:]:
                    self.finish(call, output, top=True)
            finally:
                del done[depth:]
                if outer:
                    self.local.done = None
            return output

        return forward

    def invalidate(self, dtype, device) -> None:
        self.clear(prior=False)  # (the weights changed: nothing measured holds)

    def report(self, counters) -> dict:
        return {"semantic": self.stats(), "fingerprint_s": self.fingerprint_s}

    def reset_stats(self) -> None:
        self.fingerprint_s = 0.0

    # ---- routing -------------------------------------------------------------------
    def band(self, distance: int) -> int:
        return int(np.searchsorted(self.edges, distance))

    def admitted(self) -> tuple[int, float]:
        """(the farthest band served, -1: none; the served region's error bound)."""
        if self._admitted is None:
            self._admitted = bound.admit([(c[1], c[2]) for c in self.counts], self.semantic.max_error,
                                         self.semantic.alpha)
        return self._admitted

    def nearest(self, near: Neighbours, row: int, index) -> tuple[int, int]:
        """(record, distance) of the nearest live record of the row's group within its reach;
        record -1: none. Records found gone on the way are marked so for good. The batch's
        nearest `CANDIDATES` come from one search; a row whose candidates all fail scans on."""
        records = self.records_
        if not records.size:
            return -1, -1
        if near.near is None:
            near.near = records.candidates(near.groups, near.codes, CANDIDATES)
        distances, found = near.near[0][row].tolist(), near.near[1][row].tolist()
        for d, record in zip(distances, found):
            if record < 0 or d > self.edges[-1]:
                return -1, -1
            if d > records.reach[record]:
                continue
            if _live(index, records.keys[record], records.entries[record]):
                return record, d
            records.reach[record] = -1  # evicted (or its slot reused): gone for good
        if len(found) < CANDIDATES:
            return -1, -1  # (the candidates were every record)
        distance = records.scan(near.groups[row], near.codes[row])
        while True:
            record = int(distance.argmin())
            d = int(distance[record])
            if d > self.edges[-1]:
                return -1, -1
            if _live(index, records.keys[record], records.entries[record]):
                return record, d
            records.reach[record] = -1
            distance[record] = BIG

    def consider(self, near: Neighbours, row: int, index):
        """For a row that missed the exact tier: the entry to serve it (a decoder's: the tuple
        of its pages), or None (it computes; a check is queued when a neighbour was in reach)."""
        if near.groups[row] is None:
            return None
        record, distance = self.nearest(near, row, index)
        if record < 0:
            return None
        pending = near.pending
        band = self.band(distance)
        self.counts[band][0] += 1
        last, _ = self.admitted()  # (recomputed when checks are judged, not per row)
        serving = last >= 0 and not self.stopped
        # The bound's sample: every band at one rate at any time (all would-be hits while
        # nothing serves, `explore` of them once something does), so a region's pooled counts
        # are a uniform sample of it; the other checks only narrow their neighbour's reach.
        sampled = not serving or self.rng.random() < self.semantic.explore
        if serving and band <= last and not sampled:
            pending.served += 1
            pending.served_rows.append(row)
            self.served += 1
            return self.records_.entries[record]
        pending.checks.append((row, record, band, distance, sampled, serving and band <= last))
        return None

    # ---- after the forward -----------------------------------------------------------
    def judge(self, pending: Pending, output, index) -> None:
        """Judge the forward's checks and keep its new records' outputs (`index`: the exact
        tier's, whose live entries the records follow)."""
        if not pending.checks and not pending.records:
            return
        reads = self.semantic.read(output, pending.mask)
        records = self.records_
        if pending.checks:
            rows = torch.tensor([c[0] for c in pending.checks], device=reads.device)
            served = torch.stack([records.reads[c[1]] for c in pending.checks]).to(reads.device)
            agree = self.semantic.agree(served, reads.index_select(0, rows))
            for (row, record, band, distance, sampled, explored), ok in zip(pending.checks, agree):
                self.counts[band][1] += sampled
                self.counts[band][2] += sampled and not ok
                self.checked += 1
                if not ok:
                    self.check_failed += 1
                    if records.reach[record] >= distance:
                        self.narrowed += 1
                        records.reach[record] = distance - 1
                if explored:
                    self.explored += 1
                    self.explored_failed += not ok
            self._admitted = None
            alpha = self.semantic.alpha
            if bound.lower(self.explored_failed, self.explored, alpha) > self.semantic.max_error:
                self.stopped = True
        for row, group_key, entry, key, codes in pending.records:
            records.append(group_key, entry, key, codes, reads[row].clone())
        if records.size > 2 * index.entries + 64:
            records.keep([i for i in range(records.size) if records.reach[i] >= 0
                          and _live(index, records.keys[i], records.entries[i])])

    def stats(self) -> SemanticStats:
        last, union = self.admitted()
        table, checked, failed = [], 0, 0
        for b, (e, c) in enumerate(zip(self.edges, self.counts)):
            checked, failed = checked + c[1], failed + c[2]
            table.append({"max_distance": e, "would_be": c[0], "verified": c[1], "failed": c[2],
                          "upper": bound.upper(failed, checked, self.semantic.alpha) if checked else None,
                          "serving": b <= last})
        state = "stopped" if self.stopped else ("serving" if last >= 0 else "learning")
        return SemanticStats(
            state=state, promise=self.semantic.describe(), would_be=sum(c[0] for c in self.counts),
            served=self.served, verified=self.checked, failed=self.check_failed, explored=self.explored,
            explored_failed=self.explored_failed, error_bound=union if last >= 0 else None,
            realised_bound=bound.upper(self.explored_failed, self.explored, self.semantic.alpha)
            if self.explored else None,
            bands=table, narrowed=self.narrowed, records=self.records_.size,
        )
