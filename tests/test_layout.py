"""The package layout and the import graph (docs/ARCHITECTURE.md): core <- training, core <- serving, export
above both, the CLI on top; the core and every serving module import without PyTorch."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FOLDERS = {"corinfomax": "corinfomax", "core": "corinfomax.core", "training": "corinfomax.training",
           "export": "corinfomax.export", "serving": "corinfomax.serving"}
# What each folder's modules may import from the project (its own package is always allowed).
ALLOWED = {
    "core": set(),
    "training": {"corinfomax.core"},
    "serving": {"corinfomax.core"},
    "export": {"corinfomax.core", "corinfomax.training", "corinfomax.serving"},
    "corinfomax": {"corinfomax.core", "corinfomax.training", "corinfomax.export", "corinfomax.serving"},
}
CORE_THIRD_PARTY = {"numpy", "PIL"}


def modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module name ``path`` imports, at module level or inside functions."""
    return imports_of(ast.parse(path.read_text(), str(path)))


def imports_of(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def module_files() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__.py``)."""
    files = {}
    for folder, package in FOLDERS.items():
        for path in modules(folder):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            files[".".join([package, *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))] = path
    return files


def import_graph(files: dict[str, Path]) -> dict[Path, set[Path]]:
    """Which of ``files`` each file imports, at module level or inside functions; ``from package import module``
    and relative imports resolved to the module's file, and importing a module counts as importing the
    ``__init__.py`` of each package above it (Python runs those first)."""
    graph: dict[Path, set[Path]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(part for part in (base, node.module or "") if part)
                targets |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
        graph[path] = {files[parent] for target in targets for parent in _with_parents(target) if parent in files}
        graph[path].discard(path)
    return graph


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_cycles(graph: dict[Path, set[Path]]) -> list[list[Path]]:
    """The import loops of ``graph``: each group of files that reach one another (Tarjan's strongly connected
    components of more than one file), in a stable order."""
    index: dict[Path, int] = {}
    low: dict[Path, int] = {}
    stack: list[Path] = []
    cycles = []

    def visit(node: Path) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group: list[Path] = []
            while not group or group[-1] != node:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_every_package_folder_is_listed_in_pyproject() -> None:
    tool = PYPROJECT["tool"]["setuptools"]
    assert tool["package-dir"] == {package: folder for folder, package in FOLDERS.items()}
    found = {FOLDERS[folder] + "".join(f".{part}" for part in init.parent.relative_to(REPO / folder).parts)
             for folder in FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert found == set(tool["packages"])


def test_the_package_folder_links_to_every_stage() -> None:
    """corinfomax/<stage> is a link to the top-level folder, so the checkout imports (and type-checks) as installed."""
    for folder, package in FOLDERS.items():
        if folder != "corinfomax":
            link = REPO / "corinfomax" / package.rpartition(".")[2]
            assert link.is_symlink() and link.resolve() == REPO / folder, f"{link} must link to ../{folder}"


@pytest.mark.slow
def test_type_checker_sees_a_wrong_cross_module_call(tmp_path: Path) -> None:
    """`make lint` resolves first-party imports: a call with the wrong arguments across modules fails it."""
    probe = tmp_path / "wrong_call.py"
    probe.write_text("from corinfomax.core.errors import describe\n\n\ndef f() -> None:\n    describe(1, 2, 3)\n")
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
                             "--cache-dir", str(tmp_path / "cache"), str(probe)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 1, result.stdout
    assert 'Too many arguments for "describe"' in result.stdout


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_follow_the_layers(folder: str) -> None:
    own = FOLDERS[folder]
    for path in modules(folder):
        for name in imports(path):
            if name == "corinfomax" or not name.startswith("corinfomax."):
                continue
            assert any(name == a or name.startswith(a + ".") for a in ALLOWED[folder] | {own}), f"{path} imports {name}"
            assert name != "corinfomax.cli" or path.parent == REPO / "corinfomax", f"{path} imports the CLI"


def test_no_import_cycles_between_files() -> None:
    """No file imports, directly or through others, a file that imports it back (not even inside one stage)."""
    cycles = [[str(path.relative_to(REPO)) for path in cycle] for cycle in import_cycles(import_graph(module_files()))]
    assert cycles == [], "import loops: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_the_cycle_check_finds_a_loop_through_a_package_import(tmp_path: Path) -> None:
    """``from package import module`` and a function-level import are edges too."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f() -> None:\n    from . import c\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    files = {name: tmp_path / "pkg" / f"{name.rpartition('.')[2]}.py" for name in ("pkg.a", "pkg.b", "pkg.c")}
    files["pkg"] = tmp_path / "pkg" / "__init__.py"
    assert import_cycles(import_graph(files)) == [[files["pkg.a"], files["pkg.b"], files["pkg.c"]]]


def test_core_needs_only_numpy_and_pillow() -> None:
    stdlib = sys.stdlib_module_names
    for path in modules("core"):
        outside = {name.split(".")[0] for name in imports(path)} - stdlib - CORE_THIRD_PARTY - {"corinfomax"}
        assert not outside, f"{path} imports {outside}"


def code_imports(path: Path) -> set[str]:
    """What ``path`` imports, plus what the Python code in its string literals imports (``python -c CODE``)."""
    names = imports(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import" in node.value:
            try:
                names |= imports_of(ast.parse(node.value))
            except SyntaxError:  # prose, not code
                pass
    return names


@pytest.mark.parametrize("folder", ["tests", "bench", "scripts"])
def test_stages_are_imported_by_their_package_name(folder: str) -> None:
    """From the repo root the stage folders also import as top-level `training`, `serving`... : a second module
    object for the same file (its own classes, its own UserError). Tests, benches and scripts use `corinfomax.*`."""
    stages = set(FOLDERS) - {"corinfomax"}
    for path in modules(folder):
        wrong = sorted(name for name in code_imports(path) if name.split(".")[0] in stages)
        assert not wrong, f"{path} imports {wrong}: import corinfomax.{wrong[0]} instead"


def test_the_package_imports_no_bench_tests_or_scripts() -> None:
    """They sit beside the package (bench/launcher.py starts servers for the tests, benches and scripts)."""
    for folder in FOLDERS:
        for path in modules(folder):
            assert not {name.split(".")[0] for name in imports(path)} & {"bench", "tests", "scripts"}, path


def test_bench_does_not_import_the_tests() -> None:
    for path in modules("bench"):
        assert not any(name == "tests" or name.startswith("tests.") for name in imports(path)), path


def test_tests_share_helpers_through_kits_not_other_test_modules() -> None:
    """Helpers two test modules use live in a ``*kit`` module: importing a test module drags its fixtures and
    import-time work along, and couples tests that should fail alone."""
    for path in modules("tests"):
        wrong = sorted(name for name in imports(path) if name.split(".")[-1].startswith("test_"))
        assert not wrong, f"{path} imports {wrong}: move what it needs into a tests/*kit.py module"


@pytest.mark.slow
def test_core_and_serving_import_without_torch() -> None:
    names = [FOLDERS[folder] + "." + ".".join(path.relative_to(REPO / folder).with_suffix("").parts)
             for folder in ("core", "serving") for path in modules(folder) if path.name != "__init__.py"]
    code = "import sys\nsys.modules['torch'] = None\n" + "".join(f"import {name}\n" for name in names)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
