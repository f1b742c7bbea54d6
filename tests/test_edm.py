"""NVlabs EDM networks, preconditioners, `lmm convert edm` and EDM's sampler as a teacher.

EDM pickles are written here in their exact structure: every network module is a persistent object, pickled as
`torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = {type, version, module_src, class_name,
state = the module's __dict__ with `_init_args` () and `_init_kwargs` (its constructor's keyword arguments)},
the preconditioner's submodule is `model`, containers are plain torch modules, the top level is {"ema",
"loss_fn", "augment_pipe", "dataset_kwargs" (a dnnlib.util.EasyDict)}. Numpy scalars sit where EDM puts them
(np.sqrt(...) skip_scale and init weights), written with either spelling of numpy's scalar reconstructor.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import os
import pickle
import sys
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lmm.cli.main import main
from lmm.convert import EDMObject, read_edm_pickle
from lmm.models import load_model
from lmm.nets import build_net, edm
from lmm.nets.edm import PUBLISHED, DhariwalUNet, SongUNet
from lmm.nets.precond import EDMDenoiser, edm_coefficients
from lmm.teachers import EDMTeacher, sample_teacher

# Parameter counts of the published EDM networks, in millions (EDM paper, table of model capacities).
PUBLISHED_MPARAMS = {"cifar10-32x32-uncond": 55.73, "cifar10-32x32-cond": 55.73, "afhqv2-64x64-uncond": 61.80,
                     "imagenet-64x64-cond": 295.90}
# State-dict entries of the published layout: (key, shape) of the raw network (`model.` in the pickles).
PUBLISHED_KEYS = {
    "cifar10-32x32-uncond": [("map_noise", None), ("map_augment.weight", (128, 9)), ("map_layer0.weight", (512, 128)),
                             ("enc.32x32_conv.weight", (128, 3, 3, 3)), ("enc.32x32_block0.conv0.weight", (256, 128, 3, 3)),
                             ("enc.32x32_block0.skip.weight", (256, 128, 1, 1)), ("enc.16x16_down.skip.weight", (256, 256, 1, 1)),
                             ("enc.16x16_down.conv0.resample_filter", (1, 1, 2, 2)), ("enc.16x16_block0.qkv.weight", (768, 256, 1, 1)),
                             ("enc.8x8_block3.affine.weight", (256, 512)), ("dec.8x8_in0.proj.weight", (256, 256, 1, 1)),
                             ("dec.16x16_up.conv0.resample_filter", (1, 1, 2, 2)), ("dec.16x16_block4.norm2.weight", (256,)),
                             ("dec.32x32_block0.conv0.weight", (256, 512, 3, 3)), ("dec.32x32_aux_norm.weight", (256,)),
                             ("dec.32x32_aux_conv.weight", (3, 256, 3, 3))],
    "cifar10-32x32-cond": [("map_label.weight", (128, 10)), ("map_label.bias", (128,))],
    "afhqv2-64x64-uncond": [("enc.64x64_conv.weight", (128, 3, 3, 3)), ("enc.64x64_block3.conv1.weight", (128, 128, 3, 3)),
                            ("enc.16x16_block0.qkv.weight", (768, 256, 1, 1)), ("dec.64x64_aux_conv.weight", (3, 128, 3, 3))],
    "imagenet-64x64-cond": [("map_label.weight", (768, 1000)), ("map_layer0.weight", (768, 192)),
                            ("enc.64x64_conv.weight", (192, 3, 3, 3)), ("enc.32x32_block0.norm2.weight", (384,)),
                            ("enc.8x8_block2.qkv.weight", (2304, 768, 1, 1)), ("dec.8x8_in0.qkv.bias", (2304,)),
                            ("dec.64x64_block3.conv0.weight", (192, 384, 3, 3)), ("out_conv.weight", (3, 192, 3, 3))],
}
HEAVY = {"imagenet-64x64-cond"}
# Where numpy >= 2 and numpy 1.x pickle their scalar / array reconstructors from; NUMPY is this numpy's.
SPELLINGS = ("numpy._core.multiarray", "numpy.core.multiarray")
NUMPY = np.float64(0).__reduce__()[0].__module__
PRECOND_KEYS = ("img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max", "sigma_data",
                "beta_d", "beta_min", "M", "epsilon_t")
_INIT_KWARGS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _recording(init):
    signature = inspect.signature(init)

    @functools.wraps(init)
    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        _INIT_KWARGS[self] = copy.deepcopy({k: v for k, v in bound.items() if k != "self"})

    return record


@pytest.fixture(autouse=True)
def _record_init_kwargs(monkeypatch):
    """The layers of lmm.nets.edm record their constructor arguments, all as keywords (as EDM passes them), the way
    EDM's persistent_class records `_init_kwargs`; the test pickler writes them."""
    for cls in (edm.Linear, edm.Conv2d, edm.GroupNorm, edm.UNetBlock, edm.PositionalEmbedding, edm.FourierEmbedding):
        monkeypatch.setattr(cls, "__init__", _recording(cls.__init__))


