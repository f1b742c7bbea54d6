"""The GPU fast paths, checked on the CPU: run.compile (compiled training and sampling agree with eager), the
prefetching loader, the EMA update without host syncs and the pair store's read of its next window."""
import json

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lmm.config import ConfigError, defaults, load_config
from lmm.data.arrays import TensorSource
from lmm.data.prefetch import Prefetcher
from lmm.dist import resolve_compile
from lmm.losses.perceptual import pyramid_distance
from lmm.models import build_model, student_objective, teacher_objective
from lmm.nets.pyramid import EfficientNetPyramid
from lmm.pairs import PairSource, make_pairs
from lmm.pipeline import teacher_sampler
from lmm.sampling import sample_lines
from lmm.teachers import build_teacher
from lmm.train import TrainSettings, _ema_update, train

CPU = torch.device("cpu")
MLP = {"kind": "mlp", "width": 32, "depth": 2}


def test_run_compile_is_true_false_or_auto_and_auto_means_cuda():
    assert load_config(None)["run"]["compile"] == "auto"
    assert load_config(None, ["run.compile=true"])["run"]["compile"] is True
    with pytest.raises(ConfigError, match="'run.compile' expects true, false or \"auto\""):
        load_config(None, ["run.compile=1"])
    assert not resolve_compile("auto", CPU) and resolve_compile("auto", torch.device("cuda"))
    assert resolve_compile(True, CPU) and not resolve_compile(False, torch.device("cuda"))
    with pytest.raises(ValueError, match="run.compile"):
        resolve_compile("yes", CPU)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_training_and_sampling_agree_with_eager(tmp_path):
    """run.compile=true on the CPU, at tiny size since inductor takes tens of seconds per graph here: a 2-layer MLP
    line student on toy 2-D pairs trains 200 L2 steps to the eager loss curve within 1% and logs the first step's
    seconds apart from its rate; its samples at a short last batch (padded to the batch size) and the teacher's
    pair sampler's match eager ones, without a graph compiled for the short batch."""
    scfg = {**defaults()["student"], "net": MLP, "time_sampling": "uniform", "precond": "lines"}
    objective = student_objective(scfg, None)
    gen = torch.Generator().manual_seed(0)
    source = TensorSource({"z": torch.randn(256, 2, generator=gen), "x1": torch.randn(256, 2, generator=gen)}, seed=0)
    curves, emas = {}, {}
    for compiled in (False, True):
        settings = TrainSettings(steps=200, batch_size=16, lr=1e-3, ema_halflife=0, warmup_steps=0, grad_clip=1.0,
                                 bf16=False, seed=0, ckpt_every=200, log_every=10, device="cpu", progress=False,
                                 compile=compiled)
        run = tmp_path / str(compiled)
        emas[compiled] = train(build_model(objective, MLP, (2,), 0, seed=0), objective, source, settings, run_dir=run,
                               meta={"test": 1})
        curves[compiled] = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r.get("compile") for r in curves[True]] == [True] + [None] * 19
    assert curves[True][0]["first_step_s"] > 0 and "first_step_s" not in curves[True][1]
    np.testing.assert_allclose([r["loss"] for r in curves[True]], [r["loss"] for r in curves[False]], rtol=0.01)

    z = torch.randn(5, 2, generator=gen)
    eager = sample_lines(emas[False], z, [0.0, 0.5], compile=False).x
    padded = sample_lines(emas[True], z, [0.0, 0.5], compile=True, batch_size=8).x
    graphs = _graphs()
    full = sample_lines(emas[True], torch.cat([z, z[:3]]), [0.0, 0.5], compile=True).x
    assert _graphs() == graphs and padded.shape == (5, 2)
    torch.testing.assert_close(padded, eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(full[:5], eager, atol=1e-5, rtol=1e-4)

    tcfg = {**defaults()["teacher"], "net": MLP}
    teacher = build_teacher("edm", build_model(teacher_objective(tcfg), MLP, (2,), 0, seed=1).eval())
    x1 = teacher_sampler(teacher, "euler", 3, bf16=False)(z, None)
    compiled_sampler = teacher_sampler(teacher, "euler", 3, bf16=False, compile=True, batch_size=8)
    compiled_sampler(torch.cat([z, z[:3]]), None)
    graphs = _graphs()
    torch.testing.assert_close(compiled_sampler(z, None), x1, atol=1e-4, rtol=1e-4)
    assert _graphs() == graphs


def test_ema_update_equals_averaged_models_bitwise():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ours = AveragedModel(model)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model[1].running_mean.add_(1.0)
        _ema_update(ours, model, 0.9, first=step == 0)
        theirs.update_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert int(ours.n_averaged) == 3


def test_prefetcher_serves_the_sources_batches_converted_from_uint8():
    images = np.random.default_rng(0).integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
    source = TensorSource({"x": images, "y": torch.arange(40)}, seed=3)
    assert source.raw_batch(0, 0, 1, 8)["x"].dtype == torch.uint8
    loader = Prefetcher(source, 1, 2, 8, CPU)
    for step, following in ((0, 1), (1, 2), (5, 6), (6, None)):
        got, want = loader.batch(step, following), source.batch(step, 1, 2, 8)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert got["x"].dtype == torch.float32
    loader.close()


def test_pair_source_reads_the_next_window_while_the_current_one_serves(tmp_path):
    make_pairs(tmp_path / "s", lambda z, y: -z, n_pairs=60, shard_size=10, data_shape=(2,), num_classes=0, seed=0,
               meta={"test": 1}, batch_size=10, progress=False)
    src = PairSource(tmp_path / "s", seed=1, window=2)
    first = src.batch(0, 0, 1, 4)
    upcoming, reading = src._next
    assert upcoming == src._window_shards(0, 1)
    reading.result()
    assert upcoming in src._buf_shards and src._buf_shards[src._current] == src._window_shards(0, 0)
    stream = [first["z"], *(src.batch(s, 0, 1, 4)["z"] for s in range(1, 40))]
    again = PairSource(tmp_path / "s", seed=1, window=2)
    for s in (39, 3, 17, 0, 18):
        assert torch.equal(again.batch(s, 0, 1, 4)["z"], stream[s])


def test_batched_pyramid_distance_equals_two_calls():
    """The GPU's one (2B, ...) pass of prediction and target through the perceptual pyramid gives the CPU's two
    passes' loss and gradient on the prediction, up to float rounding."""
    torch.manual_seed(0)
    pyramid = EfficientNetPyramid(32)
    target = torch.rand(3, 3, 32, 32) * 2 - 1
    grads, losses = [], []
    for batched in (False, True):
        pred = (target + 0.1 * torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))).requires_grad_()
        loss = pyramid_distance(pyramid, pred, target, batched=batched)
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append(pred.grad)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
