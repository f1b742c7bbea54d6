"""Teachers (an ODE from noise to data) and `build_teacher`."""
from __future__ import annotations

import inspect
from pathlib import Path

from torch import nn

from lmm.registry import Registry
from lmm.teachers.base import Teacher, sample_teacher
from lmm.teachers.diffusers import DiffusersTeacher
from lmm.teachers.edm import EDMTeacher
from lmm.teachers.flow import FlowTeacher

TEACHERS: Registry[Teacher] = Registry("teacher kind", "teacher.kind")
for _name, _cls in (("flow", FlowTeacher), ("edm", EDMTeacher), ("diffusers", DiffusersTeacher)):
    TEACHERS.register(_name, _cls)


def folder_teacher(path: Path) -> type[Teacher] | None:
    """The teacher kind whose own folder format `path` is (e.g. a diffusers model folder), or None."""
    return next((cls for _, cls in TEACHERS.items() if cls.owns_folder(path)), None)


def register_teacher(name: str, cls: type[Teacher]) -> type[Teacher]:
    """Make `cls` the teacher kind `teacher.kind = name`; its training objective (`cls.objective`) must be in
    lmm.objectives.OBJECTIVES."""
    cls.kind = name
    return TEACHERS.register(name, cls)


def build_teacher(kind: str, model: nn.Module, **kw) -> Teacher:
    """Teacher of `kind` (a TEACHERS name) around a preconditioned model; kw go to its constructor."""
    cls = TEACHERS.get(kind)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    for key in kw:
        if key not in valid:
            raise ValueError(f"unknown option {key!r} for teacher {kind!r}; valid: {', '.join(valid)}")
    return cls(model, **kw)


__all__ = [
    "DiffusersTeacher",
    "EDMTeacher",
    "FlowTeacher",
    "TEACHERS",
    "Teacher",
    "build_teacher",
    "folder_teacher",
    "register_teacher",
    "sample_teacher",
]
