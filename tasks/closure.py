"""Which project modules some code can run, found from the imports, and a digest of their source.

A stage's cache key holds a digest of its code: every module of this project (the packages in
:data:`PROJECT_PACKAGES`) that its task module, or its torchrun entry point, can run
(flows/stages.py); the download stage records the digest of its normalisation code with each
dataset (tasks/acquire.py: a reuse by other code says so). The set is the import closure, found by walking the ``import``
statements of each file with :mod:`ast` (imports inside functions included: they run too),
never listed by hand, so a module added or moved later is in the digest the day it is imported.
Files are read, never imported: a walk from a flows module imports nothing of flows. Third-party
packages are not in it (their versions are recorded with every MLflow run).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

PROJECT_PACKAGES = ("flows", "tasks", "srdiff_core", "storage")
REPO_ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def read_source(path: Path) -> bytes:
    """A file's bytes as first read by this process: the digest describes the code the process
    loaded, even if the file changes while a pipeline runs. Tests that edit a tree call
    ``read_source.cache_clear()`` (and ``cached_code_digest.cache_clear()``)."""
    return path.read_bytes()


def module_path(name: str, root: Path | None = None) -> Path | None:
    """The file of project module ``name`` (a package's ``__init__.py``), or None: not a module of
    this project (a third-party module, or an attribute named in ``from x import attr``)."""
    parts = name.split(".")
    if parts[0] not in PROJECT_PACKAGES:
        return None
    base = (root or REPO_ROOT).joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a`` and ``a.b`` (their ``__init__``) first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def imported_names(name: str, path: Path, source: bytes) -> set[str]:
    """Every module name the file of module ``name`` imports, anywhere in it (module level, inside
    functions or ``if`` blocks), relative imports resolved; ``from x import y`` gives ``x`` and
    ``x.y`` (the latter is dropped later if ``y`` is not a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(_with_parents(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.update(_with_parents(base))
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def import_graph(roots: Iterable[str], root: Path | None = None,
                 read: Callable[[Path], bytes] | None = None) -> dict[str, tuple[str, ...]]:
    """Project module -> the project modules it imports (parent packages included), for ``roots``
    and every project module reachable from them."""
    read = read or read_source
    graph: dict[str, tuple[str, ...]] = {}
    queue = [parent for r in roots for parent in _with_parents(r)]
    while queue:
        name = queue.pop()
        if name in graph:
            continue
        path = module_path(name, root)
        if path is None:
            continue
        edges = sorted(n for n in imported_names(name, path, read(path)) if n != name and module_path(n, root))
        graph[name] = tuple(edges)
        queue.extend(edges)
    return dict(sorted(graph.items()))


def import_closure(roots: Iterable[str], root: Path | None = None,
                   read: Callable[[Path], bytes] | None = None) -> dict[str, Path]:
    """Project module name -> file, for ``roots`` and every project module they import, directly
    or through others (their parent packages included)."""
    return {name: module_path(name, root) for name in import_graph(roots, root, read)}


def code_digest(roots: Iterable[str], root: Path | None = None, read: Callable[[Path], bytes] | None = None) -> str:
    """sha256 over the name and source of every module in the import closure of ``roots``."""
    read = read or read_source
    h = hashlib.sha256()
    for name, path in import_closure(roots, root, read).items():
        h.update(name.encode() + b"\0" + hashlib.sha256(read(path)).digest())
    return h.hexdigest()


@functools.cache
def cached_code_digest(roots: tuple[str, ...]) -> str:
    """:func:`code_digest`, once per process and ``roots``."""
    return code_digest(roots)
