"""Components from outside lmm: a plugin is a module that registers loss terms, student objectives or teacher kinds
when imported (or a function that does when called), with the functions below.

The `lmm` command imports, before it reads a config, every plugin named by an installed package's entry point in
the group `lmm.plugins` (pyproject.toml: `[project.entry-points."lmm.plugins"] name = "my_module"` or
`"my_module:register"`) and every module named in the environment variable LMM_PLUGINS (comma-separated). Library
users call `load_plugins()` or import their module themselves. A registered component's `Options` become config
keys (lmm.registry), so `lmm config` lists them and every command validates them.
"""
from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from lmm.losses import LOSSES
from lmm.losses.base import LossTerm
from lmm.objectives import OBJECTIVES, Objective, register_student_objective
from lmm.teachers import Teacher, register_teacher

GROUP = "lmm.plugins"
ENV = "LMM_PLUGINS"
_loaded: set[str] = set()


def register_loss_term(name: str, cls: type[LossTerm]) -> type[LossTerm]:
    """Make `cls` the loss term `name` of `student.loss`; its Options become the table `student.<name>`."""
    return LOSSES.register(name, cls)


def register_objective(name: str, cls: type[Objective]) -> type[Objective]:
    """Make `cls` loadable by name from model files, e.g. the objective a new teacher kind trains with."""
    return OBJECTIVES.register(name, cls)


def load_plugins() -> list[str]:
    """Import (once) the plugins of entry-point group `lmm.plugins` and of $LMM_PLUGINS; returns their names.
    Raises ValueError naming a plugin that fails to load."""
    found = [(ep.value, f"entry point {ep.name!r} of group {GROUP}", ep.load) for ep in entry_points(group=GROUP)]
    for name in filter(None, (m.strip() for m in os.environ.get(ENV, "").split(","))):
        found.append((name, f"{ENV}={os.environ[ENV]!r}", lambda name=name: importlib.import_module(name)))
    for name, source, load in found:
        if name in _loaded:
            continue
        try:
            obj = load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as e:
            raise ValueError(f"plugin {name!r} ({source}) failed to load: {type(e).__name__}: {e}") from None
        _loaded.add(name)
    return sorted(_loaded)


__all__ = ["load_plugins", "register_loss_term", "register_objective", "register_student_objective",
           "register_teacher"]
