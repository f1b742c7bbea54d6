"""One self-contained HTML page per run: sample grids, metrics, NFE curve, loss curves, timings, config."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from lmm.config import flat_keys
from lmm.io import atomic_write_text

RUN_MARKERS = ("config.json", "metrics.json", "teacher", "pairs", "student")
_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.grids{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0}figure img{image-rendering:pixelated;width:200px;border:1px solid #ddd}
figcaption{font-size:13px;text-align:center}code{font-size:12px}"""


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def svg_plot(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, logx: bool = False,
             logy: bool = False, width: int = 460, height: int = 260) -> str:
    """A small inline SVG line plot of named (x, y) series."""
    import math

    pts = [(x, y) for s in series.values() for x, y in s if (x > 0 or not logx) and (y > 0 or not logy)]
    if not pts:
        return ""
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    fy = (lambda v: math.log10(v)) if logy else (lambda v: v)
    xs, ys = [fx(x) for x, _ in pts], [fy(y) for _, y in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    m = 48
    sx = lambda v: m + (fx(v) - x0) / (x1 - x0) * (width - 2 * m)
    sy = lambda v: height - m + (fy(v) - y0) / (y1 - y0) * (2 * m - height)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    out = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="11">',
           f'<rect x="{m}" y="{m // 2}" width="{width - 2 * m}" height="{height - 1.5 * m}" fill="none" stroke="#999"/>']
    for i, (name, s) in enumerate(series.items()):
        s = [(x, y) for x, y in s if (x > 0 or not logx) and (y > 0 or not logy)]
        c = colors[i % len(colors)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="'
                   + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s) + '"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{c}"/>' for x, y in s if len(s) < 30]
        out.append(f'<text x="{width - m - 150}" y="{m // 2 + 14 + 13 * i}" fill="{c}">{html.escape(name)}</text>')
    lo_x, hi_x = (10 ** x0, 10 ** x1) if logx else (x0, x1)
    lo_y, hi_y = (10 ** y0, 10 ** y1) if logy else (y0, y1)
    out += [f'<text x="{m}" y="{height - m + 14}">{lo_x:.3g}</text>',
            f'<text x="{width - m}" y="{height - m + 14}" text-anchor="end">{hi_x:.3g}</text>',
            f'<text x="{m - 4}" y="{height - m}" text-anchor="end">{lo_y:.3g}</text>',
            f'<text x="{m - 4}" y="{m // 2 + 10}" text-anchor="end">{hi_y:.3g}</text>',
            f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">{html.escape(xlabel)}</text>',
            f'<text x="12" y="{height / 2}" transform="rotate(-90 12 {height / 2})" text-anchor="middle">'
            f'{html.escape(ylabel)}</text>', "</svg>"]
    return "\n".join(out)


def nfe_plot(rows: list[dict[str, Any]], key: str) -> str:
    """SVG of distance `key` against NFE (log-log), one curve per model and solver, from metrics rows."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if "nfe" in r:
            label = r["model"] + (f" ({r['solver']})" if r.get("solver") else "")
            curves.setdefault(label, []).append((float(r["nfe"]), float(r[key])))
    return svg_plot({k: sorted(v) for k, v in curves.items()}, "NFE", key, logx=True, logy=True)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _singularity_section(run: Path, result: dict[str, Any]) -> str:
    """RUN/analysis/singularity.json (lmm analyze singularity) as a table per line time, with its plot."""
    roles = [r for r in ("teacher", "student") if result.get(r)]
    cols = ["t"] + [f"{r} {k}" for r in roles for k in ("dist to mean", "spread")]
    rows = [{"t": f"{t:g}", **{f"{r} {k}": result[r][key][i] for r in roles
                               for k, key in (("dist to mean", "dist_to_mean_rel"), ("spread", "pixel_std_rel"))}}
            for i, t in enumerate(result["times"])]
    teacher = result.get("teacher")
    straight = (f" Teacher ODE path straightness: {teacher['straightness']:.4g} per dimension "
                f"({teacher['straightness_rel']:.4g} of the squared chord)." if teacher else "")
    svg = run / "analysis" / "singularity.svg"
    return ("<h2>Endpoint collapse near the noise end</h2><p>"
            + html.escape(f"Endpoint predictions on {result['n']} seeded noises at line time t: RMS distance to the "
                          "data mean and per-pixel spread across noises, relative to the data's own (0 = collapsed "
                          f"onto the mean, 1 = as spread as the data).{straight}")
            + "</p>" + _table(rows, cols) + (svg.read_text() if svg.is_file() else ""))


def build_report(run: str | Path, title: str | None = None) -> Path:
    """Write `RUN/report.html` from what the run folder holds (metrics.json, timings.json, logs, samples)."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    if not any((run / name).exists() for name in RUN_MARKERS):
        raise ValueError(f"{run} is not a run folder: it holds none of {', '.join(RUN_MARKERS)}")
    parts = [f"<h1>{html.escape(title or f'LMM run: {run.name}')}</h1>"]
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    rows = metrics.get("results", [])
    if rows:
        parts.append("<h2>Samples</h2><div class='grids'>")
        for r in rows:
            if r.get("grid"):
                parts.append(f"<figure><img src='{html.escape(r['grid'])}'><figcaption>{html.escape(r['label'])}"
                             f"</figcaption></figure>")
        parts.append("</div>")
        key = metrics.get("distance_key", "fd")
        optional = ("precision", "recall", "straightness", "endpoint_drift", "endpoint_to_final", "seconds")
        cols = ["label", "model", "solver", "nfe", key] + [c for c in optional if any(c in r for r in rows)]
        parts.append(f"<h2>Metrics</h2><p>{html.escape(metrics.get('description', ''))}</p>" + _table(rows, cols))
        if metrics.get("teacher_best"):
            parts.append("<h3>The teacher's best at each NFE budget</h3>"
                         + _table(metrics["teacher_best"], ["budget", "label", "nfe", key]))
        parts.append(nfe_plot(rows, key))
        if metrics.get("settings"):
            parts.append("<h3>Evaluation settings</h3>" + _table(
                [{"setting": k, "value": json.dumps(v)} for k, v in metrics["settings"].items()], ["setting", "value"]))
    singularity = run / "analysis" / "singularity.json"
    if singularity.is_file():
        parts.append(_singularity_section(run, json.loads(singularity.read_text())))
    losses = {}
    for stage in ("teacher", "student"):
        log = _read_log(run / stage / "log.jsonl")
        if log:
            losses[stage] = [(float(e["step"]), float(e["loss"])) for e in log if "loss" in e]
    if losses:
        parts.append("<h2>Training loss</h2>" + svg_plot(losses, "step", "loss", logy=True))
    if (run / "timings.json").is_file():
        timings = json.loads((run / "timings.json").read_text())
        total = sum(timings.values())
        parts.append("<h2>Time per stage</h2>" + _table(
            [{"stage": k, "seconds": v} for k, v in timings.items()] + [{"stage": "total", "seconds": total}],
            ["stage", "seconds"]))
    if (run / "config.json").is_file():
        cfg = json.loads((run / "config.json").read_text())
        parts.append("<h2>Config</h2>" + _table([{"key": k, "value": json.dumps(v)} for k, v in flat_keys(cfg)],
                                                ["key", "value"]))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run.name)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = run / "report.html"
    atomic_write_text(out, page)
    return out
