"""Kill tests: `lmm pairs` and `lmm train` are SIGKILLed at several points, rerun, and must end bitwise equal to an
uninterrupted run (CPU, one thread); after every kill the run folder's config.json and model.json files agree.

Each stage runs as a subprocess (`python -m lmm.cli.main`, OMP_NUM_THREADS=1) while the test polls its output
folder every few ms and kills it when a chosen file appears. A kill must land before the stage finishes
(return code -9, output incomplete): if the machine outruns the poll the test fails and asks for a bigger run.

The last tests recreate, deterministically, states that a kill at an unlucky instant leaves behind (a writer's
temporary file, a half-deleted old checkpoint, new weights beside the old model.json) and check a rerun heals them.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmm.checkpoint import list_checkpoints, load_model_file
from lmm.cli.main import main
from lmm.io import save_json

# every stage of this module runs on the CPU (run.device=cpu, also where CUDA is visible): the bitwise checks hold
# there, and a store or student made there is resumed there
TEACHER = ["run.progress=false", "run.device=cpu", "teacher.net.channels=8", "student.net.channels=8",
           "teacher.train.steps=4", "teacher.train.batch_size=16", "teacher.steps=4"]
# 8 shards of 64 pairs, the teacher's 4-step solver on batches of 16: about 0.1 s a shard on one thread
PAIRS = ["pairs.n=512", "pairs.shard_size=64", "pairs.batch_size=16"]
N_SHARDS = 8
STEPS = 40
STUDENT = [f"student.train.steps={STEPS}", "student.train.batch_size=16", "student.train.ckpt_every=5",
           "student.train.log_every=5"]
POLL_S = 0.005
# settings of the pairs stage kept in the teacher's config section (lmm.models._OTHER_STAGES)
PAIR_KEYS_IN_TEACHER = ("solver", "steps", "schedule")


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmm.cli.main", *args]


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _run_and_kill(cmd: list[str], kill_when, timeout: float = 120.0):
    """Start cmd, poll kill_when() every POLL_S s and SIGKILL the process as soon as it returns a truthy value,
    which is returned. Fails if the process ends on its own first."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        while True:
            hit = kill_when()
            if hit:
                proc.send_signal(signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"lmm {cmd[3]} ended (rc {proc.returncode}) before the kill point; make the run bigger\n"
                            f"{proc.stderr.read()}")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"kill point not reached in {timeout} s")
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the kill missed (rc {proc.returncode}); make the run bigger\n{err}"
    return hit


def _assert_config_agrees(run: Path) -> None:
    """RUN/config.json and each RUN/ROLE/model.json present record the same config section for that model."""
    cfg_path = run / "config.json"
    if not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    for role in ("teacher", "student"):
        model_json = run / role / "model.json"
        if not model_json.is_file():
            continue
        recorded, current = json.loads(model_json.read_text())["config"][role], dict(cfg[role])
        if role == "teacher":
            for key in PAIR_KEYS_IN_TEACHER:
                recorded.pop(key), current.pop(key)
        differ = {k: (recorded.get(k), current.get(k)) for k in recorded.keys() | current.keys()
                  if recorded.get(k) != current.get(k)}
        assert not differ, f"{cfg_path} and {model_json} disagree on config.{role} (model, config.json): {differ}"


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of killed atomic writers, and checkpoint folders lacking meta.json (not checkpoints)."""
    tmp = [p for p in folder.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    half = [p for p in folder.rglob("step-*") if p.is_dir() and not (p / "meta.json").is_file()]
    return sorted(str(p.relative_to(folder)) for p in tmp + half)


def _files(folder: Path) -> dict[str, bytes]:
    """The files a reader sees: leftovers of killed writers (see _leftovers) excluded."""
    skip = {folder / p for p in _leftovers(folder)}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(s == p or s in p.parents for s in skip)}


pytestmark = pytest.mark.usefixtures("one_thread")  # in-process stages on one thread (see conftest)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny teacher and a small pair store (in-process), and a student trained on it uninterrupted (subprocess,
    the reference for the kill tests; RUN/student is the only thing in its run folder)."""
    root = tmp_path_factory.mktemp("kill")
    run = root / "run"
    assert main(["teacher", "train", f"run.dir={run}", *TEACHER]) == 0
    assert main(["pairs", f"run.dir={run}", *TEACHER, "pairs.n=256", "pairs.shard_size=64",
                 "pairs.batch_size=64"]) == 0
    student_run = root / "student-run"
    _run(_cmd("train", f"run.dir={student_run}", *TEACHER, *STUDENT, "--pairs", str(run / "pairs")))
    return {"teacher": run / "teacher", "pairs": run / "pairs", "student_run": student_run}


