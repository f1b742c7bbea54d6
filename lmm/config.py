"""Run configuration: one nested dict per run, read from a TOML preset and `key.sub=value` overrides.

Every valid key and its default is in `defaults()`: the tables below plus each registered component's options
(lmm.registry: `student.<loss term>` and `student.<objective>` tables), with their choices and bounds; a preset or
an override that names any other key is an error that lists the valid ones. Tables named `net` and `loss` are replaced whole by a preset or by an
override of the whole table (`student.loss={l2=1.0,perceptual=0.5}`) and updated key by key by a dotted
override (`student.loss.perceptual=0.5`); their keys are checked by `lmm.nets.build_net` and `lmm.losses`.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import tomllib

# The embedded defaults are the digits demo preset, sized for about 10 minutes on 2 CPU cores.
_TRAIN = {
    "steps": 800,
    "batch_size": 128,
    "lr": 2e-3,
    "ema_halflife": 20_000.0,
    "ema_rampup": 0.25,
    "warmup_steps": 200,
    "grad_clip": 1.0,
    "ckpt_every": 300,
    "log_every": 50,
    "extend": False,
}
_UNET = {
    "kind": "unet",
    "channels": 32,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
    "embedding": "positional",
}

_BASE: dict[str, Any] = {
    "run": {
        "dir": "runs/demo",
        "seed": 0,
        "device": "auto",
        "bf16": "auto",
        "compile": "auto",
        "deterministic": False,
        "progress": True,
    },
    "data": {
        "name": "digits",
        "root": "",
        "split": "train",
        "toy": "moons",
        "n": 0,
        "resolution": 0,
        "channels": 0,
        "conditional": False,
    },
    "teacher": {
        "kind": "edm",
        "solver": "dpm++2m",
        "steps": 23,
        "schedule": "trimmed",
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "rho": 7.0,
        "sigma_data": 0.5,
        "denoiser": "edm",
        "P_mean": -1.2,
        "P_std": 1.2,
        "net": dict(_UNET),
        "train": dict(_TRAIN),
    },
    "pairs": {
        "n": 6144,
        "shard_size": 1024,
        "batch_size": 512,
        "dtype": "float32",
        "seed": 1,
        "repair": False,
    },
    "student": {
        "objective": "lines",
        "init": "teacher",
        "loss": {"l2": 1.0},
        "time_sampling": "grid",
        "grid": [0.0, 0.5],
        "weighting": "none",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "precond": "teacher",
        "sigma_data": 0.5,
        "window": 4,
        "net": dict(_UNET),
        "train": {**_TRAIN, "steps": 650},
    },
    "eval": {
        "features": "pixel",
        "split": "",
        "n": 1797,
        "batch_size": 600,
        "seed": 12345,
        "teacher_nfe": [1, 2, 4, 8],
        "teacher_solvers": ["euler", "heun", "dpm++2m"],
        "student_nfe": [1, 2],
    },
}

# Lower bounds of numeric keys (`*` matches teacher and student); lists of positive integers; choices.
_AT_LEAST: dict[str, float] = {
    "run.seed": 0, "data.n": 0, "data.resolution": 0, "data.channels": 0,
    "teacher.steps": 1, "teacher.sigma_min": 1e-12, "teacher.sigma_max": 1e-12, "teacher.rho": 1e-12,
    "teacher.sigma_data": 1e-12, "teacher.P_std": 0.0,
    "pairs.n": 1, "pairs.shard_size": 1, "pairs.batch_size": 1, "pairs.seed": 0,
    "student.sigma_data": 1e-12, "student.logit_std": 0.0, "student.window": 1,
    "*.train.steps": 0, "*.train.batch_size": 1, "*.train.lr": 0.0, "*.train.ema_halflife": 0.0,
    "*.train.ema_rampup": 0.0, "*.train.warmup_steps": 0, "*.train.grad_clip": 0.0, "*.train.ckpt_every": 1,
    "*.train.log_every": 1,
    "eval.n": 2, "eval.batch_size": 1, "eval.seed": 0,
}
_POSITIVE_LISTS = ("eval.teacher_nfe", "eval.student_nfe")
_CHOICES = {"eval.split": ("", "train", "test"), "data.split": ("train", "test")}


def _registries() -> list:
    from lmm.losses import LOSSES
    from lmm.nets.precond import DENOISERS
    from lmm.objectives import STUDENT_OBJECTIVES
    from lmm.teachers import TEACHERS

    return [LOSSES, STUDENT_OBJECTIVES, TEACHERS, DENOISERS]


def defaults() -> dict[str, Any]:
    """A fresh copy of every config key's default, registered components' options included."""
    out = copy.deepcopy(_BASE)
    for registry in _registries():
        if registry.options_at is not None:
            for name, table in registry.option_tables().items():
                out[registry.options_at][name] = table
    return out


def _rules() -> tuple[dict[str, tuple], dict[str, float]]:
    """({key: allowed values}, {key: lower bound}): lmm's own and those of the registered components."""
    from lmm.objectives.base import STUDENT_PRECONDS
    from lmm.objectives.lines import TIME_SAMPLINGS, WEIGHTINGS
    from lmm.solvers import METHODS
    from lmm.teachers.base import SCHEDULES

    choices = {**_CHOICES, "teacher.solver": METHODS, "teacher.schedule": SCHEDULES, "eval.teacher_solvers": METHODS,
               "eval.features": ("pixel", "proxy", "inception"), "student.precond": STUDENT_PRECONDS,
               "student.time_sampling": TIME_SAMPLINGS, "student.weighting": WEIGHTINGS}
    bounds = dict(_AT_LEAST)
    for registry in _registries():
        choices[registry.key] = tuple(registry)
        for key, rule in registry.option_rules().items():
            if "choices" in rule:
                choices[key] = tuple(rule["choices"])
            if "min" in rule:
                bounds[key] = rule["min"]
    return choices, bounds
