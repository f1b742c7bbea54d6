"""The FID Inception-v3 converted from its TorchScript file: an eager copy with batch norms folded into the
convolutions (FoldedInception), and that copy exported to ONNX, cached, and run by ONNX Runtime.

The TorchScript file and its preprocessing are InceptionFeatures' (lmm.metrics.features), which checks both
conversions against the TorchScript network before using them.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmm.io import atomic_path

_BN_EPS = 1e-3


class _ConvReLU(nn.Module):
    """A TorchScript Conv2dLayer (conv, batch norm without scale, ReLU) with the batch norm folded into the conv."""

    def __init__(self, layer: torch.jit.ScriptModule) -> None:
        super().__init__()
        scale = torch.rsqrt(layer.var.double() + _BN_EPS)
        self.weight = nn.Parameter((layer.weight.double() * scale[:, None, None, None]).float(), requires_grad=False)
        self.bias = nn.Parameter((layer.beta.double() - layer.mean.double() * scale).float(), requires_grad=False)
        self.stride = _pair(layer.stride)
        self.padding = _pair(layer.padding)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding).relu_()


def _pair(v: int | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


_BRANCHES = {"InceptionA": ("conv", "tower", "tower_1", "tower_2"), "InceptionB": ("conv", "tower", "pool"),
             "InceptionC": ("conv", "tower", "tower_1", "tower_2"), "InceptionD": ("tower", "tower_1", "pool")}


class _Concat(nn.Module):
    """Inception blocks A-D: channel concatenation of parallel branches."""

    def __init__(self, block: torch.jit.ScriptModule, names: tuple[str, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_fold(getattr(block, n)) for n in names])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([b(x) for b in self.branches], 1)


class _InceptionE(nn.Module):
    """Inception block E with split 1x3 / 3x1 towers."""

    def __init__(self, block: torch.jit.ScriptModule) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, _fold(child))

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], 1)


def _pool(m: torch.jit.ScriptModule) -> nn.Module:
    """The nn.MaxPool2d / nn.AvgPool2d equal to a scripted pool, read from its call in ``m.code``
    (max: kernel, stride, padding, dilation, ceil_mode; avg: kernel, stride, padding, ceil_mode, count_include_pad)."""
    call = next((line for line in m.code.splitlines() if "(input," in line), None)
    if call is None:
        raise ValueError(f"InceptionFeatures: cannot read the pool parameters of {m.original_name}")
    args = ast.literal_eval("[" + call.split("(input,", 1)[1].rsplit(")", 1)[0] + "]")
    if m.original_name == "MaxPool2d":
        return nn.MaxPool2d(*args[:4], ceil_mode=args[4] if len(args) > 4 else False)
    return nn.AvgPool2d(*args[:5])


def _fold(m: torch.jit.ScriptModule) -> nn.Module:
    kind = m.original_name
    if kind == "Conv2dLayer":
        return _ConvReLU(m)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return _pool(m)
    if kind == "Sequential":
        return nn.Sequential(*[_fold(c) for _, c in m.named_children()])
    if kind in _BRANCHES:
        return _Concat(m, _BRANCHES[kind])
    if kind == "InceptionE":
        return _InceptionE(m)
    raise ValueError(f"InceptionFeatures: unknown module type '{kind}' in the TorchScript file; use impl='torchscript'")


class FoldedInception(nn.Module):
    """Eager copy of the TorchScript Inception with batch norms folded into conv biases (same weights)."""

    def __init__(self, ts: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.layers = _fold(ts.net.layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).flatten(1)


def onnx_path(file_hash: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the ONNX export of the TorchScript file with sha256 ``file_hash`` is cached: under ``cache_dir``,
    default ``$LMM_CACHE_DIR`` or ``~/.cache/lmm``."""
    folder = Path(cache_dir or os.environ.get("LMM_CACHE_DIR") or Path.home() / ".cache" / "lmm")
    return folder / f"inception-fid-{file_hash[:16]}.onnx"


def onnx_usable(onnx_file: Path) -> bool:
    """onnxruntime is installed, and the ONNX file exists or onnxscript (torch.onnx's exporter) is installed."""
    find = importlib.util.find_spec
    return find("onnxruntime") is not None and (onnx_file.is_file() or find("onnxscript") is not None)


def onnx_session(net: nn.Module, onnx_file: Path) -> Any:
    """ONNX Runtime session of ``net`` (input "x": (B, 3, 299, 299) float32), exported to ``onnx_file`` unless
    cached there."""
    import onnxruntime as ort

    if not onnx_file.is_file():
        onnx_file.parent.mkdir(parents=True, exist_ok=True)
        probe = torch.zeros(4, 3, 299, 299)
        log = logging.getLogger("torch.onnx")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            with atomic_path(onnx_file) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                batch = torch.export.Dim("batch", min=1, max=65536)
                torch.onnx.export(net, (probe,), str(tmp), input_names=["x"], output_names=["features"],
                                  dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False)
        finally:
            log.setLevel(level)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid files
        raise ValueError(f"{onnx_file}: ONNX Runtime cannot load it ({e}); delete the file to re-export") from e
    return session
