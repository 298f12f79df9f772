"""One figure per part of the demo (matplotlib, no display needed): `FIGURES[part](result, path)`."""

from __future__ import annotations

from pathlib import Path

OFF, ON, IDEAL, BAD = "#8c8c8c", "#1f77b4", "#2ca02c", "#d62728"


def _figure(width: float, height: float, cols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, cols)


def embedding(r: dict, path: Path) -> None:
    """Throughput over the stream (a moving window of requests): off, on, and the ideal."""
    fig, ax = _figure(9, 4.6)
    reqs = r["requests"]
    window = max(1, len(reqs) // 12)
    xs, off, on, ideal = [], [], [], []
    done = 0
    for i, q in enumerate(reqs):
        done += q["rows"]
        w = reqs[max(0, i - window + 1) : i + 1]
        rows, reps = sum(x["rows"] for x in w), sum(x["repeats"] for x in w)
        xs.append(done)
        off.append(rows / sum(x["off_s"] for x in w))
        on.append(rows / sum(x["on_s"] for x in w))
        ideal.append(off[-1] / max(1e-9, 1 - reps / rows))
    ax.plot(xs, ideal, color=IDEAL, ls="--", lw=1.5, label="ideal (each distinct text computed once, for free)")
    ax.plot(xs, on, color=ON, lw=2.2, label=f"cache on: {r['on_rows_per_s']:.0f} rows/s over the stream")
    ax.plot(xs, off, color=OFF, lw=2.2, label=f"cache off: {r['off_rows_per_s']:.0f} rows/s")
    ax.set_xlabel("queries served so far")
    ax.set_ylabel(f"throughput (rows/s, last {window * r['request']} queries)")
    ax.set_ylim(0, max(max(on), max(ideal[len(ideal) // 4:] or ideal)) * 1.12)
    ax.set_xlim(0, xs[-1])
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(f"Embedding service: {r['speedup']:.2f}x faster with the cache (ideal {r['ideal']:.2f}x at "
                 f"{100 * r['repeat_share']:.0f} % repeats); every embedding as uncached", fontsize=10)
    fig.savefig(path, dpi=110)


def chat(r: dict, path: Path) -> None:
    """Time to first token per prompt, off and on, the ideal on top; the share of tokens served above."""
    import numpy as np

    fig, ax = _figure(10, 4.8)
    prompts = r["prompts"]
    x = np.arange(len(prompts))
    ax.bar(x - 0.2, [1000 * p["off_s"] for p in prompts], 0.4, color=OFF, label="cache off")
    ax.bar(x + 0.2, [1000 * p["on_s"] for p in prompts], 0.4, color=ON, label="cache on")
    ax.scatter(x + 0.2, [1000 * p["ideal_s"] for p in prompts], marker="_", s=260, color=IDEAL, zorder=3,
               label="ideal (the uncached model on the tokens left to compute alone)")
    for i, p in enumerate(prompts):
        ax.annotate(f"{100 * p['served'] / p['prompt_tokens']:.0f} %\nserved", (i + 0.2, 1000 * p["on_s"]),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7.5)
    ax.set_xticks(x, [f"chat {p['conversation']}\nturn {p['turn']}\n{p['prompt_tokens']} tok" for p in prompts],
                  fontsize=8)
    ax.set_ylabel("time to first token (ms)")
    ax.set_ylim(0, 1000 * max(max(p["off_s"], p["on_s"]) for p in prompts) * 1.3)
    ax.legend(loc="upper center", fontsize=9, ncols=3)
    ax.set_title(f"Chat with a shared system prompt: TTFT {r['speedup']:.1f}x faster (median), "
                 f"{100 * r['served_share']:.0f} % of prompt tokens from cached prefixes, "
                 f"{r['identical']}/{len(prompts)} answers identical", fontsize=10)
    fig.savefig(path, dpi=110)


def semantic(r: dict, path: Path) -> None:
    """Left: rows served from another input, within and outside the tolerance. Right: their error
    share (95 % interval) against the bound the user set."""
    fig, (left, right) = _figure(11, 4.8, 2)
    configs = [c for c in r["configs"] if c["kind"] != "exact"]
    labels = [c["label"].replace(" / ", "\n") for c in configs]
    good = [c["served"] - c["wrong"] for c in configs]
    left.bar(labels, good, color=ON, label=f"served, cosine >= {r['tolerance']:g} (right)")
    left.bar(labels, [c["wrong"] for c in configs], bottom=good, color=BAD,
             label=f"served, cosine < {r['tolerance']:g} (wrong)")
    left.set_ylabel(f"rows served another input's states (of {r['rows']})")
    left.legend(fontsize=8, loc="upper left")
    left.set_title("what each setting served on held-out text", fontsize=10)
    top = max([c["served"] for c in configs] + [1])
    left.set_ylim(0, top * 1.25)
    for i, c in enumerate(configs):
        if c["kind"] == "verified":
            note = (f"served {c['served']}:\nits checks failed\n{c['checks_failed']} of {c['checks']}"
                    if c["served"] == 0 else f"served {c['served']}")
            left.annotate(note, (i, c["served"]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    bound = 100 * r["max_error"]
    right.axhline(bound, color=IDEAL, ls="--", lw=1.5, label=f"the promise: <= {bound:g} % wrong")
    for i, c in enumerate(configs):
        if c["error"] is None:
            right.annotate("nothing served:\nnothing wrong", (i, bound), textcoords="offset points", xytext=(0, 8),
                           ha="center", fontsize=8, color=IDEAL)
            continue
        color = IDEAL if c["upper95"] <= r["max_error"] else BAD
        right.errorbar(i, 100 * c["error"], yerr=[[0], [100 * (c["upper95"] - c["error"])]], fmt="o", color=color,
                       capsize=4)
        right.annotate(f"{c['wrong']} of {c['served']}", (i, 100 * c["error"]), textcoords="offset points",
                       xytext=(0, -14), ha="center", fontsize=8, color=color)
    right.set_xticks(range(len(configs)), labels)
    right.set_xlim(-0.5, len(configs) - 0.5)
    right.set_ylim(0, 105)
    right.set_ylabel("served rows that are wrong (%, bar: 95 % upper bound)")
    right.legend(fontsize=8, loc="center left")
    right.set_title("the error each setting made, against the bound", fontsize=10)
    fig.suptitle(f"The semantic promise: tolerance cosine {r['tolerance']:g}, max_error {bound:g} % "
                 f"(calibrated on {r['calibration_rows']} rows, judged on {r['rows']} held-out rows)", fontsize=10)
    fig.savefig(path, dpi=110)


def shared(r: dict, path: Path) -> None:
    """Per replica: the time its stream took, and where its rows came from."""
    fig, (left, right) = _figure(10, 4.2, 2)
    reps = r["replicas"]
    names = [f"replica {x['name']}" for x in reps]
    left.bar(names, [x["seconds"] for x in reps], color=[OFF, ON])
    left.set_ylabel(f"seconds for its {r['rows']} queries")
    left.set_title(f"replica B {r['speedup']:.1f}x faster", fontsize=10)
    bottom = [0] * len(reps)
    for key, color, label in (("computed", OFF, "computed"), ("from_redis", ON, "from Redis"),
                              ("local_hits", IDEAL, "own bank (repeats)")):
        values = [x[key] + (x["repeats"] if key == "local_hits" else 0) for x in reps]
        right.bar(names, values, bottom=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_ylabel("queries")
    right.legend(fontsize=8)
    right.set_title("where each replica's rows came from", fontsize=10)
    fig.suptitle("Two processes, one cache on Redis: B serves what A computed", fontsize=10)
    fig.savefig(path, dpi=110)


FIGURES = {"embedding": embedding, "chat": chat, "semantic": semantic, "shared": shared}

__all__ = ["FIGURES"]
