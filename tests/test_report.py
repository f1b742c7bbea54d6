"""The run report (`lmm demo` / `lmm report`): headline, sample grids beside the real data, NFE and loss plots,
stage order, provenance marks, the analysis figures, and the page as a headless Chromium renders it."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmm.cli.main import main
from lmm.report import build_report

TINY = ["run.progress=false", "run.device=cpu", "run.bf16=false", "teacher.net.channels=8", "student.net.channels=8",
        "teacher.train.steps=10", "teacher.train.batch_size=16", "teacher.train.log_every=1", "teacher.steps=2",
        "pairs.n=64", "pairs.shard_size=32", "pairs.batch_size=32", "student.train.steps=10",
        "student.train.batch_size=16", "student.train.log_every=1", "student.loss={l2=1.0,adversarial=0.1}",
        "student.adversarial.width=8", "student.adversarial.resolution=32", "eval.n=64", "eval.teacher_nfe=[1,2,4]",
        'eval.teacher_solvers=["euler","heun"]', "eval.student_nfe=[1,2]"]
FIGURE = Path(__file__).parent.parent / "docs" / "figures" / "report.png"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny digits demo (student with a discriminator) with the singularity analysis and one more figure."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["demo", f"run.dir={run}", *TINY]) == 0
    assert main(["analyze", "singularity", str(run), "--n", "32", "--steps", "4"]) == 0
    (run / "analysis" / "extra").mkdir()
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (20, 1))).save(run / "analysis" / "extra" / "a.png")
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _svg_with(page: str, marker: str) -> str:
    """The inline SVG in which `marker` first occurs."""
    start = page.rfind("<svg", 0, page.index(marker))
    return page[start:page.index("</svg>", start)]


def test_report_content(run):
    page = build_report(run).read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    rows = metrics["results"]
    assert metrics["distance_key"] == "fd_pixel"
    headline = re.search(r"student NFE 1 fd_pixel ([\d.]+) / teacher fd_pixel ([\d.]+) = ([\d.]+)", page)
    assert headline and headline.start() < page.index("<h2")
    student, teacher = float(headline[1]), float(headline[2])
    pair_row = next(r for r in rows if r["label"] == "teacher dpm++2m NFE 2")
    assert abs(teacher - pair_row["fd_pixel"]) < 1e-3 * teacher and float(headline[3]) == pytest.approx(
        student / teacher, rel=1e-2)
    assert all(src.startswith("data:") for src in re.findall(r"src='([^']*)'", page))

    # grids: the real data first, then one per row, each labelled and at least 256 px wide
    samples = page[page.index("<h3>Samples"):page.index("<h3>Metrics")]
    assert "real data" in samples and "digits, train split" in samples
    assert len(re.findall(r"<img ", samples)) == len(rows) + 1
    assert all(int(w) >= 256 for w in re.findall(r"<img [^>]*width='(\d+)'", samples))
    for r in rows:
        assert f"<b>{r['label']}</b>" in samples
    assert "grid [0, 0.5]" in samples and "heun, 2 steps, trimmed schedule" in samples

    # NFE plot: log axis with a labelled tick at each NFE measured, several y ticks, legend right of the axes
    svg = _svg_with(page, ">NFE (log scale)</text>")
    nfes = sorted({r["nfe"] for r in rows})
    assert [int(t) for t in re.findall(r'class="xtick"[^>]*>([^<]*)<', svg)] == nfes == [1, 2, 3, 4]
    assert len(re.findall(r'class="ytick"', svg)) >= 3
    frame = re.search(r'<rect x="(\d+)" y="\d+" width="(\d+)"', svg)
    legend_x = [float(x) for x in re.findall(r'<text x="([\d.]+)" y="[\d.]+">(?:teacher|student) \(', svg)]
    assert len(legend_x) == 4 and min(legend_x) > int(frame[1]) + int(frame[2])

    # loss plots: the student's loss and its discriminator's each on its own axes, every logged point
    log = [json.loads(line) for line in (run / "student" / "log.jsonl").read_text().splitlines()]
    for key in ("loss", "disc_loss"):
        plot = _svg_with(page, f">student {key}</text>")
        points = re.search(r'<polyline [^>]*points="([^"]*)"', plot)[1].split()
        assert len(points) == len(log) == 10 and len(re.findall(r'class="ytick"', plot)) >= 3
    assert "teacher loss" in page

    # stages in pipeline order, in the sections and the timings
    heads = [page.index(h) for h in ("1. Teacher", "2. Pairs", "3. Student", "4. Evaluation", "Time per stage")]
    assert heads == sorted(heads)
    timings = page[page.index("Time per stage"):]
    order = [timings.index(s) for s in ("train teacher", "generate pairs", "train student", "sample + evaluate")]
    assert order == sorted(order)

    # every figure of the analysis folder, inline, with its source; every row computed from the current files
    figures = sorted(p for p in (run / "analysis").rglob("*") if p.suffix in (".svg", ".png"))
    assert len(figures) == 3
    for p in figures:
        assert base64.b64encode(p.read_bytes()).decode() in page and p.relative_to(run).as_posix() in page
    assert "from analysis/singularity.json" in page and "Endpoint collapse near the noise end" in page
    assert re.search(r"Reference statistics: lmm statistics of data digits[^<]*<code>\w{12}</code>[^<]*<code>\w{12}"
                     r"</code> <span class='ok'>current</span> \(reference-pixel-train.npz\)", page)
    assert "STALE" not in page and page.count("</code> <span class='ok'>current</span>") >= len(rows)


def test_rows_of_a_replaced_model_are_stale(run, tmp_path):
    run = _copy(run, tmp_path)
    rows = json.loads((run / "metrics.json").read_text())["results"]
    assert main(["train", f"run.dir={run}", *TINY, "student.train.steps=12", "student.train.extend=true"]) == 0
    reference = run / "reference-pixel-train.npz"
    reference.write_bytes(reference.read_bytes() + b"\0")
    page = build_report(run).read_text()
    assert "<span class='stale'>STALE</span>: no RUN/reference-*.npz holds these statistics now" in page
    table = page[page.index("<h3>Metrics"):page.index("<h3>The teacher's best")]
    for r in rows:
        cells = table[table.index(f"<td>{r['label']}</td>"):]
        cells = cells[:cells.index("</tr>")]
        assert ("<span class='stale'>STALE</span>" in cells) == (r["model"] == "student"), r["label"]
    samples = page[page.index("<h3>Samples"):page.index("<h3>Metrics")]
    assert samples.count("<span class='stale'>STALE</span>") == 2 * sum(r["model"] == "student" for r in rows)
    headline = page[:page.index("<h2")]
    assert "STALE" in headline and "(student row)" in headline
    analysis = page[page.index("5. Analysis"):]
    assert analysis.count("student model file is newer than this figure") == 2


def test_old_run_without_digests_and_without_data(run, tmp_path):
    run = _copy(run, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("teacher_sha256", "student_sha256"):
        del metrics["settings"][key]
    del metrics["reference"]
    for r in metrics["results"]:
        r.pop("model_sha256", None)
        del r["key"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"].update(name="image_folder", root=str(tmp_path / "nowhere"))
    (run / "config.json").write_text(json.dumps(cfg))
    page = build_report(run).read_text()
    assert page.count("digest not recorded") >= 2 * len(metrics["results"]) and "STALE" not in page
    assert "real data could not be loaded" in page and "nowhere" in page
    assert "Reference statistics: not recorded." in page
    assert re.search(r"student NFE 1 fd_pixel [\d.]+ / teacher fd_pixel [\d.]+ = [\d.]+", page)


def _screenshot(browser: str, page: Path, shot: Path, profile: Path, height: int) -> np.ndarray:
    """Render `page` in headless Chromium at 1200 x height into `shot`; its grey pixels (height, 1200)."""
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", f"--screenshot={shot}", f"--window-size=1200,{height}",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(shot).convert("L"), dtype=np.float64)


def test_report_renders_in_chromium(run, tmp_path):
    """The report in a real headless browser. LMM_REPORT_FIGURE_RUN=RUN (e.g. runs/demo after `lmm demo`) also
    renders that run's report into docs/figures/report.png."""
    browser = next((shutil.which(b) for b in ("chromium", "chromium-headless-shell", "chromium-browser")
                    if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium binary")
    page = build_report(run, title="LMM demo: digits")
    image = _screenshot(browser, page, tmp_path / "report.png", tmp_path / "profile", 3000)
    assert image.shape == (3000, 1200) and image.std() > 20
    assert image[:, :600].std() > 20 and image[1500:].std() > 20
    figure_run = os.environ.get("LMM_REPORT_FIGURE_RUN")
    if figure_run:
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        page = build_report(Path(figure_run), title="LMM demo: digits")
        assert _screenshot(browser, page, FIGURE, tmp_path / "profile", 4200).std() > 20
