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


def module_name(folder: str, path: Path) -> str:
    """The installed name of a project file: training/eval_cli.py -> corinfomax.training.eval_cli."""
    parts = path.relative_to(REPO / folder).with_suffix("").parts
    return ".".join((FOLDERS[folder],) + (parts[:-1] if parts[-1] == "__init__" else parts))


def import_graph(folder: str) -> dict[str, set[str]]:
    """Each module of ``folder`` -> the modules of that folder it imports, anywhere in the file (``from pkg import
    mod`` counts as importing ``pkg.mod``). Between folders the layers allow no loop (test above)."""
    paths = {module_name(folder, path): path for path in modules(folder)
             if folder != "corinfomax" or path.parent == REPO / "corinfomax"}
    graph = {}
    for name, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = edges & paths.keys()
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (depth-first search for a back edge), or None."""
    done: set[str] = set()

    def visit(module: str, stack: list[str]) -> list[str] | None:
        stack.append(module)
        for target in sorted(graph[module]):
            if target in stack:
                return stack[stack.index(target):] + [target]
            if target not in done and (cycle := visit(target, stack)):
                return cycle
        stack.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done and (cycle := visit(module, [])):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set(), "p.c": {"p.a", "p.b"}}) is None


# Every folder is meant to be here; serving joins once its index factory and extraction input types stop
# looping (backend <-> store/milvus, extract <-> ray_engine).
@pytest.mark.parametrize("folder", ["corinfomax", "core", "training", "export"])
def test_no_import_cycles(folder: str) -> None:
    """No file-level import loop, not even through an import inside a function."""
    cycle = find_cycle(import_graph(folder))
    assert cycle is None, "import loop: " + " -> ".join(cycle or [])


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


def test_bench_does_not_import_the_tests() -> None:
    for path in modules("bench"):
        assert not any(name == "tests" or name.startswith("tests.") for name in imports(path)), path


@pytest.mark.slow
def test_core_and_serving_import_without_torch() -> None:
    names = [FOLDERS[folder] + "." + ".".join(path.relative_to(REPO / folder).with_suffix("").parts)
             for folder in ("core", "serving") for path in modules(folder) if path.name != "__init__.py"]
    code = "import sys\nsys.modules['torch'] = None\n" + "".join(f"import {name}\n" for name in names)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
