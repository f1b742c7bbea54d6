"""torchrun / DDP helpers; every function is a no-op in a single process launched without torchrun."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist


class DistInfo(NamedTuple):
    rank: int
    world: int
    local_rank: int
    device: torch.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str | torch.device, local_rank: int = 0, local_world: int = 1) -> torch.device:
    """'auto' -> cuda:local_rank if CUDA is available else cpu; 'cuda' -> cuda:local_rank; others as given.

    Raises ValueError (naming run.device) for a GPU this machine lacks, and when `local_world` processes on this
    node (torchrun's --nproc_per_node) would share fewer GPUs."""
    if isinstance(device, str) and device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"run.device (--device) = {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device '{device}' (--device or run.device) requested but CUDA is not available on "
                         "this machine; use cpu or auto")
    count = torch.cuda.device_count()
    if device.index is None:
        if local_world > count:
            raise ValueError(f"torchrun started {local_world} processes on this node but it has {count} GPU(s); "
                             f"use --nproc_per_node={count}, or run.device=cpu to run them on the CPU")
        device = torch.device("cuda", local_rank)
    elif device.index >= count:
        raise ValueError(f"run.device (--device) = {device}, but this machine has {count} GPU(s) "
                         f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def set_kernels(deterministic: bool) -> None:
    """run.deterministic: true makes GPU results repeat bitwise (cuDNN's deterministic algorithms without
    autotuning, torch.use_deterministic_algorithms with a warning naming any op that has no deterministic kernel,
    cuBLAS's fixed workspace, attention by the plain math kernel, and lmm's resizes and augmentations by matmuls:
    lmm.nets.resize); false lets cuDNN autotune its fastest kernels. TF32 stays off either way, so
    float32 runs compute in float32 (bf16 autocast, run.bf16, is the fast path). CPU results repeat either way."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.enable_flash_sdp(not deterministic)
    torch.backends.cuda.enable_mem_efficient_sdp(not deterministic)
    torch.backends.cuda.enable_cudnn_sdp(not deterministic)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str | torch.device = "auto", deterministic: bool | None = None,
                     timeout_s: float = 1800.0) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE and join the process group (nccl on
    CUDA, gloo on CPU); `deterministic` (run.deterministic; None leaves the kernel settings as they are) goes
    to `set_kernels`.

    Idempotent: later calls return the same ranks. Without those variables: rank 0 of a world of 1.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank, _env_int("LOCAL_WORLD_SIZE", 1))
    if deterministic is not None:
        set_kernels(deterministic)
    if is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, dev)
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, dev)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a CUDA GPU that supports it, or a CPU with AVX-512 BF16 or
    AMX (read from /proc/cpuinfo's flags where it exists, else torch's oneDNN check). On CPUs with only AVX2,
    bf16 autocast is emulated and much slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set()
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[1].split())
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _bool_or_auto(key: str, setting: bool | str, auto: Callable[[], bool]) -> bool:
    if setting == "auto":
        return auto()
    if not isinstance(setting, bool):
        raise ValueError(f"{key} must be true, false or \"auto\", got {setting!r}")
    return setting


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """run.bf16: true, false, or "auto" (= native_bf16(device))."""
    return _bool_or_auto("run.bf16", setting, lambda: native_bf16(device))


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """run.compile: true, false, or "auto" (= on for a CUDA device; off on the CPU, where compiling costs more time
    than it saves in short runs)."""
    return _bool_or_auto("run.compile", setting, lambda: device.type == "cuda")


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a floating tensor over ranks (a new tensor; the input is unchanged)."""
    out = t.detach().clone()
    if not is_initialized():
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_true(ok: bool) -> bool:
    """Whether `ok` holds on every process."""
    if not is_initialized():
        return ok
    return bool(all_reduce_min(torch.tensor([int(ok)], dtype=torch.int64)).item())


def broadcast_int(value: int, src: int = 0) -> int:
    """Process `src`'s `value` on every process."""
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    out = t.to(_comm_device(t))
    dist.broadcast(out, src)
    return int(out.item())


def once_per_node(check: Callable[[], None]) -> None:
    """Run `check` (which raises on a problem) on each node's first process (LOCAL_RANK 0) only: files that all
    processes of a node read are checked once. Every process raises when one check failed."""
    error: Exception | None = None
    if _env_int("LOCAL_RANK", 0) == 0:
        try:
            check()
        except (ValueError, OSError) as e:
            error = e
    if not all_true(error is None):
        raise error or ValueError("the check on this node's first process (LOCAL_RANK 0) failed; see its error")


def shard(n: int) -> range:
    """This rank's contiguous share of range(n), in rank order (all of it without torchrun)."""
    r, w = rank(), world_size()
    return range(n * r // w, n * (r + 1) // w)


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on t runs: the current CUDA device under NCCL (which cannot send CPU tensors)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum over ranks (a new tensor on t's device)."""
    if not is_initialized():
        return t.detach().clone()
    out = t.detach().to(_comm_device(t), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.to(t.device)


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's t along dim 0, in rank order; dim-0 sizes may differ between ranks.

    t: (N_r, ...) with equal trailing shape on every rank -> (sum_r N_r, ...).
    """
    if not is_initialized():
        return t
    world, home = dist.get_world_size(), t.device
    t = t.to(_comm_device(t))
    size = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(home)


def cleanup() -> None:
    """Leave the process group (call once, at the end of the program)."""
    if is_initialized():
        dist.destroy_process_group()
