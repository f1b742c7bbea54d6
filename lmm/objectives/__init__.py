"""Objectives behind one interface, and the registry `get_objective`."""
from __future__ import annotations

import inspect

from lmm.objectives.base import Objective
from lmm.objectives.consistency import Consistency
from lmm.objectives.edm import EDMLoss
from lmm.objectives.flow_matching import FlowMatching
from lmm.objectives.lines import Lines
from lmm.objectives.ot_cfm import OTCFM
from lmm.objectives.reflow import Reflow

# students: chosen by `student.objective`; each implements Objective.from_config
STUDENT_OBJECTIVES: dict[str, type[Objective]] = {"lines": Lines, "reflow": Reflow, "ot_cfm": OTCFM,
                                                  "consistency": Consistency}
OBJECTIVES: dict[str, type[Objective]] = {"flow_matching": FlowMatching, "edm": EDMLoss, **STUDENT_OBJECTIVES}


def get_objective(name: str, **kwargs) -> Objective:
    """Objective `name` (a key of OBJECTIVES) built with kwargs; unknown name or key -> ValueError."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in kwargs:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for objective {name!r}; valid: {', '.join(valid)}")
    return cls(**kwargs)


__all__ = ["Consistency", "EDMLoss", "FlowMatching", "Lines", "OBJECTIVES", "OTCFM", "Objective", "Reflow",
           "STUDENT_OBJECTIVES", "get_objective"]
