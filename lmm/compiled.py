"""run.compile: torch.compile of the networks that the pair sampler, the training step and the student's sampler run.

A network is compiled in place (nn.Module.compile: the module, its parameters and its state_dict keys stay as
they are) for static shapes, so callers run it at one batch size: a shorter last batch is padded with zero rows
to the batch size and the padding dropped (`pad_rows`) instead of compiling another graph. On/off is
lmm.dist.resolve_compile (run.compile "auto": on for CUDA).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def network(model: nn.Module) -> nn.Module:
    """The raw network F(x, noise_label, class_labels) that a preconditioned model (lmm.nets.precond) calls,
    `model.net`; any other module itself."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) else model


def compile_network(model: nn.Module) -> nn.Module:
    """Compile network(model) in place for static shapes, unless it already is; returns that network."""
    net = network(model)
    if net._compiled_call_impl is None:
        net.compile(dynamic=False)
    return net


def pad_rows(x: Tensor | None, n: int) -> Tensor | None:
    """x (b, ...) with n - b zero rows appended, (n, ...); a tensor of n rows or more, or None, as it is."""
    if x is None or x.shape[0] >= n:
        return x
    return torch.cat([x, x.new_zeros((n - x.shape[0], *x.shape[1:]))])
