"""A stage's code version: a hash of the syntax trees of the `redi` modules its runner imports.

Found statically (ast) and transitively, so a new import is covered without a hand-kept list, and
hashed as normalised trees (docstrings dropped), so comments, docstrings and formatting never
rerun anything while any change to what the code does gives the stage a new version.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

PACKAGE = "redi"
ROOT = Path(__file__).resolve().parent  # the redi/ folder

# Plumbing left out of every stage's code version, and not followed: the CLI (flag parsing), the
# stage registry (its upstream stages and extra values enter versions as inputs and config), this
# module (what it computes is the version itself), config validation and defaults, atomic writes and
# manifests, the error classes and the package's own __init__ (its version string), and progress
# reporting. They move values and bytes, not maths: what they pass a stage is its flags, which are
# hashed as config (so a changed default still reruns), while including them would rerun days of
# ImageNet encoding for a new option, a reworded message or a progress line.
PLUMBING = frozenset({"redi", "redi.cli", "redi.stages", "redi.code_version", "redi.config", "redi.io",
                      "redi.errors", "redi.progress"})


def _source_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of a `redi.x.y` module (module or package), or None when there is none."""
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py") if parts else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _is_package(module: str, root: Path = ROOT) -> bool:
    file = _source_file(module, root)
    return file is not None and file.name == "__init__.py"


def imported_modules(module: str, root: Path = ROOT) -> set[str]:
    """The `redi` modules one module imports (anywhere in it, also inside functions), by name."""
    file = _source_file(module, root)
    return set(_imports(module, root, file, file.stat().st_mtime_ns))


@cache
def _imports(module: str, root: Path, file: Path, mtime_ns: int) -> frozenset[str]:
    tree = ast.parse(file.read_text(), filename=str(file))
    package = module if _is_package(module, root) else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..io import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            # `from pkg import name`: name may itself be a submodule
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = set()
    for name in found:
        if name != PACKAGE and not name.startswith(PACKAGE + "."):
            continue
        if _source_file(name, root) is None:
            continue  # a name defined in a module, not a module
        parts = name.split(".")
        # importing redi.a.b runs redi/a/__init__.py too
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return frozenset(modules)


def stage_modules(runner: str, root: Path = ROOT) -> list[str]:
    """Every `redi` module `runner` (a module name) runs, transitively, less PLUMBING."""
    seen: set[str] = set()
    todo = [runner]
    while todo:
        module = todo.pop()
        if module in seen or module in PLUMBING:
            continue
        seen.add(module)
        todo.extend(imported_modules(module, root))
    return sorted(seen)


def normalised_tree(source: str) -> str:
    """The module's syntax tree without docstrings, as text: comments and layout are not in it."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


@cache
def _module_hash(file: Path, mtime_ns: int) -> str:
    return hashlib.sha256(normalised_tree(file.read_text()).encode()).hexdigest()


def code_version(runner: str, root: Path = ROOT) -> str:
    """12-hex hash over the normalised trees of the modules `runner` runs (names included)."""
    digest = hashlib.sha256()
    for module in stage_modules(runner, root):
        file = _source_file(module, root)
        digest.update(module.encode() + b"\0")
        digest.update(_module_hash(file, file.stat().st_mtime_ns).encode())
    return digest.hexdigest()[:12]


def stage_code_version(stage: str, root: Path = ROOT) -> str:
    """The code version of a `redi <stage>` (its runner is the module named in the stage registry)."""
    from .stages import runner_module

    return code_version(runner_module(stage), root)
