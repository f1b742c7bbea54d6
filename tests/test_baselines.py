"""The rival methods in the same harness: 2-rectified flow, OT-CFM and consistency distillation, each an objective
of the one training loop, chosen by `student.objective`, and sampled / evaluated like any student."""
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lmm.checkpoint import load_model_file
from lmm.cli.main import main
from lmm.couplings import matched_cost, ot_permutation
from lmm.models import load_model
from lmm.nets.precond import LinesModel
from lmm.objectives import OTCFM, Consistency, Reflow
from lmm.objectives.consistency import consistency_grid
from lmm.sampling import sample_lines

SHAPE = (1, 4, 4)
TINY = ["run.progress=false", "teacher.net.channels=8", "student.net.channels=8", "teacher.train.steps=4",
        "teacher.train.batch_size=16", "teacher.steps=3", "pairs.n=64", "pairs.shard_size=64", "pairs.batch_size=64",
        "student.train.batch_size=16", "student.train.ckpt_every=3", "eval.n=32", "eval.batch_size=32"]


class Const(nn.Module):
    """Raw net returning a fixed tensor (B, *SHAPE), whatever its input."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.register_buffer("out", out)

    def forward(self, x, noise_label, class_labels=None):
        return self.out.expand_as(x)


class Affine(nn.Module):
    """Raw net a * x + b with trainable scalars, for gradient and EMA checks."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.tensor(0.1))

    def forward(self, x, noise_label, class_labels=None):
        return self.a * x + self.b


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ot_permutation_is_the_optimal_matching():
    for seed in range(3):
        a, b = _rand(6, 3, seed=seed), _rand(6, 3, seed=seed + 10)
        perm = ot_permutation(a, b)
        best = min(matched_cost(a, b[list(q)]).sum() for q in itertools.permutations(range(6)))
        assert torch.isclose(matched_cost(a, b[perm]).sum(), best)
    x = _rand(32, *SHAPE)
    shuffled = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x[shuffled][ot_permutation(x, x[shuffled])], x)
    with pytest.raises(ValueError, match="one shape"):
        ot_permutation(_rand(4, 3), _rand(5, 3))


def test_reflow_loss_is_the_velocity_error_and_its_sampler_is_euler():
    z, shift = _rand(8, *SHAPE), _rand(1, *SHAPE, seed=1)
    batch = {"z": z, "x1": z + shift}
    objective = Reflow()
    exact = objective.build_model(Const(shift[0]))
    torch.manual_seed(0)
    assert objective(exact, batch).abs().max() < 1e-6
    off = objective.build_model(Const(shift[0] + 0.5))
    assert torch.allclose(objective(off, batch), torch.full((8,), 0.25), atol=1e-5)
    # the line sampler of a velocity model on a uniform grid is Euler on v
    model = objective.build_model(Affine())
    grid = [0.0, 0.25, 0.5, 0.75]
    x = z.clone()
    for t, t_next in zip(grid, [*grid[1:], 1.0]):
        x = x + (t_next - t) * model.velocity(x, torch.full((8,), t))
    assert torch.allclose(sample_lines(model, z, grid).x, x, atol=1e-5)


def test_ot_cfm_couples_each_batch_by_optimal_transport():
    x = _rand(16, *SHAPE)
    objective = OTCFM()
    z = x[torch.randperm(16, generator=torch.Generator().manual_seed(2))] + 1e-3 * _rand(16, *SHAPE, seed=3)
    assert torch.allclose(objective.couple(z, x), x, atol=1e-2)
    assert torch.equal(OTCFM(coupling="independent").couple(z, x), z)
    noise = _rand(16, *SHAPE, seed=4)
    assert matched_cost(objective.couple(noise, x), x).sum() < matched_cost(noise, x).sum()
    # its loss is flow matching's on the coupled noise: exact for the straight-line velocity of that coupling
    model = objective.build_model(Affine())
    torch.manual_seed(5)
    loss = objective(model, {"x": x})
    torch.manual_seed(5)
    z = objective.couple(torch.randn_like(x), x)
    t = torch.rand(16)
    x_t = (1 - t).view(-1, 1, 1, 1) * z + t.view(-1, 1, 1, 1) * x
    assert torch.allclose(loss, (model.velocity(x_t, t) - (x - z)).square().flatten(1).mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="coupling"):
        OTCFM(coupling="sinkhorn")


