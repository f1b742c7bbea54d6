"""Nothing passes silently: damaged model files and checkpoints, impossible arguments, refused runs, messages
that point the right way, and run folders that are copied or moved. Each user mistake exits with code 2 and
one line naming the file, flag or key; nothing already written is changed."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmm.checkpoint import list_checkpoints, save_model
from lmm.cli.main import main

TINY = ["run.progress=false", "teacher.net.channels=8", "student.net.channels=8", "teacher.train.steps=4",
        "student.train.steps=4", "teacher.steps=3", "pairs.n=96", "pairs.shard_size=64", "pairs.batch_size=64",
        "teacher.train.batch_size=16", "student.train.batch_size=16", "teacher.train.ckpt_every=2",
        "student.train.ckpt_every=2", "eval.n=64", "eval.teacher_nfe=[1]", "eval.student_nfe=[1]"]
# the student of `made` and its retraining in test_moved_run_folder_keeps_working, compared bitwise, train on the CPU
# (GPU backward kernels are not deterministic)
STUDENT_CPU = "run.device=cpu"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A finished tiny digits run: teacher, pairs, student (never modified by the tests: they copy it)."""
    run = tmp_path_factory.mktemp("faults") / "run"
    for stage in (["teacher", "train"], ["pairs"], ["train", STUDENT_CPU]):
        assert main([*stage, f"run.dir={run}", *TINY]) == 0
    return run


