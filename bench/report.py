"""What every benchmark reports with: one header, medians and ratios, a table on stdout, and rows
written as JSON, CSV or Markdown under its --out folder.

A header holds the date, the device, the machine, the versions, `llmcache.build_info()` and the
arguments; a script adds its own keys (`header(args, device, config=..., notes=...)`). Writers
create the folder and return the path written.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path


def now() -> str:
    """The UTC time to the second, ISO 8601."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def plain_args(args) -> dict:
    """vars(args) with paths as strings (JSON)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def header(args, device: str = "cpu", *, machine: dict | None = None, versions: dict | None = None, **extra) -> dict:
    """Date, device, machine, versions, build_info and arguments of a run; `machine` and
    `versions` add to those sections, `extra` adds top-level keys."""
    import numpy as np
    import torch
    import transformers

    import llmcache

    return {
        "date": now(),
        "device": device,
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            **(machine or {}),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "llmcache": llmcache.__version__,
            **(versions or {}),
        },
        "build_info": llmcache.build_info(),
        "args": plain_args(args),
        **extra,
    }


def about(head: dict) -> list[str]:
    """The header as the lines of a Markdown report's list: date, machine, versions, build_info, args."""
    m, v = head["machine"], head["versions"]
    return [
        f"date: {head['date']}",
        f"machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch threads {m['torch_threads']}, device {m['device']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"build_info: `{json.dumps(head['build_info'])}`",
        f"args: `{json.dumps(head['args'])}`",
    ]


# ---------------------------------------------------------------- medians and ratios


def median(values: Iterable) -> float | None:
    """The median of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def median_of(items: Iterable, f: Callable) -> float | None:
    return median(f(x) for x in items)


def median_ratio(numerators: Iterable[float], denominators: Iterable[float]) -> float | None:
    """The median of the pairwise ratios (side-by-side measurements: each pair shares the machine's load)."""
    return median(a / b for a, b in zip(numerators, denominators, strict=True))


def fmt_ms(seconds: float | None, digits: int = 3) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.{digits}f}"


def fmt_x(ratio: float | None, digits: int = 2) -> str:
    return "-" if ratio is None else f"{ratio:.{digits}f}x"


def fmt_pct(share: float | None, digits: int = 2) -> str:
    return "-" if share is None else f"{100 * share:.{digits}f} %"


# ---------------------------------------------------------------- targets


def target(name: str, value: float | None, goal: float, detail: str, *, below: bool = False,
           unit: str | None = None) -> dict:
    """PASS when `value` is at least `goal` (at most, with `below`), SHORT otherwise, n/a without a value."""
    status = "n/a" if value is None else ("PASS" if (value <= goal if below else value >= goal) else "SHORT")
    record = {"target": name, "status": status, "value": value, "goal": goal}
    if unit is not None:
        record["unit"] = unit
    return record | {"detail": detail}


def format_target(t: dict) -> str:
    unit, value = t.get("unit"), t["value"]
    if value is None:
        shown = "-"
    elif unit == "x":
        shown = f"{value:.3g}x"
    elif unit == "frac":
        shown = f"{100 * value:.1f}%"
    else:
        shown = f"{value:.4g}"
    return f"  {t['status']:<5}  {t['target']:<62}  {shown:>8}  (goal {t['goal']:g}; {t['detail']})"


def print_targets(targets: list[dict], title: str = "targets:") -> None:
    print(title)
    for t in targets:
        print(format_target(t))


# ---------------------------------------------------------------- tables


def _cell(value, spec: str | None) -> str:
    if value is None:
        return "-"
    if spec and not isinstance(value, str):
        return format(value, spec)
    return str(value)


def format_table(rows: list[dict], formats: dict[str, str] | None = None, align: str | None = None) -> str:
    """Rows (dicts, the first one's keys are the columns) as aligned text: numbers to the right,
    text to the left, or as `align` says ("l" or "r" per column); `formats` gives a format spec
    per column (e.g. {"ms": ".2f"})."""
    if not rows:
        return "(no rows)"
    formats = formats or {}
    columns = list(rows[0])
    cells = [[_cell(r.get(c), formats.get(c)) for c in columns] for r in rows]
    if align is None:
        right = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in columns]
    else:
        right = [a == "r" for a in align]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    fmt = lambda line: "  ".join(f"{x:>{w}}" if r else f"{x:<{w}}" for x, w, r in zip(line, widths, right)).rstrip()
    return "\n".join([fmt(columns), fmt(["-" * w for w in widths]), *(fmt(line) for line in cells)])


def print_table(rows: list[dict], formats: dict[str, str] | None = None, align: str | None = None,
                title: str | None = None) -> None:
    if title:
        print(title)
    print(format_table(rows, formats, align), flush=True)


def markdown_table(rows: list[dict], align: str | None = None) -> str:
    """A Markdown table of rows (dicts; the first one's keys are the columns); `align` holds an
    "l" or "r" per column (default: all "l")."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    rule = "".join("---:|" if a == "r" else "---|" for a in (align or "l" * len(columns)))
    lines = ["| " + " | ".join(columns) + " |", "|" + rule]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- files


def write_json(path: Path, record: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def write_rows(path: Path, head: dict, rows: list[dict], targets: list[dict] | None = None) -> Path:
    """{"header": head, "rows": rows, "targets": targets} as JSON; says where."""
    path = write_json(path, {"header": head, "rows": rows, "targets": targets or []})
    print(f"wrote {path}", flush=True)
    return path


def write_csv(path: Path, rows: list[dict], fields: list[str], comment: str | None = None) -> Path:
    """Rows under a header line of `fields` (other keys left out); `comment` first as a "# " line
    (read back with comment='#')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if comment is not None:
            f.write(f"# {comment}\n")
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_md(path: Path, lines: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def write_report(out: Path, stem: str, head: dict, record: dict, tables: list[tuple[str | None, list[dict]]],
                 notes: list[str], *, title: str, lines: list[str] | None = None, notes_heading: bool = False) -> Path:
    """OUT/<stem>.json ({"header": head, **record}) and OUT/<stem>.md: '# title', a list of `lines`
    (default: `about(head)`), then each table (under '## name' when it has one), and the notes:
    at the end of the list, or under '## Notes' with `notes_heading`. Prints the tables."""
    path = write_json(Path(out) / f"{stem}.json", {"header": head, **record})
    md = [f"# {title}", "", *(f"- {x}" for x in (about(head) if lines is None else lines))]
    if not notes_heading:
        md += [f"- {n}" for n in notes]
    md.append("")
    for name, rows in tables:
        md += ([f"## {name}", ""] if name else []) + [markdown_table(rows), ""]
    if notes_heading:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    write_md(Path(out) / f"{stem}.md", md)
    for name, rows in tables:
        print(f"{name}\n{markdown_table(rows)}\n" if name else markdown_table(rows), flush=True)
    print(f"wrote {path} and .md", flush=True)
    return path
