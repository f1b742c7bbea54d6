"""DDP under torchrun (2 CPU ranks, gloo) trains like one process with twice the per-rank batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from lmm import dist

SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch
    from torch import nn

    from lmm import dist
    from lmm.train import TrainSettings, as_objective, train

    D = 3


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, D))

        def forward(self, x):
            return self.net(x)


    def objective(model, batch, step):
        return ((model(batch["x"]) - batch["y"]) ** 2).mean(dim=1)


    class Source:
        def batch(self, step, rank, world, batch_size):
            g = torch.Generator().manual_seed(1000 + step)
            x = torch.randn(batch_size * world, D, generator=g)
            y = torch.sin(2 * x).flip(1)
            part = slice(rank * batch_size, (rank + 1) * batch_size)
            return {"x": x[part], "y": y[part]}


    def fit(run_dir, steps, batch_size, init_seed):
        torch.manual_seed(init_seed)
        model = Net()
        settings = TrainSettings(steps=steps, batch_size=batch_size, lr=2e-2, ema_halflife=40.0, ema_rampup=0.0,
                                 warmup_steps=2, grad_clip=0.5, bf16=False, seed=3, ckpt_every=3, log_every=1,
                                 device="cpu", progress=False, extend=True)
        ema = train(model, as_objective(objective), Source(), settings, run_dir=run_dir, meta={"test": "dist"})
        return model, ema


    out = Path(sys.argv[1])
    rank, world, local_rank, device = dist.init_distributed("auto")
    if world == 1:
        model, ema = fit(out / "single", 5, 8, 0)
    else:
        fit(out / "ddp", 3, 4, rank)
        model, ema = fit(out / "ddp", 5, 4, 100 + rank)
    gathered = dist.all_gather_tensor(torch.full((rank + 1, 2), float(rank)))
    mean = dist.all_reduce_mean(torch.tensor([float(rank), 2.0]))
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "gathered": gathered, "mean": mean,
                "info": [rank, world, local_rank, str(device), dist.is_main()]}, out / f"result-{world}-{rank}.pt")
    dist.barrier()
    dist.cleanup()
''')


def _run(args: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def test_two_ranks_equal_one_rank_with_double_batch(tmp_path: Path) -> None:
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(script), str(tmp_path)], tmp_path)
    _run([str(script), str(tmp_path)], tmp_path)
    single = torch.load(tmp_path / "result-1-0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"result-2-{r}.pt", weights_only=True) for r in range(2)]

    assert single["info"] == [0, 1, 0, "cpu", True]
    assert [r["info"] for r in ranks] == [[0, 2, 0, "cpu", True], [1, 2, 1, "cpu", False]]
    assert torch.equal(ranks[0]["gathered"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
    assert torch.equal(ranks[1]["gathered"], ranks[0]["gathered"])
    assert torch.equal(ranks[0]["mean"], torch.tensor([0.5, 2.0]))
    assert torch.equal(single["gathered"], torch.zeros(1, 2))

    for key in ("model", "ema"):
        for name, ref in single[key].items():
            for r in ranks:
                assert torch.allclose(r[key][name], ref, atol=1e-5), (key, name)
    moved = single["model"]["net.0.weight"] - single["ema"]["net.0.weight"]
    assert moved.abs().max() > 1e-3

    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(log) == 5
    assert [p.name for p in sorted((tmp_path / "ddp" / "checkpoints").iterdir())] == ["step-00000003", "step-00000005"]
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


def test_single_process_helpers_are_noops() -> None:
    info = dist.init_distributed("cpu")
    assert tuple(info) == (0, 1, 0, torch.device("cpu"))
    assert dist.is_main() and dist.world_size() == 1
    t = torch.arange(3.0)
    assert dist.all_gather_tensor(t) is t
    mean = dist.all_reduce_mean(t)
    assert torch.equal(mean, t) and mean.data_ptr() != t.data_ptr()
    assert dist.resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dist.barrier()
    dist.cleanup()


def test_sample_and_eval_under_torchrun_equal_one_process(tmp_path: Path) -> None:
    """On the CPU (gloo), whatever GPUs the machine has."""
    run = tmp_path / "run"
    common = [f"run.dir={run}", "run.device=cpu", "teacher.net.channels=8", "run.progress=false", "teacher.train.steps=3",
              "teacher.train.batch_size=16", "teacher.steps=2", "eval.n=300", "eval.batch_size=64", "data.n=200"]
    lmm = ["-m", "lmm.cli.main"]
    _run([*lmm, "teacher", "train", *common], tmp_path)
    model = str(run / "teacher")
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "lmm.cli.main"]
    for launcher, tag in ((lmm, "one"), (torchrun, "two")):
        _run([*launcher, "sample", "--model", model, "--device", "cpu", "--solver", "euler", "--steps", "2", "-n", "150",
              "--batch-size", "32", "--out", str(tmp_path / f"{tag}.npz")], tmp_path)
        _run([*launcher, "eval", *common, "--model", model, "--nfe", "1,2", "--samples", str(tmp_path / "one.npz"),
              "--ref-cache", str(tmp_path / f"ref-{tag}.npz"), "--out", str(tmp_path / f"{tag}.json")], tmp_path)
    one, two = (np.load(tmp_path / f"{tag}.npz")["images"] for tag in ("one", "two"))
    assert one.shape == (150, 8, 8, 1) and np.array_equal(one, two)
    rows = [json.loads((tmp_path / f"{tag}.json").read_text())["results"] for tag in ("one", "two")]
    assert [r["label"] for r in rows[0]] == [r["label"] for r in rows[1]] and len(rows[0]) == 3
    for a, b in zip(*rows):
        for key in ("fd_pixel", "precision", "recall"):
            assert abs(a[key] - b[key]) <= 1e-9 * max(1.0, abs(a[key])), (a["label"], key)
    refs = [np.load(tmp_path / f"ref-{tag}.npz") for tag in ("one", "two")]
    assert (tmp_path / "two.svg").read_text().startswith("<svg")
    assert int(refs[1]["n"]) == 200 and np.allclose(refs[0]["sigma"], refs[1]["sigma"], rtol=0, atol=1e-12)


def _one_gpu(monkeypatch) -> None:
    """A machine with one GPU as far as device selection can tell (no CUDA call is made before it refuses)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_device_selection_refuses_gpus_the_machine_lacks(monkeypatch) -> None:
    _one_gpu(monkeypatch)
    assert dist.resolve_device("cuda") == dist.resolve_device("auto") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"run.device \(--device\) = cuda:1, but this machine has 1 GPU\(s\) \(cuda:0\)"):
        dist.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="torchrun started 2 processes on this node but it has 1 GPU.*"
                                         "--nproc_per_node=1, or run.device=cpu"):
        dist.resolve_device("auto", local_rank=1, local_world=2)
    assert dist.resolve_device("cpu", local_rank=1, local_world=2) == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        dist.resolve_device("gpu")


@pytest.mark.parametrize("device, ranks", [("cuda:1", {}), ("auto", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                                                      "LOCAL_WORLD_SIZE": "2"})])
def test_missing_gpu_is_one_line_exit_2_and_nothing_written(device, ranks, tmp_path, monkeypatch, capsys) -> None:
    from lmm.cli.main import main

    _one_gpu(monkeypatch)
    for key, value in ranks.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    for argv in (["teacher", "train"], ["pairs"], ["train"], ["demo"]):
        assert main([*argv, f"run.dir={run}", f"run.device={device}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lmm: error: ") and "GPU" in err, err
        assert not run.exists()
    assert main(["sample", "--model", str(tmp_path / "m"), "--device", device, "--out", str(tmp_path / "s.npz")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "s.npz").exists()
