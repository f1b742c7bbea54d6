"""One self-contained HTML page per run: a headline (the student's one-step distance against the teacher's), then
the stages in pipeline order (teacher, pairs, student, evaluation) with their loss curves, sample grids beside the
real data, metrics and the NFE curve, the run's analysis figures, timings and config. Each figure and metric row
says what it was computed from, and rows made from another model file than the run's current one are marked STALE."""
from __future__ import annotations

import base64
import html
import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from lmm.config import flat_keys
from lmm.io import atomic_write_text, file_sha256

RUN_MARKERS = ("config.json", "metrics.json", "teacher", "pairs", "student")
ROLES = ("teacher", "student")
GRID_MIN_WIDTH = 256
REAL_GRID = "samples/real.png"
_KEY_NAMES = {"fid": "FID"}
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")
_STYLE = """body{font-family:system-ui,sans-serif;max-width:1140px;margin:1.5em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:3px;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f3f3f3;white-space:normal;vertical-align:bottom}td:first-child,th:first-child{text-align:left}
.headline{font-size:20px;font-weight:600;background:#f4f7fb;border-left:4px solid #1f77b4;padding:10px 14px}
.headline small{display:block;font-size:13px;font-weight:normal;color:#555;margin-top:4px}
.gallery{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
figure{margin:0}figure img{image-rendering:pixelated;border:1px solid #ddd;max-width:100%;height:auto}
.scroll{overflow-x:auto}
figcaption{font-size:12px;max-width:340px;margin-top:4px;line-height:1.35}figcaption b{font-size:13px}
.wide figcaption{max-width:none}.note{font-size:13px;color:#555}
.stale{color:#fff;background:#c62828;font-weight:700;padding:0 4px;border-radius:3px}
.ok{color:#2e7d32}.unknown{color:#777;font-style:italic}code{font-size:12px}nav a{margin-right:1em}"""


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _written(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(path.stat().st_mtime))