def _edm_numpy(kwargs: dict) -> dict:
    """Recorded layer kwargs with EDM's numpy scalars: its np.sqrt values (skip_scale, init_attn's and
    DhariwalUNet's init weights and biases, map_label's weight) as np.float64; init_zero's 1e-5 stays a float."""
    def convert(key, value):
        if isinstance(value, dict):
            return {k: convert(k, v) for k, v in value.items()}
        numpy = key in ("skip_scale", "init_weight", "init_bias") and isinstance(value, float) and value != 1e-5
        return np.float64(value) if numpy else value

    return {k: convert(k, v) for k, v in kwargs.items()}


def _net_kwargs(kw: dict) -> dict:
    """The raw net's constructor kwargs as EDM's preconditioners pass them."""
    return dict(img_resolution=kw["img_resolution"], in_channels=kw["img_channels"], out_channels=kw["img_channels"],
                label_dim=kw.get("label_dim", 0), **{k: v for k, v in kw.items() if k not in (*PRECOND_KEYS, "model_type")})


def _numpy_stand_ins(monkeypatch, spelling: str) -> dict:
    """{} when this numpy writes `spelling` itself; else never-called stand-ins for `spelling`.scalar and
    ._reconstruct, registered in a fake module so that pickle writes their global names."""
    if spelling == NUMPY:
        return {}
    module = types.ModuleType(spelling)
    for name in ("scalar", "_reconstruct"):
        def stand_in(*args):
            raise AssertionError("never called: tests only write pickles")

        stand_in.__module__, stand_in.__qualname__ = spelling, name
        setattr(module, name, stand_in)
    monkeypatch.setitem(sys.modules, spelling, module)
    return {"scalar": module.scalar, "_reconstruct": module._reconstruct}