@pytest.fixture
def run(made, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(made, copy)
    return copy


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("lmm: error: ") == 1 and err.splitlines()[-1].startswith("lmm: error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# -- damaged model files -------------------------------------------------------------------------------------------

def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x5A
    path.write_bytes(bytes(data))


def _damages(weights: Path) -> dict:
    size, header = weights.stat().st_size, 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    return {
        "flip in the header length": lambda: _flip(weights, 1),
        "flip in the header": lambda: _flip(weights, header // 2),
        "flip at the first tensor byte": lambda: _flip(weights, header),
        "flip mid-file": lambda: _flip(weights, header + (size - header) // 2),
        "flip at the last byte": lambda: _flip(weights, size - 1),
        "flip a few hundred bytes": lambda: [_flip(weights, header + 100 + i) for i in range(300)],
        "truncate": lambda: weights.write_bytes(weights.read_bytes()[: size - 40]),
    }


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_damaged_model_files_are_refused_and_left_alone(made, tmp_path, capsys, role):
    src = made / role / "model.safetensors"
    for name in _damages(src):
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        shutil.copy(src, folder / "model.safetensors")
        shutil.copy(src.with_suffix(".json"), folder / "model.json")
        _damages(folder / "model.safetensors")[name]()
        before = _snapshot(folder)
        out = tmp_path / f"{name}.npz"
        _refused(["sample", "--model", str(folder), "-n", "4", "--out", str(out)], capsys,
                 str(folder / "model.safetensors"))
        assert not out.exists(), name
        assert _snapshot(folder) == before, name


def test_swapped_model_json_is_refused(run, capsys):
    """teacher/model.json and student/model.json swapped: each model is refused, naming its JSON file."""
    t, s = run / "teacher" / "model.json", run / "student" / "model.json"
    t_bytes, s_bytes = t.read_bytes(), s.read_bytes()
    t.write_bytes(s_bytes)
    s.write_bytes(t_bytes)
    for role in ("teacher", "student"):
        _refused(["sample", "--model", str(run / role), "-n", "4", "--out", str(run / "x.npz")], capsys,
                 str(run / role / "model.json"), "does not belong to")
    assert not (run / "x.npz").exists()


def test_model_json_of_another_model_is_refused(tmp_path):
    """Same network, other weights: the JSON of one beside the weights of the other is refused."""
    from lmm.checkpoint import CorruptFileError, load_model_file

    save_model(tmp_path / "a", {"w": torch.zeros(3)}, {"k": 1})
    save_model(tmp_path / "b", {"w": torch.ones(3)}, {"k": 1})
    shutil.copy(tmp_path / "b.json", tmp_path / "a.json")
    with pytest.raises(CorruptFileError, match="a.json does not belong to"):
        load_model_file(tmp_path / "a")


def test_model_without_digest_loads_with_a_warning(tmp_path):
    """Files written before digests existed still load, and say that they are not checked."""
    from safetensors.torch import save_file

    from lmm.checkpoint import load_model_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.json").write_text(json.dumps({"k": 1}))
    with pytest.warns(UserWarning, match="old.safetensors records no weights_sha256"):
        state, meta = load_model_file(tmp_path / "old")
    assert meta == {"k": 1} and torch.equal(state["w"], torch.ones(2))


# -- damaged checkpoints -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,how", [
    ("model.safetensors", "flip"), ("ema.safetensors", "flip"), ("state.pt", "flip"), ("meta.json", "digit"),
    ("meta.json", "truncate"), ("model.safetensors", "truncate"), ("ema.safetensors", "swap"),
])
def test_damaged_checkpoint_is_refused_with_the_way_back(run, capsys, target, how):
    """Resuming from a damaged latest checkpoint is refused, naming the file and the previous checkpoint;
    nothing in the run folder changes."""
    ckpts = list_checkpoints(run / "teacher")
    assert len(ckpts) == 2
    latest, previous = ckpts[-1], ckpts[0]
    f = latest / target
    data = f.read_bytes()
    if how == "flip":
        _flip(f, len(data) // 2)
    elif how == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif how == "swap":
        shutil.copy(latest / "model.safetensors", f)
    else:
        text = data.decode()
        i = text.index('"step": ') + len('"step": ')
        f.write_text(text[:i] + "7" + text[i + 1:])
    (run / "teacher" / "model.safetensors").unlink()
    (run / "teacher" / "model.json").unlink()
    before = _snapshot(run)
    _refused(["teacher", "train", f"run.dir={run}", *TINY], capsys, str(latest), f"resume from {previous.name}")
    assert _snapshot(run) == before


# -- impossible arguments ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--nfe", "0"], "--nfe"), (["--nfe", "-2"], "--nfe"), (["-n", "0"], "-n"), (["-n", "-5"], "-n"),
    (["--batch-size", "0"], "--batch-size"), (["--grid", "0,0.5,0.4"], "--grid"), (["--grid", "0.1"], "--grid"),
    (["--grid", "0,x"], "--grid"),
])
def test_sample_flags_out_of_range_are_usage_errors(made, tmp_path, capsys, args, needle):
    out = tmp_path / "s.npz"
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--model", str(made / "student"), "--out", str(out), *args])
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("role,args,needle", [
    ("student", ["--nfe", "3", "--grid", "0,0.5"], "--nfe 3 contradicts --grid"),
    ("student", ["--steps", "2"], "apply to teachers"),
    ("teacher", ["--steps", "0"], None),
    ("teacher", ["--nfe", "2", "--steps", "2"], "not both"),
    ("teacher", ["--grid", "0,0.5"], "apply to students"),
    ("teacher", ["--mode", "restart"], "apply to students"),
])
def test_contradicting_sample_flags_are_errors(made, tmp_path, capsys, role, args, needle):
    out = tmp_path / "s.npz"
    argv = ["sample", "--model", str(made / role), "--out", str(out), "-n", "4", *args]
    if needle is None:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    else:
        _refused(argv, capsys, needle)
    assert not out.exists()


def test_teacher_nfe_takes_the_most_steps_that_fit(made, tmp_path, capsys):
    for solver, nfe, want in (("heun", 7, 7), ("heun", 4, 3), ("euler", 3, 3), ("dpm++2m", 5, 5)):
        assert main(["sample", "--model", str(made / "teacher"), "--solver", solver, "--nfe", str(nfe), "-n", "2",
                     "--out", str(tmp_path / "t.npz")]) == 0
        assert f"NFE {want}" in capsys.readouterr().out


def test_eval_mistakes_are_one_line_errors(made, tmp_path, capsys):
    out = tmp_path / "m.json"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(made / "teacher"), "--nfe", "0", "--out", str(out)])
    assert exit_.value.code == 2 and "--nfe" in capsys.readouterr().err
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((8, 8, 8, 1), np.float32))
    _refused(["eval", "--samples", str(floats), "--out", str(out)], capsys, str(floats), "float32")
    readme = Path(__file__).parent.parent / "README.md"
    _refused(["eval", "--samples", str(readme), "--out", str(out)], capsys, str(readme), "not an .npz")
    _refused(["eval", "--samples", str(tmp_path / "absent.npz"), "--out", str(out)], capsys, "absent.npz")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(made, tmp_path, capsys):
    _refused(["sample", "--model", str(made / "student"), "--device", "cuda", "-n", "2", "--out",
              str(tmp_path / "s.npz")], capsys, "CUDA is not available", "--device")


def test_config_values_out_of_range_name_the_key(capsys):
    for override, key in (("teacher.steps=0", "teacher.steps"), ("pairs.n=-1", "pairs.n"),
                          ("student.train.batch_size=0", "student.train.batch_size"),
                          ("eval.teacher_nfe=[1,0]", "eval.teacher_nfe"), ("eval.split=val", "eval.split")):
        _refused(["config", override], capsys, f"'{key}'")


def test_overrides_may_follow_sample_files(made, tmp_path, capsys):
    """`--samples a.npz eval.n=64` reads eval.n=64 as an override, not as a file name."""
    samples = tmp_path / "s.npz"
    assert main(["sample", "--model", str(made / "student"), "-n", "64", "--out", str(samples)]) == 0
    out = tmp_path / "m.json"
    assert main(["eval", "--out", str(out), "--samples", str(samples), "eval.n=64", "data.n=200"]) == 0
    metrics = json.loads(out.read_text())
    assert [r["label"] for r in metrics["results"]] == [str(samples)] and metrics["reference"]["n"] == 200


