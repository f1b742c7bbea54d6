"""The paper's presets under torchrun: 2 CPU ranks (gloo) train each EDM preset's student at its net layout (tiny
widths, the preset's losses: L2 + perceptual + adversarial), are SIGKILLed after the step-3 checkpoint, resume,
and end bitwise equal (on the CPU) to an uninterrupted 2-rank run.

Datasets are written in their own formats (CIFAR-10 python batches, ImageNet 64 .npz, AFHQ image folders); the
teacher is trained for one step at the preset's teacher layout. To keep launches few, the uninterrupted runs of all
presets share one torchrun launch, and so do the resumed runs (the commands of a launch share its process group).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lmm.checkpoint import list_checkpoints, load_checkpoint, load_model_file
from lmm.cli.main import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STEPS, KILL_AFTER = 6, 3
# Tiny widths that keep each layout: ADM's attention needs 64 channels a head, so its base width stays 64.
NETS = {"cifar10-uncond-edm": "model_channels=8", "cifar10-cond-edm": "model_channels=8",
        "afhq64-edm": "model_channels=8", "imagenet64-cond-edm": "model_channels=64"}
RUNNER = textwrap.dedent('''
    import json, sys
    from lmm import dist
    from lmm.cli import main as cli

    leave = dist.cleanup
    cli.dist.cleanup = lambda: None  # one process group for all commands: torchrun's store serves one rendezvous
    for argv in json.loads(open(sys.argv[1]).read()):
        if cli.main(argv) != 0:
            sys.exit(f"lmm {argv[0]} failed")
    leave()
''')


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _write_dataset(preset: str, root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    if preset.startswith("cifar10"):
        for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
            batch = {b"labels": [int(v) for v in rng.integers(0, 10, 4)],
                     b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8)}
            (root / name).write_bytes(pickle.dumps(batch, protocol=2))
        meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": 4}
        (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    elif preset.startswith("imagenet64"):
        for name in ("train_data_batch_1", "val_data"):
            np.savez(root / f"{name}.npz", data=rng.integers(0, 256, (8, 12288), dtype=np.uint8),
                     labels=rng.integers(1, 1001, 8))
    else:
        for split in ("train", "val"):
            for cls in ("cat", "dog"):
                for i in range(3):
                    (root / split / cls).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _args(preset: str, run: Path, data: Path) -> list[str]:
    width = NETS[preset]
    return ["-c", str(CONFIGS / f"{preset}.toml"), f"run.dir={run}", f"data.root={data}", "run.device=cpu",
            "run.progress=false", "run.bf16=false", f"teacher.net.{width}", "teacher.net.num_blocks=1",
            f"student.net.{width}", "student.net.num_blocks=1", "teacher.train.steps=1",
            "teacher.train.batch_size=2", "teacher.steps=2", "pairs.n=8", "pairs.shard_size=4", "pairs.batch_size=4",
            f"student.train.steps={STEPS}", "student.train.batch_size=2", f"student.train.ckpt_every={KILL_AFTER}",
            "student.train.log_every=1", "student.train.warmup_steps=2"]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def _run_all(argvs: list[list[str]], tmp_path: Path, name: str) -> None:
    (tmp_path / "runner.py").write_text(RUNNER)
    (tmp_path / f"{name}.json").write_text(json.dumps(argvs))
    done = subprocess.run(_torchrun(str(tmp_path / "runner.py"), str(tmp_path / f"{name}.json")), env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Grad strides do not match" not in done.stderr


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _kill_after_checkpoint(argv: list[str], run: Path) -> None:
    """Launch 2 ranks on `lmm train`; SIGKILL the ranks (torchrun starts each in a session of its own) and then
    torchrun once the step-KILL_AFTER checkpoint is complete."""
    proc = subprocess.Popen(_torchrun("-m", "lmm.cli.main", *argv), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        while not any(p.name == f"step-{KILL_AFTER:08d}" for p in list_checkpoints(run / "student")):
            if proc.poll() is not None:
                pytest.fail(f"torchrun ended (rc {proc.returncode}) before the kill point\n{proc.stderr.read()[-4000:]}")
            assert time.monotonic() - t0 < 300, "kill point not reached in 300 s"
            time.sleep(0.005)
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert not (run / "student" / "model.safetensors").exists(), "the kill missed: the run finished first"


def test_presets_train_kill_and_resume_under_torchrun_bitwise_on_cpu(tmp_path: Path) -> None:
    presets = list(NETS)
    killed, whole = {}, {}
    for preset in presets:
        data = _write_dataset(preset, tmp_path / "data" / preset)
        killed[preset] = tmp_path / "killed" / preset
        whole[preset] = tmp_path / "whole" / preset
        args = _args(preset, killed[preset], data)
        assert main(["teacher", "train", *args]) == 0
        assert main(["pairs", *args]) == 0
        shutil.copytree(killed[preset], whole[preset])

    _run_all([["train", *_args(p, whole[p], tmp_path / "data" / p)] for p in presets], tmp_path, "whole")
    for preset in presets:
        _kill_after_checkpoint(["train", *_args(preset, killed[preset], tmp_path / "data" / preset)], killed[preset])
    _run_all([["train", *_args(p, killed[p], tmp_path / "data" / p)] for p in presets], tmp_path, "resume")

    for preset in presets:
        a, b = (load_model_file(r / "student" / "model.safetensors")[0] for r in (killed[preset], whole[preset]))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), preset
        (ta, sa, _), (tb, sb, _) = (load_checkpoint(list_checkpoints(r / "student")[-1])
                                   for r in (killed[preset], whole[preset]))
        assert sa["step"] == sb["step"] == STEPS and sa["world"] == 2, preset
        for group in tb:
            assert all(ta[group][k].equal(v) for k, v in tb[group].items()), (preset, group)
        log = [json.loads(line) for line in (killed[preset] / "student" / "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == STEPS and "disc_loss" in log[-1], preset
