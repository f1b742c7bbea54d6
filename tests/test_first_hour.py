"""A new user's mistakes, each through the `lmm` command: exit code 2, one line that names the value or file and
says what to do, no traceback, and no file of the run folder (or beside it) changed."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lmm.cli.main import main

TINY = ["run.progress=false", "run.device=cpu", "teacher.net.channels=8", "student.net.channels=8",
        "teacher.train.steps=4", "teacher.train.batch_size=16", "teacher.steps=2", "pairs.n=64", "pairs.shard_size=32",
        "pairs.batch_size=32", "student.train.steps=4", "student.train.batch_size=16"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a finished tiny run (teacher, pairs, student) and the files a user might pass by mistake."""
    root = tmp_path_factory.mktemp("first-hour")
    args = [f"run.dir={root / 'run'}", *TINY]
    for stage in (["teacher", "train"], ["pairs"], ["train"]):
        assert main([*stage, *args]) == 0
    (root / "notes.txt").write_text("notes\n")
    (root / "random.bin").write_bytes(bytes(range(256)) * 4)
    (root / "samples.npz").write_bytes(b"")
    (root / "folder").mkdir()
    np.savez(root / "rgb.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    torch.save({"ema": torch.zeros(1)}, root / "torch-save.pt")
    return root


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_exit_2(argv: list[str], root: Path, capsys, *named: str) -> str:
    before = _snapshot(root)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and "error:" in err, err
    for text in named:
        assert text in err, (text, err)
    assert _snapshot(root) == before, "files changed"
    return err


def test_mistakes_with_files(work, capsys):
    run = [f"run.dir={work / 'run'}", *TINY]
    _one_line_exit_2(["pairs", *run, "--out", str(work / "samples.npz")], work, capsys, "samples.npz", "is a file")
    sample = ["sample", "--model", str(work / "run" / "student"), "--nfe", "1", "--device", "cpu"]
    for out in ("folder", "grid.png"):
        _one_line_exit_2([*sample, "-n", "4", "--out", str(work / out)], work, capsys, out, "name an .npz file",
                         "a folder with --format png")
    for out, named in (("s.npz", "name a folder"), ("notes.txt", "is a file"), ("run", "not empty")):
        _one_line_exit_2([*sample, "--format", "png", "--out", str(work / out)], work, capsys, out, named)
    _one_line_exit_2([*sample, "--seeds", "0-9", "-n", "10", "--out", str(work / "s.npz")], work, capsys, "--seeds",
                     "-n/--seed, not both")
    for setting, named in (("run.device=tpu", "'tpu' is not a device"), ("run.bf16=on", "'run.bf16' expects true")):
        _one_line_exit_2([*sample[:-2], setting, "--out", str(work / "s.npz")], work, capsys, named)
    for flag, command in (("--model", ["sample", "--nfe", "1", "--out", str(work / "s.npz")]),
                          ("--teacher", ["pairs", *run])):
        _one_line_exit_2([*command, flag, str(work / "notes.txt")], work, capsys, "notes.txt is not an lmm model")
    _one_line_exit_2(["train", *run, f"run.dir={work / 'no-teacher'}", "student.objective=ot_cfm"], work, capsys,
                     "no-teacher/teacher", "student.init=scratch")
    for name, what in (("torch-save.pt", "zip archive"), ("notes.txt", "not a pickle"),
                       ("run/student/model.safetensors", "safetensors file")):
        _one_line_exit_2(["convert", "edm", str(work / name), str(work / "converted"), "--trust-pickle"], work, capsys,
                         name, what)
    _one_line_exit_2(["eval", *run, "--ref", str(work / "random.bin"), "--model", str(work / "run" / "student"),
                      "--nfe", "1"], work, capsys, "random.bin", "not a reference statistics file")
    _one_line_exit_2(["train", *run, f"run.dir={work / 'other'}", "--pairs", str(work / "folder")], work, capsys,
                     "folder", "`lmm pairs`")
    _one_line_exit_2(["eval", *run, "--samples", str(work / "rgb.npz")], work, capsys, "rgb.npz", "(32, 32, 3)",
                     "-c", "data.name")


@pytest.mark.parametrize("setting, named", [
    ("teacher.solver=heum", "'teacher.solver' must be one of"),
    ("eval.features=incepton", "'eval.features' must be one of"),
    ("student.grid=[0.5,0.2]", "'student.grid'"),
    ("student.loss={l2=1.0,perceptul=0.1}", "perceptul"),
    ("teacher.kind=ddpm", "'teacher.kind' must be one of"),
    ("teacher.kind=flow teacher.sigma_max=10", "teacher.kind=flow does not read teacher.sigma_max=10.0"),
])
def test_settings_are_checked_before_any_work(setting, named, work, capsys):
    for command in (["config"], ["teacher", "train"], ["demo"]):
        _one_line_exit_2([*command, f"run.dir={work / 'run'}", *TINY, *setting.split()], work, capsys, named)


def test_argument_mistakes_are_one_line(work, capsys):
    sample = ["sample", "--model", "m", "--out", "s.npz"]
    for argv, named in (([*sample, "--nfe", "x"], "lmm sample: error: argument --nfe"),
                        (["eval", "--bogus"], "unrecognized arguments: --bogus"),
                        ([*sample, "--bf16", "on"], "argument --bf16: invalid choice: 'on'"),
                        ([*sample, "--seeds", "9-5"], "'9-5' runs backwards"),
                        ([*sample, "--seeds", "0-3,2"], "lists a seed more than once"),
                        ([*sample, "--seeds", "0:9"], "such as 0-49999 or 0,5,7-9")):
        _one_line_exit_2(argv, work, capsys, named, "--help")


def test_analyze_ot_checks_the_pair_store_before_any_work(work, capsys, monkeypatch):
    from lmm.analysis import ot

    monkeypatch.setattr(ot, "gaussian_pairing_grid", lambda *a, **k: pytest.fail("the Gaussian experiment ran"))
    store = work / "run" / "pairs"
    analyze = ["analyze", "ot", "--dims", "1,2", "--pairs", str(store), "--out", str(work / "ot")]
    _one_line_exit_2([*analyze, "--resolutions", "4,3"], work, capsys, "--resolutions 3", "resolution 8",
                     str(store))
    _one_line_exit_2([*analyze, "--batches", "2,512"], work, capsys, "--batches 512", "64 pairs", "--batches 2")
    _one_line_exit_2([*analyze, "--batches", "512"], work, capsys, "--batches 512", "at most 64")


def test_defaults_match_across_commands():
    from lmm.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["analyze", "singularity", "run"]).device == "auto"
    args = parser.parse_args(["sample", "--model", "m", "--out", "s.npz"])
    assert (args.device, args.bf16, args.deterministic) == (None, None, None)
