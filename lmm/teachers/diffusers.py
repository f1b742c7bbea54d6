"""Diffusers teachers (extra `lmm[diffusers]`): a `UNet2DModel` saved with `save_pretrained`, with its scheduler
config, as an EDM teacher that every lmm solver runs.

Folders (`diffusers_paths`): a pipeline folder (`model_index.json`, `unet/` with `config.json` and
`diffusion_pytorch_model.safetensors` or `.bin`, `scheduler/scheduler_config.json`; google/ddpm-cifar10-32's
layout), or a bare UNet folder (its `config.json` and weights) with `scheduler_config.json` beside them, in
`scheduler/`, or in `../scheduler/` (the `unet/` folder of a pipeline). Only unconditional pixel-space UNet2DModels
with positional time embeddings, `in_channels == out_channels`, and pipelines of a UNet and a scheduler alone.

The ODE. The scheduler config's betas (beta_schedule, beta_start, beta_end, num_train_timesteps or trained_betas,
as diffusers' DDIMScheduler computes them) give alphas_cumprod abar_k, k = 0..T-1, and the noise levels
sigma_k = sqrt((1 - abar_k) / abar_k), increasing with k. The scheduler's sample is x_vp = sqrt(abar) x for the
EDM state x = x0 + sigma eps. `DiffusersDenoiser` is D(x; sigma): the UNet sees x / sqrt(1 + sigma^2) and the
timestep t(sigma), and its output `out` becomes the x0 prediction by the config's prediction_type:
epsilon: D = x - sigma out; sample: D = out; v_prediction: D = c^2 x - sigma c out with c = 1 / sqrt(1 + sigma^2).
t(sigma) interpolates k linearly in log sigma between the two neighbouring sigma_k (k-diffusion's DiscreteSchedule
without quantisation), clamped to [0, T-1]. At a discrete sigma_k (rounded to float32, as the solvers pass sigma)
it is exactly k, so on the scheduler's grid the UNet sees the integer timesteps diffusers gives it; between them
(Heun / midpoint / RK4 stages, the "edm" grid, line_endpoint) the right-hand side stays continuous in sigma.

`DiffusersTeacher` is an EDMTeacher on D: dx/dsigma = (x - D(x; sigma)) / sigma from grid[0] z down to sigma = 0,
with sigma_min = sigma_0, sigma_max = sigma_{T-1}, rho = 7. Its grids:
- grid(N, "trimmed"), the scheduler's: sigma at the timesteps of DDIMScheduler.set_timesteps(N) (the config's
  timestep_spacing and steps_offset), then 0. "euler" on it is DDIM with eta = 0 and "dpm++2m" is
  DPMSolverMultistepScheduler (solver_order 2, algorithm_type "dpmsolver++", final_sigmas_type "zero") on the same
  timesteps, step for step;
- grid(N, "edm"): EDMTeacher's rho = 7 schedule from sigma_{T-1} to sigma_0, then 0 (diffusers' use_karras_sigmas,
  with interpolated instead of rounded timesteps).

Where diffusers' loops differ from these ODE solvers:
- diffusers starts at timesteps[0] from unit noise n; the teacher from sigma z, sigma = grid[0]. The same trajectory
  is diffusers' from n = sqrt(abar) sigma z = sigma z / sqrt(1 + sigma^2) (abar at timesteps[0]); the end states
  are equal (abar = 1 at sigma = 0).
- DDIM steps from t to t - T // N: the next timestep for timestep_spacing "leading", and for "trailing" when N
  divides T; otherwise its loop is not an ODE solver on its own timesteps, and Euler differs from it.
- DDIM's clip_sample / thresholding clip x0 at every step; D is not clipped. set_alpha_to_one = False ends DDIM at
  sigma_0 instead of 0.

`load_diffusers_teacher` returns the teacher (eval mode, no grad) and a meta like an lmm teacher file's: kind "edm"
(the ODE's; "source": "diffusers"), sampler dpm++2m with 25 steps on the "trimmed" grid, data_shape (C, H, W),
num_classes 0, and `config.teacher` with sigma_min / sigma_max / rho / sigma_data 0.5 / denoiser "edm" for students
that take the teacher's parameterisation.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmm.nets.precond import batch_times, bcast
from lmm.teachers.edm import EDMTeacher

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Discrete-time schedulers whose config defines the variance-preserving process by its betas.
SCHEDULERS = (
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
)
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
           "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
SAMPLER = {"solver": "dpm++2m", "steps": 25, "schedule": "trimmed"}
INSTALL = "pip install 'lmm[diffusers]'"


class DiffusersDenoiser(nn.Module):
    """D(x; sigma) of a diffusers UNet2DModel `net` over the discrete sigmas of `alphas_cumprod` (module docstring);
    x (B, C, H, W), sigma scalar or (B,). `sigmas`: (T,) float64 on the CPU."""

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor, prediction_type: str) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        abar = alphas_cumprod.detach().to(torch.float64).cpu()
        self.net = net
        self.prediction_type = prediction_type
        self.sigmas = ((1 - abar) / abar).sqrt()
        self.register_buffer("log_sigmas", self.sigmas.float().double().log(), persistent=False)

    @property
    def data_shape(self) -> tuple[int, int, int]:
        size = self.net.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return int(self.net.config.in_channels), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return 0

    def timestep(self, sigma: Tensor) -> Tensor:
        """(B,) float32 timesteps of noise levels sigma (B,): k interpolated linearly in log sigma, in [0, T-1]."""
        log_sigma = sigma.to(self.log_sigmas).clamp_min(1e-30).log()
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, self.log_sigmas.numel() - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        return (low + ((log_sigma - lo) / (hi - lo)).clamp(0, 1)).float()

    def forward(self, x: Tensor, sigma: Tensor, y: Tensor | None = None) -> Tensor:
        if y is not None:
            raise ValueError("a diffusers teacher is unconditional; it takes no class labels")
        sigma = batch_times(sigma, x)
        s = bcast(sigma, x)
        c_in = (1 + s**2).rsqrt()
        out = self.net(c_in * x, self.timestep(sigma)).sample
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "sample":
            return out
        return c_in**2 * x - s * c_in * out


class DiffusersTeacher(EDMTeacher):
    """EDMTeacher on a DiffusersDenoiser whose "trimmed" grid is the scheduler's (module docstring).

    scheduler: the diffusers DDIMScheduler of the folder's scheduler config; its set_timesteps makes the grid.
    Registered as teacher kind "diffusers", loaded from folders, never trained; its model files and pair stores
    record the ODE's kind, "edm".
    """

    trainable = False

    @classmethod
    def owns_folder(cls, path: Path) -> bool:
        return is_diffusers_folder(path)

    @classmethod
    def load_folder(cls, path: Path, device: str | torch.device = "cpu") -> tuple[DiffusersTeacher, dict]:
        return load_diffusers_teacher(path, device)

    def __init__(self, model: DiffusersDenoiser, scheduler: Any) -> None:
        super().__init__(model, sigma_min=float(model.sigmas[0]), sigma_max=float(model.sigmas[-1]), rho=7.0)
        self.scheduler = scheduler

    def timesteps(self, steps: int) -> Tensor:
        """(steps,) int64 timesteps of DDIMScheduler.set_timesteps(steps), decreasing."""
        total = self.model.sigmas.numel()
        if steps > total:
            raise ValueError(f"teacher solver steps {steps} exceed the scheduler's {total} training timesteps")
        self.scheduler.set_timesteps(steps)
        return self.scheduler.timesteps.cpu().to(torch.int64)

    def grid(self, steps: int, schedule: str = "edm") -> Tensor:
        steps = self._check_grid_args(steps, schedule)
        if schedule == "edm":
            return super().grid(steps, schedule)
        return torch.cat([self.model.sigmas[self.timesteps(steps)], torch.zeros(1, dtype=torch.float64)])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether the folder holds a diffusers model: `model_index.json`, `unet/config.json`, or a `config.json`
    with a diffusers `_class_name`."""
    path = Path(path)
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return True
    config = path / "config.json"
    try:
        return config.is_file() and "_class_name" in json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        return False


