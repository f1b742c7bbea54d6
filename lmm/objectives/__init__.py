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
from lmm.registry import Registry

# students: chosen by `student.objective`; each implements Objective.from_config. OBJECTIVES: every objective a
# model file can name (the students' and the teachers' training objectives).
STUDENT_OBJECTIVES: Registry[Objective] = Registry("student objective", "student.objective", options_at="student")
OBJECTIVES: Registry[Objective] = Registry("objective", "objective")
for _cls in (FlowMatching, EDMLoss):
    OBJECTIVES.register(_cls.name, _cls)
for _cls in (Lines, Reflow, OTCFM, Consistency):
    STUDENT_OBJECTIVES.register(_cls.name, _cls)
    OBJECTIVES.register(_cls.name, _cls)


def register_student_objective(name: str, cls: type[Objective]) -> type[Objective]:
    """Make `cls` the student objective `student.objective = name` (and loadable from model files)."""
    OBJECTIVES.register(name, cls)
    return STUDENT_OBJECTIVES.register(name, cls)


def get_objective(name: str, **kwargs) -> Objective:
    """Objective `name` (a key of OBJECTIVES) built with kwargs; unknown name or key -> ValueError."""
    cls = OBJECTIVES.get(name)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for key in kwargs:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for objective {name!r}; valid: {', '.join(valid)}")
    return cls(**kwargs)


__all__ = ["Consistency", "EDMLoss", "FlowMatching", "Lines", "OBJECTIVES", "OTCFM", "Objective", "Reflow",
           "STUDENT_OBJECTIVES", "get_objective", "register_student_objective"]
