"""The verified semantic tier: serves a neighbour's output only where checks bound the error.

It sits behind the exact tier (`exact.ExactTier`) and uses its entries: a row that misses there
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
from dataclasses import dataclass, field

import numpy as np
import torch

from . import bound
from .promise import Semantic

BIG = 1 << 20  # "no limit" for a distance
EDGES = (0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023)  # upper Hamming distance of each band


def _live(index, key, entry) -> bool:
    """The record's entry (a decoder's: every page of its chain) still holds its key."""
    if isinstance(entry, tuple):
        return all(index.is_live(e, k) for k, e in zip(key, entry))
    return index.is_live(entry, key)


def bands(max_distance: int) -> list[int]:
    """Upper edges of the bands up to `max_distance`."""
    edges = [e for e in EDGES if e < max_distance] + [max_distance]
    return sorted(set(edges))


@dataclass
class Group:
    """Cached rows that may answer each other: one length, positions, token types, namespace."""

    codes: np.ndarray  # uint64 [capacity, W]; the first `size` rows are records
    reach: np.ndarray  # int64 [capacity]: the record serves rows at most this far (-1: gone; a failed check at
    # distance d lowers it to d - 1: the entry's own threshold)
    size: int = 0
    entries: list = field(default_factory=list)  # exact-tier entry per record
    keys: list = field(default_factory=list)  # its key (the entry is still this row's while the index says so)
    reads: list = field(default_factory=list)  # Semantic.read of its output


@dataclass
class Pending:
    """One forward's checks and new records, finished once its output is known."""

    mask: torch.Tensor
    checks: list = field(default_factory=list)  # (row, group, record, band, distance, sampled, explored)
    records: list = field(default_factory=list)  # (row, group, entry, key, codes)
    served: int = 0
    served_rows: list = field(default_factory=list)  # rows served a neighbour's entry


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