class PointTeacher(nn.Module):
    """A teacher whose data is the single point `a`: its line endpoint prediction is `a` everywhere."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)

    def line_endpoint(self, x_t, t, y=None):
        return self.a.expand_as(x_t)


def test_consistency_grid_and_teacher_step():
    grid = consistency_grid(18)
    assert grid[0] == 0.0 and len(grid) == 19 and all(b > a for a, b in zip(grid, grid[1:]))
    assert 1 / 81 < grid[1] < 0.05 and math.isclose(grid[-1], 1 / 1.002)  # t_0 = 0 stands for sigma_max
    a = _rand(1, *SHAPE, seed=1)
    for solver in ("euler", "heun"):
        objective = Consistency(steps=4, solver=solver)
        objective.setup(SHAPE, 0, teacher=PointTeacher(a[0]), model=objective.build_model(Affine()))
        z = _rand(6, *SHAPE)
        t, t_next = torch.full((6,), 0.2), torch.full((6,), 0.7)
        # the line ODE of a one-point data set is the straight line from z to a: any step stays on it
        x_next = objective.teacher_step(0.8 * z + 0.2 * a, t, t_next, None)
        assert torch.allclose(x_next, 0.3 * z + 0.7 * a, atol=1e-5)


def test_consistency_loss_vanishes_for_the_consistency_function_and_the_target_is_an_ema():
    a = _rand(1, *SHAPE, seed=1)
    objective = Consistency(steps=4, precond="none")
    perfect = objective.build_model(Const(a[0]))
    objective.setup(SHAPE, 0, teacher=PointTeacher(a[0]), model=perfect)
    assert objective(perfect, {"x": a.expand(8, *SHAPE)}).abs().max() < 1e-10
    # the target follows the model with decay `ema` per step
    objective = Consistency(steps=4, ema=0.5)
    model = objective.build_model(Affine())
    objective.setup(SHAPE, 0, teacher=PointTeacher(a[0]), model=model)
    with torch.no_grad():
        model.net.a.fill_(1.5)
    objective(model, {"x": a.expand(4, *SHAPE)})
    assert math.isclose(objective.target.net.a.item(), 1.0)
    state = objective.train_state()
    assert set(state) == {"net.a", "net.b"}
    with pytest.raises(ValueError, match="ema"):
        Consistency(ema=1.0)


def test_each_method_trains_samples_and_evaluates_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    common = [f"run.dir={run}", *TINY]
    assert main(["teacher", "train", *common]) == 0
    assert main(["pairs", *common]) == 0
    for name, extra in (("reflow", []), ("ot_cfm", ["student.init=scratch"]),
                        ("consistency", ["student.consistency.steps=4"])):
        folder = tmp_path / name
        folder.mkdir()
        for part in ("teacher", "pairs"):
            (folder / part).symlink_to(run / part)
        args = [f"run.dir={folder}", *TINY, f"student.objective={name}", "student.train.steps=3", *extra]
        assert main(["train", *args]) == 0, capsys.readouterr().err
        student, meta = load_model(folder / "student")
        assert isinstance(student, LinesModel) and meta["objective"] == name
        assert student.sampler == ("restart" if name == "consistency" else "line")
        assert ("pairs" in meta) == (name == "reflow") and ("data" in meta) == (name != "reflow")
        out = tmp_path / f"{name}.npz"
        assert main(["sample", "--model", str(folder / "student"), "--nfe", "2", "-n", "6", "--out", str(out)]) == 0
        assert np.load(out)["images"].shape == (6, 8, 8, 1)
        assert main(["eval", *args, "--model", str(folder / "student"), "--nfe", "1,2",
                     "--out", str(tmp_path / f"{name}.json")]) == 0
        rows = json.loads((tmp_path / f"{name}.json").read_text())["results"]
        assert [r["nfe"] for r in rows] == [1, 2]
    # OT-CFM is a velocity model: initialising it from an EDM teacher's weights is refused
    assert main(["train", f"run.dir={tmp_path / 'bad'}", *TINY, "student.objective=ot_cfm",
                 f"--teacher={run / 'teacher'}", "student.train.steps=1"]) == 2
    assert "student.init=scratch" in capsys.readouterr().err


def test_consistency_distillation_resumes_bitwise_with_its_target(tmp_path):
    """Stopped at step 3 and resumed to 6 (its EMA target checkpointed with it), consistency distillation ends
    bitwise equal to 6 uninterrupted steps: on the CPU, as GPU backward kernels are not deterministic."""
    run = tmp_path / "run"
    common = [f"run.dir={run}", *TINY]
    assert main(["teacher", "train", *common]) == 0
    straight, split = tmp_path / "straight", tmp_path / "split"
    for folder in (straight, split):
        folder.mkdir()
        (folder / "teacher").symlink_to(run / "teacher")
    cd = [*TINY, "run.device=cpu", "student.objective=consistency", "student.consistency.steps=4",
          "student.consistency.ema=0.9"]
    assert main(["train", f"run.dir={straight}", *cd, "student.train.steps=6"]) == 0
    assert main(["train", f"run.dir={split}", *cd, "student.train.steps=3"]) == 0
    assert main(["train", f"run.dir={split}", *cd, "student.train.steps=6", "student.train.extend=true"]) == 0
    a, _ = load_model_file(straight / "student" / "model.safetensors")
    b, _ = load_model_file(split / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ckpt = sorted((split / "student" / "checkpoints").iterdir())[-1]
    assert (ckpt / "objective.safetensors").is_file()


@pytest.mark.parametrize("argv, named", [
    (["-c", "configs/fashion_mnist.toml", "student.objective=reflow"], "student.loss={\"l2\": 1.0, \"perceptual\""),
    (["student.objective=ot_cfm", "student.grid=[0.0,0.3]", "student.window=2"], "student.grid=[0.0, 0.3], student.window=2"),
    (["student.objective=lines", "student.ot_cfm.sigma=0.1"], "student.ot_cfm={\"sigma\": 0.1"),
    (["student.objective=consistency", "student.time_sampling=uniform"], "student.time_sampling=\"uniform\""),
])
def test_settings_the_objective_would_ignore_are_refused(argv, named, capsys):
    """Every command refuses, on loading its config, a student setting its objective does not read (one line,
    exit 2), and says how to set it back; the default values pass."""
    root = Path(__file__).resolve().parent.parent
    argv = [str(root / a) if a.endswith(".toml") else a for a in argv]
    for command in (["config"], ["train", "run.dir=/nonexistent/never-written"]):
        assert main([*command, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and named in err and "does not read" in err, err
    assert main(["config", *argv, "student.loss={l2=1.0}", "student.grid=[0.0,0.5]", "student.time_sampling=grid",
                 "student.window=4", "student.ot_cfm.sigma=0.0"]) == 0
