"""A finished stage is kept: other `steps` are refused before anything is written, training on is asked for
(`*.train.extend=true`) and keeps the finished model; `lmm demo` checks every begun stage before any records."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lmm.cli.main import main

TINY = ["run.progress=false", "run.device=cpu", "teacher.net.channels=8", "student.net.channels=8",
        "teacher.train.steps=4", "teacher.train.batch_size=16", "teacher.train.ckpt_every=2", "teacher.steps=2",
        "pairs.n=64", "pairs.shard_size=32", "pairs.batch_size=32", "student.train.steps=4",
        "student.train.batch_size=16", "eval.n=64", "eval.teacher_nfe=[1]", "eval.student_nfe=[1]"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(argv: list[str], root: Path, capsys, *named: str) -> None:
    before = _snapshot(root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)
    assert _snapshot(root) == before, "files changed"


def test_finished_teacher_other_steps_refused_then_extended(tmp_path, capsys):
    run = [f"run.dir={tmp_path}", *TINY]
    assert main(["teacher", "train", *run]) == 0
    finished = (tmp_path / "teacher" / "model.safetensors").read_bytes()
    _refused(["teacher", "train", *run, "teacher.train.steps=6"], tmp_path, capsys,
             "finished 4-step model", "teacher.train.extend=true", "teacher.train.steps=4")
    _refused(["teacher", "train", *run, "teacher.train.steps=2"], tmp_path, capsys,
             "beyond teacher.train.steps=2", "teacher.train.steps=4")
    assert main(["teacher", "train", *run]) == 0
    assert (tmp_path / "teacher" / "model.safetensors").read_bytes() == finished

    assert main(["teacher", "train", *run, "teacher.train.steps=6", "teacher.train.extend=true"]) == 0
    kept = tmp_path / "teacher" / "model-step00000004"
    assert kept.with_suffix(".safetensors").read_bytes() == finished
    assert json.loads(kept.with_suffix(".json").read_text())["step"] == 4
    assert json.loads((tmp_path / "teacher" / "model.json").read_text())["step"] == 6
    _refused(["teacher", "train", *run], tmp_path, capsys, "beyond teacher.train.steps=4",
             "model-step00000004.safetensors")


def test_demo_refuses_a_later_stage_before_recording_anything(tmp_path, capsys):
    run = [f"run.dir={tmp_path}", *TINY]
    assert main(["demo", *run]) == 0
    _refused(["demo", *run, "pairs.seed=3"], tmp_path, capsys, "seed")
    _refused(["demo", *run, "student.train.steps=8"], tmp_path, capsys, "student.train.extend=true")
    _refused(["demo", *run, "student.train.lr=0.5"], tmp_path, capsys, "lr")
