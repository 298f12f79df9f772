"""The demo's report: per-layer hit rates, the terminal table and the figure."""

from __future__ import annotations

from pathlib import Path

import llmcache

from .stream import LOW_FIDELITY


def layer_rates(stats: llmcache.CacheStats) -> list[dict]:
    rate = lambda n, s: n / s.lookups if s.lookups else 0.0
    return [{"layer": s.layer, "lookups": s.lookups, "exact_hits": s.exact_hits, "semantic_hits": s.semantic_hits,
             "exact_rate": rate(s.exact_hits, s), "semantic_rate": rate(s.semantic_hits, s)} for s in stats.layers]


def _fold_layers(layers: list[dict], most: int = 6) -> str:
    """'0-5 40.0+0.0': runs of consecutive layers with equal (rounded) exact+semantic hit rates;
    past `most` runs, the range over all layers instead ('0-29 27.8..28.3+21.5..33.2')."""
    parts, start = [], 0
    cell = lambda r: f"{100 * r['exact_rate']:.1f}+{100 * r['semantic_rate']:.1f}"
    for i in range(1, len(layers) + 1):
        if i == len(layers) or cell(layers[i]) != cell(layers[start]):
            first, last = layers[start]["layer"], layers[i - 1]["layer"]
            parts.append(f"{first}{'' if first == last else f'-{last}'} {cell(layers[start])}")
            start = i
    if len(parts) > most:
        span = lambda key: f"{100 * min(r[key] for r in layers):.1f}..{100 * max(r[key] for r in layers):.1f}"
        return f"{layers[0]['layer']}-{layers[-1]['layer']} {span('exact_rate')}+{span('semantic_rate')}"
    return ", ".join(parts)


def format_table(report: dict) -> str:
    decoder = report["model"] == "smollm2"
    fid_head = (f"{'ppl':>8} {'ppl +%':>8} {'NLL>1%':>7}" if decoder
                else f"{'cos mean':>9} {'cos min':>9} {'<0.99':>6}")
    head = f"{'run':<11} {'rows/s':>8} {'speedup':>7} {'exact%':>6} {'sem%':>6} {fid_head} {'MiB':>7}  layer hit% exact+sem"
    off = report["off"]
    ref = f"{off['ppl']:>8.3f} {'':>8} {'':>7}" if decoder else f"{'(reference)':>26}"
    lines = [head, f"{'off':<11} {off['rows_per_s']:>8.1f} {'1.00x':>7} {'-':>6} {'-':>6} {ref} {'-':>7}  -"]
    for run in report["runs"]:
        f = run["fidelity"]
        fid = (f"{f['ppl_on']:>8.3f} {100 * f['ppl_change']:>+7.2f}% {100 * f['rows_nll_moved_1pct']:>6.1f}%"
               if decoder else f"{f['mean']:>9.6f} {f['min']:>9.6f} {100 * f['below_0.99']:>5.1f}%")
        lines.append(
            f"{run['label']:<11} {run['rows_per_s']:>8.1f} {run['speedup']:>6.2f}x {100 * run['exact_hit_rate']:>6.1f} "
            f"{100 * run['semantic_hit_rate']:>6.1f} {fid} {run['bytes'] / 2**20:>7.1f}  {_fold_layers(run['layers'])}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Left: hit rate by layer, exact and semantic stacked, one bar group per run. Right: speedup
    against fidelity, one point per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    decoder = report["model"] == "smollm2"
    runs = report["runs"]
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    colors = [f"C{i}" for i in range(len(runs))]
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        x = [layer["layer"] - 0.4 + (i + 0.5) * width for layer in run["layers"]]
        exact = [100 * layer["exact_rate"] for layer in run["layers"]]
        semantic = [100 * layer["semantic_rate"] for layer in run["layers"]]
        left.bar(x, exact, width, color=colors[i], label=run["label"])
        left.bar(x, semantic, width, bottom=exact, color=colors[i], alpha=0.35, hatch="//", edgecolor=colors[i])
    left.set_xlabel("layer")
    left.set_ylabel("hit rate (% of lookups)")
    left.set_title("hit rate by layer (solid: exact, hatched: semantic)")
    left.set_xticks([layer["layer"] for layer in runs[0]["layers"]])
    left.set_ylim(0, 100)
    left.legend(fontsize=8, ncols=3, loc="upper right")
    for i, run in enumerate(runs):
        f = run["fidelity"]
        y = f["ppl_off"] / f["ppl_on"] if decoder else f["mean"]
        right.scatter(run["speedup"], y, color=colors[i], s=50, zorder=3, label=run["label"])
        if not decoder:
            right.scatter(run["speedup"], f["min"], color=colors[i], s=50, facecolors="none", zorder=3)
            right.plot([run["speedup"]] * 2, [f["min"], f["mean"]], color=colors[i], lw=1)
        right.annotate(run["label"], (run["speedup"], y), textcoords="offset points", xytext=(6, 4 - 12 * (i % 2)),
                       fontsize=8)
    right.axhline(1.0, color="gray", lw=0.8, ls="--")
    if not decoder:
        right.axhline(LOW_FIDELITY, color="gray", lw=0.8, ls=":")
    right.axvline(1.0, color="gray", lw=0.8, ls="--")
    right.set_xlabel("speedup over uncached (x)")
    right.set_ylabel("perplexity off / on (1 = lossless)" if decoder
                     else "embedding cosine on vs off (filled: mean, hollow: min)")
    right.set_title("speed vs fidelity")
    fig.suptitle(report["title"], fontsize=10)
    fig.savefig(path, dpi=110)