def _tick_label(v: float) -> str:
    return f"{v:.3g}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def _linear_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n (at least 3) round values, in steps of 1, 2 or 5 x 10^k, in [lo, hi]."""
    if hi <= lo:
        return [lo]
    for want in (n, 2 * n):
        raw = (hi - lo) / want
        mag = 10.0 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
        ticks = [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
        if len(ticks) >= 3:
            break
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks in [lo, hi] (> 0): decades, else 1-2-5 or 1..9 times decades, the first with at least 3 ticks; else
    round linear values."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mults in ((1,), (1, 2, 5), range(1, 10)):
        ticks = [m * 10.0 ** e for e in decades for m in mults if lo * (1 - 1e-9) <= m * 10.0 ** e <= hi * (1 + 1e-9)]
        if len(ticks) >= 3:
            return ticks
    return [t for t in _linear_ticks(lo, hi) if t > 0]


def _padded(lo: float, hi: float, log: bool) -> tuple[float, float]:
    if hi <= lo:
        d = 0.5 if log else (abs(lo) * 0.1 or 1.0)
        return lo - d, hi + d
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def svg_plot(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, logx: bool = False,
             logy: bool = False, width: int = 460, height: int = 260, xticks: Sequence[float] | None = None) -> str:
    """A standalone SVG line plot of named (x, y) series, `width` x `height` for the axes, with labelled ticks along
    both axes (log axes at decades or 1-2-5 steps; `xticks`: the x ticks at these values instead) and the legend
    right of the data area, widening the SVG (left out for one series named like the y axis). Points that a log
    axis cannot show are dropped; empty when none is left."""
    def shown(x: float, y: float) -> bool:
        return math.isfinite(x) and math.isfinite(y) and (x > 0 or not logx) and (y > 0 or not logy)

    series = {k: [(float(x), float(y)) for x, y in s if shown(float(x), float(y))] for k, s in series.items()}
    series = {k: s for k, s in series.items() if s}
    if not series:
        return ""
    fx = math.log10 if logx else float
    fy = math.log10 if logy else float
    xticks = [float(t) for t in xticks or () if t > 0 or not logx]
    xs = [fx(x) for s in series.values() for x, _ in s] + [fx(t) for t in xticks]
    ys = [fy(y) for s in series.values() for _, y in s]
    x0, x1 = _padded(min(xs), max(xs), logx)
    y0, y1 = _padded(min(ys), max(ys), logy)
    left, right, top, bottom = 62, width - 12, 12, height - 42

    def sx(v: float) -> float:
        return left + (fx(v) - x0) / (x1 - x0) * (right - left)

    def sy(v: float) -> float:
        return bottom - (fy(v) - y0) / (y1 - y0) * (bottom - top)

    xt = xticks or (_log_ticks(10.0 ** x0, 10.0 ** x1) if logx else _linear_ticks(x0, x1))
    yt = _log_ticks(10.0 ** y0, 10.0 ** y1) if logy else _linear_ticks(y0, y1)
    legend = not (len(series) == 1 and next(iter(series)) == ylabel)
    legend_w = int(34 + 6.4 * max(len(k) for k in series)) if legend else 0
    out = [f'<svg width="{width + legend_w}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="11" '
           f'font-family="sans-serif">',
           f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="#fff" stroke="#999"/>']
    last = -math.inf
    for t in sorted(t for t in xt if x0 <= fx(t) <= x1):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#e4e4e4"/>')
        if x - last >= 20:
            out.append(f'<text class="xtick" x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">'
                       f'{_tick_label(t)}</text>')
            last = x
    for t in (t for t in yt if y0 <= fy(t) <= y1):
        y = sy(t)
        out += [f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e4e4e4"/>',
                f'<text class="ytick" x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(t)}</text>']
    for i, (name, s) in enumerate(series.items()):
        c = _COLORS[i % len(_COLORS)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="'
                   + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s) + '"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{c}"/>' for x, y in s if len(s) < 30]
        if legend:
            ly = top + 8 + 16 * i
            out += [f'<line x1="{width}" y1="{ly}" x2="{width + 20}" y2="{ly}" stroke="{c}" stroke-width="2"/>',
                    f'<text x="{width + 25}" y="{ly + 4}">{html.escape(name)}</text>']
    out += [f'<text x="{(left + right) / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
            f'<text x="13" y="{(top + bottom) / 2}" transform="rotate(-90 13 {(top + bottom) / 2})" '
            f'text-anchor="middle">{html.escape(ylabel)}</text>', "</svg>"]
    return "\n".join(out)


def nfe_plot(rows: list[dict[str, Any]], key: str) -> str:
    """SVG of distance `key` against NFE (log-log, x ticks at the NFEs measured), one curve per model and solver."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if "nfe" in r and r.get(key) is not None:
            label = r["model"] + (f" ({r['solver']})" if r.get("solver") else "")
            curves.setdefault(label, []).append((float(r["nfe"]), float(r[key])))
    nfes = sorted({x for c in curves.values() for x, _ in c})
    return svg_plot({k: sorted(v) for k, v in curves.items()}, "NFE (log scale)", f"{_key_name(key)} (log scale)",
                    logx=True, logy=True, width=520, height=300, xticks=nfes)


def _key_name(key: str) -> str:
    return _KEY_NAMES.get(key, key)


def _table(rows: list[dict[str, Any]], columns: list[str], raw: Sequence[str] = ()) -> str:
    """HTML table; the columns in `raw` hold HTML already."""
    def fmt(c: str, v: Any) -> str:
        return str(v) if c in raw else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c).replace('_', '_<wbr>') if len(c) > 10 else html.escape(c)}</th>"
                   for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(c, r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


def _img(data: bytes, mime: str = "image/png", min_width: int = 0) -> str:
    """An <img> with the image inline as a data URI; a PNG narrower than `min_width` is first upscaled by the
    smallest integer factor that reaches it, nearest neighbour."""
    size = ""
    if mime == "image/png":
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        k = max(1, math.ceil(min_width / img.width))
        if k > 1:
            img = img.resize((img.width * k, img.height * k), Image.NEAREST)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = buf.getvalue()
        size = f" width='{img.width}' height='{img.height}'"
    return f"<img src='data:{mime};base64,{base64.b64encode(data).decode()}'{size}>"


def _mark(status: str) -> str:
    cls = {"STALE": "stale", "current": "ok"}.get(status, "unknown")
    return f"<span class='{cls}'>{html.escape(status)}</span>"


def _digest_status(recorded: str | None, current: str | None) -> str:
    if not recorded:
        return "digest not recorded"
    if current is None:
        return "model file missing"
    return "current" if recorded == current else "STALE"


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "-"


def _role(row: dict[str, Any]) -> str | None:
    """The model a metrics row sampled: its "model" field, else its label's first word."""
    for name in (row.get("model"), str(row.get("label", "")).split(" ")[0]):
        if name in ROLES:
            return name
    return None


class _Provenance:
    """The run's current model files (their sha256) against the digests its records name."""

    def __init__(self, run: Path, settings: dict[str, Any]):
        self.files = {role: run / role / "model.safetensors" for role in ROLES}
        self.current = {role: file_sha256(p) if p.is_file() else None for role, p in self.files.items()}
        self.settings = settings

    def recorded(self, row: dict[str, Any]) -> str | None:
        """The sha256 of the model file a row was computed from: its model_sha256, else the evaluation's
        settings.ROLE_sha256 (the rows of one metrics.json share its settings)."""
        role = _role(row)
        return row.get("model_sha256") or (self.settings.get(f"{role}_sha256") if role else None)

    def status(self, row: dict[str, Any]) -> str:
        role = _role(row)
        return _digest_status(self.recorded(row), self.current[role]) if role else "not a run model"

    def cell(self, row: dict[str, Any]) -> str:
        role, recorded = _role(row), self.recorded(row)
        title = f"recorded {recorded or 'none'}; current {role}/model.safetensors {self.current.get(role) or 'missing'}"
        return f"<code title='{html.escape(title)}'>{_short(recorded)}</code> {_mark(self.status(row))}"

    def teacher_file(self, digest: str | None) -> str:
        """The teacher file of sha256 `digest`, marked against the current teacher/model.safetensors."""
        return f"teacher file <code>{_short(digest)}</code> {_mark(_digest_status(digest, self.current['teacher']))}"


def _sampler(row: dict[str, Any]) -> str:
    """The sampler of a metrics row in words, from its key (the sampler settings) or its fields."""
    how = json.loads(row["key"]) if row.get("key") else {}
    solver = how.get("solver", row.get("solver", "?"))
    if "steps" in how:
        return f"{solver}, {how['steps']} steps, {how.get('schedule', 'edm')} schedule"
    grid = how.get("grid", row.get("time_grid"))
    return f"{solver}, grid [{', '.join(f'{t:g}' for t in grid)}]" if grid else str(solver)


def _headline(rows: list[dict[str, Any]], key: str, run: Path, prov: _Provenance) -> str:
    """"student NFE 1 KEY x / teacher KEY y = x/y": the student's fewest-NFE row against the teacher's row with the
    sampler that made the pairs (else the teacher's best at its largest NFE)."""
    scored = [r for r in rows if r.get(key) is not None and "nfe" in r]
    students = sorted((r for r in scored if _role(r) == "student"), key=lambda r: r["nfe"])
    teachers = [r for r in scored if _role(r) == "teacher"]
    if not students or not teachers:
        return "<p class='headline'>No student and teacher rows in metrics.json to compare.</p>"
    made = _read_json(run / "pairs" / "manifest.json") or _read_json(run / "teacher" / "model.json").get("teacher", {})
    own = {"solver": made.get("solver"), "steps": made.get("steps"), "schedule": made.get("schedule", "edm")}
    pair_rows = [r for r in teachers if r.get("key") and
                 {k: json.loads(r["key"]).get(k) for k in own} == own]
    if pair_rows:
        teacher, why = pair_rows[0], "the sampler that made the pairs"
    else:
        top = max(r["nfe"] for r in teachers)
        teacher = min((r for r in teachers if r["nfe"] == top), key=lambda r: r[key])
        why = "its best at its largest NFE"
    student, name = students[0], _key_name(key)
    x, y = float(student[key]), float(teacher[key])
    ratio = f"{x / y:.3g}" if y else "inf"
    marks = "".join(f" {_mark('STALE')} ({role} row)" for role, r in (("student", student), ("teacher", teacher))
                    if prov.status(r) == "STALE")
    return (f"<p class='headline'>student NFE {student['nfe']} {html.escape(name)} {x:.4g} / teacher "
            f"{html.escape(name)} {y:.4g} = {ratio}{marks}<small>student: {html.escape(student['label'])} "
            f"({html.escape(_sampler(student))}); teacher: {html.escape(teacher['label'])} "
            f"({html.escape(_sampler(teacher))}), {why}; lower is better.</small></p>")


def _real_grid(run: Path) -> tuple[str, str]:
    """(the <img> of a grid of real images, its caption): RUN/samples/real.png when present, else the first images
    of the run's dataset (eval.split, else data.split), laid out as lmm.generate.save_samples lays out samples;
    on failure no image and a caption saying why."""
    if (run / REAL_GRID).is_file():
        return _img((run / REAL_GRID).read_bytes(), min_width=GRID_MIN_WIDTH), f"from {REAL_GRID}"
    try:
        import numpy as np

        from lmm.analysis.singularity import run_config
        from lmm.data.from_config import load_data
        from lmm.generate import save_samples

        cfg = run_config(run)
        split = _read_json(run / "config.json").get("eval", {}).get("split") or cfg["data"]["split"]
        data = load_data({**cfg, "data": {**cfg["data"], "split": split}})
        labelled = cfg["data"]["conditional"] and data.y is not None
        head = data.head(min(len(data), 2048 if labelled else 64))
        images = np.ascontiguousarray(head.uint8_nhwc())
        with tempfile.TemporaryDirectory() as tmp:
            png = save_samples({"images": images, "labels": np.asarray(head.y) if labelled else None},
                               Path(tmp) / "real.npz").with_suffix(".png")
            img = _img(png.read_bytes(), min_width=GRID_MIN_WIDTH)
        which = "the first of each class, a row per class" if labelled else f"the first {min(len(images), 64)}"
        return img, f"{data.name}, {split} split: {which} images (read with the run's config)"
    except Exception as err:  # whatever the dataset's loader raises becomes a note on the page
        return "", f"real data could not be loaded: {type(err).__name__}: {err}"


def _samples_section(run: Path, rows: list[dict[str, Any]], key: str, prov: _Provenance) -> str:
    gridded = [r for r in rows if r.get("grid")]
    if not gridded:
        return ""
    img, caption = _real_grid(run)
    figs = [f"<figure>{img}<figcaption><b>real data</b><br>{html.escape(caption)}</figcaption></figure>"]
    for r in gridded:
        path = run / r["grid"]
        status = prov.status(r)
        source = f"from {Path(r['grid']).with_suffix('.npz').as_posix()}, made with the row's model file"
        figs.append(
            "<figure>" + (_img(path.read_bytes(), min_width=GRID_MIN_WIDTH) if path.is_file()
                          else f"<p class='note'>grid file missing: {html.escape(r['grid'])}</p>")
            + f"<figcaption><b>{html.escape(r['label'])}</b>"
            + (f" {_mark('STALE')}" if status == "STALE" else "")
            + f"<br>model {html.escape(str(_role(r) or r.get('model')))} &middot; sampler "
            f"{html.escape(_sampler(r))} &middot; NFE {r.get('nfe', '?')}<br>{html.escape(_key_name(key))} "
            f"{float(r[key]):.4g} &middot; model file {prov.cell(r)}<br>{html.escape(source)}</figcaption></figure>")
    return ("<h3>Samples</h3><p class='note'>Grids upscaled with nearest neighbour; each is the first samples of "
            "its row, from the same seeded noise.</p><div class='gallery'>" + "".join(figs) + "</div>")


def _reference_note(run: Path, reference: Any) -> str:
    """What the metrics were scored against (metrics.json's "reference"), its statistics file marked against the
    run's current RUN/reference-*.npz files."""
    if not isinstance(reference, dict):
        return f"Reference statistics: {html.escape(str(reference)) if reference else 'not recorded'}."
    digest = reference.get("sha256")
    text = (f"Reference statistics: {html.escape(str(reference.get('source', '?')))}; statistics file "
            f"<code>{_short(digest)}</code>, data <code>{_short(reference.get('data_sha256'))}</code>")
    files = {file_sha256(p): p.name for p in sorted(run.glob("reference-*.npz"))} if digest else {}
    if digest in files:
        return f"{text} {_mark('current')} ({html.escape(files[digest])})."
    if files:
        return f"{text} {_mark('STALE')}: no RUN/reference-*.npz holds these statistics now."
    return text + "."


def _metrics_section(run: Path, metrics: dict[str, Any], prov: _Provenance) -> str:
    rows, key = metrics.get("results", []), metrics.get("distance_key", "fd")
    optional = ("precision", "recall", "straightness", "endpoint_drift", "endpoint_to_final", "seconds")
    refs = sorted({k for r in rows for k in r if k.startswith("reference")})
    cols = (["label", "model", "solver", "nfe", key] + [c for c in optional if any(c in r for r in rows)]
            + ["model file (sha256)"] + refs)
    table_rows = [{**r, "model file (sha256)": prov.cell(r),
                   **{k: _short(r[k]) if _is_digest(r.get(k)) else r.get(k, "") for k in refs}} for r in rows]
    stale = [r["label"] for r in rows if prov.status(r) == "STALE"]
    current = "; ".join(f"{role}/model.safetensors <code>{_short(d)}</code>" if d else f"{role}: no model file"
                        for role, d in prov.current.items())
    parts = [_samples_section(run, rows, key, prov),
             f"<h3>Metrics</h3><p class='note'>From metrics.json (written {_written(run / 'metrics.json')}). "
             f"{html.escape(metrics.get('description', ''))}</p>"
             f"<p class='note'>{_reference_note(run, metrics.get('reference'))}</p>"
             f"<p class='note'>Model file of each row: the sha256 recorded with it (model_sha256, else the "
             f"evaluation's settings) against the current files: {current}. "
             + (f"{_mark('STALE')} rows ({html.escape(', '.join(stale))}) were computed from another model file "
                "than the current one: re-run the evaluation.</p>" if stale else "</p>")
             + _table(table_rows, cols, raw=["model file (sha256)"])]
    if metrics.get("teacher_best"):
        parts.append("<h3>The teacher's best at each NFE budget</h3>"
                     + _table(metrics["teacher_best"], ["budget", "label", "nfe", key]))
    plot = nfe_plot(rows, key)
    if plot:
        parts.append(f"<h3>{html.escape(_key_name(key))} against NFE</h3><figure class='wide'>{plot}<figcaption>"
                     f"From the rows of metrics.json above (one point per row; ticks at the NFEs measured)."
                     + (f" {_mark('STALE')} points: {html.escape(', '.join(stale))}." if stale else "")
                     + "</figcaption></figure>")
    if metrics.get("settings"):
        parts.append("<h3>Evaluation settings</h3>" + _table(
            [{"setting": k, "value": json.dumps(v)} for k, v in metrics["settings"].items()], ["setting", "value"]))
    return "".join(parts)


def _is_digest(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _loss_plots(run: Path, stage: str) -> str:
    """One small plot per loss the stage's log.jsonl records (loss, and e.g. disc_loss of a discriminator phase),
    every logged point."""
    path = run / stage / "log.jsonl"
    log = _read_log(path)
    keys = [k for k in dict.fromkeys(k for e in log for k in e) if k == "loss" or k.endswith("_loss")]
    figs = []
    for k in keys:
        pts = [(float(e["step"]), float(e[k])) for e in log if k in e and "step" in e]
        logy = all(y > 0 for _, y in pts)
        plot = svg_plot({f"{stage} {k}": pts}, "step", f"{stage} {k}", logy=logy, width=400, height=220)
        if plot:
            figs.append(f"<figure>{plot}<figcaption>{html.escape(stage)} {html.escape(k)}"
                        f"{' (log scale)' if logy else ''}: {len(pts)} points, steps {pts[0][0]:g} to "
                        f"{pts[-1][0]:g}, from {stage}/log.jsonl</figcaption></figure>")
    return ("<h3>Training loss</h3><div class='gallery'>" + "".join(figs) + "</div>") if figs else ""


def _model_line(run: Path, role: str, prov: _Provenance) -> str:
    meta = _read_json(run / role / "model.json")
    if prov.current[role] is None:
        return f"<p class='note'>No {role}/model.safetensors.</p>"
    step = f", trained {meta['step']} steps" if "step" in meta else ""
    return (f"<p class='note'>{role}/model.safetensors: sha256 <code>{_short(prov.current[role])}</code>, written "
            f"{_written(prov.files[role])}{step}.</p>")


def _stage_sections(run: Path, prov: _Provenance) -> list[str]:
    teacher = "<h2 id='teacher'>1. Teacher</h2>" + _model_line(run, "teacher", prov) + _loss_plots(run, "teacher")
    manifest = _read_json(run / "pairs" / "manifest.json")
    pairs = "<h2 id='pairs'>2. Pairs</h2>"
    if manifest:
        pairs += (f"<p class='note'>{manifest.get('n_pairs', '?')} pairs, {manifest.get('solver', '?')} "
                  f"{manifest.get('steps', '?')} steps (NFE {manifest.get('nfe', '?')}), "
                  f"{manifest.get('schedule', 'edm')} schedule; made by the "
                  + prov.teacher_file(manifest.get("teacher", {}).get("sha256")) + ".</p>")
    else:
        pairs += "<p class='note'>No pairs/manifest.json.</p>"
    trained_on = _read_json(run / "student" / "model.json").get("pairs", {})
    student = "<h2 id='student'>3. Student</h2>" + _model_line(run, "student", prov)
    if trained_on:
        made_by = prov.teacher_file(trained_on.get("teacher_sha256"))
        student += f"<p class='note'>Trained on pairs made by the {made_by}.</p>"
    return [teacher, pairs, student + _loss_plots(run, "student")]


def _singularity_section(result: dict[str, Any]) -> str:
    """RUN/analysis/singularity.json (lmm analyze singularity) as a table per line time."""
    roles = [r for r in ROLES if result.get(r)]
    cols = ["t"] + [f"{r} {k}" for r in roles for k in ("dist to mean", "spread")]
    rows = [{"t": f"{t:g}", **{f"{r} {k}": result[r][key][i] for r in roles
                               for k, key in (("dist to mean", "dist_to_mean_rel"), ("spread", "pixel_std_rel"))}}
            for i, t in enumerate(result["times"])]
    teacher = result.get("teacher")
    straight = (f" Teacher ODE path straightness: {teacher['straightness']:.4g} per dimension "
                f"({teacher['straightness_rel']:.4g} of the squared chord)." if teacher else "")
    return ("<h3>Endpoint collapse near the noise end</h3><p>"
            + html.escape(f"Endpoint predictions on {result['n']} seeded noises at line time t: RMS distance to the "
                          "data mean and per-pixel spread across noises, relative to the data's own (0 = collapsed "
                          f"onto the mean, 1 = as spread as the data).{straight}")
            + "</p>" + _table(rows, cols))


def _figure_source(run: Path, fig: Path, prov: _Provenance) -> str:
    """What an analysis figure was computed from: the JSON beside it (NAME.json, else PREFIX.json for PREFIX_*) and
    the run's model files it names, STALE when one of them is newer than the figure."""
    found = [p for p in (fig.with_suffix(".json"), fig.with_name(fig.stem.split("_")[0] + ".json")) if p.is_file()]
    if not found:
        return "source not recorded"
    source = _read_json(found[0])
    roles = [r for r in ROLES if isinstance(source.get(r), dict) and "model" in source[r]]
    text = f"from {html.escape(found[0].relative_to(run).as_posix())}"
    if roles:
        text += " (" + ", ".join(f"{r}/model.safetensors" for r in roles) + ")"
    newer = [r for r in roles if prov.files[r].is_file() and prov.files[r].stat().st_mtime > fig.stat().st_mtime]
    if newer:
        text += (f" {_mark('STALE')}: the current {' and '.join(newer)} model file is newer than this figure; "
                 "re-run the analysis")
    return text


def _analysis_section(run: Path, prov: _Provenance) -> str:
    folder = run / "analysis"
    parts = []
    singularity = folder / "singularity.json"
    if singularity.is_file():
        parts.append(_singularity_section(json.loads(singularity.read_text())))
    mimes = {".svg": "image/svg+xml", ".png": "image/png"}
    figs = sorted(p for p in folder.rglob("*") if p.suffix.lower() in mimes and p.is_file()) if folder.is_dir() else []
    if figs:
        parts.append("<h3>Figures</h3><div class='gallery'>" + "".join(
            f"<figure class='wide'>{_img(p.read_bytes(), mimes[p.suffix.lower()])}<figcaption>"
            f"<b>{html.escape(p.relative_to(run).as_posix())}</b><br>written {_written(p)}, "
            f"{_figure_source(run, p, prov)}</figcaption></figure>" for p in figs) + "</div>")
    return ("<h2 id='analysis'>5. Analysis</h2>" + "".join(parts)) if parts else ""


def _stage_rank(name: str) -> int:
    """A timed stage's place in the pipeline: teacher, pairs, student, evaluation, then anything else."""
    words = (("teacher",), ("pair",), ("student",), ("eval", "sample"))
    return next((i for i, w in enumerate(words) if any(x in name.lower() for x in w)), len(words))


def build_report(run: str | Path, title: str | None = None) -> Path:
    """Write `RUN/report.html` (atomically, images inline) from what the run folder holds: model files, logs,
    pairs manifest, metrics.json, sample grids, the dataset (for the real grid), analysis figures, timings.json and
    config.json."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    if not any((run / name).exists() for name in RUN_MARKERS):
        raise ValueError(f"{run} is not a run folder: it holds none of {', '.join(RUN_MARKERS)}")
    metrics = _read_json(run / "metrics.json")
    rows, key = metrics.get("results", []), metrics.get("distance_key", "fd")
    prov = _Provenance(run, metrics.get("settings", {}))
    parts = [*_stage_sections(run, prov), "<h2 id='evaluation'>4. Evaluation</h2>",
             _metrics_section(run, metrics, prov) if rows else "<p class='note'>No metrics.json rows.</p>"]
    parts.append(_analysis_section(run, prov))
    if (run / "timings.json").is_file():
        timings = sorted(json.loads((run / "timings.json").read_text()).items(), key=lambda kv: _stage_rank(kv[0]))
        total = {"stage": "total", "seconds": sum(v for _, v in timings)}
        parts.append("<h2 id='timings'>Time per stage</h2><p class='note'>From timings.json (seconds, summed over "
                     "the invocations of each stage).</p>"
                     + _table([{"stage": k, "seconds": v} for k, v in timings] + [total], ["stage", "seconds"]))
    if (run / "config.json").is_file():
        cfg = json.loads((run / "config.json").read_text())
        parts.append("<h2 id='config'>Config</h2>" + _table(
            [{"key": k, "value": json.dumps(v)} for k, v in flat_keys(cfg)], ["key", "value"]))
    body = "".join(parts)
    nav = "".join(f"<a href='#{a}'>{t}</a>" for a, t in (
        ("teacher", "Teacher"), ("pairs", "Pairs"), ("student", "Student"), ("evaluation", "Evaluation"),
        ("analysis", "Analysis"), ("timings", "Timings"), ("config", "Config")) if f"id='{a}'" in body)
    head = (f"<h1>{html.escape(title or f'LMM run: {run.name}')}</h1>"
            + (_headline(rows, key, run, prov) if rows else "<p class='headline'>No metrics.json yet.</p>")
            + f"<nav>{nav}</nav>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run.name)}</title>"
            f"<style>{_STYLE}</style></head><body>{head}{body}</body></html>")
    out = run / "report.html"
    atomic_write_text(out, page)
    return out
