"""`llmcache.calibrate`: measure, on the user's own data, what the verified semantic tier may serve.

    report = llmcache.calibrate(model, batches, tolerance=0.95, max_error=0.01)
    print(report.table())
    llmcache.accelerate(model, semantic=report.semantic)   # starts serving where the data proved it

The data runs through the model once per candidate setting with every would-be hit computed and
checked (nothing served), so each neighbourhood's counts are complete; `bound.admit` then picks
what may serve. The online tier keeps checking a share `explore` of its hits: the calibration
is a prior, not a licence (it holds for a stream like the calibration data).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import adapters, bound
from .promise import Semantic


@dataclass
class Calibration:
    """What `calibrate` measured. `settings`: per candidate (num_bits, serve) the band table
    (dicts of max_distance, would_be, failed, upper: the bound of the region up to that band,
    serving), the predicted semantic hit share
    of the rows, and the union's error bound (None: no band may serve). `semantic`: the best
    setting's `Semantic`, carrying its evidence; `num_bits`: the code length it needs."""

    semantic: Semantic
    num_bits: int
    settings: list
    rows: int

    def at(self, max_error: float) -> Calibration:
        """The same measurements, chosen for another max_error (nothing reruns)."""
        return _choose(self.settings, self.semantic.replace(max_error=max_error), self.rows)

    def table(self) -> str:
        """A markdown table: one line per candidate setting and band."""
        lines = ["| num_bits | serve | band (max distance) | would-be hits | failed | error upper bound (distance <= band) | serves |",
                 "|---:|---|---:|---:|---:|---:|---|"]
        for s in self.settings:
            for b in s["bands"]:
                up = "-" if b["upper"] is None else f"{100 * b['upper']:.2f} %"
                lines.append(f"| {s['num_bits']} | {s['serve']} | {b['max_distance']} | {b['would_be']} | "
                             f"{b['failed']} | {up} | {'yes' if b['serving'] else 'no'} |")
        best = [s for s in self.settings if s["num_bits"] == self.num_bits and s["serve"] == self.semantic.serve]
        for s in best:
            bnd = "none serves" if s["bound"] is None else f"bound {100 * s['bound']:.2f} %"
            lines.append(f"\nchosen: num_bits {s['num_bits']}, serve {s['serve']}: predicted semantic hits "
                         f"{100 * s['hit_share']:.1f} % of {self.rows} rows, {bnd} (max_error "
                         f"{100 * self.semantic.max_error:g} % at confidence {self.semantic.confidence:g})")
        return "\n".join(lines)

    def figure(self, path) -> None:
        """Plot each setting's per-band error upper bound against max_error (needs matplotlib)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for s in self.settings:
            xs = [b["max_distance"] for b in s["bands"] if b["upper"] is not None]
            ys = [b["upper"] for b in s["bands"] if b["upper"] is not None]
            ax.plot(xs, ys, marker="o", label=f"{s['num_bits']} bits, {s['serve']}")
        ax.axhline(self.semantic.max_error, color="k", ls="--", lw=1, label="max_error")
        ax.set_xscale("symlog")
        ax.set_xlabel("band: Hamming distance up to")
        ax.set_ylabel("error upper bound")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def calibrate(model, data, tolerance=0.99, max_error: float = 0.01, confidence: float = 0.95,
              pooling: str = "mean", num_bits=(256,), serve=("states", "pooled")) -> Calibration:
    """Measure the verified semantic tier on `data` and return the most aggressive setting whose
    error bound is <= max_error.

    Args:
        model: a transformers encoder (or SentenceTransformer, or a task model with tolerance
            "label"), not accelerated; it is accelerated inside and restored after.
        data: an iterable of model-input dicts (what `model(**batch)` takes: input_ids
            int64 [B, T], attention_mask, ...), in stream order; iterated once per setting, so
            a list (not a generator).
        tolerance, max_error, confidence, pooling: as in `llmcache.Semantic`.
        num_bits, serve: the candidate SimHash lengths and serving modes (see `Semantic.serve`).
    Returns:
        A `Calibration`; its `semantic` carries the evidence of the best setting (most
        predicted semantic hits; ties: the first), to pass to `accelerate` with its `num_bits`.
    """
    from .api import cached
    from .report import stats

    data = list(data)
    whole = adapters.is_sentence_transformer(model)  # takes the features dict
    settings = []
    rows = 0
    for bits in num_bits:
        for mode in serve:
            probe = Semantic(tolerance=tolerance, max_error=max_error, confidence=confidence, pooling=pooling,
                             explore=1.0, serve=mode)
            with cached(model, semantic=probe, num_bits=bits), torch.inference_mode():
                for batch in data:
                    if whole:
                        model(batch)
                    else:
                        model(**batch)
                s = stats(model)
            rows = s.rows
            counts = tuple((b["would_be"], b["verified"], b["failed"]) for b in s.semantic.bands)
            settings.append({"num_bits": bits, "serve": mode, "bands": s.semantic.bands, "counts": counts})
    semantic = Semantic(tolerance=tolerance, max_error=max_error, confidence=confidence, pooling=pooling)
    return _choose(settings, semantic, rows)


def _choose(settings: list, semantic: Semantic, rows: int) -> Calibration:
    """Admit bands of every setting at `semantic`'s bound; the best setting serves the most rows."""
    settings = [dict(s) for s in settings]
    for s in settings:
        last, union = bound.admit([(c[1], c[2]) for c in s["counts"]], semantic.max_error, semantic.alpha)
        checked = failed = 0
        bands = []
        for i, (b, c) in enumerate(zip(s["bands"], s["counts"])):
            checked, failed = checked + c[1], failed + c[2]
            up = bound.upper(failed, checked, semantic.alpha) if checked else None
            bands.append({**b, "upper": up, "serving": i <= last})
        s["bands"] = bands
        s["hit_share"] = sum(c[0] for c in s["counts"][: last + 1]) / max(rows, 1)
        s["bound"] = union if last >= 0 else None
    best = max(settings, key=lambda s: s["hit_share"])
    chosen = semantic.replace(serve=best["serve"], evidence=best["counts"])
    return Calibration(semantic=chosen, num_bits=best["num_bits"], settings=settings, rows=rows)
