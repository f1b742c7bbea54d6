"""Trajectory straightness (Liu et al., rectified flow), temporal consistency and spread of endpoint predictions."""

from __future__ import annotations

import torch
from torch import Tensor


def straightness(trajectory: list[Tensor], times: Tensor) -> float:
    """Discretised straightness S of a sampled trajectory; 0 for a straight line at constant speed.

    trajectory: K+1 states X_0..X_K, each (B, ...); times: (K+1,) monotone times of the states,
    in any time variable (flow t, EDM sigma, ...). With tau = (t - t_0) / (t_K - t_0) in [0, 1],
    u_k = (X_{k+1} - X_k) / (tau_{k+1} - tau_k) and
    S = mean_batch sum_k (tau_{k+1} - tau_k) * mean_dims ((X_K - X_0) - u_k)^2,
    the Riemann sum of E int_0^1 ||(X_1 - X_0) - v(X_t, t)||^2 dt (per dimension).
    """
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if len(trajectory) < 2 or times.numel() != len(trajectory):
        raise ValueError(f"straightness: need K+1 >= 2 states and as many times, got {len(trajectory)} states "
                         f"and {times.numel()} times")
    span = times[-1] - times[0]
    if span == 0:
        raise ValueError("straightness: times[0] == times[-1]")
    tau = ((times - times[0]) / span).tolist()
    if any(b <= a for a, b in zip(tau[:-1], tau[1:])):
        raise ValueError("straightness: times must be strictly monotone")
    x0 = trajectory[0].detach().double()
    chord = trajectory[-1].detach().double() - x0
    total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for k in range(len(trajectory) - 1):
        dtau = tau[k + 1] - tau[k]
        u = (trajectory[k + 1].detach().double() - trajectory[k].detach().double()) / dtau
        total += dtau * (chord - u).flatten(1).pow(2).mean(1)
    return total.mean().item()


def endpoint_consistency(endpoints: list[Tensor], times: Tensor) -> dict[str, float]:
    """How much the endpoint prediction moves along one trajectory (0 for both when it stays put).

    endpoints: K >= 2 predictions N_0..N_{K-1} of the data endpoint, each (B, ...), made at the strictly
    increasing times t_0..t_{K-1} of ``times`` (K,). Returns
    ``endpoint_drift`` = mean_batch sum_k mean_dims (N_{k+1} - N_k)^2 / (t_{k+1} - t_k), the Riemann sum of
    E int ||dN/dt||^2 dt (per dimension), and ``endpoint_to_final`` = mean over k < K-1 of the batch mean
    of the RMS (over dims) distance of N_k to the last prediction N_{K-1}.
    """
    times = torch.as_tensor(times, dtype=torch.float64).flatten()
    if len(endpoints) < 2 or times.numel() != len(endpoints):
        raise ValueError(f"endpoint_consistency: need K >= 2 predictions and as many times, got {len(endpoints)} "
                         f"predictions and {times.numel()} times")
    ts = times.tolist()
    if any(b <= a for a, b in zip(ts[:-1], ts[1:])):
        raise ValueError(f"endpoint_consistency: times must be strictly increasing, got {ts}")
    preds = [x.detach().double().flatten(1) for x in endpoints]
    final = preds[-1]
    drift = torch.zeros(final.shape[0], dtype=torch.float64, device=final.device)
    for k in range(len(preds) - 1):
        drift += (preds[k + 1] - preds[k]).pow(2).mean(1) / (ts[k + 1] - ts[k])
    to_final = [(x - final).pow(2).mean(1).sqrt().mean().item() for x in preds[:-1]]
    return {"endpoint_drift": drift.mean().item(), "endpoint_to_final": sum(to_final) / len(to_final)}


def endpoint_spread(endpoints: list[Tensor], data_mean: Tensor) -> dict[str, list[float]]:
    """How endpoint predictions collapse toward the data mean, per step.

    endpoints: per-step predictions of the data endpoint, each (B, ...); data_mean: (...) or
    (1, ...). Returns ``dist_to_mean``: batch mean of the RMS (over dims) distance to the data
    mean, and ``pixel_std``: std across the batch of each element, averaged over elements.
    Both are per element, so they compare across resolutions; near t = 0 a posterior-mean
    predictor gives both ~0 (collapse), a lines model keeps them at the data's level.
    """
    mean = data_mean.detach().double()
    dist, std = [], []
    for x in endpoints:
        x = x.detach().double()
        if x.shape[0] < 2:
            raise ValueError(f"endpoint_spread: need a batch of >= 2, got shape {tuple(x.shape)}")
        m = mean.to(x.device).expand_as(x)
        dist.append((x - m).flatten(1).pow(2).mean(1).sqrt().mean().item())
        std.append(x.std(dim=0).mean().item())
    return {"dist_to_mean": dist, "pixel_std": std}
