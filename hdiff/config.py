"""Typed configs loaded from TOML: unknown keys and wrong types fail loudly, naming the field.

Configs are dataclasses; :func:`from_dict` builds one from a (nested) dict, and :func:`load_toml`
from a file. Every output directory gets the resolved config back as TOML (:func:`to_toml`).
A float field never holds NaN or an infinity (TOML allows both; no hdiff setting means them), and
a file that is missing or not TOML is one ``ValueError`` / ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _check_value(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _check_value(value, option, name)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"{name}: {value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is not None:
            raise TypeError(f"{name} must be None")
        return None
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ValueError(f"{name} must be one of {typing.get_args(annotation)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return [_check_value(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a table, got {type(value).__name__}")
        return from_dict(annotation, value, name)
    if annotation is Any:
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise TypeError(f"{name} must be a {annotation.__name__}, got {type(value).__name__}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], name: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ``ValueError``, wrong types ``TypeError``."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{name}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {k: _check_value(v, hints[k], f"{name}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML file ``path``.

    Raises:
        FileNotFoundError: no such file (naming it).
        ValueError: ``path`` is a directory or not valid TOML (naming it and the position).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} is not a file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None


def load_toml(cls: type[T], path: str | Path) -> T:
    """Read a TOML file into dataclass ``cls`` (strict keys and types; see :func:`read_toml`)."""
    return from_dict(cls, read_toml(path), Path(path).name)


def to_toml(obj: Any) -> str:
    """Serialise a (nested) config dataclass, or a dict of plain values, as TOML (tables for nested
    dataclasses and dicts, ``[[arrays]]`` for lists of them, None omitted)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    def is_table_list(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, dict) for x in v)

    def emit(d: dict, prefix: str, header: str | None = None) -> list[str]:
        plain = [f"{k} = {fmt(v)}" for k, v in d.items()
                 if v is not None and not isinstance(v, dict) and not is_table_list(v)]
        head = header if header is not None else (f"[{prefix}]" if prefix and plain else None)
        lines = ([head] if head else []) + plain
        for k, v in d.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                lines += [""] + emit(v, name)
            elif is_table_list(v):  # a list of tables: one [[name]] block each
                for item in v:
                    lines += [""] + emit(item, name, header=f"[[{name}]]")
        return lines

    data = obj if isinstance(obj, dict) else dataclasses.asdict(obj)
    return "\n".join(emit(data, "")) + "\n"


@dataclass
class GHMConfig:
    """How to build a GHM: ``family = "hierarchy"`` (the RHM) or ``"factorized"``."""

    family: typing.Literal["hierarchy", "factorized"] = "hierarchy"
    vocab_size: int = 8
    num_rules: int = 2
    branching: int = 2
    depth: int = 4
    num_classes: int | None = None
    layout: typing.Literal["sequence", "image"] = "sequence"
    rule_probs: typing.Literal["uniform", "zipf"] = "uniform"
    concentration: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad ``ghm.*`` field, before anything is built.

        Besides the ranges, this refuses a GHM too large to build or use (``ghm.depth``), saying
        how much memory it would take (:func:`hdiff.ghm.model.size_error`).
        """
        for name, low in (("vocab_size", 2), ("num_rules", 1), ("branching", 2), ("depth", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value < low:
                why = " (one symbol leaves nothing to model)" if name == "vocab_size" else ""
                raise ValueError(f"ghm.{name} must be >= {low}, got {value}{why}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"ghm.num_classes must be >= 1 (or unset: vocab_size), got {self.num_classes}")
        if self.layout == "image" and self.branching != 4:
            raise ValueError(f"ghm.branching must be 4 with ghm.layout = 'image' (2x2 blocks), got {self.branching}")
        if not self.concentration > 0:
            raise ValueError(f"ghm.concentration must be > 0, got {self.concentration}")
        v, m, s, nc = self.vocab_size, self.num_rules, self.branching, self.num_classes or self.vocab_size
        if self.family == "hierarchy":
            if m > v ** (s - 1):
                raise ValueError(f"ghm.num_rules ({m}) must be <= vocab_size**(branching-1) = {v ** (s - 1)} "
                                 "for an unambiguous grammar")
            if nc * m > v**s:
                raise ValueError(f"ghm.num_classes * num_rules ({nc * m}) must be <= vocab_size**branching "
                                 f"({v**s}) for an unambiguous grammar")
            params = 8 * (s + 1) * m * (nc + (self.depth - 1) * v)
        else:
            params = 8 * s * v * (nc + (self.depth - 1) * v)
        from hdiff.ghm.model import size_error

        error = size_error(s, self.depth, v, params)
        if error is not None:
            raise ValueError(f"ghm.depth / ghm.vocab_size: {error}")

    def build(self):
        """The :class:`~hdiff.ghm.GHM` this config describes."""
        from hdiff.ghm import GHM

        if self.family == "hierarchy":
            return GHM.random_hierarchy(self.vocab_size, self.num_rules, self.branching, self.depth,
                                        num_classes=self.num_classes, layout=self.layout,
                                        rule_probs=self.rule_probs, seed=self.seed)
        return GHM.random_factorized(self.vocab_size, self.branching, self.depth, num_classes=self.num_classes,
                                     layout=self.layout, concentration=self.concentration, seed=self.seed)


__all__ = ["GHMConfig", "from_dict", "load_toml", "read_toml", "to_toml", "field"]
