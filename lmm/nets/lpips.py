"""LPIPS (Zhang et al. 2018) without torchvision: AlexNet / VGG16 feature stacks with torchvision's parameter names,
and LPIPS's learned linear layers.

Weights it reads (never downloads):
- the backbone, torchvision's ImageNet file in torch's hub cache: `torch.hub.get_dir()/checkpoints/`
  `vgg16-397923af.pth` or `alexnet-owt-7be5be79.pth` (a plain state dict; only its `features.*` are used);
- the linear layers shipped in the `lpips` PyPI package, `lpips/weights/v0.1/{vgg,alex}.pth` (found without
  importing the package, which would import torchvision; `pip install lpips --no-deps` is enough).
Both are loaded with torch.load(weights_only=True); a missing file is an error naming the path expected.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from lmm.nets.resize import resize

BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
# (layer list of torchvision's `features`, the indices after which LPIPS taps the relu outputs)
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = {"vgg": (3, 8, 15, 22, 29), "alex": (1, 4, 7, 9, 11)}
CHANNELS = {"vgg": (64, 128, 256, 512, 512), "alex": (64, 192, 384, 256, 256)}
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _features(net: str) -> nn.Sequential:
    """torchvision's `features` stack of vgg16 or alexnet (same indices, so its state-dict keys load)."""
    if net == "alex":
        return nn.Sequential(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
                             nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU())
    layers: list[nn.Module] = []
    c = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = v
    return nn.Sequential(*layers)


def backbone_path(net: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def linear_weights_path(net: str) -> Path:
    """lpips/weights/v0.1/<net>.pth of the installed lpips package (not imported)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"LPIPS's linear layers (lpips/weights/v0.1/{net}.pth) need the lpips package: "
                                "pip install lpips --no-deps")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "weights" / "v0.1" / f"{net}.pth"
        if path.is_file():
            return path
    raise FileNotFoundError(f"the lpips package has no weights/v0.1/{net}.pth under "
                            f"{', '.join(spec.submodule_search_locations)}; reinstall it")


def _load(path: Path, what: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: expected {path} (torchvision's ImageNet weights; put the file "
                                f"there or set TORCH_HOME)")
    return torch.load(path, map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    """forward(a, b) -> (B,) LPIPS distance of images a, b (B, C, H, W) in [-1, 1] (C = 1 or 3), resized to at
    least `resolution` on their shorter side. Frozen; gradients flow to the inputs."""

    def __init__(self, net: str = "vgg", resolution: int = 64) -> None:
        super().__init__()
        if net not in BACKBONE_FILES:
            raise ValueError(f"LPIPS network must be one of {', '.join(BACKBONE_FILES)}, got {net!r}")
        self.net, self.resolution, self.taps = net, resolution, _TAPS[net]
        self.features = _features(net)[: self.taps[-1] + 1]
        backbone = _load(backbone_path(net), f"LPIPS {net} backbone")
        self.features.load_state_dict({k.removeprefix("features."): v for k, v in backbone.items()
                                       if k.startswith("features.") and int(k.split(".")[1]) <= self.taps[-1]})
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS[net])
        lin_path = linear_weights_path(net)
        lin = torch.load(lin_path, map_location="cpu", weights_only=True)
        try:
            for k, layer in enumerate(self.lins):
                layer.weight.data.copy_(lin[f"lin{k}.model.1.weight"])
        except (KeyError, RuntimeError) as e:
            raise ValueError(f"{lin_path}: not LPIPS {net} linear layers ({e})") from None
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if min(x.shape[-2:]) < self.resolution:
            x = resize(x, (self.resolution, self.resolution))
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        total = 0.0
        for lin, fa, fb in zip(self.lins, self._taps(a), self._taps(b)):
            na = fa / (fa.square().sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.square().sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((na - nb).square()).mean((1, 2, 3))
        return total
