"""Pin the serving install for the Bento: `corinfomax[serve]` and everything it pulls in, at the versions
installed in this environment (`make lock` writes requirements/serve.lock.txt).

Read from the installed packages' metadata, not resolved against an index: it runs on a machine without
internet access and pins exactly what the tests ran against. Markers are evaluated for this machine, so
generate it on the platform the Bento's container runs on (Linux x86_64).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]


def serve_requirements(pyproject: Path) -> list[Requirement]:
    """pyproject's base dependencies plus the [serve] extra (what `pip install corinfomax[serve]` asks for)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"]["serve"]]


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras | {""})


def pins(roots: list[Requirement]) -> dict[str, str]:
    """Canonical name -> installed version for the closure of ``roots`` on this machine."""
    found: dict[str, str] = {}
    todo = [(requirement, set[str]()) for requirement in roots]
    while todo:
        requirement, parent_extras = todo.pop()
        if not _applies(requirement, parent_extras):
            continue
        name = canonicalize_name(requirement.name)
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError as err:
            sys.exit(f"{requirement.name} is required but not installed here: run `make install-serve` first ({err})")
        if dist.version not in requirement.specifier:
            sys.exit(f"installed {requirement.name} {dist.version} does not satisfy {requirement}")
        first_visit = name not in found
        found[name] = dist.version
        # Revisit a package whenever it is asked for with extras, so those extras' dependencies are pinned too.
        if first_visit or requirement.extras:
            todo.extend((Requirement(line), set(requirement.extras)) for line in dist.requires or [])
    return found


def lock_text(found: dict[str, str]) -> str:
    header = [
        "# The Bento's pinned serving install (bentofile.yaml: requirements_txt), written by `make lock`",
        f"# (scripts/lock_serve.py) from an environment with corinfomax[serve] installed: Python "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}.",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in sorted(found.items())]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "requirements" / "serve.lock.txt")
    args = parser.parse_args()
    found = pins(serve_requirements(REPO / "pyproject.toml"))
    args.out.write_text(lock_text(found))
    print(f"{len(found)} packages pinned in {args.out}")


if __name__ == "__main__":
    main()