# ---------------------------------------------------------------------------------------------------- lmm pairs

def _sidecars(store: Path) -> list[str]:
    return sorted(p.name for p in store.glob("shard-*.json"))


def _stamps(store: Path, sidecars: list[str]) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of finished shards and their sidecars: a rewritten file (atomic rename) has a new inode."""
    out = {}
    for side in sidecars:
        for name in (side, side.replace(".json", ".safetensors")):
            st = (store / name).stat()
            out[name] = (st.st_ino, st.st_mtime_ns)
    return out


def test_pairs_killed_and_rerun_equal_an_uninterrupted_run(made, tmp_path):
    teacher = made["teacher"] / "model.safetensors"

    def cmd(run: Path) -> list[str]:  # --teacher: the manifest records the same teacher path in both folders
        return _cmd("pairs", f"run.dir={run}", *TEACHER, *PAIRS, "--teacher", str(teacher))

    ref = subprocess.Popen(cmd(tmp_path / "ref"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)  # the uninterrupted run, alongside
    run = tmp_path / "run"
    store = run / "pairs"
    shutil.copytree(made["teacher"], run / "teacher")  # so that config.json has a model to agree with

    # 1: as soon as the process starts writing (the manifest's header appears): no shard finished
    _run_and_kill(cmd(run), lambda: (store / "manifest.json").is_file())
    assert len(_sidecars(store)) < N_SHARDS
    _assert_config_agrees(run)

    # 2: right after the first shard's sidecar appears
    _run_and_kill(cmd(run), lambda: _sidecars(store))
    first = _sidecars(store)
    assert 1 <= len(first) < N_SHARDS
    kept = _stamps(store, first)
    _assert_config_agrees(run)

    # 3: mid-way, after 4 shards; the rerun must have left the finished shards as they were
    _run_and_kill(cmd(run), lambda: len(_sidecars(store)) >= 4)
    mid = _sidecars(store)
    assert 4 <= len(mid) < N_SHARDS
    assert _stamps(store, first) == kept, "the rerun rewrote shards that were already finished"
    kept = _stamps(store, mid)
    _assert_config_agrees(run)

    # 4: run to the end
    _run(cmd(run))
    assert _stamps(store, mid) == kept, "the rerun rewrote shards that were already finished"
    _assert_config_agrees(run)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    got, want = _files(store), _files(tmp_path / "ref" / "pairs")
    assert sorted(got) == sorted(want) and len(want) == 2 * N_SHARDS + 1
    for name in want:
        assert got[name] == want[name], f"{store / name} differs from the uninterrupted run's"
    print("leftovers of killed writers:", _leftovers(store))


# ---------------------------------------------------------------------------------------------------- lmm train

def _ckpt_steps(student: Path) -> list[int]:
    root = student / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step-")) if root.is_dir() else []


def _latest(student: Path) -> int:
    return max(_ckpt_steps(student), default=0)


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _equal_states(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same_checkpoint(got: Path, want: Path) -> None:
    """Weights bytewise; state.pt by content (torch.save's bytes differ for an optimizer state that was loaded and
    saved again, with equal content); meta.json up to state.pt's digest."""
    for name in ("model.safetensors", "ema.safetensors"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), got / name
    load = lambda p: torch.load(p / "state.pt", weights_only=True)  # noqa: E731
    assert _equal_states(load(got), load(want)), got / "state.pt"

    def meta(p: Path) -> dict:
        record = json.loads((p / "meta.json").read_text())
        record.pop("record_sha256", None)
        record["sha256"].pop("state.pt")
        return record

    assert meta(got) == meta(want), got / "meta.json"


