"""The demo's summary: one table for the terminal, and `README.md` + `index.html` embedding the figures."""

from __future__ import annotations

import html
from pathlib import Path

TITLES = {"embedding": "1. Embedding service", "chat": "2. Chat with a shared system prompt",
          "semantic": "3. The semantic promise", "shared": "4. Two processes, one cache (Redis)"}
COLUMNS = ("part", "cache off", "cache on", "speedup", "ideal", "check")


def _row(part: str, r: dict) -> tuple:
    if "skipped" in r:
        return (TITLES[part], "-", "-", "-", "-", f"skipped: {r['skipped']}")
    if part == "embedding":
        return (TITLES[part], f"{r['off_rows_per_s']:.0f} rows/s", f"{r['on_rows_per_s']:.0f} rows/s",
                f"{r['speedup']:.2f}x", f"{r['ideal']:.2f}x",
                (f"{r['rows']} embeddings: max |on - off| {r['max_abs_diff']:.1e} (off against itself across "
                f"batches: {r['off_drift']:.1e})"))
    if part == "chat":
        return (TITLES[part], f"TTFT {1000 * r['off_ttft_s']:.0f} ms", f"TTFT {1000 * r['on_ttft_s']:.0f} ms",
                f"{r['speedup']:.2f}x", f"{r['ideal']:.2f}x",
                (f"{r['identical']}/{len(r['prompts'])} answers token-identical; {100 * r['served_share']:.0f} % of "
                "prompt tokens from cached prefixes"))
    if part == "semantic":
        verified = next(c for c in r["configs"] if c["kind"] == "verified")
        raws = [c for c in r["configs"] if c["kind"] == "raw"]
        worst = max(raws, key=lambda c: c["served"])
        return (TITLES[part], "-", f"{verified['served']} of {r['rows']} rows from neighbours",
                f"{verified['speed']:.2f}x (one pass)", "-",
                (f"{verified['wrong']} served rows wrong (bound {100 * r['max_error']:g} %); unchecked "
                f"{worst['label']}: {worst['wrong']} of {worst['served']} wrong"))
    a, b = r["replicas"]
    return (TITLES[part], f"A: {a['seconds']:.2f} s", f"B: {b['seconds']:.2f} s", f"{r['speedup']:.2f}x", "-",
            (f"B: {b['from_redis']} rows from Redis, {b['computed']} computed; max |B - uncached| "
            f"{b['max_abs_diff']:.1e}"))


def table(results: dict) -> list[tuple]:
    return [COLUMNS] + [_row(part, r) for part, r in results.items()]


def terminal(rows: list[tuple]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "-" * min(160, max(len(line) for line in lines)))
    return "\n".join(lines)


def markdown(rows: list[tuple]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(out + ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]])


def write(out: Path, title: str, results: dict, notes: dict) -> tuple[Path, Path]:
    """README.md and index.html in `out`: the table, then per part its note and figure."""
    rows = table(results)
    md = [f"# {title}", "", markdown(rows), ""]
    page = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
            ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{border:1px solid #ccc;"
            "padding:4px 8px}table{border-collapse:collapse}img{max-width:100%}</style>"),
            f"<h1>{html.escape(title)}</h1><table>",
            "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>"]
    page += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:]]
    page.append("</table>")
    for part, r in results.items():
        md += [f"## {TITLES[part]}", "", notes.get(part, ""), ""]
        page += [f"<h2>{html.escape(TITLES[part])}</h2><p>{html.escape(notes.get(part, ''))}</p>"]
        if "figure" in r:
            md += [f"![{TITLES[part]}]({r['figure']})", ""]
            page.append(f"<img src='{html.escape(r['figure'])}' alt='{html.escape(TITLES[part])}'>")
        elif "skipped" in r:
            md += [f"Skipped: {r['skipped']}", ""]
            page.append(f"<p><b>Skipped:</b> {html.escape(r['skipped'])}</p>")
    (out / "README.md").write_text("\n".join(md))
    (out / "index.html").write_text("\n".join(page) + "\n")
    return out / "README.md", out / "index.html"


__all__ = ["TITLES", "markdown", "table", "terminal", "write"]
