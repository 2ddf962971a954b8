"""A user's first steps: `pip install` vmoe-routing alone (with the plugin host it depends on)
into a fresh virtualenv, list the routers, then install the hash plugin and see it appear with no
code change. Our packages are not on an index, so the plugin host is installed from its folder."""

import json
import os
import pathlib
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LIST_ROUTERS = "import vmoe_routing; print(vmoe_routing.available_routers())"


def run(*args: str) -> str:
    result = subprocess.run(args, capture_output=True, text=True, check=False, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"{args} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    path = tmp_path_factory.mktemp("user-venv")
    venv.EnvBuilder(with_pip=True).create(path)
    return path / ("Scripts" if os.name == "nt" else "bin")


def installed(bin_dir: pathlib.Path) -> set[str]:
    listing = json.loads(run(str(bin_dir / "python"), "-m", "pip", "list", "--format=json"))
    return {p["name"].lower().replace("_", "-") for p in listing}


def test_routing_alone_then_the_hash_plugin(fresh_venv):
    python = str(fresh_venv / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run(*pip, str(ROOT / "packages" / "vmoe-plugins"), str(ROOT / "packages" / "vmoe-routing"))

    packages = installed(fresh_venv)
    assert {"vmoe-routing", "vmoe-plugins", "jax", "pluggy", "numpy"} <= packages
    heavy = ("flax", "tensorflow", "grain", "optax", "orbax")
    forbidden = {p for p in packages if p.startswith(heavy)}
    assert not forbidden, f"vmoe-routing pulled in {forbidden}"

    routers = run(python, "-c", LIST_ROUTERS).strip()
    assert routers == "['bpr', 'top_k']"

    run(*pip, str(ROOT / "plugins" / "vmoe-router-hash"))
    assert run(python, "-c", LIST_ROUTERS).strip() == "['bpr', 'hash', 'top_k']"

    # The plugin's router is usable end to end from the installed packages.
    code = (
        "import jax.numpy as jnp, vmoe_routing as vr\n"
        "r = vr.get_router('hash', num_experts=4, k=2)\n"
        "x = jnp.ones((2, 8, 3))\n"
        "routing = r(r.init(None, 3), x)\n"
        "print(vr.combine(vr.dispatch(x, routing), routing).shape)\n"
    )
    assert run(python, "-c", code).strip() == "(2, 8, 3)"

    # Uninstalled, its name leaves the registry, and asking for it names the package to install.
    run(python, "-m", "pip", "uninstall", "--yes", "--quiet", "vmoe-router-hash")
    assert run(python, "-c", LIST_ROUTERS).strip() == "['bpr', 'top_k']"
    code = (
        "import vmoe_routing as vr\n"
        "try:\n"
        "    vr.get_router('hash', num_experts=4)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    assert run(python, "-c", code).strip() == (
        "router 'hash' comes with the plugin package vmoe-router-hash, which is not installed: "
        "pip install vmoe-router-hash; installed: ['bpr', 'top_k']"
    )


def test_the_router_plugins_of_later_moe_practice_install_and_uninstall(fresh_venv):
    """aux_free and group_limited need vmoe-routing only: installed they are routers, and
    uninstalled their names leave and asking for one names its package (this runs after the
    test above, in the same environment)."""
    python = str(fresh_venv / "python")
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    plugins = ("vmoe-router-aux-free", "vmoe-router-group-limited")
    run(*pip, *(str(ROOT / "plugins" / name) for name in plugins))
    assert (
        run(python, "-c", LIST_ROUTERS).strip() == "['aux_free', 'bpr', 'group_limited', 'top_k']"
    )
    run(python, "-m", "pip", "uninstall", "--yes", "--quiet", *plugins)
    assert run(python, "-c", LIST_ROUTERS).strip() == "['bpr', 'top_k']"
    for router, package in zip(("aux_free", "group_limited"), plugins, strict=True):
        code = (
            "import vmoe_routing as vr\n"
            "try:\n"
            f"    vr.get_router({router!r}, num_experts=4)\n"
            "except ValueError as error:\n"
            "    print(error)\n"
        )
        assert f"which is not installed: pip install {package};" in run(python, "-c", code)


def test_the_running_interpreter_is_not_the_fresh_one(fresh_venv):
    # Guards the test above against silently using the session's own environment.
    assert pathlib.Path(sys.executable).resolve().parent != fresh_venv.resolve()