def test_student_training_killed_and_rerun_equals_an_uninterrupted_run(made, tmp_path):
    # the reference trained in made["student_run"]; a student's files record its run folder (config.run.dir), so
    # the killed runs train in that very path, after the reference is moved aside
    run = made["student_run"]
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    shutil.rmtree(run)
    try:
        _kill_student(run, ref, made["pairs"])
    finally:
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(ref, run)


def _kill_student(run: Path, ref: Path, pairs: Path) -> None:
    student = run / "student"
    cmd = _cmd("train", f"run.dir={run}", *TEACHER, *STUDENT, "--pairs", str(pairs))

    # 1: while the first checkpoint is being written if the poll catches its .tmp-* folder, else just after it
    def writing():
        root = student / "checkpoints"
        if root.is_dir() and any(p.name.startswith(".tmp-") for p in root.iterdir()):
            return "while a checkpoint was being written"
        return "after the first checkpoint" if _ckpt_steps(student) else None

    print("kill 1:", _run_and_kill(cmd, writing))
    assert _latest(student) < STEPS and not (student / "model.safetensors").exists()
    _assert_config_agrees(run)

    # 2: right after this run's first checkpoint folder appears
    before = _latest(student)
    _run_and_kill(cmd, lambda: _latest(student) > before)
    assert _latest(student) < STEPS and not (student / "model.safetensors").exists()
    _assert_config_agrees(run)

    # 3: after a later checkpoint
    _run_and_kill(cmd, lambda: _latest(student) >= 25)
    assert _latest(student) < STEPS and not (student / "model.safetensors").exists()
    _assert_config_agrees(run)

    # 4: run to the end
    _run(cmd)
    _assert_config_agrees(run)
    for name in ("model.safetensors", "model.json", "../config.json"):
        assert (student / name).read_bytes() == (ref / "student" / name).read_bytes(), name
    # the checkpoints kept (the newest two) equal the uninterrupted run's
    assert [checkpoint.name for checkpoint in list_checkpoints(student)] == ["step-00000035", "step-00000040"]
    assert [c.name for c in list_checkpoints(ref / "student")] == ["step-00000035", "step-00000040"]
    for name in ("step-00000035", "step-00000040"):
        _assert_same_checkpoint(student / "checkpoints" / name, ref / "student" / "checkpoints" / name)
    print("leftovers of killed writers:", _leftovers(run))

    # log.jsonl: each run appends, so steps redone after a resume appear more than once (and log.jsonl can hold
    # records of steps later redone); every record of a step has the uninterrupted run's loss, lr and grad norm
    # (timings differ), and the last record is the last step's
    log, ref_log = _log(student / "log.jsonl"), _log(ref / "student" / "log.jsonl")
    print("log.jsonl steps after the kills:", [r["step"] for r in log])
    keys = ("loss", "lr", "grad_norm")
    want = {r["step"]: [r[k] for k in keys] for r in ref_log}
    assert sorted(want) == list(range(5, STEPS + 5, 5)) and {r["step"] for r in log} == set(want)
    for r in log:
        assert [r[k] for k in keys] == want[r["step"]], r
    assert log[-1]["step"] == STEPS and len(log) >= len(ref_log)


def test_config_json_agrees_with_the_student_after_a_killed_longer_run(made, tmp_path):
    """A finished student (40 steps) trained on to 60 in the same folder, the longer run killed after its first new
    checkpoint: config.json still describes student/model.json (the 40-step model)."""
    run = tmp_path / "run"
    shutil.copytree(made["student_run"], run)
    _assert_config_agrees(run)
    longer = _cmd("train", f"run.dir={run}", *TEACHER, *STUDENT, "student.train.steps=60", "student.train.extend=true",
                  "--pairs", str(made["pairs"]))
    _run_and_kill(longer, lambda: _latest(run / "student") > STEPS)
    assert json.loads((run / "student" / "model.json").read_text())["step"] == STEPS
    _assert_config_agrees(run)


# ------------------------------------------------------------------------ states a kill at an unlucky instant leaves

