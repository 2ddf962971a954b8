"""Every package's requires-python is at least that of each of our packages it depends on.

A package that says >=3.10 but needs one that says >=3.11 cannot be installed on 3.10 at all, so
its floor is false. Third-party floors (jax, flax, grain, ...) are checked by hand from their
wheels' Requires-Python and noted next to requires-python in each pyproject; `nox -s
lowest-routing` installs vmoe-routing at its lowest allowed versions and runs its tests.
"""

import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml")) + sorted(
    p.parent for p in ROOT.glob("plugins/*/pyproject.toml")
)
PROJECTS = {
    project["name"]: project
    for project in (tomllib.loads((f / "pyproject.toml").read_text())["project"] for f in FOLDERS)
}


def _floor(requires_python: str) -> tuple[int, int]:
    """The (major, minor) of the `>=X.Y` clause of a requires-python specifier."""
    match = re.search(r">=\s*(\d+)\.(\d+)", requires_python)
    assert match, f"requires-python {requires_python!r} has no >= floor"
    return int(match[1]), int(match[2])


def _our_requirements(project: dict) -> set[str]:
    """Our distributions `project` names, in its dependencies or any of its extras."""
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    names = {re.split(r"[<>=!~ \[;]", r)[0] for r in requirements}
    return names & PROJECTS.keys()


def test_every_package_has_a_floor():
    for name, project in PROJECTS.items():
        assert "requires-python" in project, f"{name} has no requires-python"
        _floor(project["requires-python"])


@pytest.mark.parametrize("name", sorted(PROJECTS))
def test_floor_is_at_least_that_of_our_packages_it_depends_on(name):
    floor = _floor(PROJECTS[name]["requires-python"])
    for dependency in sorted(_our_requirements(PROJECTS[name])):
        needed = _floor(PROJECTS[dependency]["requires-python"])
        assert floor >= needed, (
            f"{name} says Python >={floor[0]}.{floor[1]} but depends on {dependency}, "
            f"which needs >={needed[0]}.{needed[1]}"
        )


def test_floor_parsing():
    assert _floor(">=3.10") == (3, 10)
    assert _floor("<4, >= 3.11") == (3, 11)
    assert _floor(">=3.10") < _floor(">=3.11")  # so train >=3.10 over layers >=3.11 fails
