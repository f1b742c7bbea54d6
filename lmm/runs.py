"""The run's folder (run.dir) and records, and run.bf16 and run.compile on this machine.

RUN/config.json holds the config keys each finished stage used (record_config); RUN/timings.json the seconds
spent in each stage (Timer).
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Iterator

import torch

from lmm import dist
from lmm.io import save_json


def run_dir(cfg: dict) -> Path:
    """RUN: the folder of run.dir, where each stage writes its own subfolder."""
    return Path(cfg["run"]["dir"])


def use_bf16(cfg: dict, device: torch.device) -> bool:
    """run.bf16 resolved for `device` ("auto": on where the device computes bf16 natively)."""
    return dist.resolve_bf16(cfg["run"]["bf16"], device)


def use_compile(cfg: dict, device: torch.device) -> bool:
    """run.compile resolved for `device` ("auto": on for CUDA); see lmm.compiled."""
    return dist.resolve_compile(cfg["run"]["compile"], device)


# The config keys each stage's output depends on; record_config updates only these in RUN/config.json.
STAGE_KEYS = {
    "teacher": ["run", "data", "teacher"],
    "pairs": ["pairs", "teacher.solver", "teacher.steps", "teacher.schedule"],
    "student": ["student"],
    "eval": ["eval"],
}


def record_config(cfg: dict, stage: str) -> None:
    """Update RUN/config.json with the keys `stage` used (STAGE_KEYS), after it has succeeded, so that a refused
    or failed stage leaves the record as it was and the file always describes the models in the folder. The
    first stage to write it records the whole config."""
    if not dist.is_main():
        return
    path = run_dir(cfg) / "config.json"
    record = json.loads(path.read_text()) if path.is_file() else json.loads(json.dumps(cfg))
    keys = STAGE_KEYS[stage]
    if stage == "teacher":
        keys = ["run", "data", *(f"teacher.{k}" for k in cfg["teacher"] if f"teacher.{k}" not in STAGE_KEYS["pairs"])]
    for key in keys:
        *parents, last = key.split(".")
        src, dst = cfg, record
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[last] = src[last]
    save_json(path, record)


class Timer:
    """Wall-clock seconds per named stage in `timings` and a JSON file. Seconds add up over invocations, so a
    stage that was interrupted and resumed (or rerun and found finished) shows the total time spent in it."""

    def __init__(self, path: Path):
        self.path = path
        self.timings: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - start, 2)
        if dist.is_main():
            save_json(self.path, self.timings)