# -- refused runs write nothing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,override", [
    (["teacher", "train"], "teacher.train.lr=0.01"),
    (["train"], "student.loss={pseudo_huber=1.0}"),
    (["pairs"], "pairs.seed=7"),
])
def test_refused_stage_leaves_the_folder_as_it_was(run, capsys, stage, override):
    before = _snapshot(run)
    _refused([*stage, f"run.dir={run}", *TINY, override], capsys)
    assert _snapshot(run) == before


def test_config_json_records_each_stage_after_it_succeeds(tmp_path, capsys):
    """config.json is written after a stage succeeds, with the keys that stage used: a teacher rerun with other
    student settings does not make the record disagree with the student already in the folder."""
    run = tmp_path / "run"
    assert main(["teacher", "train", f"run.dir={run}", *TINY]) == 0
    assert json.loads((run / "config.json").read_text())["teacher"]["train"]["steps"] == 4
    assert main(["pairs", f"run.dir={run}", *TINY]) == 0
    assert main(["train", f"run.dir={run}", *TINY]) == 0
    assert main(["teacher", "train", f"run.dir={run}", *TINY, "student.train.lr=0.5", "pairs.seed=9"]) == 0
    record = json.loads((run / "config.json").read_text())
    student = json.loads((run / "student" / "model.json").read_text())["config"]
    assert record["student"] == student["student"] and record["pairs"] == student["pairs"]


def test_failed_demo_leaves_no_folder(tmp_path, capsys):
    run = tmp_path / "run"
    _refused(["demo", f"run.dir={run}", "data.name=image_folder", f"data.root={tmp_path / 'absent'}"], capsys,
             "data.root", str(tmp_path / "absent"))
    assert not run.exists()


def test_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    _refused(["report", str(tmp_path)], capsys, "not a run folder")
    assert not (tmp_path / "report.html").exists()


# -- messages that point the right way -----------------------------------------------------------------------------

def test_messages_name_the_config_key(tmp_path, capsys):
    _refused(["teacher", "train", f"run.dir={tmp_path / 'r'}", "data.name=fashion_mnist",
              f"data.root={tmp_path}"], capsys, "data.root=DIR")
    _refused(["teacher", "train", f"run.dir={tmp_path / 'r'}", "data.name=image_folder",
              f"data.root={tmp_path / 'nowhere'}"], capsys, "does not exist", "nowhere")
    assert not (tmp_path / "r").exists()


def test_resume_refusal_says_what_to_do(run, capsys):
    err = _refused(["train", f"run.dir={run}", *TINY, "student.train.lr=0.01"], capsys,
                   "student.train.lr: 0.002 -> 0.01", "run.dir=")
    assert "resume_ignore" not in err


# -- run folders copied or moved -----------------------------------------------------------------------------------

def test_moved_run_folder_keeps_working(made, tmp_path):
    """A run folder moved elsewhere: its pair store still belongs to its teacher (identified by sha256), and a
    new student initialised from the teacher finds it in the folder, not at the path the store recorded (and, on
    the CPU, equals the student trained before the move bitwise)."""
    copy = tmp_path / "copy"
    shutil.copytree(made, copy)
    recorded = json.loads((copy / "pairs" / "manifest.json").read_text())["teacher"]["path"]
    assert Path(recorded).resolve() != (copy / "teacher" / "model.safetensors").resolve()
    before = _snapshot(copy / "pairs")
    assert main(["pairs", f"run.dir={copy}", *TINY]) == 0
    assert _snapshot(copy / "pairs") == before
    shutil.rmtree(copy / "student")
    original = Path(recorded)
    hidden = original.with_name("hidden.safetensors")
    original.rename(hidden)
    try:
        assert main(["train", f"run.dir={copy}", *TINY, STUDENT_CPU]) == 0
    finally:
        hidden.rename(original)
    from lmm.checkpoint import load_model_file

    moved, kept = load_model_file(copy / "student" / "model")[0], load_model_file(made / "student" / "model")[0]
    assert moved.keys() == kept.keys() and all(torch.equal(moved[k], kept[k]) for k in kept)


def test_student_init_refuses_another_teacher(run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["teacher", "train", f"run.dir={other}", *TINY, "run.seed=3"]) == 0
    shutil.rmtree(run / "student")
    _refused(["train", f"run.dir={run}", *TINY, f"--teacher={other / 'teacher' / 'model.safetensors'}"], capsys,
             "is not the teacher that made the pair store")


def test_damaged_model_is_rewritten_from_the_final_checkpoint(run, made, capsys):
    """The recovery the refusal message gives: delete the model files and rerun the training command."""
    weights = run / "teacher" / "model.safetensors"
    _flip(weights, weights.stat().st_size // 2)
    _refused(["pairs", f"run.dir={run}", *TINY, "pairs.seed=5", f"--out={run / 'pairs2'}"], capsys, str(weights))
    assert not (run / "pairs2" / "manifest.json").exists()
    assert main(["teacher", "train", f"run.dir={run}", *TINY]) == 0
    assert "damaged or cut short; rewritten from" in capsys.readouterr().err
    from lmm.checkpoint import load_model_file

    again, kept = load_model_file(weights)[0], load_model_file(made / "teacher" / "model")[0]
    assert all(torch.equal(again[k], kept[k]) for k in kept)
