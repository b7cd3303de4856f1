"""The report card as files: report.json, and report.html with its plots (matplotlib, no pyplot state) embedded as PNG
data URIs, so the page is one self-contained file. report.py builds the card; this module only renders it."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.evaluate.report import PERCENT_SCALE_METRICS, VARIANTS, _format_metric, _variant_name


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return _png_data_uri(buffer.getvalue())


def _percent(name: str, value: float | None) -> float:
    """Every metric on one 0-100 axis: sacrebleu's are already there, the 0-1 ones are scaled."""
    if value is None:
        return 0.0
    return value if name in PERCENT_SCALE_METRICS else 100 * value


def plot_task_metrics(card: dict) -> str:
    """Grouped bars: each task metric for base zero-shot, base k-shot and tuned (0-100)."""
    from matplotlib.figure import Figure

    metrics = card["task_metrics"]
    variants = [v for v in VARIANTS if metrics.get(v)]
    names = list(metrics["tuned"])
    figure = Figure(figsize=(max(6.0, 1.1 * len(names)), 3.6))
    ax = figure.subplots()
    width = 0.8 / len(variants)
    for offset, variant in enumerate(variants):
        xs = [i + (offset - (len(variants) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [_percent(n, metrics[variant][n]) for n in names], width,
               label=_variant_name(variant, card["task"]["fewshot"]))
    ax.set_xticks(range(len(names)), [n if n in PERCENT_SCALE_METRICS else f"{n} x100" for n in names], rotation=20)
    ax.set_ylim(0, 100)
    ax.set_ylabel("score (0-100)")
    ax.set_title(f"Task metrics on the {card['task']['eval_split']['name']} split (n={card['task']['n']})")
    ax.legend(fontsize=8)
    return _figure_png(figure)


def plot_forgetting(card: dict) -> str:
    """Bars of tuned - base per benchmark; red where the tuned model lost accuracy."""
    from matplotlib.figure import Figure

    rows = card["forgetting"]["benchmarks"]
    names = list(rows)
    deltas = [rows[n]["delta"] for n in names]
    figure = Figure(figsize=(max(5.0, 1.2 * len(names)), 3.2))
    ax = figure.subplots()
    ax.bar(names, deltas, color=["#c0392b" if d < 0 else "#27ae60" for d in deltas])
    ax.axhline(0, color="black", linewidth=0.8)
    reach = max([0.05] + [abs(d) * 1.2 for d in deltas])  # symmetric, so a small loss does not look like a cliff
    ax.set_ylim(-reach, reach)
    ax.set_ylabel("tuned - base (accuracy)")
    ax.set_title("Forgetting: change on general benchmarks")
    return _figure_png(figure)


def plot_confusion(card: dict) -> str:
    """Confusion matrices side by side (rows: true label; columns: predicted, then '(other)')."""
    from matplotlib.figure import Figure

    confusion = card["error_analysis"]["confusion"]
    variants = [v for v in VARIANTS if v in confusion]
    n = len(confusion["labels"])
    figure = Figure(figsize=(3.4 * len(variants) + 0.4 * n, 2.6 + 0.35 * n))
    axes = figure.subplots(1, len(variants), squeeze=False)[0]
    for ax, variant in zip(axes, variants):
        matrix = confusion[variant]
        ax.imshow(matrix, cmap="Blues")
        top = max(max(row) for row in matrix) or 1
        for r, row in enumerate(matrix):
            for c, count in enumerate(row):
                ax.text(c, r, str(count), ha="center", va="center", fontsize=8, color="white" if count > top / 2 else "black")
        ax.set_xticks(range(len(confusion["columns"])), confusion["columns"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), confusion["labels"], fontsize=8)
        ax.set_title(_variant_name(variant, card["task"]["fewshot"]), fontsize=9)
        ax.set_xlabel("predicted")
    axes[0].set_ylabel("true")
    return _figure_png(figure)


def plot_length_buckets(card: dict) -> str:
    """Grouped bars: the per-example metric in each length quartile, per variant."""
    from matplotlib.figure import Figure

    analysis = card["error_analysis"]["length_buckets"]
    buckets = analysis["buckets"]
    variants = [v for v in VARIANTS if buckets and v in buckets[0]]
    figure = Figure(figsize=(6.0, 3.2))
    ax = figure.subplots()
    width = 0.8 / max(len(variants), 1)
    labels = [f"{b['tokens'][0]}-{b['tokens'][1]}\n(n={b['n']})" for b in buckets]
    for offset, variant in enumerate(variants):
        xs = [i + (offset - (len(variants) - 1) / 2) * width for i in range(len(buckets))]
        ax.bar(xs, [b[variant] for b in buckets], width, label=_variant_name(variant, card["task"]["fewshot"]))
    ax.set_xticks(range(len(buckets)), labels, fontsize=8)
    ax.set_xlabel(analysis["by"])
    ax.set_ylabel(analysis["metric"])
    ax.legend(fontsize=8)
    return _figure_png(figure)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1d2430; line-height: 1.45; background: #ffffff; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; } h2 { border-bottom: 2px solid #dde3ea; padding-bottom: 0.2rem; margin-top: 2.2rem; }
.meta { color: #5b6675; font-size: 0.9rem; }
.verdict { background: #eef5ff; border-left: 4px solid #2f6fd6; padding: 0.8rem 1rem; font-size: 1.05rem; }
table { border-collapse: collapse; margin: 0.6rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #d5dbe3; padding: 0.3rem 0.55rem; text-align: left; vertical-align: top; }
th { background: #f3f6f9; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pos { color: #1e7d3a; } .neg { color: #b3261e; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font-size: 0.85rem; max-width: 32rem; }
img { max-width: 100%; display: block; margin: 0.5rem 0; }
.note { color: #5b6675; font-size: 0.88rem; }
"""

# Reports how many images failed to decode once the page has loaded; tests (and curious readers) read the attribute.
_BROKEN_IMAGES_SCRIPT = """
window.addEventListener("load", function () {
  var broken = Array.prototype.filter.call(document.images, function (img) { return img.naturalWidth === 0; });
  document.body.dataset.brokenImages = String(broken.length);
});
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _signed_cell(name: str, value: float | None) -> str:
    css = "" if value is None or value == 0 else ("pos" if value > 0 else "neg")
    return f'<td class="num {css}">{_e(_format_metric(name, value, signed=True))}</td>'


def _metrics_table(rows: list[tuple[str, dict | None]], names: list[str], gain: dict | None = None,
                   gain_label: str = "gain", bold: dict[str, str | None] | None = None) -> str:
    """A metrics table: one row per (label, metrics), an optional signed gain row; `bold` maps a metric to the row
    label whose value to emphasise (the best baseline)."""
    head = "".join(f"<th>{_e(n)}</th>" for n in names)
    body = []
    for label, metrics in rows:
        if metrics is None:
            continue
        cells = "".join(
            f'<td class="num">{"<b>" if bold and bold.get(n) == label else ""}{_e(_format_metric(n, metrics.get(n)))}'
            f'{"</b>" if bold and bold.get(n) == label else ""}</td>' for n in names)
        body.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    if gain is not None:
        body.append(f"<tr><th>{_e(gain_label)}</th>{''.join(_signed_cell(n, gain.get(n)) for n in names)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def _short_id(row_id: str) -> str:
    """`/long/path/test.jsonl:12` as `test.jsonl:12`: the file is named once above each table."""
    return Path(row_id).name


def _img(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{_e(alt)}">' if uri else ""


def render_report_html(card: dict, plots: dict[str, str | None]) -> str:
    """The report page: one self-contained HTML document (inline CSS, images as data URIs, a few lines of script)."""
    task, metrics = card["task"], card["task_metrics"]
    fewshot = task["fewshot"]
    names = list(metrics["tuned"])
    sections = []

    sections.append(f'<h2 id="verdict">Verdict</h2><p class="verdict">{_e(card["verdict"])}</p>')

    best = {n: _variant_name(v, fewshot) if v else None for n, v in metrics["best_baseline"].items()}
    sections.append(
        '<h2 id="task-metrics">Task metrics</h2>'
        f'<p class="note">{_e(task["kind"])} task ({_e(task["method"])}), {task["n"]} examples from {_e(task["eval_split"]["note"])}: '
        f'<code>{_e(task["eval_split"]["path"])}</code>. Gain = tuned minus the better baseline, metric by metric '
        "(in bold).</p>"
        + _metrics_table([(_variant_name(v, fewshot), metrics.get(v)) for v in VARIANTS], names, metrics["gain"],
                         "gain over best baseline", bold=best)
        + _img(plots.get("task_metrics"), "task metrics: base, k-shot and tuned")
        + (_ood_html(card, names) if card["ood"] else "")
    )

    baseline = card["prompting_baseline"]
    if baseline["metrics"]:
        body = (f'<p class="note">The base model prompted with {baseline["fewshot"]} solved examples from '
                f'{_e(baseline["pool_note"])} ({baseline["pool_size"]} rows; seeded choice, seed {baseline["seed"]}) as earlier '
                "user/assistant turns. This is what the task gets without training.</p>"
                + _metrics_table([(_variant_name("base_fewshot", fewshot), baseline["metrics"])], names,
                                 baseline["fewshot_minus_zero_shot"], "k-shot minus zero-shot")
                + _metrics_table([], names, baseline["tuned_minus_fewshot"], "tuned minus k-shot"))
    else:
        body = ""
    sections.append('<h2 id="prompting-baseline">Prompting baseline</h2>' + body
                    + (f'<p class="note">{_e(baseline["note"])}</p>' if baseline["note"] else ""))

    forgetting = card["forgetting"]
    if forgetting["benchmarks"]:
        rows = "".join(
            f"<tr><th>{_e(name)}</th><td>{_e(row['metric'])}</td><td class=\"num\">{row['base']:.3f}</td>"
            f"<td class=\"num\">{row['tuned']:.3f}</td>{_signed_cell('acc', row['delta'])}<td class=\"num\">{row['n']}</td>"
            f"<td>{_e(row['slice'])}</td></tr>"
            for name, row in forgetting["benchmarks"].items())
        body = ("<table><tr><th>benchmark</th><th>metric</th><th>base</th><th>tuned</th><th>delta</th><th>n</th>"
                f"<th>questions</th></tr>{rows}</table>" + _img(plots.get("forgetting"), "forgetting deltas"))
    else:
        body = "<p>No benchmarks requested.</p>"
    sections.append(f'<h2 id="forgetting">Forgetting</h2><p class="note">{_e(forgetting["note"])}</p>{body}')

    sections.append(_error_analysis_html(card, plots))

    shown = [v for v in VARIANTS if card["samples"] and v in card["samples"][0]]
    sample_rows = "".join(
        f"<tr><td>{_e(_short_id(s['id']))}</td><td><pre>{_e(s['prompt'])}</pre></td><td><pre>{_e(s['reference'])}</pre></td>"
        + "".join(f"<td><pre>{_e(s[v])}</pre></td>" for v in shown) + "</tr>"
        for s in card["samples"])
    sections.append(
        '<h2 id="samples">Samples</h2>'
        f'<p class="note">{len(card["samples"])} held-out examples (seeded choice) for reading side by side.</p>'
        "<table><tr><th>id</th><th>prompt</th><th>reference</th>"
        + "".join(f"<th>{_e(_variant_name(v, fewshot))}</th>" for v in shown) + f"</tr>{sample_rows}</table>")

    training = card["training"]
    summary = training["summary"] or {}
    summary_rows = "".join(f"<tr><th>{_e(k)}</th><td class=\"num\">{_e(v)}</td></tr>" for k, v in summary.items() if v is not None)
    sections.append('<h2 id="training">Training</h2>'
                    + (f"<table>{summary_rows}</table>" if summary_rows else f'<p class="note">{_e(training["note"])}</p>')
                    + _img(plots.get("loss_curve"), "training and eval loss"))

    cache = card["cache"]
    footer = (f'<p class="note">Evaluations: {cache["hits"]} from the cache, {cache["misses"]} computed '
              f'(cache: <code>{_e(cache["dir"])}</code>). Report built in {card["seconds"]} s.</p>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Report card: {_e(card['run_dir'])}</title><style>{_CSS}</style></head><body>"
        f"<h1>Report card: {_e(Path(card['run_dir']).name)}</h1>"
        f'<p class="meta">base <code>{_e(card["models"]["base"]["target"])}</code> vs tuned '
        f'<code>{_e(card["models"]["tuned"]["target"])}</code> &middot; {_e(card["created"])}</p>'
        + "".join(sections) + footer + f"<script>{_BROKEN_IMAGES_SCRIPT}</script></body></html>\n"
    )


def _ood_html(card: dict, names: list[str]) -> str:
    ood = card["ood"]
    return (f'<h3 id="out-of-domain">Out-of-domain</h3><p class="note">{ood["n"]} examples from '
            f'<code>{_e(ood["path"])}</code>, zero-shot.</p>'
            + _metrics_table([("base model", ood["base"]), ("tuned model", ood["tuned"])], names, ood["gain"], "tuned - base"))


def _error_analysis_html(card: dict, plots: dict[str, str | None]) -> str:
    analysis = card["error_analysis"]
    fewshot = card["task"]["fewshot"]
    worst = analysis["worst_examples"]
    baseline_variants = list(worst[0]["baselines"]) if worst else []
    rows = "".join(
        f"<tr><td>{_e(_short_id(w['id']))}</td><td><pre>{_e(w['prompt'])}</pre></td><td><pre>{_e(w['reference'])}</pre></td>"
        f"<td><pre>{_e(w['prediction'])}</pre></td><td class=\"num\">{w['score']:.1f}</td>"
        + "".join(f"<td><pre>{_e(w['baselines'][v])}</pre></td>" for v in baseline_variants) + "</tr>"
        for w in worst)
    parts = ['<h2 id="error-analysis">Error analysis</h2>',
             f"<h3>Worst tuned examples</h3><p class=\"note\">By {_e(analysis['worst_by'])}.</p>"]
    if worst:
        parts.append("<table><tr><th>id</th><th>prompt</th><th>reference</th><th>tuned</th><th>score</th>"
                     + "".join(f"<th>{_e(_variant_name(v, fewshot))}</th>" for v in baseline_variants)
                     + f"</tr>{rows}</table>")
    else:
        parts.append("<p>The tuned model got every example right.</p>")
    if analysis["per_label"]:
        parts.append("<h3>Per label</h3><table><tr><th>label</th><th>support</th>"
                     + "".join(f"<th>F1 {_e(_variant_name(v, fewshot))}</th>" for v in analysis["per_label"]) + "</tr>")
        labels = list(analysis["per_label"]["tuned"])
        for label in labels:
            support = analysis["per_label"]["tuned"][label]["support"]
            cells = "".join(f'<td class="num">{analysis["per_label"][v][label]["f1"]:.3f}</td>' for v in analysis["per_label"])
            parts.append(f"<tr><th>{_e(label)}</th><td class=\"num\">{support}</td>{cells}</tr>")
        parts.append("</table>" + _img(plots.get("confusion"), "confusion matrices"))
    buckets = analysis["length_buckets"]
    variants = [v for v in VARIANTS if buckets["buckets"] and v in buckets["buckets"][0]]
    bucket_rows = "".join(
        f"<tr><td>{b['tokens'][0]}-{b['tokens'][1]}</td><td class=\"num\">{b['n']}</td>"
        + "".join(f'<td class="num">{b[v]:.{1 if card["task"]["kind"] == "generation" else 3}f}</td>' for v in variants)
        + "</tr>" for b in buckets["buckets"])
    parts.append(f"<h3>By length</h3><p class=\"note\">Quartiles of {_e(buckets['by'])}; mean {_e(buckets['metric'])} per group.</p>"
                 "<table><tr><th>tokens</th><th>n</th>" + "".join(f"<th>{_e(_variant_name(v, fewshot))}</th>" for v in variants)
                 + f"</tr>{bucket_rows}</table>" + _img(plots.get("length_buckets"), "metric by length"))
    return "".join(parts)


def write_report_files(card: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write report.json (the card) and report.html (the card rendered, plots and loss curve embedded) into `out_dir`.

    Raises:
        TunelabError: `out_dir` exists and is not a directory.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TunelabError(f"{out_dir}: exists and is not a directory; give a directory for report.json and report.html")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    loss_curve = card["training"].get("loss_curve")
    plots: dict[str, str | None] = {
        "task_metrics": plot_task_metrics(card),
        "forgetting": plot_forgetting(card) if card["forgetting"]["benchmarks"] else None,
        "confusion": plot_confusion(card) if card["error_analysis"]["confusion"] else None,
        "length_buckets": plot_length_buckets(card) if card["error_analysis"]["length_buckets"]["buckets"] else None,
        "loss_curve": _png_data_uri(Path(loss_curve).read_bytes()) if loss_curve and Path(loss_curve).is_file() else None,
    }
    html_path.write_text(render_report_html(card, plots), encoding="utf-8")
    return json_path, html_path
