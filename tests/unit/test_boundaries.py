"""Import boundaries, checked by parsing every module with ``ast``.

The rules are docs/architecture.md#layers.

It also flags the import-time side effects that page rules out and a parser can
see: environment reads outside function bodies and ``warnings.filterwarnings`` calls.
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "clients", "server")
PRIVACY_MODULE = "core/privacy/dp.py"  # the only opacus importer (may not exist yet)
# The SimpleITK importers (docs/architecture.md#layers): image files, STAPLE,
# registration.
SIMPLEITK_MODULES = (
    "core/data/io.py",
    "core/consensus/staple.py",
    "core/consensus/registration.py",
)

# Package -> top-level modules it must never import (docs/architecture.md#layers).
FORBIDDEN: dict[str, frozenset[str]] = {
    "core": frozenset({"flwr", "grpc", "clients", "server", "simulations"}),
    "clients": frozenset(
        {"server", "torch", "monai", "opacus", "SimpleITK", "simulations"}
    ),
    "server": frozenset(
        {"clients", "torch", "monai", "opacus", "SimpleITK", "simulations"}
    ),
}
# Module -> the only files of their package that may import it.
EXCLUSIVE: dict[str, tuple[str, ...]] = {
    "opacus": (PRIVACY_MODULE,),
    "SimpleITK": SIMPLEITK_MODULES,
}


@dataclasses.dataclass(frozen=True, slots=True)
class Violation:
    path: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


def _resolve_relative(module: str | None, level: int, package: str) -> str:
    """Absolute name of ``from <level dots><module> import ...`` inside ``package``."""
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*base, module] if module else base)


def _imported_modules(tree: ast.AST, package: str) -> Iterator[tuple[str, int]]:
    """Every module an ``import``/``from`` statement or literal dynamic import names."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield _resolve_relative(node.module, node.level, package), node.lineno
            elif node.module:
                yield node.module, node.lineno
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield first.value, node.lineno


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in {"__import__", "import_module"}
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "import_module"
        and isinstance(func.value, ast.Name)
        and func.value.id == "importlib"
    )


def _module_aliases(tree: ast.AST, module: str) -> set[str]:
    """Names under which ``module`` itself is bound (``import os as _os``)."""
    names = {module}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(
                alias.asname
                for alias in node.names
                if alias.name == module and alias.asname
            )
    return names


