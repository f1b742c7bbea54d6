"""End-to-end runs of the `lmm` command (in-process) on toy and digits data."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmm.cli.main import build_parser, main

TINY_UNET = ["teacher.net.channels=8", "student.net.channels=8", "run.progress=false"]
TOY_FAST = ["teacher.train.steps=300", "student.train.steps=300", "teacher.train.warmup_steps=20",
            "student.train.warmup_steps=20", "teacher.train.ema_halflife=2000.0", "student.train.ema_halflife=2000.0",
            "teacher.net.width=64", "student.net.width=64", "teacher.net.depth=3", "student.net.depth=3",
            "pairs.n=2048", "pairs.shard_size=1024", "eval.n=1000", "data.n=4000", "run.progress=false"]


def test_help_documents_every_option(capsys):
    parser = build_parser()
    for command in (["config"], ["teacher", "train"], ["pairs"], ["train"], ["sample"], ["compare"], ["eval"], ["demo"], ["report"]):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([*command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        sub = parser._subparsers._group_actions[0].choices[command[0]]
        if len(command) > 1:
            sub = sub._subparsers._group_actions[0].choices[command[1]]
        for action in sub._actions:
            assert action.help, f"{command} {action.dest} has no help text"
            for flag in action.option_strings:
                assert flag in text
            if not action.option_strings:
                assert (action.metavar or action.dest) in text


def test_unknown_key_is_a_clear_error(capsys):
    assert main(["config", "teacher.train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'teacher.train.stepz'" in err and "steps" in err


def test_stages_on_digits(tmp_path, capsys):
    run = tmp_path / "run"
    common = [f"run.dir={run}", *TINY_UNET, "teacher.train.steps=4", "student.train.steps=4", "teacher.steps=3",
              "pairs.n=96", "pairs.shard_size=64", "pairs.batch_size=64", "teacher.train.batch_size=16",
              "student.train.batch_size=16", "teacher.train.ckpt_every=2", "student.train.ckpt_every=2"]
    assert main(["teacher", "train", *common]) == 0
    assert main(["pairs", *common]) == 0
    manifest = json.loads((run / "pairs" / "manifest.json").read_text())
    assert manifest["n_pairs"] == 96 and manifest["nfe"] == 3 and manifest["solver"] == "dpm++2m"
    assert manifest["schedule"] == "trimmed"
    assert len(manifest["grid"]) == 4 and manifest["grid"][-1] == 0.0
    assert main(["train", *common]) == 0
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", str(run / "student"), "--nfe", "2", "-n", "10", "--out", str(out)]) == 0
    images = np.load(out)["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert out.with_suffix(".png").is_file()
    student = ["sample", "--model", str(run / "student"), "--nfe", "2"]
    # --format png: one PNG per image, named by index, holding the .npz's pixels
    assert main([*student, "-n", "10", "--format", "png", "--out", str(tmp_path / "pngs")]) == 0
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names == [f"{i:06d}.png" for i in range(10)]
    for name, image in zip(names, images):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / name))[..., None], image)
    # --seeds: an image depends on its seed alone, whatever its batch; -c and KEY=VALUE give run.*, flags win
    preset = Path(__file__).parent.parent / "configs" / "fashion_mnist.toml"
    assert main(["sample", "-c", str(preset), "run.device=cpu", "run.bf16=false", *student[1:], "--seeds", "3-5",
                 "--out", str(tmp_path / "s35.npz")]) == 0
    assert main([*student, "--seeds", "4", "--format", "png", "--out", str(tmp_path / "s4"), "run.bf16=true",
                 "--bf16", "false", "--device", "cpu"]) == 0
    three = np.load(tmp_path / "s35.npz")
    assert three["seeds"].tolist() == [3, 4, 5] and (tmp_path / "s35.png").is_file()
    assert [p.name for p in (tmp_path / "s4").iterdir()] == ["000004.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s4" / "000004.png"))[..., None], three["images"][1])
    # lmm compare: a row per model from the same seeds' noise; the student's NFE-2 row holds lmm sample's images
    fig = tmp_path / "compare.png"
    assert main(["compare", "--model", str(run / "teacher"), "--model", str(run / "student"),
                 "--model", f"{run / 'student' / 'model.safetensors'}@2", "--seeds", "3-5", "--scale", "2",
                 "--out", str(fig), "run.bf16=false"]) == 0
    canvas = np.asarray(Image.open(fig))
    assert canvas.shape[0] == 2 + 3 * (16 + 2)
    for i in range(3):
        left = canvas.shape[1] - (3 - i) * (16 + 2)
        cell = canvas[2 + 2 * 18: 2 + 2 * 18 + 16, left: left + 16, 0]
        assert np.array_equal(cell, three["images"][i, :, :, 0].repeat(2, 0).repeat(2, 1))
    assert main(["compare", "--model", str(run / "student"), "--out", str(tmp_path / "c.npz")]) == 2
    assert "name a .png file" in capsys.readouterr().err
    assert main(["sample", "--model", str(run / "teacher"), "--solver", "euler", "--steps", "2", "-n", "4",
                 "--out", str(tmp_path / "t.npz")]) == 0
    assert "NFE 2" in capsys.readouterr().out
    # a student file is not a teacher
    assert main(["pairs", *common, f"--teacher={run / 'student' / 'model.safetensors'}"]) == 2
    assert "not a teacher" in capsys.readouterr().err


def test_demo_on_moons_student_beats_one_step_teacher(tmp_path):
    run = tmp_path / "moons"
    preset = Path(__file__).parent.parent / "configs" / "toy_moons.toml"
    assert main(["demo", "-c", str(preset), f"run.dir={run}", *TOY_FAST]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    key = metrics["distance_key"]
    rows = {r["label"]: r for r in metrics["results"]}
    teacher1, student1 = rows["teacher euler NFE 1"][key], rows["student lines NFE 1"][key]
    assert student1 * 3 < teacher1
    # straightness is measured on 32 Euler steps of each model's own ODE: one value per model, whatever the sampler
    teacher_s = {r["straightness"] for r in metrics["results"] if r["model"] == "teacher"}
    student_s = {r["straightness"] for r in metrics["results"] if r["model"] == "student"}
    assert len(teacher_s) == len(student_s) == 1
    assert rows["teacher euler NFE 1"]["straightness"] > rows["student lines NFE 1"]["straightness"] > 0
    page = (run / "report.html").read_text()
    assert "Time per stage" in page and "train student" in page and "<svg" in page
    assert set(json.loads((run / "timings.json").read_text())) == {
        "train teacher", "generate pairs", "train student", "sample + evaluate"}
    # lmm eval on the demo's own sample file and on the student sampled afresh gives the demo's figure
    out = tmp_path / "eval.json"
    assert main(["eval", "-c", str(preset), f"run.dir={run}", *TOY_FAST, "--samples",
                 str(run / "samples" / "student_lines_nfe_1.npz"), "--model", str(run / "student"), "--nfe", "1",
                 "--out", str(out)]) == 0
    scored = json.loads(out.read_text())["results"]
    assert len(scored) == 2
    for row in scored:
        assert abs(row[key] - student1) < 1e-9 * max(1.0, student1)
    assert out.with_suffix(".svg").read_text().startswith("<svg")
    # an evaluation cut short resumes: the rows already in metrics.json are kept, the missing ones recomputed
    cut = {**metrics, "results": metrics["results"][:-2]}
    (run / "metrics.json").write_text(json.dumps(cut))
    assert main(["demo", "-c", str(preset), f"run.dir={run}", *TOY_FAST]) == 0
    resumed = json.loads((run / "metrics.json").read_text())["results"]
    assert [r["label"] for r in resumed] == [r["label"] for r in metrics["results"]]
    assert resumed[:-2] == metrics["results"][:-2]
    for a, b in zip(resumed[-2:], metrics["results"][-2:]):
        assert abs(a[key] - b[key]) < 1e-9 * max(1.0, b[key])
    # other eval settings start the table afresh
    assert main(["demo", "-c", str(preset), f"run.dir={run}", *TOY_FAST, "eval.n=500"]) == 0
    fresh = json.loads((run / "metrics.json").read_text())
    assert fresh["settings"]["n"] == 500
    assert all(r[key] != m[key] for r, m in zip(fresh["results"], metrics["results"]))


def test_eval_reference_cache_is_reused_and_refuses_other_data(tmp_path, capsys):
    images = tmp_path / "s.npz"
    rng = np.random.default_rng(0)
    np.savez(images, images=rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8))
    cache = tmp_path / "ref.npz"
    common = ["eval", "--samples", str(images), "--ref-cache", str(cache), "--out", str(tmp_path / "m.json")]
    assert main([*common, "data.n=300"]) == 0 and cache.is_file()
    first = json.loads((tmp_path / "m.json").read_text())["results"][0]["fd_pixel"]
    assert main([*common, "data.n=300"]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["results"][0]["fd_pixel"] == first
    capsys.readouterr()
    assert main([*common, "data.n=200"]) == 2
    assert "ref.npz" in capsys.readouterr().err
    # the statistics file alone is a reference (no dataset read: data.name names a missing folder here)
    alone = ["eval", "--samples", str(images), "--ref", str(cache), "--out", str(tmp_path / "r.json")]
    assert main([*alone, "data.name=image_folder", f"data.root={tmp_path / 'absent'}"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["fd_pixel"] == first
    assert main([*alone, "eval.features=proxy"]) == 2
    assert "ref.npz" in capsys.readouterr().err


@pytest.mark.parametrize("preset,extra", [
    (None, ["teacher.net.channels=8", "student.net.channels=8", "teacher.steps=2"]),
    ("toy_moons.toml", ["teacher.net.width=32", "student.net.width=32", "data.n=500", "teacher.steps=2"]),
])
def test_student_starts_as_the_teachers_endpoint_predictor(tmp_path, preset, extra):
    """student.init=teacher with the default student.precond=teacher: before training (0 steps) the student is
    N(x_t, t) = the teacher's own endpoint prediction at every line time (EDM: D(x_t / t, (1-t)/t))."""
    import torch

    from lmm.models import load_model
    from lmm.teachers import EDMTeacher

    run = tmp_path / "run"
    cfg = [] if preset is None else ["-c", str(Path(__file__).parent.parent / "configs" / preset)]
    common = [*cfg, f"run.dir={run}", "run.progress=false", "teacher.train.steps=3", "student.train.steps=0",
              "pairs.n=64", "pairs.shard_size=64", "pairs.batch_size=64", "teacher.train.batch_size=16",
              "student.train.batch_size=16", *extra]
    for stage in (["teacher", "train"], ["pairs"], ["train"]):
        assert main([*stage, *common]) == 0
    teacher, _ = load_model(run / "teacher")
    student, smeta = load_model(run / "student")
    assert smeta["objective_kwargs"]["precond"] == ("edm" if isinstance(teacher, EDMTeacher) else "velocity")
    shape = tuple(student.data_shape)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(6, *shape, generator=g)
    t = torch.tensor([0.0, 0.005, 0.1, 0.4, 0.8, 0.97])
    with torch.no_grad():
        torch.testing.assert_close(student(x_t, t), teacher.line_endpoint(x_t, t), atol=1e-5, rtol=1e-5)
        if isinstance(teacher, EDMTeacher):
            tt = t[2:].reshape(-1, *[1] * len(shape))
            want = teacher.model(x_t[2:] / tt, (1 - t[2:]) / t[2:])
            torch.testing.assert_close(student(x_t[2:], t[2:]), want, atol=1e-5, rtol=1e-5)
