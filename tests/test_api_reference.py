"""The public API is documented: docstrings on every public name, and the README's table.

Public means: named in the ``__all__`` of a module whose dotted path has no part
starting with ``_``. Classes and functions need a docstring, and so do their public
methods and properties (an inherited docstring counts: an override documents
nothing new).
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re
from types import ModuleType

import txmgr

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def public_modules() -> list[ModuleType]:
    names = ["txmgr"] + [
        m.name for m in pkgutil.walk_packages(txmgr.__path__, "txmgr.")
        if not any(part.startswith("_") for part in m.name.split(".")[1:])
        and not m.name.startswith("txmgr.migrations")
    ]
    return [importlib.import_module(name) for name in names]


def member_doc(cls: type, name: str, member: object) -> str | None:
    if isinstance(member, property):
        for klass in cls.__mro__:
            found = vars(klass).get(name)
            if isinstance(found, property) and found.__doc__:
                return found.__doc__
        return None
    return inspect.getdoc(getattr(cls, name))


def undocumented(module: ModuleType) -> list[str]:
    missing = []
    if not (module.__doc__ or "").strip():
        missing.append(module.__name__)
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants and type aliases carry no docstring of their own
        where = f"{module.__name__}.{name}"
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(where)
        if not inspect.isclass(obj) or not obj.__module__.startswith("txmgr"):
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_"):
                continue
            if not (isinstance(member, staticmethod | classmethod | property)
                    or inspect.isfunction(member)):
                continue
            if not (member_doc(obj, attr, member) or "").strip():
                missing.append(f"{where}.{attr}")
    return missing


def api_section() -> str:
    return README.read_text().split("\n## API reference\n", 1)[1].split("\n## ", 1)[0]


def test_every_public_name_has_a_docstring() -> None:
    missing = sorted({m for module in public_modules() for m in undocumented(module)})
    assert not missing, "public names without a docstring:\n" + "\n".join(missing)


def test_readme_table_names_everything_exported_by_txmgr() -> None:
    section = api_section()
    absent = [name for name in txmgr.__all__
              if not re.search(rf"`{re.escape(name)}\b", section)]
    assert not absent, f"README, API reference: add {absent}"


def test_readme_table_names_every_public_module() -> None:
    section = api_section()
    absent = [m.__name__ for m in public_modules()
              if hasattr(m, "__all__") and m.__name__ != "txmgr"
              and f"`{m.__name__}`" not in section]
    assert not absent, f"README, API reference: add the modules {absent}"