def _from_aliases(tree: ast.AST, module: str, attributes: set[str]) -> set[str]:
    """Names bound by ``from <module> import <attribute> [as name]``."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module == module
            and not node.level
        ):
            names.update(
                alias.asname or alias.name
                for alias in node.names
                if alias.name in attributes
            )
    return names


def _import_time_nodes(tree: ast.Module) -> Iterator[ast.AST]:
    """Nodes evaluated when the module is imported: everything but function bodies.

    Class bodies, decorators and default values run at import, so they count.
    """
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            stack.extend(node.decorator_list)
            stack.extend(node.args.defaults)
            stack.extend(d for d in node.args.kw_defaults if d is not None)
            if node.returns is not None:
                stack.append(node.returns)
        elif isinstance(node, ast.Lambda):
            stack.extend(node.args.defaults)
            stack.extend(d for d in node.args.kw_defaults if d is not None)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _is_attribute_of(node: ast.AST, owners: set[str], attributes: set[str]) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr in attributes
        and isinstance(node.value, ast.Name)
        and node.value.id in owners
    )


def check_source(source: str, relative_path: str) -> list[Violation]:
    """Boundary violations of one module given by its path relative to the repo root."""
    tree = ast.parse(source, filename=relative_path)
    path = Path(relative_path)
    top_package = path.parts[0]
    package = ".".join(path.parts[:-1])
    violations = []
    forbidden = FORBIDDEN.get(top_package, frozenset())
    for module, line in _imported_modules(tree, package):
        top = module.split(".")[0]
        if top in forbidden:
            violations.append(
                Violation(
                    relative_path, line, f"{top_package} must not import {module}"
                )
            )
        elif top in EXCLUSIVE and relative_path not in EXCLUSIVE[top]:
            violations.append(
                Violation(
                    relative_path,
                    line,
                    f"only {', '.join(EXCLUSIVE[top])} may import {top} "
                    f"(found {module})",
                )
            )

    os_names = _module_aliases(tree, "os")
    environ_names = _from_aliases(tree, "os", {"environ", "getenv"})
    for node in _import_time_nodes(tree):
        reads_env = _is_attribute_of(node, os_names, {"environ", "getenv"}) or (
            isinstance(node, ast.Name) and node.id in environ_names
        )
        if reads_env:
            violations.append(
                Violation(relative_path, node.lineno, "environment read at import time")
            )

    warnings_names = _module_aliases(tree, "warnings")
    filter_names = _from_aliases(tree, "warnings", {"filterwarnings"})
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if _is_attribute_of(node.func, warnings_names, {"filterwarnings"}) or (
            isinstance(node.func, ast.Name) and node.func.id in filter_names
        ):
            violations.append(
                Violation(relative_path, node.lineno, "warnings.filterwarnings call")
            )
    return violations


def iter_modules() -> list[Path]:
    return sorted(
        path
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if ".venv" not in path.parts
    )


def scan_repository() -> list[Violation]:
    violations = []
    for path in iter_modules():
        relative = path.relative_to(ROOT).as_posix()
        violations.extend(check_source(path.read_text(encoding="utf-8"), relative))
    return violations


# ----------------------------------------------------------------------------- repo


def test_scan_finds_the_packages() -> None:
    # Prepare / Execute
    modules = iter_modules()
    packages = {path.relative_to(ROOT).parts[0] for path in modules}

    # Assert
    assert len(modules) > 10
    assert packages == set(PACKAGES)


def test_repository_respects_boundaries() -> None:
    # Prepare / Execute
    violations = scan_repository()

    # Assert
    assert not violations, "boundary violations:\n" + "\n".join(map(str, violations))


# ------------------------------------------------------------- the checker itself

VIOLATING_CASES = [
    ("import flwr\n", "core/x.py", "core must not import flwr"),
    ("from flwr.app import Message\n", "core/x.py", "core must not import flwr.app"),
    ("import grpc.aio\n", "core/x.py", "core must not import grpc.aio"),
    ("from clients import records\n", "core/x.py", "core must not import clients"),
    ("from server.store import RunStore\n", "core/x.py", "must not import server"),
    (
        "import opacus\n",
        "core/training/trainer.py",
        "only core/privacy/dp.py may import opacus",
    ),
    (
        "import SimpleITK as sitk\n",
        "core/data/dataset.py",
        "only core/data/io.py, core/consensus/staple.py, "
        "core/consensus/registration.py may import",
    ),
    ("import torch\n", "clients/app.py", "clients must not import torch"),
    ("from monai.networks import nets\n", "clients/x.py", "must not import monai"),
    ("from server import pipeline\n", "clients/x.py", "must not import server"),
    ("import SimpleITK\n", "clients/x.py", "clients must not import SimpleITK"),
    ("import opacus\n", "server/x.py", "server must not import opacus"),
    ("from clients.site import resolve_site\n", "server/x.py", "must not import"),
    ("import torch.nn as nn\n", "server/x.py", "server must not import torch.nn"),
    ("from simulations import run\n", "server/x.py", "must not import simulations"),
    ("import simulations.loso\n", "core/x.py", "must not import simulations"),
    ("from ..server import store\n", "clients/x.py", "must not import server"),
    (
        "def build():\n    import torch\n    return torch.zeros(1)\n",
        "server/x.py",
        "server must not import torch",
    ),
    (
        "class Model:\n    def run(self):\n        from monai import nets\n",
        "clients/x.py",
        "clients must not import monai",
    ),
    (
        "import importlib\nmodule = importlib.import_module('torch')\n",
        "clients/x.py",
        "clients must not import torch",
    ),
    ("import os\nROOT = os.environ['DATA']\n", "core/x.py", "environment read"),
    ("import os\nROOT = os.environ.get('DATA')\n", "core/x.py", "environment read"),
    ("import os as _os\nROOT = _os.getenv('DATA')\n", "server/x.py", "environment"),
    ("from os import environ\nROOT = environ['X']\n", "clients/x.py", "environment"),
    ("from os import getenv\nROOT = getenv('X')\n", "core/x.py", "environment read"),
    ("import os\nif os.getenv('X'):\n    pass\n", "core/x.py", "environment read"),
    (
        "import os\nclass Paths:\n    root = os.environ['X']\n",
        "core/x.py",
        "environment read",
    ),
    (
        "import os\ndef run(path=os.environ['X']):\n    return path\n",
        "core/x.py",
        "environment read",
    ),
    ("import warnings\nwarnings.filterwarnings('ignore')\n", "core/x.py", "warnings"),
    (
        "import warnings\ndef quiet():\n    warnings.filterwarnings('ignore')\n",
        "server/x.py",
        "warnings.filterwarnings call",
    ),
    (
        "from warnings import filterwarnings\nfilterwarnings('ignore')\n",
        "clients/x.py",
        "warnings.filterwarnings call",
    ),
]


@pytest.mark.parametrize(("source", "path", "expected"), VIOLATING_CASES)
def test_checker_reports_violation(source: str, path: str, expected: str) -> None:
    # Prepare / Execute
    violations = check_source(source, path)

    # Assert
    assert any(expected in str(violation) for violation in violations), violations


ALLOWED_CASES = [
    ("import torch\nimport monai\nimport numpy\n", "core/training/trainer.py"),
    ("import SimpleITK as sitk\n", "core/data/io.py"),
    ("import SimpleITK as sitk\n", "core/consensus/staple.py"),
    ("import SimpleITK as sitk\n", "core/consensus/registration.py"),
    ("import opacus\n", "core/privacy/dp.py"),
    ("import numpy as np\nfrom flwr.app import Message\n", "clients/app.py"),
    (
        "from core import protocol\nfrom core.transfer.job import train_source_model\n",
        "clients/x.py",
    ),
    (
        "from flwr.serverapp import Grid\nfrom core.training.networks import Arrays\n",
        "server/x.py",
    ),
    ("from . import records\n", "clients/app.py"),
    ("from .store import RunStore\n", "server/report.py"),
    ("import os\ndef cache():\n    return os.environ.get('HOME')\n", "core/x.py"),
    (
        "import os\nclass Site:\n    def root(self):\n        return os.getenv('X')\n",
        "clients/x.py",
    ),
    ("import os\nPID = os.getpid()\n", "core/x.py"),
    ("import warnings\nwarnings.warn('careful')\n", "core/x.py"),
    ("def plot():\n    import matplotlib\n", "server/report.py"),
]


@pytest.mark.parametrize(("source", "path"), ALLOWED_CASES)
def test_checker_accepts_allowed_code(source: str, path: str) -> None:
    # Prepare / Execute
    violations = check_source(source, path)

    # Assert
    assert violations == []


def test_checker_reports_line_numbers() -> None:
    # Prepare
    source = "import numpy\n\n\ndef late():\n    import flwr\n"

    # Execute
    violations = check_source(source, "core/late.py")

    # Assert
    assert [(v.path, v.line) for v in violations] == [("core/late.py", 5)]


def test_the_client_app_starts_without_opacus() -> None:
    # Prepare: in deployment every message starts a new ClientApp process, so what
    # the module imports is paid per message; Opacus (with torch.distributed.tensor
    # and sympy) is needed only by DP training and is imported there
    # (core/privacy/dp.py, _OPACUS_LAZY).
    probe = (
        "import sys, clients.app; "
        "print(sorted(name for name in ('opacus', 'sympy') if name in sys.modules))"
    )

    # Execute: a fresh interpreter, as the ClientApp process is
    completed = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )

    # Assert
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"


# ------------------------------------------------------------------- package tree

SOURCE_ROOTS = (*PACKAGES, "simulations")
# Each method package's docstring names its method (docs/methods.md).
METHOD_PACKAGES = {
    "core/transfer": "TGMA",
    "core/consensus": "DeepSTAPLE",
    "core/semisup": "UG-MCL",
    "core/affinity": "SeqTran",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: not in functions or TYPE_CHECKING."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            stack.extend(ast.iter_child_nodes(node))


def _import_graph() -> dict[str, set[str]]:
    """Repository module -> the repository modules it imports at import time."""
    paths = [
        path
        for root in SOURCE_ROOTS
        for path in (ROOT / root).rglob("*.py")
        if ".venv" not in path.parts
    ]
    modules = {_module_name(path): path for path in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets: set[str] = set()
        for node in _runtime_imports(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif node.module and not node.level:
                targets.add(node.module)
                # ``from package import module`` imports the submodule too
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {target for target in targets if target in modules} - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycles() -> None:
    # Prepare / Execute: a package's __init__ that imports its modules is an edge
    # from the package to each; a module importing a sibling through the package
    # is an edge back, which is the cycle this test exists for.
    graph = _import_graph()

    # Assert
    assert len(graph) > 50
    assert _cycles(graph) == []


def test_the_cycle_finder_reports_a_cycle() -> None:
    # Prepare
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

    # Execute / Assert
    assert _cycles(graph) == [["a", "b", "c"]]


def test_every_package_says_what_it_owns() -> None:
    # Prepare
    folders = sorted(
        {
            path.parent
            for root in SOURCE_ROOTS
            for path in (ROOT / root).rglob("*.py")
            if ".venv" not in path.parts
        }
    )

    # Execute
    missing = []
    for folder in folders:
        init = folder / "__init__.py"
        docstring = (
            ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
            if init.is_file()
            else None
        )
        if not docstring:
            missing.append(folder.relative_to(ROOT).as_posix())

    # Assert
    assert len(folders) >= 12
    assert missing == [], "packages without an __init__ docstring"


@pytest.mark.parametrize(("package", "method"), sorted(METHOD_PACKAGES.items()))
def test_each_method_package_names_its_method(package: str, method: str) -> None:
    # Prepare / Execute
    init = ROOT / package / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""

    # Assert
    assert docstring.split("\n", 1)[0].find(method) >= 0, docstring


def test_the_unit_tests_mirror_the_source_tree() -> None:
    # Prepare: tests/unit/<package path>/ tests <package path>/
    unit = ROOT / "tests" / "unit"
    folders = sorted(
        path.parent.relative_to(unit)
        for path in unit.rglob("test_*.py")
        if path.parent != unit
    )

    # Execute
    orphans = sorted({f.as_posix() for f in folders if not (ROOT / f).is_dir()})

    # Assert
    assert folders
    assert orphans == [], "test folders with no source package of that path"
