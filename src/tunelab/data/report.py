"""What `data prepare` (and every `train`) leaves in `<output.dir>/data/`: the prepared splits as JSONL, the rows left
out with the reason, `data_report.json`, a token-length histogram and `data_report.html` that shows them together."""

from __future__ import annotations

import html
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from tunelab.data.pipeline import SPLITS, PipelineResult, label_counts
from tunelab.data.tokenize import Encoded

REPORT_FILES = ("data_report.json", "data_report.html", "token_lengths.png")
STYLE = (
    "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}.warn{color:#a40}</style>"
)


def length_stats(rows: Sequence[Encoded], max_length: int) -> dict:
    full = [e.full_length or len(e.input_ids) for e in rows]
    if not full:
        return {"examples": 0}
    over = [n - max_length for n in full if n > max_length]
    q = sorted(full)
    return {
        "examples": len(full),
        "tokens": sum(min(n, max_length) for n in full),
        "min": q[0],
        "median": statistics.median(q),
        "p95": q[min(len(q) - 1, int(0.95 * len(q)))],
        "max": q[-1],
        "over_max_length": len(over),
        "over_by_max": max(over, default=0),
        "trained_tokens": sum(e.n_trained for e in rows),
    }


def build_report(result: PipelineResult, encoded: dict[str, Sequence[Encoded]], max_length: int) -> dict:
    return {
        "format": result.format,
        "splits": {name: len(result.splits[name]) for name in SPLITS},
        "steps": result.steps,
        "removed": len(result.removed),
        "removed_by_step": {step: sum(r.step == step for r in result.removed) for step in sorted({r.step for r in result.removed})},
        "warnings": result.warnings,
        "label_field": result.label_field,
        "labels": {name: label_counts(result.splits[name], result.label_field) for name in SPLITS} if result.label_field else {},
        "max_length": max_length,
        "token_lengths": {name: length_stats(rows, max_length) for name, rows in encoded.items()},
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_splits(result: PipelineResult, out: Path) -> None:
    for name in SPLITS:
        write_jsonl(out / f"{name}.jsonl", [{**r.row, "_source": r.row.get("_source", r.where)} for r in result.splits[name]])
    write_jsonl(out / "removed_rows.jsonl", [{"source": r.source, "step": r.step, "reason": r.reason} for r in result.removed])


def plot_lengths(encoded: dict[str, Sequence[Encoded]], max_length: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    top = max((e.full_length or len(e.input_ids) for rows in encoded.values() for e in rows), default=1)
    bins = list(range(0, max(top, max_length) + 2, max(1, max(top, max_length) // 40)))
    for name, rows in encoded.items():
        if rows:
            ax.hist([e.full_length or len(e.input_ids) for e in rows], bins=bins, alpha=0.6, label=f"{name} ({len(rows)})")
    ax.axvline(max_length, color="crimson", linestyle="--", linewidth=1, label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example (chat template applied, before truncation)")
    ax.set_ylabel("examples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def describe_step(step: dict) -> str:
    """`{'step': 'pii', 'rows_changed': 2, 'found': {'email': 1, 'ip': 0}}` -> 'rows changed 2; found: email 1'."""
    parts = []
    for key, value in step.items():
        if key == "step":
            continue
        if isinstance(value, dict):
            inner = ", ".join(f"{k} {v}" for k, v in value.items() if v)
            parts.append(f"{key.replace('_', ' ')}: {inner or 'none'}")
        else:
            parts.append(f"{key.replace('_', ' ')} {value}")
    return "; ".join(parts)


def _table(rows: list[tuple], head: tuple) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + cells + "</table>"


def write_html(report: dict, removed: list, out: Path) -> None:
    steps = [(s["step"], describe_step(s)) for s in report["steps"]]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>tunelab data report</title>",
        STYLE,
        "<h1>Data report</h1>",
        f"<p>Format <b>{html.escape(report['format'])}</b>; max_length {report['max_length']} tokens.</p>",
        "<h2>Splits</h2>",
        _table([(k, v) for k, v in report["splits"].items()], ("split", "rows")),
        "<h2>Steps</h2>",
        _table(steps, ("step", "what it did")),
    ]
    if report["warnings"]:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in report["warnings"]) + "</ul>")
    parts.append("<h2>Token lengths</h2><img src='token_lengths.png' alt='token-length histogram'>")
    stats = report["token_lengths"]
    keys = ("examples", "min", "median", "p95", "max", "over_max_length")
    parts.append(_table([(name, *(s.get(k, "") for k in keys)) for name, s in stats.items()], ("split", *keys)))
    if report["labels"]:
        labels = sorted({lab for counts in report["labels"].values() for lab in counts})
        parts.append(f"<h2>Labels ({html.escape(str(report['label_field']))})</h2>")
        parts.append(_table([(lab, *(report["labels"][s].get(lab, 0) for s in SPLITS)) for lab in labels], ("label", *SPLITS)))
    if removed:
        shown = removed[:500]
        parts.append(f"<h2>Removed rows ({len(removed)})</h2>")
        parts.append(_table([(r.source, r.step, r.reason) for r in shown], ("row", "step", "reason")))
        if len(removed) > len(shown):
            parts.append(f"<p>... and {len(removed) - len(shown)} more in removed_rows.jsonl</p>")
    out.write_text("\n".join(parts), encoding="utf-8")


def write_report(result: PipelineResult, encoded: dict[str, Sequence[Encoded]], max_length: int, out: Path) -> dict:
    """Write every report file into `out` and return the report."""
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(result, encoded, max_length)
    write_splits(result, out)
    (out / "data_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot_lengths(encoded, max_length, out / "token_lengths.png")
    write_html(report, result.removed, out / "data_report.html")
    return report
