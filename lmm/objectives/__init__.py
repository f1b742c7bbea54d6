"""Objectives behind one interface, and the registry `get_objective`."""
from __future__ import annotations

import inspect

from lmm.losses import LOSSES
from lmm.objectives.base import STUDENT_KEYS_ALWAYS_READ, Objective
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


def unread_student_keys(scfg: dict, defaults: dict) -> list[str]:
    """Keys of config section `student` that its objective does not read (Objective.reads) yet are set to other
    values than their `defaults`; loss-term option tables (`student.perceptual`, ...) configure a term only
    when it is in `student.loss` and are not counted."""
    cls = STUDENT_OBJECTIVES.get(scfg.get("objective"))
    if cls is None:
        return []
    read = {*STUDENT_KEYS_ALWAYS_READ, *cls.reads, *LOSSES}
    return [k for k in scfg if k not in read and k in defaults and scfg[k] != defaults[k]]


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
           "STUDENT_OBJECTIVES", "get_objective", "unread_student_keys"]
