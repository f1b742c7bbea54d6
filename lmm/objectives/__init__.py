"""Objectives behind one interface, and the registry `get_objective`."""
from __future__ import annotations

import inspect

from lmm.objectives.base import Objective
from lmm.objectives.edm import EDMLoss
from lmm.objectives.flow_matching import FlowMatching
from lmm.objectives.lines import Lines

OBJECTIVES: dict[str, type[Objective]] = {"flow_matching": FlowMatching, "edm": EDMLoss, "lines": Lines}


def get_objective(name: str, **kwargs) -> Objective:
    """Objective `name` ("flow_matching" | "edm" | "lines") built with kwargs; unknown name or key -> ValueError."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in kwargs:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for objective {name!r}; valid: {', '.join(valid)}")
    return cls(**kwargs)


__all__ = ["EDMLoss", "FlowMatching", "Lines", "OBJECTIVES", "Objective", "get_objective"]