def _edm_modules(monkeypatch):
    """Fake `torch_utils.persistence` and `dnnlib.util` modules, so that pickle writes their global names."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called: tests only write pickles")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util = types.ModuleType("dnnlib.util")
    easy = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    util.EasyDict = easy
    for name, mod in {"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": persistence,
                      "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": util}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return _reconstruct_persistent_obj, easy


class _EDMPickler(pickle.Pickler):
    """Pickles lmm's EDM modules as EDM's persistent objects; `top_kwargs` are the preconditioner's init kwargs,
    `numpy` the stand-ins of `_numpy_stand_ins` (numpy's own reductions for the rest). Counts numpy scalars."""

    def __init__(self, f, reconstruct, top: nn.Module, top_name: str, top_kwargs: dict, numpy: dict):
        super().__init__(f, protocol=pickle.DEFAULT_PROTOCOL)
        self.reconstruct, self.top, self.top_name, self.top_kwargs = reconstruct, top, top_name, top_kwargs
        self.numpy, self.numpy_scalars = numpy, 0

    def reducer_override(self, obj):
        if isinstance(obj, (np.generic, np.ndarray)):
            self.numpy_scalars += isinstance(obj, np.generic)
            if not self.numpy:
                return NotImplemented
            fn, *rest = obj.__reduce__()
            return self.numpy[fn.__name__], *rest
        if not isinstance(obj, nn.Module) or isinstance(obj, (nn.ModuleDict, nn.ModuleList, nn.Sequential)):
            return NotImplemented
        state = dict(obj.__dict__)
        if obj is self.top:
            name, kwargs = self.top_name, self.top_kwargs
            state.update({k: v for k, v in kwargs.items() if k in PRECOND_KEYS}, _modules={"model": obj.net})
        elif obj is self.top.net:
            name, kwargs = type(obj).__name__, _net_kwargs(self.top_kwargs)
        else:
            name, kwargs = type(obj).__name__, _edm_numpy(_INIT_KWARGS[obj])
            if name == "UNetBlock":
                state["skip_scale"] = kwargs.get("skip_scale", 1)
        state.update(_init_args=(), _init_kwargs=kwargs)
        meta = dict(type="class", version=6, module_src="raise SystemExit('EDM source must never run')\n",
                    class_name=name, state=state)
        return self.reconstruct, (meta,)


def write_edm_pickle(path: Path, monkeypatch, net: nn.Module, precond: str, precond_kwargs: dict,
                     extra: dict | None = None, spelling: str = NUMPY) -> int:
    """Write an EDM pickle of `net` under `precond`; returns how many numpy scalars it holds."""
    reconstruct, easy = _edm_modules(monkeypatch)
    top = EDMDenoiser(net)
    data = {"ema": top, "loss_fn": None, "augment_pipe": None,
            "dataset_kwargs": easy(class_name="training.dataset.ImageFolderDataset", path="cifar10-32x32.zip"),
            **(extra or {})}
    with open(path, "wb") as f:
        pickler = _EDMPickler(f, reconstruct, top, precond, precond_kwargs, _numpy_stand_ins(monkeypatch, spelling))
        pickler.dump(data)
    return pickler.numpy_scalars


def _published(name: str, seed: int = 0) -> tuple[nn.Module, dict]:
    kind, cfg, shape, ncls = PUBLISHED[name]
    torch.manual_seed(seed)
    net = build_net({"kind": kind, **cfg}, shape, ncls)
    kwargs = dict(img_resolution=shape[1], img_channels=shape[0], label_dim=ncls, use_fp16=False, sigma_min=0,
                  sigma_max=float("inf"), sigma_data=0.5, model_type=type(net).__name__, **cfg)
    if kind == "songunet":
        kwargs.update(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                      channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                      channel_mult=cfg.get("channel_mult", [2, 2, 2]))
    else:
        kwargs.update(model_channels=192, channel_mult=[1, 2, 3, 4])
    return net, kwargs


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_networks_match_their_layout(name):
    net, _ = _published(name)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / 1e6 - PUBLISHED_MPARAMS[name]) < 0.01, n
    state = net.state_dict()
    for key, shape in PUBLISHED_KEYS[name]:
        if shape is None:
            assert not any(k.startswith(key) for k in state), key
        else:
            assert tuple(state[key].shape) == shape, key


def test_attention_width_that_does_not_split_into_heads_is_refused():
    with pytest.raises(ValueError, match="480 channels cannot be split into 7 heads of 64 channels"):
        build_net({"kind": "dhariwalunet", "model_channels": 160, "channel_mult": [1, 2, 3, 4]}, (3, 64, 64), 1000)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_convert_published_network_round_trip_and_sample(name, tmp_path, monkeypatch):
    net, kwargs = _published(name, seed=1)
    for p in net.parameters():  # EDM zero-initialises output layers: randomise all so the check means something
        p.data.normal_(0, 0.05)
    pkl = tmp_path / "network-snapshot.pkl"
    write_edm_pickle(pkl, monkeypatch, net, "EDMPrecond", kwargs)
    out = tmp_path / "teacher"
    assert main(["convert", "edm", str(pkl), str(out), "--trust-pickle"]) == 0
    teacher, meta = load_model(out)
    assert isinstance(teacher, EDMTeacher) and meta["source"]["class_name"] == "EDMPrecond"
    assert (meta["teacher"]["solver"], meta["teacher"]["steps"], meta["teacher"]["schedule"]) == ("heun", 18, "edm")
    got = teacher.model.net.state_dict()
    assert got.keys() == net.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())
    shape, ncls = PUBLISHED[name][2], PUBLISHED[name][3]
    z = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([ncls - 1]) if ncls else None
    if name in HEAVY:
        x = teacher.endpoint(80 * z, torch.tensor(80.0), y)
    else:
        x = sample_teacher(teacher, z, 2, "heun", y).x
    assert x.shape == (1, *shape) and torch.isfinite(x).all()


