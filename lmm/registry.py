"""Registries: the one place each kind of extension (loss term, student objective, teacher kind, ...) is looked up by
name. A component that takes settings declares them as a dataclass `Options` on its class, each field with its
default and, in the field's metadata, optionally `choices` (the values allowed) and `min` (a lower bound); the
config schema (`lmm config`, its defaults and validation) is derived from these, so adding a component never edits
lmm/config.py. Components from outside the package register through `Registry.register`, from a module that
`lmm.plugins.load_plugins` imports.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named classes of one kind. `what` names the kind in messages; `key` is the config key whose value picks a
    member (e.g. "student.objective"); `options_at` is where each member's Options table sits in the config
    ("student" puts the table of member NAME at `student.NAME`; None: members have no options tables)."""

    def __init__(self, what: str, key: str, options_at: str | None = None) -> None:
        self.what, self.key, self.options_at = what, key, options_at
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str, cls: type[T]) -> type[T]:
        """Add `cls` under `name` (also set as `cls.name`); refused if another class holds the name."""
        if not name.isidentifier():
            raise ValueError(f"{self.what} name {name!r} must be a Python identifier (it names config keys)")
        if self._classes.get(name, cls) is not cls:
            raise ValueError(f"{self.what} {name!r} is already registered ({self._classes[name].__qualname__})")
        options_class(cls)
        cls.name = name
        self._classes[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        if name not in self._classes:
            raise ValueError(f"{self.key}: unknown {self.what} {name!r}; valid: {', '.join(self._classes)} (one from "
                             "a plugin needs the plugin loaded: lmm.plugins)")
        return self._classes[name]

    def __getitem__(self, name: str) -> type[T]:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def items(self) -> list[tuple[str, type[T]]]:
        return list(self._classes.items())

    def option_tables(self) -> dict[str, dict[str, Any]]:
        """{member name: its Options defaults} for the members that have options."""
        return {name: opts for name, cls in self._classes.items() if (opts := option_defaults(cls))}

    def option_rules(self) -> dict[str, dict[str, Any]]:
        """{dotted config key: {"choices": ..., "min": ...}} of every member's options that declare a rule."""
        rules: dict[str, dict[str, Any]] = {}
        if self.options_at is None:
            return rules
        for name, cls in self._classes.items():
            opts = options_class(cls)
            for f in dataclasses.fields(opts) if opts is not None else ():
                rule = {k: f.metadata[k] for k in ("choices", "min") if k in f.metadata}
                if rule:
                    rules[f"{self.options_at}.{name}.{f.name}"] = rule
        return rules


def options_class(cls: type) -> type | None:
    """The component's Options dataclass, or None; anything else named Options is refused."""
    opts = getattr(cls, "Options", None)
    if opts is not None and not dataclasses.is_dataclass(opts):
        raise TypeError(f"{cls.__qualname__}.Options must be a dataclass")
    return opts


def option_defaults(cls: type) -> dict[str, Any]:
    """{option: default} of the component class's Options (empty without options)."""
    opts = options_class(cls)
    values = {} if opts is None else dataclasses.asdict(opts())
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def option(default: Any, *, choices: tuple | None = None, min: float | None = None) -> Any:
    """A dataclass field of an Options class with a default and optional rules (copied for list defaults)."""
    metadata = {k: v for k, v in (("choices", choices), ("min", min)) if v is not None}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
