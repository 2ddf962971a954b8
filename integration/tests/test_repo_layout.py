"""Every package has the same skeleton, its own version, and capped ranges on our packages."""

import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml")) + sorted(
    p.parent for p in ROOT.glob("plugins/*/pyproject.toml")
)
OURS = {tomllib.loads((f / "pyproject.toml").read_text())["project"]["name"] for f in FOLDERS}


def test_the_six_packages_and_a_plugin_exist():
    names = {f.name for f in FOLDERS}
    expected = {"vmoe-plugins", "vmoe-routing", "vmoe-layers", "vmoe-data", "vmoe-train"}
    expected |= {"vmoe-eval"}
    assert expected | {"vmoe-router-hash"} <= names


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_package_skeleton(folder):
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    module = project["name"].replace("-", "_")
    assert project["name"] == folder.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    for path in ("README.md", f"src/{module}/__init__.py", f"src/{module}/py.typed", "tests"):
        assert (folder / path).exists(), f"{folder.name} lacks {path}"
    assert any((folder / "tests").glob("test_*.py")), f"{folder.name} has no tests"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_dependencies_on_our_packages_are_ranges_capped_at_the_next_minor(folder):
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    for requirement in requirements:
        name = re.split(r"[<>=!~ \[;]", requirement)[0]
        if name in OURS:
            match = re.fullmatch(rf"{name}>=(\d+)\.(\d+)(?:\.\d+)?,<(\d+)\.(\d+)", requirement)
            assert match, f"{folder.name}: {requirement!r} must be a range like {name}>=0.1,<0.2"
            major, minor, cap_major, cap_minor = map(int, match.groups())
            assert (cap_major, cap_minor) == (major, minor + 1), requirement


def _our_closure(dist: str) -> set[str]:
    """Our distributions `dist` needs at run time (transitively), read from installed metadata."""
    import importlib.metadata

    seen: set[str] = set()
    todo = [dist]
    while todo:
        for requirement in importlib.metadata.requires(todo.pop()) or []:
            name = re.split(r"[<>=!~ \[;]", requirement)[0]
            if "extra ==" not in requirement and name in OURS and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_lower_packages_never_depend_on_higher_ones():
    assert _our_closure("vmoe-plugins") == set()
    assert _our_closure("vmoe-routing") == {"vmoe-plugins"}
    assert _our_closure("vmoe-data") == {"vmoe-plugins"}  # not vmoe-routing any more
    assert _our_closure("vmoe-layers") == {"vmoe-plugins", "vmoe-routing"}
