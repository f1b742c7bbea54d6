"""Diffusers teachers (lmm.teachers.diffusers): folder layouts, the scheduler's own sampling loops reproduced by lmm's
solvers, `lmm pairs` / `lmm sample` / `lmm eval` on a diffusers folder, and the loader's errors."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.cli.main import main
from lmm.io import file_sha256, path_sha256
from lmm.models import load_model
from lmm.pairs import open_pairs
from lmm.pipeline import store_teacher
from lmm.teachers.base import sample_teacher
from lmm.teachers.diffusers import DiffusersTeacher

SHAPE = (3, 8, 8)
# (layout, prediction_type, timestep_spacing, steps_offset): spacings where DDIM steps from one of its timesteps to
# the next (module docstring of lmm.teachers.diffusers)
CASES = [("pipeline", "epsilon", "leading", 1), ("bare", "v_prediction", "trailing", 0),
         ("bare_scheduler_dir", "sample", "leading", 0)]


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unet(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=SHAPE[1], in_channels=SHAPE[0], out_channels=SHAPE[0], block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


def save_folder(diffusers, unet, path, layout="pipeline", prediction_type="epsilon", spacing="leading", offset=1):
    """A diffusers folder of `unet` and a DDPM (pipeline) or DDIM (bare) scheduler config, by save_pretrained."""
    kw = {"clip_sample": False, "prediction_type": prediction_type, "timestep_spacing": spacing, "steps_offset": offset}
    if layout == "pipeline":
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**kw)).save_pretrained(path)
    else:
        unet.save_pretrained(path)
        diffusers.DDIMScheduler(**kw).save_pretrained(path / "scheduler" if layout == "bare_scheduler_dir" else path)
    return path


@pytest.fixture(scope="module")
def folders(diffusers, unet, tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return {case: save_folder(diffusers, unet, root / case[0], *case) for case in CASES}


@pytest.fixture(scope="module")
def pipeline_folder(folders):
    return folders[CASES[0]]


def noise(n=3):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(1))


def start(scheduler, timestep, sigma: float, z):
    """diffusers' initial sample at `timestep` for the teacher's sigma * z: sqrt(abar) sigma z."""
    return scheduler.alphas_cumprod[timestep].sqrt() * sigma * z


def close(ours, theirs) -> bool:
    """Max abs difference < 1e-4, relative to the scale of the output where a random epsilon net makes it large."""
    return bool((ours - theirs).abs().max() < 1e-4 * max(1.0, float(theirs.abs().max())))


@torch.no_grad()
def run_loop(scheduler, unet, x, **step_kw):
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loader_reads_both_layouts(folders, case):
    teacher, meta = load_model(folders[case])
    assert isinstance(teacher, DiffusersTeacher) and not teacher.training
    assert meta["role"] == "teacher" and meta["format"] == "diffusers" and meta["num_classes"] == 0
    assert meta["data_shape"] == list(SHAPE) and teacher.model.data_shape == SHAPE
    assert meta["teacher"]["kind"] == "edm" and meta["teacher"]["prediction_type"] == case[1]
    assert meta["teacher"]["schedule"] == "trimmed" and meta["config"]["teacher"]["sigma_data"] == 0.5
    sigmas = teacher.model.sigmas
    assert (teacher.sigma_min, teacher.sigma_max) == (float(sigmas[0]), float(sigmas[-1]))
    json.dumps(meta)


def test_timestep_is_exact_on_the_discrete_sigmas_and_interpolated_between(pipeline_folder):
    model = load_model(pipeline_folder)[0].model
    sigmas, total = model.sigmas, model.sigmas.numel()
    assert torch.equal(model.timestep(sigmas.float()), torch.arange(total, dtype=torch.float32))
    mid = (sigmas[:-1] * sigmas[1:]).sqrt().float()
    assert torch.allclose(model.timestep(mid), torch.arange(total - 1) + 0.5, atol=1e-3)
    assert model.timestep(torch.tensor([0.0, 1e9])).tolist() == [0.0, total - 1]


@pytest.mark.parametrize("steps", [2, 5])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_euler_on_the_scheduler_grid_is_ddim(diffusers, unet, folders, case, steps):
    teacher, _ = load_model(folders[case])
    ddim = diffusers.DDIMScheduler.from_config(teacher.scheduler.config)
    ddim.set_timesteps(steps)
    grid = teacher.grid(steps, "trimmed")
    sigmas = [float(s) for s in teacher.model.sigmas[ddim.timesteps]]
    assert grid.tolist() == [*sigmas, 0.0]
    z = noise()
    ours = sample_teacher(teacher, z, steps, "euler", schedule="trimmed")
    theirs = run_loop(ddim, unet, start(ddim, ddim.timesteps[0], sigmas[0], z), eta=0.0)
    assert ours.nfe == steps and close(ours.x, theirs)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' own, under numpy 2
@pytest.mark.parametrize("steps", [2, 5])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dpm_solver_2m_on_the_scheduler_grid_is_dpm_solver_multistep(diffusers, unet, folders, case, steps):
    teacher, _ = load_model(folders[case])
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(
        teacher.scheduler.config, solver_order=2, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    if case[2] == "trailing":
        dpm.set_timesteps(steps)
    else:
        dpm.set_timesteps(timesteps=teacher.timesteps(steps).tolist())
    assert dpm.timesteps.tolist() == teacher.timesteps(steps).tolist()
    z = noise()
    sigma = float(teacher.grid(steps, "trimmed")[0])
    ours = sample_teacher(teacher, z, steps, "dpm++2m", schedule="trimmed")
    theirs = run_loop(dpm, unet, start(dpm, dpm.timesteps[0], sigma, z))
    assert close(ours.x, theirs)


def test_edm_grid_and_other_solvers(pipeline_folder):
    teacher, _ = load_model(pipeline_folder)
    grid = teacher.grid(4, "edm")
    assert grid.tolist()[::3] == pytest.approx([teacher.sigma_max, teacher.sigma_min]) and grid[-1] == 0
    for method in ("heun", "dpm++2m"):
        sol = sample_teacher(teacher, noise(2), 4, method, schedule="edm")
        assert sol.x.shape == (2, *SHAPE) and torch.isfinite(sol.x).all()
    with pytest.raises(ValueError, match="exceed the scheduler's 1000 training timesteps"):
        teacher.grid(1001, "trimmed")


def test_path_sha256(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.bin").write_bytes(b"abc")
    (tmp_path / "d" / "sub" / "b.json").write_text("{}")
    assert path_sha256(tmp_path / "d" / "a.bin") == file_sha256(tmp_path / "d" / "a.bin")
    digest = path_sha256(tmp_path / "d")
    shutil.copytree(tmp_path / "d", tmp_path / "copy")
    assert path_sha256(tmp_path / "copy") == digest
    (tmp_path / "copy" / "sub" / "b.json").rename(tmp_path / "copy" / "sub" / "c.json")
    assert path_sha256(tmp_path / "copy") != digest
    (tmp_path / "d" / "a.bin").write_bytes(b"abd")
    assert path_sha256(tmp_path / "d") != digest


def test_cli_pairs_and_sample_on_a_diffusers_folder(pipeline_folder, tmp_path, capsys):
    run = tmp_path / "run"
    common = [f"run.dir={run}", "run.progress=false", "run.bf16=false", "teacher.steps=2", "pairs.n=6",
              "pairs.shard_size=4", "pairs.batch_size=4"]
    # pairs made on the CPU, as the check below is: the stored x1 equal the teacher's own to 1e-5 there (not on a
    # GPU, whose convolutions round differently)
    assert main(["pairs", *common, "run.device=cpu", f"--teacher={pipeline_folder}"]) == 0
    store = open_pairs(run / "pairs")
    m = store.manifest
    teacher, _ = load_model(pipeline_folder)
    assert m["teacher"]["sha256"] == path_sha256(pipeline_folder) and m["teacher"]["kind"] == "edm"
    assert m["teacher"]["config"]["source"] == "diffusers" and m["n_pairs"] == 6 and m["data_shape"] == list(SHAPE)
    assert m["solver"] == "dpm++2m" and m["nfe"] == 2 and m["grid"] == teacher.grid(2, "trimmed").tolist()
    for _, shard in store.iter_shards():
        x1 = sample_teacher(teacher, shard["z"], 2, "dpm++2m", schedule="trimmed").x
        assert torch.allclose(shard["x1"], x1, atol=1e-5)
    assert store_teacher(m, None, tmp_path / "elsewhere") == pipeline_folder
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", str(pipeline_folder), "--solver", "euler", "--steps", "3", "-n", "3",
                 "--out", str(out)]) == 0
    assert "NFE 3" in capsys.readouterr().out and out.is_file()
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / f"{i}.png")
    metrics = tmp_path / "m.json"
    assert main(["eval", *common, "data.name=image_folder", f"data.root={data}", "data.resolution=8",
                 "eval.features=pixel", "eval.n=16", "eval.batch_size=16", 'eval.teacher_solvers=["euler"]',
                 "--model", str(pipeline_folder), "--nfe", "2", "--out", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    assert result["settings"]["model_sha256"] == path_sha256(pipeline_folder) and len(result["results"]) == 1


def test_cli_refuses_a_folder_without_scheduler_config_and_writes_nothing(unet, tmp_path, capsys):
    folder = tmp_path / "unet_only"
    unet.save_pretrained(folder)
    run = tmp_path / "run"
    assert main(["pairs", f"run.dir={run}", "run.progress=false", f"--teacher={folder}"]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: no scheduler config" in err and "scheduler_config.json" in err
    assert not run.exists()


@pytest.mark.parametrize("edit, message", [
    ({"_class_name": "ScoreSdeVeScheduler"}, "scheduler 'ScoreSdeVeScheduler' is not supported"),
    ({"prediction_type": "flow_prediction"}, "prediction_type 'flow_prediction' is not supported"),
])
def test_unknown_scheduler_or_prediction_type(diffusers, unet, tmp_path, edit, message):
    folder = save_folder(diffusers, unet, tmp_path / "f")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        load_model(folder)


def test_missing_unet_weights(diffusers, unet, tmp_path):
    folder = save_folder(diffusers, unet, tmp_path / "f")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match=f"{folder / 'unet'}: no UNet weights .*diffusion_pytorch_model.safetensors"):
        load_model(folder)


def fake_folder(tmp_path, **unet_config):
    """A bare folder with the files the loader checks before importing diffusers (the weights are not read)."""
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8, **unet_config}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    return folder


def test_without_diffusers_installed(tmp_path, monkeypatch):
    folder = fake_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ValueError, match=rf"{folder} is a diffusers model.*pip install 'lmm\[diffusers\]'"):
        load_model(folder)


def test_class_conditional_unet_is_refused(tmp_path):
    folder = fake_folder(tmp_path, num_class_embeds=10)
    with pytest.raises(ValueError, match="config.json: class-conditional UNet2DModels are not supported"):
        load_model(folder)
