"""Teachers (an ODE from noise to data) and `build_teacher`."""
from __future__ import annotations

import inspect

from torch import nn

from lmm.teachers.base import Teacher, sample_teacher
from lmm.teachers.edm import EDMTeacher
from lmm.teachers.flow import FlowTeacher

TEACHERS: dict[str, type[Teacher]] = {"flow": FlowTeacher, "edm": EDMTeacher}
TEACHER_OBJECTIVES: dict[str, str] = {kind: cls.objective for kind, cls in TEACHERS.items()}


def _check_kind(kind: str) -> type[Teacher]:
    if kind not in TEACHERS:
        raise ValueError(f"unknown teacher kind {kind!r}; valid: {', '.join(TEACHERS)}")
    return TEACHERS[kind]


def teacher_objective(kind: str) -> str:
    """Name of the objective a teacher of this kind trains with ("flow" -> "flow_matching", "edm" -> "edm")."""
    return _check_kind(kind).objective


def build_teacher(kind: str, model: nn.Module, **kw) -> Teacher:
    """Teacher of `kind` ("flow" | "edm") around a preconditioned model; kw go to its constructor."""
    cls = _check_kind(kind)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    for key in kw:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for teacher {kind!r}; valid: {', '.join(valid)}")
    return cls(model, **kw)


__all__ = [
    "EDMTeacher",
    "FlowTeacher",
    "TEACHERS",
    "TEACHER_OBJECTIVES",
    "Teacher",
    "build_teacher",
    "sample_teacher",
    "teacher_objective",
]
