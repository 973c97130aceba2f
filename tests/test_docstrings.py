"""Every public function, class and public method defined in :mod:`hdiff` has a docstring.

The walk imports every module of the package (so a module that fails to import fails here too),
takes the functions and classes *defined* in each module (``obj.__module__`` is that module:
re-exports and third-party objects are skipped, and each object is checked once, where it lives),
and, for each public class, the methods, class/static methods and properties defined in its own
body. Names starting with ``_`` are private (dunders included) and exempt. A docstring must be the
object's own: one inherited from a base class (diffusers, torch) does not count, and neither do the
signatures that :mod:`dataclasses` and :class:`typing.NamedTuple` write into an undocumented class.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from types import ModuleType

import hdiff


def _modules() -> tuple[list[ModuleType], list[str]]:
    """Import ``hdiff`` and all its submodules; return the modules and the import failures."""
    modules: list[ModuleType] = [hdiff]
    failures: list[str] = []
    for info in pkgutil.walk_packages(hdiff.__path__, prefix="hdiff.", onerror=failures.append):
        try:
            modules.append(importlib.import_module(info.name))
        except Exception as exc:  # noqa: BLE001 -- report every broken module, not just the first
            failures.append(f"{info.name}: {type(exc).__name__}: {exc}")
    return modules, failures


def _has_own_doc(obj: object) -> bool:
    """True if ``obj`` carries a non-empty docstring of its own (not an auto-generated one)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return False
    if isinstance(obj, type):
        # dataclasses and NamedTuple fill an empty __doc__ with the signature "Name(field, ...)"
        auto = dataclasses.is_dataclass(obj) or (issubclass(obj, tuple) and hasattr(obj, "_fields"))
        if auto and doc.startswith(f"{obj.__name__}("):
            return False
    return True


def _member_function(member: object) -> object | None:
    """The function behind a class-body member (method, classmethod, staticmethod, property), else None."""
    if isinstance(member, (classmethod, staticmethod)):
        member = member.__func__
    if isinstance(member, property):
        return member.fget
    if inspect.isfunction(member):
        return member
    return None


def _undocumented(module: ModuleType) -> list[str]:
    """Qualified names of the public objects defined in ``module`` that lack a docstring."""
    missing: list[str] = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # imported from elsewhere: checked where it is defined, or not ours
        if not _has_own_doc(obj):
            missing.append(f"{module.__name__}.{name}")
        if not inspect.isclass(obj):
            continue
        for attr, member in sorted(obj.__dict__.items()):
            if attr.startswith("_"):
                continue
            fn = _member_function(member)
            if fn is None or not getattr(fn, "__module__", "").startswith("hdiff"):
                continue
            if not _has_own_doc(fn):
                missing.append(f"{module.__name__}.{name}.{attr}")
    return missing


def test_every_module_imports() -> None:
    _, failures = _modules()
    assert not failures, "modules of hdiff that fail to import:\n  " + "\n  ".join(failures)


def test_public_api_has_docstrings() -> None:
    modules, _ = _modules()
    assert len(modules) > 10, "the package walk found too few modules"
    missing = sorted({name for module in modules for name in _undocumented(module)})
    assert not missing, (
        f"{len(missing)} public functions / classes / methods of hdiff have no docstring:\n  "
        + "\n  ".join(missing)
    )