def diffusers_paths(folder: str | Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler config file) of a diffusers folder (module docstring); ValueError naming the folder
    and the file when the UNet config, its weights or the scheduler config is missing, or the pipeline has other
    components."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file():
        others = [k for k, v in _read_json(index).items() if k not in ("unet", "scheduler") and isinstance(v, list)
                  and v and v[0] is not None]
        if others:
            raise ValueError(f"{index}: the pipeline has components {', '.join(others)} besides unet and scheduler; "
                             "only pixel-space unconditional pipelines (a UNet2DModel and a scheduler) are supported")
    unet = folder / "unet" if (folder / "unet" / "config.json").is_file() or index.is_file() else folder
    if not (unet / "config.json").is_file():
        raise ValueError(f"{folder}: no UNet config (missing {unet / 'config.json'})")
    if not any((unet / name).is_file() for name in WEIGHTS):
        raise ValueError(f"{unet}: no UNet weights (missing {WEIGHTS[0]} or {WEIGHTS[1]})")
    names = [folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json"]
    if unet == folder:
        names.append(folder.parent / "scheduler" / "scheduler_config.json")
    found = [p for p in names if p.is_file()]
    if not found:
        raise ValueError(f"{folder}: no scheduler config (missing {' or '.join(map(str, names))})")
    return unet, found[0]


def _import_diffusers(folder: Path) -> Any:
    try:
        import diffusers
    except ImportError:
        raise ValueError(f"{folder} is a diffusers model; loading it needs diffusers: {INSTALL}") from None
    return diffusers


def _ddim_scheduler(diffusers: Any, config: dict[str, Any], path: Path) -> Any:
    """The DDIMScheduler of a scheduler config (its other classes' keys dropped), with alphas_cumprod in (0, 1)."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(f"{path}: scheduler {name!r} is not supported; valid: {', '.join(SCHEDULERS)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{path}: prediction_type {prediction!r} is not supported; "
                         f"valid: {', '.join(PREDICTION_TYPES)}")
    cls = diffusers.DDIMScheduler
    keys = set(inspect.signature(cls.__init__).parameters) - {"self"}
    try:
        scheduler = cls(**{k: v for k, v in config.items() if k in keys})
    except (NotImplementedError, ValueError) as err:
        raise ValueError(f"{path}: unsupported scheduler config ({err})") from None
    abar = scheduler.alphas_cumprod.double()
    if abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
        raise ValueError(f"{path}: alphas_cumprod must decrease strictly inside (0, 1) (zero terminal SNR, "
                         "rescale_betas_zero_snr, is not supported)")
    return scheduler


def _check_unet(config: dict[str, Any], path: Path) -> None:
    if config.get("_class_name") != "UNet2DModel":
        raise ValueError(f"{path}: model {config.get('_class_name')!r} is not supported; only UNet2DModel")
    if config.get("num_class_embeds") is not None or config.get("class_embed_type") is not None:
        raise ValueError(f"{path}: class-conditional UNet2DModels are not supported")
    if config.get("time_embedding_type", "positional") != "positional":
        raise ValueError(f"{path}: time_embedding_type {config['time_embedding_type']!r} is not supported; "
                         "only 'positional'")
    if config.get("in_channels", 3) != config.get("out_channels", 3):
        raise ValueError(f"{path}: out_channels {config.get('out_channels', 3)} != in_channels "
                         f"{config.get('in_channels', 3)} (learned variances are not supported)")
    if config.get("sample_size") is None:
        raise ValueError(f"{path}: no sample_size, so the image size is unknown")


def load_diffusers_teacher(folder: str | Path, device: str | torch.device = "cpu") -> tuple[DiffusersTeacher, dict]:
    """(DiffusersTeacher on `device` in eval mode, meta) of a diffusers folder (module docstring). Raises ValueError
    naming the folder and file for a missing UNet config, weights or scheduler config, an unsupported model,
    scheduler or prediction type, weights that do not load, and when diffusers is not installed."""
    folder = Path(folder)
    unet_dir, scheduler_path = diffusers_paths(folder)
    unet_config, scheduler_config = _read_json(unet_dir / "config.json"), _read_json(scheduler_path)
    _check_unet(unet_config, unet_dir / "config.json")
    diffusers = _import_diffusers(folder)
    scheduler = _ddim_scheduler(diffusers, scheduler_config, scheduler_path)
    try:
        unet = diffusers.UNet2DModel.from_pretrained(
            unet_dir, low_cpu_mem_usage=diffusers.utils.is_accelerate_available()).float()
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{unet_dir}: cannot load the UNet ({err})") from None
    prediction = scheduler_config.get("prediction_type", "epsilon")
    teacher = DiffusersTeacher(DiffusersDenoiser(unet, scheduler.alphas_cumprod, prediction), scheduler)
    teacher.to(device).eval().requires_grad_(False)
    ode = {"sigma_min": teacher.sigma_min, "sigma_max": teacher.sigma_max, "rho": teacher.rho}
    source = {"source": "diffusers", "scheduler": scheduler_config["_class_name"], "prediction_type": prediction}
    meta = {
        "format": "diffusers",
        "role": "teacher",
        "path": str(folder),
        "data_shape": list(teacher.model.data_shape),
        "num_classes": 0,
        "net": unet_config,
        "teacher": {"kind": "edm", **SAMPLER, **ode, **source},
        "config": {"teacher": {"kind": "edm", **SAMPLER, **ode, "sigma_data": 0.5, "denoiser": "edm", **source,
                               "scheduler_config": scheduler_config}},
    }
    return teacher, meta


__all__ = [
    "PREDICTION_TYPES",
    "SCHEDULERS",
    "DiffusersDenoiser",
    "DiffusersTeacher",
    "diffusers_paths",
    "is_diffusers_folder",
    "load_diffusers_teacher",
]