def test_rerun_removes_a_killed_manifest_write(made, tmp_path):
    """A kill while make_pairs rewrites manifest.json (after each shard) leaves `.manifest.json.XXXX.tmp`
    (lmm.io.atomic_path); the rerun that finishes the store must not leave it there."""
    run = tmp_path / "run"
    store = run / "pairs"
    shutil.copytree(made["pairs"], store)
    for name in ("shard-00003.json", "shard-00003.safetensors"):  # killed while shard 3 was being made
        (store / name).unlink()
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"] = [r for r in manifest["shards"] if r["index"] != 3]
    save_json(store / "manifest.json", manifest)
    (store / ".manifest.json.k1ll3d.tmp").write_text('{"half": ')
    assert main(["pairs", f"run.dir={run}", *TEACHER, "pairs.n=256", "pairs.shard_size=64", "pairs.batch_size=64",
                 "--teacher", str(made["teacher"] / "model.safetensors")]) == 0
    assert (store / "shard-00003.json").is_file()
    assert _leftovers(store) == []


def test_rerun_removes_a_half_deleted_old_checkpoint(made, tmp_path):
    """save_checkpoint deletes the checkpoints beyond `keep` with shutil.rmtree; killed in the middle, it leaves a
    step-* folder without meta.json, which list_checkpoints no longer sees, so no later pruning removes it."""
    run = tmp_path / "run"
    shutil.copytree(made["student_run"], run)
    old = run / "student" / "checkpoints" / "step-00000035"
    for name in ("meta.json", "model.safetensors"):  # the order rmtree happened to take in a real kill
        (old / name).unlink()
    assert main(["train", f"run.dir={run}", *TEACHER, *STUDENT, "student.train.steps=45", "student.train.extend=true",
                 "--pairs", str(made["pairs"])]) == 0
    assert [c.name for c in list_checkpoints(run / "student")] == ["step-00000040", "step-00000045"]
    assert _leftovers(run) == []


def test_rerun_repairs_weights_written_without_their_model_json(made, tmp_path):
    """save_model replaces model.safetensors, then model.json: a kill between the two leaves the new weights with
    the old model.json (training extended from 40 to 45 steps here). The final checkpoint exists, so the rerun
    has nothing to train; it must still leave a model.json that belongs to the weights."""
    run = tmp_path / "run"
    shutil.copytree(made["student_run"], run)
    old_json = (run / "student" / "model.json").read_bytes()
    longer = ["train", f"run.dir={run}", *TEACHER, *STUDENT, "student.train.steps=45", "student.train.extend=true",
              "--pairs", str(made["pairs"])]
    assert main(longer) == 0
    (run / "student" / "model.json").write_bytes(old_json)  # the state the kill leaves
    assert main(longer) == 0
    _, meta = load_model_file(run / "student" / "model")
    assert meta["step"] == 45


def test_ctrl_c_says_how_to_resume_and_the_rerun_finishes(made, tmp_path):
    """SIGINT (Ctrl-C) during `lmm train`: exit 130, no traceback, at most 2 lines saying how to resume; the rerun
    resumes from the last checkpoint and finishes. (200 steps, so that a loaded machine cannot finish the run
    between the first checkpoint and the signal.)"""
    run = tmp_path / "run"
    student = run / "student"
    steps = 200
    cmd = _cmd("train", f"run.dir={run}", *TEACHER, *STUDENT, f"student.train.steps={steps}", "--pairs",
               str(made["pairs"]))
    # SIGINT's default disposition, as in a terminal: a shell without job control starts background jobs (a CI
    # script's, say) with SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.monotonic()
        while not _ckpt_steps(student):
            assert proc.poll() is None, f"lmm train ended before the interrupt (rc {proc.returncode})"
            assert time.monotonic() - t0 < 120, "no checkpoint in 120 s"
            time.sleep(POLL_S)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and "Traceback" not in err and "Rerun the same command" in err, err
    stopped = _latest(student)
    assert stopped < steps and not (student / "model.safetensors").exists()
    _run(cmd)
    records = [r["step"] for r in _log(student / "log.jsonl")]
    assert (student / "model.safetensors").is_file() and records[-1] == steps and stopped + 5 in records