def _tiny_song(**kw) -> SongUNet:
    torch.manual_seed(0)
    net = SongUNet((3, 8, 8), 0, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                   dropout=0.0, **kw)
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net.eval()


TINY = dict(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_type="SongUNet", model_channels=8,
            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


@pytest.mark.parametrize("arch", [dict(), dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                                                resample_filter=[1, 3, 3, 1]),
                                  dict(encoder_type="skip", decoder_type="skip")])
def test_songunet_variants_convert(arch, tmp_path, monkeypatch):
    net = _tiny_song(**arch)
    pkl = tmp_path / "s.pkl"
    write_edm_pickle(pkl, monkeypatch, net, "EDMPrecond", {**TINY, **arch, "sigma_data": 0.5})
    assert main(["convert", "edm", str(pkl), str(tmp_path / "t"), "--trust-pickle"]) == 0
    teacher, _ = load_model(tmp_path / "t")
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 7.0])
    torch.testing.assert_close(teacher.model(x, sigma), EDMDenoiser(net)(x, sigma))


@pytest.mark.parametrize("precond, denoiser", [("VPPrecond", "vp"), ("VEPrecond", "ve")])
def test_vp_and_ve_preconditioners(precond, denoiser, tmp_path, monkeypatch):
    net = _tiny_song()
    pkl = tmp_path / "b.pkl"
    extra = dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5) if denoiser == "vp" else dict(sigma_min=0.02,
                                                                                                 sigma_max=100)
    write_edm_pickle(pkl, monkeypatch, net, precond, {**TINY, **extra})
    assert main(["convert", "edm", str(pkl), str(tmp_path / "t"), "--trust-pickle"]) == 0
    teacher, meta = load_model(tmp_path / "t")
    assert meta["objective_kwargs"]["denoiser"] == denoiser
    assert teacher.sigma_min == (0.002 if denoiser == "vp" else 0.02) and teacher.sigma_max == 80.0
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 20.0])
    s = sigma.reshape(-1, 1, 1, 1)
    if denoiser == "vp":  # EDM's VPPrecond: D = x - sigma F(x / sqrt(sigma^2 + 1), 999 t(sigma))
        t = ((0.1**2 + 2 * 19.9 * (1 + sigma**2).log()).sqrt() - 0.1) / 19.9
        want = x - s * net(x / (s**2 + 1).sqrt(), 999 * t)
    else:  # EDM's VEPrecond: D = x + sigma F(x, ln(sigma / 2))
        want = x + s * net(x, (0.5 * sigma).log())
    torch.testing.assert_close(teacher.model(x, sigma), want, atol=1e-5, rtol=1e-5)


