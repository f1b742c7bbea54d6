"""TensorBoard event files beside log.jsonl: the same scalars at the same steps, each step once after a killed or
stopped run is resumed, and nothing of tensorboard imported where it is not installed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lmm.cli.main import main  # noqa: E402
from lmm.train import Phase, TrainSettings, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["run.progress=false", "run.device=cpu", "teacher.net.channels=8", "student.net.channels=8",
        "teacher.train.steps=4", "teacher.train.batch_size=16", "teacher.train.log_every=1",
        "teacher.train.ckpt_every=2", "teacher.steps=2", "pairs.n=64", "pairs.shard_size=32", "pairs.batch_size=32",
        "student.train.steps=4", "student.train.batch_size=16", "student.train.log_every=1",
        "student.train.ckpt_every=3"]
D = 4


def _last_records(folder: Path) -> dict[int, dict]:
    """log.jsonl's last record of each step (a resumed run's, where a step was logged again)."""
    return {r["step"]: r for r in map(json.loads, (folder / "log.jsonl").read_text().splitlines())}


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} as TensorBoard shows folder's event files; fails on a step shown twice."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), (tag, steps)
        out[tag] = {e.step: e.value for e in events}
    return out


def _assert_scalars_match_log(folder: Path) -> dict[int, dict]:
    records = _last_records(folder)
    want: dict[str, dict[int, float]] = {}
    for step, record in records.items():
        for key, value in record.items():
            if key != "step" and not isinstance(value, bool):
                want.setdefault(key, {})[step] = float(np.float32(value))
    assert _scalars(folder) == want
    return records


def test_teacher_and_student_runs_write_the_log_as_scalars(tmp_path: Path) -> None:
    args = [f"run.dir={tmp_path}", *TINY]
    for stage in (["teacher", "train"], ["pairs"], ["train"]):
        assert main([*stage, *args]) == 0
    for role in ("teacher", "student"):
        records = _assert_scalars_match_log(tmp_path / role)
        assert sorted(records) == [1, 2, 3, 4] and {"loss", "lr", "grad_norm"} <= set(records[4])
        assert len(list((tmp_path / role).glob("events.out.tfevents.*"))) == 1
    assert not list((tmp_path / "pairs").glob("events.out.tfevents.*"))


class _Objective(nn.Module):
    """A regression loss with a discriminator-like phase every other step (its `disc_loss` is in some records
    only); raises KeyboardInterrupt at step `stop_at`."""

    def __init__(self, stop_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.disc, self.stop_at = nn.Linear(D, 1), stop_at

    def forward(self, model: nn.Module, batch: dict, step: int) -> torch.Tensor:
        if step == self.stop_at:
            raise KeyboardInterrupt
        return ((model(batch["x"]) - batch["y"]) ** 2).mean(1)

    def phases(self) -> list[Phase]:
        def loss(net: nn.Module, batch: dict, step: int, rank: int, world: int) -> torch.Tensor:
            return net(batch["x"]).squeeze(1) ** 2
        return [Phase("disc", self.disc, loss, lr=1e-2, interval=2)]

    def train_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        pass


class _Source:
    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict[str, torch.Tensor]:
        x = torch.randn(batch_size, D, generator=torch.Generator().manual_seed(step))
        return {"x": x, "y": torch.tanh(x)}


def _train(run_dir: Path, steps: int, stop_at: int | None = None) -> None:
    torch.manual_seed(0)
    settings = TrainSettings(steps=steps, batch_size=8, lr=1e-2, ema_halflife=0.0, warmup_steps=0, grad_clip=1.0,
                             bf16=False, seed=0, ckpt_every=5, log_every=1, device="cpu", progress=False)
    train(nn.Linear(D, D), _Objective(stop_at), _Source(), settings, run_dir=run_dir, meta={})


def test_a_killed_run_resumed_shows_each_step_once(tmp_path: Path) -> None:
    """A run killed after logging steps 11-13 but before their checkpoint (recreated: a 13-step run's last
    checkpoint and model removed) resumes from step 10; TensorBoard drops the killed run's steps 11-13."""
    _train(tmp_path, 13)
    for name in ("checkpoints/step-00000013/meta.json", "model.safetensors", "model.json"):
        (tmp_path / name).unlink()
    _train(tmp_path, 20)
    logged = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == [*range(1, 14), *range(11, 21)]
    records = _assert_scalars_match_log(tmp_path)
    assert sorted(records) == list(range(1, 21)) and "disc_loss" in records[1] and "disc_loss" not in records[2]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2


def test_a_stopped_run_continued_shows_each_step_once(tmp_path: Path) -> None:
    """Ctrl-C at step 8 (after the checkpoint at 5), then the run continued to 12."""
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, 12, stop_at=8)
    _train(tmp_path, 12)
    assert sorted(_assert_scalars_match_log(tmp_path)) == list(range(1, 13))


def test_without_tensorboard_only_log_jsonl(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    _train(tmp_path, 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "log.jsonl", "model.json",
                                                           "model.safetensors"]
    assert not any(m.startswith("torch.utils.tensorboard") for m in sys.modules)
