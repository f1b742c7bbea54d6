"""Raw networks F(x, noise_label, class_labels) and ``build_net`` to make one from a config dict."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from lmm.nets.edm import DhariwalUNet, SongUNet
from lmm.nets.mlp import MLP
from lmm.nets.unet import UNet

NETS: dict[str, type[nn.Module]] = {"unet": UNet, "mlp": MLP, "songunet": SongUNet, "dhariwalunet": DhariwalUNet}


def net_keys(kind: str) -> list[str]:
    """Config keys accepted for a net kind (besides ``kind``)."""
    sig = inspect.signature(NETS[kind].__init__)
    return [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]


def build_net(cfg: dict[str, Any], data_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a raw network from ``cfg`` (``{"kind": "unet"|"mlp", ...}``) for data of ``data_shape``.

    Missing keys take the constructor defaults; unknown keys raise ValueError naming them.
    """
    kind = cfg.get("kind")
    if kind not in NETS:
        raise ValueError(f"net config: 'kind' must be one of {sorted(NETS)}, got {kind!r}")
    valid = net_keys(kind)
    unknown = sorted(set(cfg) - set(valid) - {"kind"})
    if unknown:
        raise ValueError(f"net config ({kind}): unknown key(s) {unknown}; valid keys: {['kind'] + valid}")
    kwargs = {k: v for k, v in cfg.items() if k != "kind"}
    return NETS[kind](tuple(data_shape), int(num_classes), **kwargs)


__all__ = ["DhariwalUNet", "MLP", "SongUNet", "UNet", "build_net", "net_keys", "NETS"]
