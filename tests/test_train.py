"""Train loop, checkpoints and EMA on tiny inline stand-ins (a small MLP, a regression objective, a seeded source)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lmm.checkpoint import (
    CorruptFileError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_file,
    save_checkpoint,
    save_model,
    tensors_sha256,
)
from lmm.train import (
    Phase,
    TrainObjective,
    TrainSettings,
    as_objective,
    derive_seed,
    ema_beta,
    meta_differences,
    train,
    warmup_lr,
)

D = 4


class TinyNet(nn.Module):
    def __init__(self, width: int = 16, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, width), nn.SiLU(), nn.Dropout(dropout), nn.Linear(width, D))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def regression_objective(model: nn.Module, batch: dict[str, torch.Tensor], step: int = 0) -> torch.Tensor:
    """Per-sample squared error (B,) on inputs jittered with the global RNG (exercises per-step seeding)."""
    x = batch["x"] + 0.01 * torch.randn_like(batch["x"])
    return ((model(x) - batch["y"]) ** 2).mean(dim=1)


class RegressionSource:
    """y = tanh(x A); the global batch at `step` depends only on (seed, step); rank r gets slice r."""

    def __init__(self, seed: int = 0, nan_from: int | None = None):
        self.seed, self.nan_from = seed, nan_from
        self.a = torch.randn(D, D, generator=torch.Generator().manual_seed(1234))

    def batch(self, step: int, rank: int, world: int, batch_size: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        x = torch.randn(batch_size * world, D, generator=g)
        y = torch.tanh(x @ self.a)
        if self.nan_from is not None and step >= self.nan_from:
            y = y * float("nan")
        part = slice(rank * batch_size, (rank + 1) * batch_size)
        return {"x": x[part], "y": y[part]}


def run(run_dir: Path, steps: int, source: RegressionSource | None = None, meta: dict | None = None,
        **kw) -> tuple[nn.Module, nn.Module]:
    """Train a fresh TinyNet on the CPU (device="cpu" also where CUDA is visible: the bitwise checks hold there)."""
    torch.manual_seed(0)
    model = TinyNet()
    args = dict(batch_size=8, lr=1e-2, ema_halflife=200.0, warmup_steps=5, grad_clip=1.0, bf16=False, seed=7,
                ckpt_every=10, log_every=5, device="cpu", progress=False)
    args.update(kw)
    ema = train(model, as_objective(regression_objective), source or RegressionSource(),
                TrainSettings(steps=steps, **args), run_dir=run_dir,
                meta=meta if meta is not None else {"config": {"lr": args["lr"]}})
    return model, ema


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_loss_decreases_and_final_files(tmp_path: Path) -> None:
    _, ema = run(tmp_path, 120, ema_halflife=100.0, ckpt_every=50, log_every=10)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(10, 121, 10))
    assert log[-1]["loss"] < 0.3 * log[0]["loss"]
    assert all(r["samples_per_s"] > 0 and r["grad_norm"] > 0 for r in log)
    state, meta = load_model_file(tmp_path / "model.safetensors")
    assert meta == {"config": {"lr": 1e-2}, "step": 120, "weights_sha256": tensors_sha256(state)}
    assert not ema.training and all(not p.requires_grad for p in ema.parameters())
    for k, v in ema.state_dict().items():
        assert torch.equal(state[k], v)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000100", "step-00000120"]


def test_resume_equals_uninterrupted_bitwise(tmp_path: Path) -> None:
    """On the CPU (see run): 10 steps, then resumed to 20, equal 20 uninterrupted steps bitwise."""
    full_model, full_ema = run(tmp_path / "full", 20)
    run(tmp_path / "split", 10)
    assert latest_checkpoint(tmp_path / "split").name == "step-00000010"
    split_model, split_ema = run(tmp_path / "split", 20, extend=True)
    for a, b in ((full_model, split_model), (full_ema, split_ema)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(full_model.net[0].weight, full_ema.net[0].weight)
    _, full_state, _ = load_checkpoint(tmp_path / "full" / "checkpoints" / "step-00000020")
    _, split_state, _ = load_checkpoint(tmp_path / "split" / "checkpoints" / "step-00000020")
    for k in full_state["optimizer"]["state"]:
        for name, t in full_state["optimizer"]["state"][k].items():
            assert torch.equal(t, split_state["optimizer"]["state"][k][name])


def test_resume_rejects_changed_meta_unless_ignored(tmp_path: Path) -> None:
    run(tmp_path, 4, meta={"config": {"lr": 1, "net": {"width": 16}}, "role": "student"})
    with pytest.raises(ValueError, match=r"other settings \(lr: 1 -> 2; net\.width: 16 -> 32\).*run\.dir=") as err:
        run(tmp_path, 6, meta={"config": {"lr": 2, "net": {"width": 32}}, "role": "student"})
    assert "resume_ignore" not in str(err.value)
    run(tmp_path, 6, meta={"config": {"lr": 2, "net": {"width": 16}}, "role": "student",
                           "resume_ignore": ["config.lr"]}, extend=True)
    assert latest_checkpoint(tmp_path).name == "step-00000006"
    assert meta_differences({"a": {"b": 1}}, {"a": {"b": 1}, "c": 2}) == ["c"]
    # a setting added after the checkpoint was written does not differ while it has its default
    assert meta_differences({"a": {"b": 1}}, {"a": {"b": 1}, "c": 2}, {"c": 2}) == []
    assert meta_differences({"a": {"b": 1}}, {"a": {"b": 1}, "c": 3}, {"c": 2}) == ["c"]
    assert meta_differences({"a": {"b": 1}, "c": 3}, {"a": {"b": 1}, "c": 2}, {"c": 2}) == ["c"]


def test_students_of_older_versions_resume_with_new_settings_at_their_defaults() -> None:
    from lmm.config import load_config
    from lmm.models import resume_defaults, student_objective

    cfg = load_config(None, [])
    objective = student_objective(cfg["student"], cfg["teacher"])
    defaults = resume_defaults(objective)
    assert defaults["config.student.objective"] == "lines" and defaults["objective_kwargs.denoiser"] == "edm"
    new = {"config": {"student": {"objective": "lines", "grid": [0.0, 0.5]}}, "objective_kwargs": {"denoiser": "edm"}}
    old = {"config": {"student": {"grid": [0.0, 0.5]}}, "objective_kwargs": {}}
    assert meta_differences(old, new, defaults) == []


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 13; last good checkpoint: .*step-00000010"):
        run(tmp_path, 20, source=RegressionSource(nan_from=12), ckpt_every=5, log_every=5)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000005", "step-00000010"]
    assert not (tmp_path / "model.safetensors").exists()
    tensors, state, _ = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for sd in tensors.values() for t in sd.values() if t.is_floating_point())
    assert read_log(tmp_path)[-1]["event"] == "non-finite loss"


def test_nonfinite_before_first_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FloatingPointError, match=r"step 1; last good checkpoint: none"):
        run(tmp_path, 3, source=RegressionSource(nan_from=0))


def test_ema_math() -> None:
    assert ema_beta(64, 640.0) ** 10 == pytest.approx(0.5)
    assert ema_beta(64, 0.0) == 0.0
    # EDM's ramp-up: the halflife is min(halflife, rampup * samples seen)
    assert ema_beta(64, 640.0, 0.05, 0) == 0.0
    assert ema_beta(64, 640.0, 0.5, 640) == pytest.approx(0.5 ** (64 / 320))
    assert ema_beta(64, 640.0, 0.5, 10**6) == ema_beta(64, 640.0)
    with pytest.raises(ValueError, match="ema_halflife"):
        ema_beta(8, -1.0)


def test_ema_in_loop(tmp_path: Path) -> None:
    torch.manual_seed(0)
    init = TinyNet().state_dict()
    model, ema = run(tmp_path / "none", 5, ema_halflife=0.0)
    for k, v in model.state_dict().items():
        assert torch.equal(ema.state_dict()[k], v)
    # an EMA that never forgets, without ramp-up, holds the weights after the first step (not the initial ones)
    _, first = run(tmp_path / "one", 1, ema_halflife=1e30, ema_rampup=0.0)
    model, ema = run(tmp_path / "frozen", 5, ema_halflife=1e30, ema_rampup=0.0)
    assert not torch.equal(model.net[0].weight, init["net.0.weight"])
    for k, v in ema.named_parameters():
        assert torch.equal(v, first.state_dict()[k]) and not torch.equal(v, init[k])
    assert ema.calls.item() == model.calls.item() == 5


@pytest.mark.parametrize("rampup", [0.0, 0.05])
def test_ema_follows_the_ramped_decay(tmp_path: Path, rampup: float) -> None:
    """The loop's EMA equals e_1 = w_1, e_k = beta_k e_(k-1) + (1 - beta_k) w_k with beta_k = ema_beta(B, H, rampup,
    (k-1) B) over the weights w_k after each step; without ramp-up the weights after step 1 keep a share
    prod beta_k of the final average (the initial-weights problem), with it next to none."""
    weights: list[dict] = []

    def recording(model: nn.Module, batch: dict, step: int) -> torch.Tensor:
        weights.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return regression_objective(model, batch)

    torch.manual_seed(0)
    model = TinyNet(dropout=0.0)
    steps, halflife = 30, 2000.0
    settings = TrainSettings(steps=steps, batch_size=8, lr=1e-2, ema_halflife=halflife, ema_rampup=rampup,
                             warmup_steps=0, grad_clip=1.0, bf16=False, seed=7, ckpt_every=steps, log_every=steps,
                             device="cpu", progress=False)
    ema = train(model, as_objective(recording), RegressionSource(), settings, run_dir=tmp_path, meta={})
    w = weights[1:] + [{k: v.detach() for k, v in model.named_parameters()}]
    ref, share = dict(w[0]), 1.0
    for k in range(1, steps):
        beta = ema_beta(8, halflife, rampup, k * 8)
        ref = {n: beta * ref[n] + (1 - beta) * w[k][n] for n in ref}
        share *= beta
    for n, p in ema.named_parameters():
        assert torch.allclose(p, ref[n], atol=1e-6), n
    assert share > 0.9 if rampup == 0 else share < 1e-6


def test_resume_refuses_another_world_size_or_batch(tmp_path: Path) -> None:
    run(tmp_path, 10)
    with pytest.raises(ValueError, match=r"1 process\(es\) x batch 8 .* 1 x 4"):
        run(tmp_path, 20, batch_size=4)
    ckpt = latest_checkpoint(tmp_path)
    tensors, state, meta = load_checkpoint(ckpt)
    state["world"] = 2
    save_checkpoint(tmp_path, 10, tensors, state, meta)
    with pytest.raises(ValueError, match=r"2 process\(es\) x batch 8 per process, this run has 1 x 8"):
        run(tmp_path, 20)


def test_warmup_and_bf16(tmp_path: Path) -> None:
    assert [warmup_lr(1.0, s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(0.1, 0, 0) == 0.1
    run(tmp_path, 6, bf16=True, log_every=1)
    log = read_log(tmp_path)
    assert [r["lr"] for r in log] == pytest.approx([2e-3, 4e-3, 6e-3, 8e-3, 1e-2, 1e-2])
    assert all(math.isfinite(r["loss"]) for r in log)
    assert derive_seed(7, 3, 0) != derive_seed(7, 3, 1) != derive_seed(7, 4, 0)


def test_objective_shape_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"per-sample loss of shape \(8,\)"):
        train(TinyNet(), as_objective(lambda m, b, step: regression_objective(m, b).mean()), RegressionSource(),
              TrainSettings(steps=2, batch_size=8, lr=1e-3, ema_halflife=0.0, warmup_steps=0, grad_clip=0.0,
                            bf16=False, seed=0, ckpt_every=1, log_every=1, device="cpu", progress=False),
              run_dir=tmp_path, meta={})


_SETTINGS = dict(steps=2, batch_size=8, lr=1e-3, ema_halflife=0.0, warmup_steps=0, grad_clip=0.0, bf16=False, seed=0,
                 ckpt_every=1, log_every=1, device="cpu")


@pytest.mark.parametrize("change, message", [
    ({"steps": -1}, r"steps must be an integer >= 0, got -1"),
    ({"batch_size": 2.5}, r"batch_size must be an integer >= 1, got 2.5"),
    ({"ckpt_every": 0}, r"ckpt_every must be an integer >= 1"),
    ({"keep": 0}, r"keep must be an integer >= 1"),
    ({"lr": -1.0}, r"lr and grad_clip must be >= 0"),
    ({"optimizer": "sgd"}, r"optimizer must be 'adamw' or 'adam', got 'sgd'"),
    ({"ema_rampup": -0.1}, r"ema_halflife and ema_rampup must be >= 0"),
])
def test_settings_validated_on_construction(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainSettings(**{**_SETTINGS, **change})


def test_settings_from_config_and_defaults() -> None:
    from dataclasses import FrozenInstanceError, replace

    from lmm.config import load_config

    t = load_config(None, [])["student"]["train"]
    settings = TrainSettings.from_config(t, seed=3, bf16=True, device="cpu", progress=False)
    assert (settings.steps, settings.batch_size, settings.lr, settings.ema_halflife, settings.ema_rampup,
            settings.warmup_steps, settings.grad_clip, settings.ckpt_every, settings.log_every) == (
        t["steps"], t["batch_size"], t["lr"], t["ema_halflife"], t["ema_rampup"], t["warmup_steps"], t["grad_clip"],
        t["ckpt_every"], t["log_every"])
    assert (settings.seed, settings.bf16, settings.device, settings.progress) == (3, True, "cpu", False)
    assert (settings.optimizer, settings.weight_decay, settings.keep) == ("adamw", 0.0, 2)
    assert TrainSettings(**_SETTINGS).ema_rampup == 0.25 and TrainSettings(**_SETTINGS).progress
    with pytest.raises(FrozenInstanceError):
        settings.steps = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="log_every"):
        replace(settings, log_every=0)


def test_objective_protocol(tmp_path: Path) -> None:
    from lmm.config import load_config
    from lmm.models import student_objective, teacher_objective

    cfg = load_config(None, [])
    for objective in (student_objective(cfg["student"], cfg["teacher"]), teacher_objective(cfg["teacher"])):
        assert isinstance(objective, TrainObjective) and as_objective(objective) is objective
    wrapped = as_objective(regression_objective)
    assert isinstance(wrapped, TrainObjective) and not isinstance(regression_objective, TrainObjective)
    assert wrapped.phases() == [] and wrapped.train_state() == {}
    wrapped.load_train_state({})
    with pytest.raises(ValueError, match="keeps no training state"):
        wrapped.load_train_state({"target": torch.zeros(1)})
    with pytest.raises(TypeError, match=r"TrainObjective.*as_objective\(fn\)"):
        train(TinyNet(), regression_objective, RegressionSource(), TrainSettings(**_SETTINGS), run_dir=tmp_path,
              meta={})
    assert not (tmp_path / "log.jsonl").exists()


def test_phases_and_objective_state_resume_bitwise(tmp_path: Path) -> None:
    """An objective with a phase (its own network and Adam) and training state: 6 steps, then resumed to 12, equal
    12 uninterrupted steps bitwise, phase network and objective state included."""

    class Phased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.disc = nn.Linear(D, 1)
            self.register_buffer("target", torch.zeros(D))

        def forward(self, model: nn.Module, batch: dict, step: int) -> torch.Tensor:
            out = model(batch["x"] + 0.01 * torch.randn_like(batch["x"]))
            self.target.mul_(0.9).add_(0.1 * out.detach().mean(0))
            return ((out - batch["y"]) ** 2).mean(1) + 0.1 * self.disc(out).squeeze(1) ** 2

        def phases(self) -> list[Phase]:
            def loss(net: nn.Module, batch: dict, step: int, rank: int, world: int) -> torch.Tensor:
                return (net(batch["x"]).squeeze(1) - torch.randn(batch["x"].shape[0])) ** 2
            return [Phase("disc", self.disc, loss, lr=1e-2, interval=2, start=1)]

        def train_state(self) -> dict[str, torch.Tensor]:
            return {"target": self.target.clone()}

        def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
            self.target.copy_(state["target"])

    def fit(run_dir: Path, steps: int) -> tuple[nn.Module, Phased]:
        objective = Phased()
        torch.manual_seed(0)
        model = TinyNet()
        train(model, objective, RegressionSource(), TrainSettings(**{**_SETTINGS, "steps": steps, "ckpt_every": 6,
                                                                    "log_every": 3, "progress": False,
                                                                    "extend": True}),
              run_dir=run_dir, meta={})
        return model, objective

    full_model, full = fit(tmp_path / "full", 12)
    fit(tmp_path / "split", 6)
    split_model, split = fit(tmp_path / "split", 12)
    for a, b in ((full_model, split_model), (full, split)):
        for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.equal(v, w), k
    tensors, state, _ = load_checkpoint(latest_checkpoint(tmp_path / "split"))
    assert torch.equal(tensors["objective"]["target"], split.target) and set(state["phase_optimizers"]) == {"disc"}
    assert all("disc_loss" in r for r in read_log(tmp_path / "full"))


def _tensors() -> dict[str, dict[str, torch.Tensor]]:
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "ema": {"w": torch.ones(2, 3)}}


def test_checkpoint_atomicity_and_rotation(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, _tensors(), {"step": step, "rng": torch.get_rng_state()}, {"k": step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    root = tmp_path / "checkpoints"
    leftover = root / ".tmp-step-00000040-999"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    (root / "step-00000050").mkdir()
    assert latest_checkpoint(tmp_path) == root / "step-00000030"
    tensors, state, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(tensors["model"]["w"], _tensors()["model"]["w"]) and meta == {"k": 30}
    assert state["step"] == 30 and state["rng"].dtype == torch.uint8
    save_checkpoint(tmp_path, 30, _tensors(), {"step": 30}, {"k": "again"})
    assert not leftover.exists()
    assert load_checkpoint(root / "step-00000030")[2] == {"k": "again"}
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_failed_checkpoint_write_leaves_the_previous_one(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, _tensors(), {"step": 10}, {"k": 10})
    with pytest.raises(Exception):
        save_checkpoint(tmp_path, 20, _tensors(), {"step": 20, "bad": lambda: None}, {"k": 20})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000010"]
    assert load_checkpoint(latest_checkpoint(tmp_path))[2] == {"k": 10}


@pytest.mark.parametrize("damage", ["garbage", "truncate", "flip"])
def test_corrupt_checkpoint_names_file(tmp_path: Path, damage: str) -> None:
    path = save_checkpoint(tmp_path, 1, _tensors(), {"step": 1}, {})
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"garbage": b"\x00not a safetensors file", "truncate": data[: len(data) - 5],
                   "flip": data[:-1] + bytes([data[-1] ^ 0xFF])}[damage])
    with pytest.raises(CorruptFileError, match=str(f)):
        load_checkpoint(path)
    (path / "state.pt").unlink()
    f.write_bytes(data)
    with pytest.raises(FileNotFoundError, match=str(path / "state.pt")):
        load_checkpoint(path)


def test_model_file_roundtrip_tied_and_errors(tmp_path: Path) -> None:
    emb = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    sd = {**{f"emb.{k}": v for k, v in emb.state_dict().items()}, "head.weight": head.weight,
          "view": emb.weight[:, 1]}
    path = save_model(tmp_path / "model", sd, {"format": "x", "step": 3})
    assert path == tmp_path / "model.safetensors" and (tmp_path / "model.json").is_file()
    state, meta = load_model_file(tmp_path / "model")
    assert meta == {"format": "x", "step": 3, "weights_sha256": tensors_sha256(sd)}
    assert all(torch.equal(state[k], v) for k, v in sd.items())
    (tmp_path / "model.json").unlink()
    assert load_model_file(path)[1] == meta
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.safetensors")):
        load_model_file(tmp_path / "absent.safetensors")
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CorruptFileError, match=str(path)):
        load_model_file(path)


def test_a_run_stopped_before_its_first_record_leaves_no_folder(tmp_path: Path) -> None:
    """Ctrl-C (or any stop) before the first log record or checkpoint: no empty run folder is left behind."""
    def interrupted(model, batch, step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(TinyNet(), as_objective(interrupted), RegressionSource(), TrainSettings(**_SETTINGS),
              run_dir=tmp_path / "student", meta={})
    assert not (tmp_path / "student").exists()