REPLACED_WHOLE = {"net", "loss"}
BOOL_OR_AUTO = {"run.bf16", "run.compile"}


class ConfigError(ValueError):
    """A config file or override names an unknown key or has a value of the wrong type."""


def _merge(base: dict, update: dict, where: str, source: str, preset: bool, free: bool = False) -> None:
    """Update `base` in place. A preset replaces `net` tables whole; an override updates them (`free`: any key)."""
    for key, value in update.items():
        path = f"{where}.{key}" if where else key
        if free:
            base[key] = value
            continue
        if key not in base:
            valid = ", ".join(sorted(base))
            raise ConfigError(f"{source}: unknown key '{path}'; valid keys here: {valid}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{path}' must be a table, got {value!r}")
            if key in REPLACED_WHOLE and preset:
                base[key] = copy.deepcopy(value)
            else:
                _merge(base[key], value, path, source, preset, free=key in REPLACED_WHOLE)
        else:
            base[key] = _coerce(base[key], value, path, source)


def _coerce(default: Any, value: Any, path: str, source: str) -> Any:
    if path in BOOL_OR_AUTO:
        if not (isinstance(value, bool) or value == "auto"):
            raise ConfigError(f"{source}: '{path}' expects true, false or \"auto\", got {value!r}")
        return value
    if isinstance(default, bool) or default is None:
        ok = isinstance(value, bool) or default is None
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{source}: '{path}' expects {type(default).__name__}, got {value!r}")
    return value


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; value is read as a TOML value, else a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_preset(path: Path, _chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """The tables of preset `path` to merge in order, (source, table) pairs: the presets it extends first. A
    preset extends another with a top-level `base = "other.toml"` (relative to its own folder); its own keys then
    update the base's, `net` and `loss` tables replacing the base's whole."""
    if not path.is_file():
        via = f" (base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {path}{via}")
    if path.resolve() in _chain:
        raise ConfigError(f"{path}: 'base' chain loops: {' -> '.join(map(str, (*_chain, path.resolve())))}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    base = data.pop("base", None)
    if base is None:
        return [(str(path), data)]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' expects the file name of another preset, got {base!r}")
    return [*read_preset(path.parent / base, (*_chain, path.resolve())), (str(path), data)]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """defaults(), updated by the TOML file at `path` (if any) after the presets it extends (read_preset), then by
    each `key=value` override."""
    cfg = defaults()
    if path is not None:
        for source, data in read_preset(Path(path)):
            _merge(cfg, data, "", source, preset=True)
    for text in overrides:
        whole = text.split("=", 1)[0].strip().rsplit(".", 1)[-1] in REPLACED_WHOLE
        _merge(cfg, parse_override(text), "", f"override '{text}'", preset=whole)
    check_values(cfg)
    return cfg


def check_values(cfg: dict) -> None:
    """Raise ConfigError naming the key of any count, step, size or rate outside its range."""
    values = dict(flat_keys(cfg))
    choices, bounds = _rules()
    for key, value in values.items():
        pattern = key.replace("teacher.train.", "*.train.").replace("student.train.", "*.train.")
        low = bounds.get(key, bounds.get(pattern))
        if low is not None and value < low:
            bound = "a positive number" if 0 < low < 1e-6 else f">= {low:g}"
            raise ConfigError(f"'{key}' must be {bound}, got {value!r}")
        valid = choices.get(key)
        if valid is not None and not all(v in valid for v in (value if isinstance(value, list) else [value])):
            raise ConfigError(f"'{key}' must be {'a list of ' if isinstance(value, list) else ''}one of "
                              f"{', '.join(map(repr, valid))}, got {value!r}")
    from lmm.losses import check_loss
    from lmm.sampling import check_grid

    try:
        check_grid(cfg["student"]["grid"])
    except (ValueError, TypeError) as e:
        raise ConfigError(f"'student.grid': {e}") from None
    try:
        check_loss(cfg["student"]["loss"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_reads(cfg)
    for key in _POSITIVE_LISTS:
        value = values[key]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            raise ConfigError(f"'{key}' must be a list of positive integers, got {value!r}")


def _check_reads(cfg: dict) -> None:
    """Refuse settings that the chosen student objective (Objective.reads) or teacher kind (Teacher.reads) would
    silently ignore, unless they have their defaults. Loss-term option tables (`student.perceptual`, ...)
    configure a term only when it is in `student.loss` and are not counted."""
    from lmm.losses import LOSSES
    from lmm.objectives import STUDENT_OBJECTIVES
    from lmm.objectives.base import STUDENT_KEYS_ALWAYS_READ
    from lmm.teachers import TEACHERS
    from lmm.teachers.base import TEACHER_KEYS_ALWAYS_READ

    base = defaults()
    s, t = cfg["student"], cfg["teacher"]
    chosen = {"student": (f"student.objective={s['objective']}",
                          {*STUDENT_KEYS_ALWAYS_READ, *STUDENT_OBJECTIVES.get(s["objective"]).reads, *LOSSES}),
              "teacher": (f"teacher.kind={t['kind']}", {*TEACHER_KEYS_ALWAYS_READ, *TEACHERS.get(t["kind"]).reads})}
    for section, (chooser, read) in chosen.items():
        values, default = cfg[section], base[section]
        unread = [k for k in values if k not in read and k in default and values[k] != default[k]]
        if unread:
            given = ", ".join(f"{section}.{k}={json.dumps(values[k])}" for k in unread)
            back = " ".join(f"'{section}.{k}={_toml(default[k])}'" for k in unread)
            raise ConfigError(f"{chooser} does not read {given}; remove them, or set them back to their defaults "
                              f"({back})")


def _toml(value: Any) -> str:
    """A value as written in a KEY=VALUE override."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value).replace(" ", "") if isinstance(value, list) else str(value)


def flat_keys(cfg: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """[("teacher.train.lr", 0.002), ...] for help texts and reports."""
    rows = []
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flat_keys(value, path + ".")
        else:
            rows.append((path, value))
    return rows