def test_convert_refuses_without_flag_and_unknown_globals(tmp_path, monkeypatch, capsys):
    pkl = tmp_path / "s.pkl"
    write_edm_pickle(pkl, monkeypatch, _tiny_song(), "EDMPrecond", TINY)
    assert main(["convert", "edm", str(pkl), str(tmp_path / "t")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "t").exists()

    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    write_edm_pickle(pkl, monkeypatch, _tiny_song(), "EDMPrecond", TINY, extra={"augment_pipe": Evil()})
    assert main(["convert", "edm", str(pkl), str(tmp_path / "t"), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert f"{pkl}: refuses to load global '{os.mkdir.__module__}.mkdir'" in err
    assert not marker.exists() and not (tmp_path / "t").exists()


def test_convert_errors_name_the_file_and_write_nothing(tmp_path, monkeypatch, capsys):
    pkl = tmp_path / "s.pkl"
    write_edm_pickle(pkl, monkeypatch, _tiny_song(), "EDMPrecond", {**TINY, "model_channels": 16})
    out = tmp_path / "t"
    assert main(["convert", "edm", str(pkl), str(out), "--trust-pickle"]) == 2
    assert f"{pkl}: its weights do not match the songunet" in capsys.readouterr().err and not out.exists()

    write_edm_pickle(pkl, monkeypatch, _tiny_song(), "iDDPMPrecond", TINY)
    assert main(["convert", "edm", str(pkl), str(out), "--trust-pickle"]) == 2
    assert "'ema' is a iDDPMPrecond" in capsys.readouterr().err and not out.exists()

    write_edm_pickle(pkl, monkeypatch, _tiny_song(), "EDMPrecond", TINY)
    pkl.write_bytes(pkl.read_bytes()[: pkl.stat().st_size // 2])
    assert main(["convert", "edm", str(pkl), str(out), "--trust-pickle"]) == 2
    assert f"{pkl}: not a readable EDM pickle" in capsys.readouterr().err and not out.exists()

    torch.save({"ema": torch.zeros(1)}, pkl)
    with pytest.raises(ValueError, match="s.pkl"):
        read_edm_pickle(pkl)


def _edm_heun_reference(denoise, z: torch.Tensor, steps: int = 18, sigma_min: float = 0.002,
                        sigma_max: float = 80.0) -> torch.Tensor:
    """EDM's deterministic sampler (its paper's Algorithm 1, sigma(t) = t, s(t) = 1), written out in float64."""
    i = torch.arange(steps, dtype=torch.float64)
    t = (sigma_max ** (1 / 7) + i / (steps - 1) * (sigma_min ** (1 / 7) - sigma_max ** (1 / 7))) ** 7
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = z.double() * t[0]
    for k in range(steps):
        d = (x - denoise(x.float(), t[k]).double()) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if k < steps - 1:
            d2 = (x_next - denoise(x_next.float(), t[k + 1]).double()) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def test_edm_sampler_as_teacher_matches_edm_algorithm():
    """A converted-style teacher with EDM's defaults (Heun, 18 steps, 35 NFE) follows EDM's Algorithm 1."""
    torch.manual_seed(0)
    net = DhariwalUNet((3, 8, 8), 4, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
                       dropout=0.0).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    model = EDMDenoiser(net).eval()
    teacher = EDMTeacher(model)
    z, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 3, 1])
    with torch.no_grad():
        sol = sample_teacher(teacher, z, 18, "heun", y)
        want = _edm_heun_reference(lambda x, s: model(x, s.float(), y), z)
    assert sol.nfe == 35
    torch.testing.assert_close(sol.x.double(), want, atol=1e-4, rtol=0)


class _GaussianDenoiser(nn.Module):
    """The exact denoiser of N(mu, s^2 I): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), written as an EDM net."""

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x_in, noise_label, class_labels=None):
        sigma = (4 * noise_label).exp().reshape(-1, 1)
        c_skip, c_out, c_in, _ = (c.reshape(-1, 1) for c in edm_coefficients(sigma.flatten()))
        x = x_in / c_in
        d = self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)
        return (d - c_skip * x) / c_out


@pytest.mark.parametrize("method, steps", [("heun", 512), ("dpm++2m", 1024), ("dpm++3m", 256)])
def test_samplers_reproduce_the_gaussian_closed_form(method, steps):
    """x(0) = mu + (sigma_max z - mu) s / sqrt(s^2 + sigma_max^2), to 1e-4 with enough steps (float64)."""
    mu, s = 0.3, 0.5
    z = torch.randn(128, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    teacher = EDMTeacher(EDMDenoiser(_GaussianDenoiser(mu, s)))
    exact = mu + (80 * z - mu) * s / math.sqrt(s**2 + 80**2)
    x = sample_teacher(teacher, z, steps, method, schedule="edm").x
    assert (x - exact).abs().max() < 1e-4


def test_pairs_from_a_converted_teacher_folder(tmp_path, monkeypatch):
    """`lmm pairs --teacher FOLDER` records the sha256 of FOLDER/model.safetensors, so the student stage finds the
    teacher by file, folder or run folder alike."""
    from lmm.io import file_sha256
    from lmm.pairs import open_pairs
    from lmm.pipeline import store_teacher

    pkl = tmp_path / "s.pkl"
    write_edm_pickle(pkl, monkeypatch, _tiny_song(), "EDMPrecond", TINY)
    run = tmp_path / "run"
    assert main(["convert", "edm", str(pkl), str(run / "teacher"), "--trust-pickle"]) == 0
    assert main(["pairs", f"run.dir={run}", "run.progress=false", "run.bf16=false", "teacher.steps=2", "pairs.n=4",
                 "pairs.shard_size=4", "pairs.batch_size=4", f"--teacher={run / 'teacher'}"]) == 0
    manifest = open_pairs(run / "pairs").manifest
    weights = run / "teacher" / "model.safetensors"
    assert manifest["teacher"]["sha256"] == file_sha256(weights)
    assert store_teacher(manifest, run / "teacher", tmp_path) == weights == store_teacher(manifest, None, run)


def _vp_sigma(t: float, beta_d: float = 19.9, beta_min: float = 0.1) -> float:
    return math.sqrt(math.expm1(0.5 * beta_d * t**2 + beta_min * t))


def _edm_precond_reference(net: nn.Module, precond: str, kw: dict, y: torch.Tensor | None):
    """D(x; sigma) of EDM's EDMPrecond / VPPrecond / VEPrecond written from EDM's formulas on the raw net, in
    float32 as EDM evaluates it."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.float()
        if precond == "EDMPrecond":
            sd = float(kw["sigma_data"])
            c_skip, c_out = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt()
            c_in, c_noise = 1 / (sd**2 + s**2).sqrt(), s.log() / 4
        elif precond == "VPPrecond":
            bd, bmin, m = float(kw.get("beta_d", 19.9)), float(kw.get("beta_min", 0.1)), int(kw.get("M", 1000))
            c_skip, c_out, c_in = 1, -s, 1 / (s**2 + 1).sqrt()
            c_noise = (m - 1) * ((bmin**2 + 2 * bd * (1 + s**2).log()).sqrt() - bmin) / bd
        else:
            c_skip, c_out, c_in, c_noise = 1, s, 1, (0.5 * s).log()
        return c_skip * x + c_out * net(c_in * x, c_noise.expand(x.shape[0]), y)

    return denoise


# Tiny EDM nets (8x8 images) and preconditioners, with numpy scalars among the constructor arguments.
ARCHS = {
    "ddpmpp": dict(model_type="SongUNet", label_dim=0, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                   attn_resolutions=[4], embedding_type="positional", encoder_type="standard"),
    "ncsnpp": dict(model_type="SongUNet", label_dim=np.int64(2), model_channels=8, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], embedding_type="fourier", channel_mult_noise=2,
                   encoder_type="residual", resample_filter=[1, 3, 3, 1]),
    "adm": dict(model_type="DhariwalUNet", label_dim=4, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[4]),
}
PRECONDS = {"EDMPrecond": dict(sigma_data=np.float64(0.5), sigma_max=np.float32(np.inf)),
            "VPPrecond": dict(beta_d=np.float64(19.9), M=np.int64(1000)),
            "VEPrecond": dict(sigma_min=np.float64(0.02), sigma_max=np.int64(100))}
EDM_DEFAULTS = {"EDMPrecond": dict(sigma_min=0.0, sigma_max=math.inf), "VEPrecond": dict(sigma_min=0.02, sigma_max=100)}
EDM_KWARGS = dict(img_resolution=np.int64(8), img_channels=3, use_fp16=np.bool_(False), dropout=np.float64(0.13),
                  label_dropout=np.float32(0.25))


def _edm_net(kw: dict) -> nn.Module:
    """lmm's copy of the raw net EDM builds from preconditioner kwargs `kw`, every weight random."""
    cfg = {k: v.item() if isinstance(v, np.generic) else v for k, v in _net_kwargs(kw).items()}
    res, channels, ncls, _ = (cfg.pop(k) for k in ("img_resolution", "in_channels", "label_dim", "out_channels"))
    torch.manual_seed(0)
    net = (SongUNet if kw["model_type"] == "SongUNet" else DhariwalUNet)((channels, res, res), ncls, **cfg)
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net.eval()


def _records(obj):
    """Every record under an EDMObject, itself included."""
    yield obj
    for child in (obj.state.get("_modules") or {}).values():
        if isinstance(child, EDMObject):
            yield from _records(child)


def _leaves(value):
    if isinstance(value, (dict, list, tuple)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _leaves(v)
    else:
        yield value


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("precond", list(PRECONDS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_converted_teacher_pairs_follow_edms_sampler(arch, precond, spelling, tmp_path, monkeypatch):
    """An EDM pickle with numpy scalars in its states and constructor arguments converts, and `lmm pairs` with
    EDM's sampler (Heun, 18 steps, sigma clamped to the network's range) gives EDM's Algorithm 1 on the raw net."""
    from lmm.pairs import open_pairs

    kw = {**EDM_KWARGS, **ARCHS[arch], **PRECONDS[precond]}
    net = _edm_net(kw)
    pkl, run = tmp_path / "network-snapshot.pkl", tmp_path / "run"
    assert write_edm_pickle(pkl, monkeypatch, net, precond, kw, spelling=spelling) > 10
    other = SPELLINGS[1 - SPELLINGS.index(spelling)]
    assert spelling.encode() in pkl.read_bytes() and other.encode() not in pkl.read_bytes()
    records = [r for r in _records(read_edm_pickle(pkl)["ema"]) if "_init_kwargs" in r.state]
    assert len(records) == 2 + sum(1 for m in net.modules() if m in _INIT_KWARGS)
    leaves = list(_leaves([r.state["_init_kwargs"] for r in records]))
    assert {type(v) for v in leaves} <= {bool, int, float, str} and {type(v) for v in leaves} >= {bool, int, float}
    assert math.sqrt(0.2 if arch != "adm" else 1 / 3) in leaves
    skip_scale = {r.state["skip_scale"] for r in records if r.class_name == "UNetBlock"}
    assert skip_scale == {math.sqrt(0.5) if arch != "adm" else 1}

    assert main(["convert", "edm", str(pkl), str(run / "teacher"), "--trust-pickle"]) == 0
    if precond == "VPPrecond":  # EDM's generate.py clamps its sigma range to the network's
        lo, hi = _vp_sigma(1e-5), _vp_sigma(1.0)
    else:
        lo, hi = (float(kw.get(k, EDM_DEFAULTS[precond][k])) for k in ("sigma_min", "sigma_max"))
    sigma_min, sigma_max = max(0.002, lo), min(80.0, hi)
    _, meta = load_model(run / "teacher")
    assert (meta["teacher"]["sigma_min"], meta["teacher"]["sigma_max"]) == (sigma_min, sigma_max)
    assert main(["pairs", f"run.dir={run}", "run.progress=false", "run.bf16=false", "run.device=cpu",
                 "teacher.solver=heun", "teacher.steps=18", "teacher.schedule=edm", "pairs.n=3", "pairs.shard_size=3",
                 "pairs.batch_size=3", f"--teacher={run / 'teacher'}"]) == 0
    shard = open_pairs(run / "pairs").load_shard(0)
    with torch.no_grad():
        want = _edm_heun_reference(_edm_precond_reference(net, precond, kw, shard.get("y")), shard["z"],
                                   sigma_min=sigma_min, sigma_max=sigma_max)
    assert shard["x1"].dtype == torch.float32
    assert (want - sigma_max * shard["z"]).norm() / want.norm() > 0.05  # the net moves x1 well beyond 1e-5
    assert (shard["x1"].double() - want).norm() / want.norm() < 1e-5


class _Mkdir:
    """Creates `path` when unpickled: were it ever run, the marker shows it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("key, value, refused", [
    ("attn_resolutions", lambda marker: np.array([4, _Mkdir(marker)], dtype=object),
     "to load global '{}._reconstruct' (a numpy array; "),
    ("resample_filter", lambda marker: np.array([1.0, 1.0]), "to load global '{}._reconstruct' (a numpy array; "),
    ("embedding_type", lambda marker: np.str_("positional"), "numpy.dtype 'U10' ("),
], ids=["object-array", "float-array", "str-scalar"])
def test_convert_refuses_numpy_arrays_and_non_numeric_scalars(key, value, refused, spelling, tmp_path, monkeypatch,
                                                              capsys):
    pkl, out, marker = tmp_path / "s.pkl", tmp_path / "t", tmp_path / "executed"
    write_edm_pickle(pkl, monkeypatch, _tiny_song(), "EDMPrecond", {**TINY, key: value(marker)}, spelling=spelling)
    assert main(["convert", "edm", str(pkl), str(out), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmm: error: {pkl}: refuses {refused.format(spelling)}") and err.count("\n") == 1
    assert "only numeric numpy scalars are read from an EDM pickle" in err
    assert not out.exists() and not marker.exists()


def test_convert_refuses_a_plain_torch_module_as_ema(tmp_path, capsys):
    pkl, out = tmp_path / "plain.pkl", tmp_path / "t"
    pkl.write_bytes(pickle.dumps({"ema": nn.Linear(2, 2), "loss_fn": None}))
    assert main(["convert", "edm", str(pkl), str(out), "--trust-pickle"]) == 2
    err = capsys.readouterr().err
    assert err == (f"lmm: error: {pkl}: refuses to load global 'torch.nn.modules.linear.Linear' (a plain torch "
                   f"module; 'ema' must be an EDM persistent network (torch_utils.persistence))\n")
    assert not out.exists()


class _ScalarPickler(pickle.Pickler):
    """Pickles numpy scalars as numpy does, scalar(dtype, data), with (dtype, data) passed through `rewrite`."""

    def __init__(self, f, rewrite):
        super().__init__(f, protocol=pickle.DEFAULT_PROTOCOL)
        self.rewrite = rewrite

    def reducer_override(self, obj):
        if not isinstance(obj, np.generic):
            return NotImplemented
        fn, args = obj.__reduce__()
        return fn, self.rewrite(*args)


def _dump_scalar(path: Path, value: np.generic, rewrite=None) -> bytes:
    with open(path, "wb") as f:
        _ScalarPickler(f, rewrite or (lambda dtype, data: (dtype, data))).dump({"v": value})
    return path.read_bytes()


def _swap_byte_order(dtype: np.dtype, data: bytes) -> tuple[np.dtype, bytes]:
    swapped = dtype.newbyteorder()
    return swapped, np.frombuffer(data, dtype).astype(swapped).tobytes()


NUMERIC_SCALARS = [np.True_, np.False_, np.int8(-5), np.uint8(200), np.int16(-300), np.uint16(60000),
                   np.int32(-70000), np.uint32(4_000_000_000), np.int64(-2**40), np.uint64(2**64 - 1), np.float16(-1.5),
                   np.float32(0.1), np.float64(0.1), np.complex64(0.5 - 0.25j), np.complex128(0.1 + 2j)]


@pytest.mark.parametrize("value", NUMERIC_SCALARS, ids=lambda v: f"{v.dtype.str[1:]}={v}")
@pytest.mark.parametrize("byte_order", ["native", "swapped"])
def test_numeric_numpy_scalars_decode_to_python_values(value, byte_order, tmp_path):
    pkl = tmp_path / "v.pkl"
    data = _dump_scalar(pkl, value, _swap_byte_order if byte_order == "swapped" else None)
    assert pickle.loads(data)["v"] == value  # numpy reads these bytes as `value`
    got, want = read_edm_pickle(pkl)["v"], value.item()
    assert type(got) is type(want) and got == want


@pytest.mark.parametrize("value, rewrite, refused", [
    (np.str_("ab"), None, "refuses numpy.dtype 'U2' (only numeric numpy scalars are read from an EDM pickle)"),
    (np.bytes_(b"abc"), None, "refuses numpy.dtype 'S3' ("),
    (np.void(b"abcd"), None, "refuses numpy.dtype 'V4' ("),
    (np.datetime64("2020-01-01"), None, "refuses numpy.dtype 'M8' ("),
    (np.float64(0.5), lambda dtype, data: (np.dtype(object), data), "refuses numpy.dtype 'O8' ("),
    pytest.param(np.longdouble(1), None, "refuses numpy.dtype 'f16' (a long double",
                 marks=pytest.mark.skipif(np.dtype(np.longdouble).itemsize != 16, reason="long double is f8 here")),
    (np.float64(0.5), lambda dtype, data: (dtype, data[:3]), "a numpy scalar of dtype 'f8' takes 8 bytes, this one "
                                                            "has 3"),
], ids=["U2", "S3", "V4", "M8", "O8", "f16", "short"])
def test_other_numpy_scalars_are_refused(value, rewrite, refused, tmp_path):
    pkl = tmp_path / "v.pkl"
    _dump_scalar(pkl, value, rewrite)
    with pytest.raises(ValueError) as err:
        read_edm_pickle(pkl)
    assert str(err.value).startswith(f"{pkl}: {refused}") and "\n" not in str(err.value)
