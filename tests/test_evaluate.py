"""lmm.evaluate: precision/recall on equal numbers of real and generated samples; each model's own-ODE metrics; which
reference and which model file each number came from; sample files of the wrong shape."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from lmm.checkpoint import save_model
from lmm.config import load_config
from lmm.evaluate import PR_K, Reference, evaluate_inputs, evaluate_run, evaluate_sampler, own_ode_metrics, score
from lmm.io import file_sha256
from lmm.metrics import FeatureStats, precision_recall, subset_indices
from lmm.models import build_model, model_meta, student_objective, teacher_objective
from lmm.objectives import get_objective
from lmm.teachers import FlowTeacher

CPU = torch.device("cpu")


def _points(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def _reference(real: torch.Tensor, seed: int = 7) -> Reference:
    stats = FeatureStats(keep_features=True)
    stats.add(real)
    return Reference(stats, None, "fd_points", "points", seed, {"source": "points", "sha256": None, "data_sha256": None,
                                                                 "n": stats.n})


def test_precision_recall_on_a_seeded_real_subset_as_large_as_the_samples():
    real, fake = _points(1000, 0), _points(200, 1, shift=0.3)
    ref = _reference(real)
    row = score(ref, fake.numpy())
    assert row["precision_recall"] == {"features": "points", "k": PR_K, "n_real": 200, "n_fake": 200}
    assert list(ref.pr_subsets) == [200]
    idx, radii = ref.pr_subsets[200]
    assert idx.shape == (200,) and radii.shape == (200,) and len(set(idx.tolist())) == 200
    assert torch.equal(idx, subset_indices(1000, 200, 7))
    want = precision_recall(real[idx], fake, k=PR_K)
    assert (row["precision"], row["recall"]) == (want["precision"], want["recall"])
    assert score(ref, fake.numpy()) == row and list(ref.pr_subsets) == [200]
    again = _reference(real)
    assert score(again, fake.numpy()) == row
    assert not torch.equal(_reference(real, seed=8).real_subset(200)[0], idx)
    # more samples than reference points: the samples are cut to the reference's size instead
    few = score(_reference(real[:150]), fake.numpy())
    assert few["precision_recall"] == {"features": "points", "k": PR_K, "n_real": 150, "n_fake": 150}
    want = precision_recall(real[:150], fake[subset_indices(200, 150, 7)], k=PR_K)
    assert (few["precision"], few["recall"]) == (want["precision"], want["recall"])


class _Scaling(nn.Module):
    """Endpoint prediction a z for the line point x_t = (1-t) z + t a z: a x_t / (1 - t + t a), constant
    along each line, so its own ODE is exactly straight. As a velocity model (flow teacher): the velocity
    (a - 1) x / (1 + (a - 1) t) of the same ODE."""

    data_shape, num_classes = (2, 3), 0

    def __init__(self, a: float, velocity: bool) -> None:
        super().__init__()
        self.a, self.velocity = a, velocity

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = t.reshape(-1, 1, 1)
        if self.velocity:
            return (self.a - 1) * x / (1 + (self.a - 1) * t)
        return self.a * x / (1 - t + t * self.a)


def test_own_ode_metrics_vanish_for_predictions_constant_along_the_line():
    student = _Scaling(2.0, velocity=False)
    teacher = FlowTeacher(_Scaling(2.0, velocity=True)).train()
    for model in (student, teacher):
        out = own_ode_metrics(model, seed=0, device=CPU)
        assert set(out) == {"straightness", "endpoint_drift", "endpoint_to_final"}
        assert all(abs(v) < 1e-5 for v in out.values()), out  # float32 rounding of predictions ~1
    assert teacher.training


def _own_ode_direct(predict, seed: int, steps: int = 32, batch: int = 256) -> dict[str, float]:
    """The own-ODE metrics recomputed in numpy from their definitions: Euler steps x_(k+1) = x_k + dt (N_k - x_k) /
    (1 - t_k) on t_k = k / steps from the seeded noises (lmm.generate.noise_batches), the output N_(K-1) at t = 1."""
    z = torch.randn((batch, 2), generator=torch.Generator().manual_seed(seed))
    x, dt, states, preds = z, 1.0 / steps, [z.double().numpy()], []
    with torch.no_grad():
        for k in range(steps):
            t = k / steps
            n = predict(x, torch.full((batch,), t))
            preds.append(n.double().numpy())
            x = x + (dt / (1 - t)) * (n - x)
            states.append(x.double().numpy() if k + 1 < steps else preds[-1])
    chord = states[-1] - states[0]
    straight = sum(dt * ((chord - (b - a) / dt) ** 2).mean(1) for a, b in zip(states[:-1], states[1:])).mean()
    drift = sum(((b - a) ** 2).mean(1) / dt for a, b in zip(preds[:-1], preds[1:])).mean()
    to_final = np.mean([np.sqrt(((p - preds[-1]) ** 2).mean(1)).mean() for p in preds[:-1]])
    return {"straightness": straight, "endpoint_drift": drift, "endpoint_to_final": to_final}


def test_rows_at_nfe_1_carry_nonzero_own_ode_metrics_of_teacher_and_student():
    net = {"kind": "mlp", "width": 32, "depth": 2}
    torch.manual_seed(0)
    teacher = FlowTeacher(build_model(get_objective("flow_matching"), net, (2,), 0)).eval()
    student = build_model(get_objective("lines"), net, (2,), 0).eval()
    with torch.no_grad():
        for p in [*teacher.parameters(), *student.parameters()]:  # off the zero-initialised output layers
            p.normal_(0.0, 0.5)
    cfg = {"eval": {"n": 64, "seed": 0, "batch_size": 64}, "run": {"bf16": False, "compile": False, "progress": False}}
    ref = _reference(_points(300, 2))
    for role, model, how in (("teacher", teacher, {"solver": "euler", "steps": 1}),
                             ("student", student, {"solver": "lines", "grid": [0.0]})):
        own = own_ode_metrics(model, seed=3, device=CPU)
        assert own["straightness"] > 1e-6 and own["endpoint_drift"] > 1e-6 and own["endpoint_to_final"] > 1e-6
        assert own_ode_metrics(model, seed=3, device=CPU) == own
        row, _ = evaluate_sampler(cfg, ref, role, model, how, CPU, own)
        assert row["nfe"] == 1
        predict = teacher.line_endpoint if role == "teacher" else (lambda x, t: student(x, t, None))
        direct = _own_ode_direct(predict, seed=3)
        for key, value in direct.items():
            assert row[key] == pytest.approx(value, rel=1e-6), (role, key)
        assert row["precision_recall"] == {"features": "points", "k": PR_K, "n_real": 64, "n_fake": 64}


def _toy_cfg(tmp_path, *overrides: str) -> dict:
    return load_config("configs/toy_moons.toml", [
        f"run.dir={tmp_path}", "data.n=300", "eval.n=64", "eval.batch_size=64", "eval.teacher_nfe=[1]",
        'eval.teacher_solvers=["euler"]', "eval.student_nfe=[1]", "teacher.solver=euler", "teacher.steps=1",
        "teacher.net.width=16", "student.net.width=16", "run.device=cpu", "run.progress=false", "run.bf16=false",
        *overrides])


def _save_models(cfg: dict, folder) -> dict:
    """Untrained teacher and student of `cfg` (2-D points) saved as folder/ROLE/model.safetensors: {role: path}."""
    files = {}
    for role, objective in (("teacher", teacher_objective(cfg["teacher"])),
                            ("student", student_objective(cfg["student"], cfg["teacher"]))):
        net = cfg[role]["net"]
        files[role] = save_model(folder / role / "model", build_model(objective, net, (2,), 0, seed=0).state_dict(),
                                 model_meta(role, objective, net, (2,), 0, cfg, bf16=False))
    return files


def test_samples_of_another_shape_than_the_data_are_refused_naming_file_and_shapes(tmp_path):
    samples = tmp_path / "cifar.npz"
    np.savez(samples, images=np.zeros((4, 32, 32, 3), dtype=np.uint8))
    cfg = load_config(overrides=["data.n=200", "run.device=cpu", "run.progress=false"])
    with pytest.raises(ValueError) as err:
        evaluate_inputs(cfg, samples=[samples])
    assert str(err.value) == (f"{samples}: samples have shape (32, 32, 3) but data digits has (8, 8, 1) (H, W, C); "
                              "pass the preset the samples were made with (-c ...) or set data.name")
    with pytest.raises(ValueError, match=rf"^{samples}: samples have shape \(32, 32, 3\) but data toy-moons has "
                                         r"\(2,\) \(D,\); pass the preset"):
        evaluate_inputs(_toy_cfg(tmp_path), samples=[samples])


def test_eval_rows_of_a_model_carry_its_files_sha256_and_the_reference_its_source(tmp_path):
    cfg = _toy_cfg(tmp_path)
    files = _save_models(cfg, tmp_path)
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.random.default_rng(0).standard_normal((40, 2)).astype(np.float32))
    out = evaluate_inputs(cfg, samples=[samples], model=tmp_path / "student", nfes=[1])
    assert [r.get("model_sha256") for r in out["results"]] == [None, file_sha256(files["student"])]
    assert out["reference"] == {"source": "lmm statistics of data toy-moons split train, n 300", "sha256": None,
                                "data_sha256": None, "n": 300}
    assert "against lmm statistics of data toy-moons split train, n 300;" in out["description"]


def test_run_metrics_name_the_reference_and_each_rows_model_file(tmp_path):
    cfg = _toy_cfg(tmp_path)
    files = _save_models(cfg, tmp_path)
    metrics = evaluate_run(cfg)
    assert metrics["reference"]["source"] == "lmm statistics of data toy-moons split train, n 300"
    assert [(r["model"], r["model_sha256"]) for r in metrics["results"]] == [
        ("teacher", file_sha256(files["teacher"])), ("student", file_sha256(files["student"]))]
    old = json.loads((tmp_path / "metrics.json").read_text())
    for row in old["results"]:
        del row["model_sha256"]
    (tmp_path / "metrics.json").write_text(json.dumps(old))
    assert evaluate_run(cfg)["results"] == metrics["results"]  # kept rows of an older file gain the field