class SemanticTier:
    """The verified tier of one accelerated model (see the module docstring)."""

    def __init__(self, semantic: Semantic, num_bits: int, seed: int):
        self.semantic = semantic
        self.words = num_bits // 64
        self.edges = bands(semantic.max_distance if semantic.max_distance is not None else num_bits // 4)
        self.rng = random.Random(seed)
        self.pooling = semantic.pooling  # what the caller pools by (a SentenceTransformer's own, set by accelerate)
        if semantic.evidence is not None and len(semantic.evidence) != len(self.edges):
            raise ValueError(f"Semantic.evidence has {len(semantic.evidence)} bands and this tier {len(self.edges)} "
                             f"(num_bits {num_bits}, max_distance {self.edges[-1]}): accelerate with the num_bits and "
                             "max_distance the calibration used (Calibration.num_bits)")
        self.clear()

    def clear(self, prior: bool = True) -> None:
        """Forget every record and what this run measured; keep the calibration's evidence
        unless `prior` is False (the weights changed: nothing measured holds)."""
        self.groups: dict = {}
        self.records = 0  # records in all groups, live or not
        prior = list(self.semantic.evidence or ()) if prior else []
        self.counts = [list(prior[i]) if i < len(prior) else [0, 0, 0] for i in range(len(self.edges))]
        self.served = self.explored = self.explored_failed = self.narrowed = 0
        self.checked = self.check_failed = 0  # this run's checks (the counts add the prior's)
        self.stopped = False
        self._admitted = None

    # ---- routing -------------------------------------------------------------------
    def band(self, distance: int) -> int:
        return int(np.searchsorted(self.edges, distance))

    def admitted(self) -> tuple[int, float]:
        """(the farthest band served, -1: none; the served region's error bound)."""
        if self._admitted is None:
            self._admitted = bound.admit([(c[1], c[2]) for c in self.counts], self.semantic.max_error,
                                         self.semantic.alpha)
        return self._admitted

    def nearest(self, group_key, codes: np.ndarray, index) -> tuple[Group | None, int, int]:
        """(group, record, distance) of the nearest live, unbanned record within reach; record -1: none."""
        group = self.groups.get(group_key)
        if group is None or not group.size:
            return group, -1, -1
        n = group.size
        distance = np.bitwise_count(group.codes[:n] ^ codes).sum(1, dtype=np.int64)
        distance[distance > group.reach[:n]] = BIG
        while True:
            record = int(distance.argmin())
            d = int(distance[record])
            if d > self.edges[-1]:
                return group, -1, -1
            if _live(index, group.keys[record], group.entries[record]):
                return group, record, d
            group.reach[record] = -1  # evicted (or its slot reused): gone for good
            distance[record] = BIG

    def consider(self, pending: Pending, row: int, group_key, codes: np.ndarray, index):
        """For a row that missed the exact tier: the entry to serve it (a decoder's: the tuple
        of its pages), or None (it computes; a check is queued when a neighbour was in reach)."""
        if group_key is None:
            return None
        group, record, distance = self.nearest(group_key, codes, index)
        if record < 0:
            return None
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
            return group.entries[record]
        pending.checks.append((row, group, record, band, distance, sampled, serving and band <= last))
        return None

    def stored(self, pending: Pending, row: int, group_key, entry: int, key, codes: np.ndarray) -> None:
        pending.records.append((row, group_key, entry, key, codes))

    # ---- after the forward -----------------------------------------------------------
    def finish(self, pending: Pending, output, index) -> None:
        """Judge the forward's checks and keep its new records' outputs (`index`: the exact
        tier's, whose live entries the records follow)."""
        if not pending.checks and not pending.records:
            return
        reads = self.semantic.read(output, pending.mask)
        if pending.checks:
            rows = torch.tensor([c[0] for c in pending.checks], device=reads.device)
            served = torch.stack([c[1].reads[c[2]] for c in pending.checks]).to(reads.device)
            agree = self.semantic.agree(served, reads.index_select(0, rows))
            for (row, group, record, band, distance, sampled, explored), ok in zip(pending.checks, agree):
                self.counts[band][1] += sampled
                self.counts[band][2] += sampled and not ok
                self.checked += 1
                if not ok:
                    self.check_failed += 1
                    if group.reach[record] >= distance:
                        self.narrowed += 1
                        group.reach[record] = distance - 1
                if explored:
                    self.explored += 1
                    self.explored_failed += not ok
            self._admitted = None
            alpha = self.semantic.alpha
            if bound.lower(self.explored_failed, self.explored, alpha) > self.semantic.max_error:
                self.stopped = True
        for row, group_key, entry, key, codes in pending.records:
            group = self.groups.get(group_key)
            if group is None:
                group = self.groups[group_key] = Group(np.zeros((4, self.words), np.uint64), np.full(4, BIG))
            n = group.size
            if n == group.codes.shape[0]:
                group.codes = np.concatenate([group.codes, np.zeros_like(group.codes)])
                group.reach = np.concatenate([group.reach, np.full_like(group.reach, BIG)])
            group.codes[n] = codes
            group.size = n + 1
            group.entries.append(entry)
            group.keys.append(key)
            group.reads.append(reads[row].clone())
            self.records += 1
        if self.records > 2 * index.entries + 64:
            self._sweep(index)

    def _sweep(self, index) -> None:
        """Drop the records whose entries the exact tier evicted (records never outlive twice
        the live entries, plus a little)."""
        self.records = 0
        for key, group in list(self.groups.items()):
            keep = [i for i in range(group.size) if group.reach[i] >= 0
                    and _live(index, group.keys[i], group.entries[i])]
            if not keep:
                del self.groups[key]
                continue
            at = np.array(keep, dtype=np.int64)
            group.codes, group.reach = group.codes[at], group.reach[at]
            group.entries = [group.entries[i] for i in keep]
            group.keys = [group.keys[i] for i in keep]
            group.reads = [group.reads[i] for i in keep]
            group.size = len(keep)
            self.records += len(keep)

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
            bands=table, narrowed=self.narrowed, records=self.records,
        )
