"""The plugin system: built-ins through the hook, lazy entry points, broken plugins, conflicts."""

import dataclasses
import re
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import pytest

import vmoe_plugins as plugins
import vmoe_routing


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


@dataclasses.dataclass(frozen=True)
class ConstantRouter:
    """Every token to expert 0 with weight 1: a minimal router for plugin tests."""

    num_experts: int
    capacity: int = 4

    def init(self, rng, d_model):
        return {}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def __call__(self, params, x_gsd, *, rng=None, deterministic=True):
        g, s, _ = x_gsd.shape
        return vmoe_routing.token_choice_routing(
            jnp.zeros((g, s, 1), jnp.int32),
            jnp.ones((g, s, 1)),
            num_experts=self.num_experts,
            capacity=self.capacity,
        )


class ConstantPlugin:
    @vmoe_routing.hookimpl
    def vmoe_routers(self):
        return {"constant": ConstantRouter}


def test_built_ins_are_available():
    assert {"top_k", "bpr"} <= set(vmoe_routing.available_routers())
    assert vmoe_routing.ROUTERS.provider("top_k") == "vmoe_routing.builtins (built-in)"
    assert isinstance(vmoe_routing.get_router("top_k", num_experts=4, k=2), vmoe_routing.TopKRouter)


def test_unknown_router_lists_the_installed_ones_and_suggests():
    with pytest.raises(
        ValueError,
        match=r"unknown router 'top-k' \(did you mean 'top_k'\?\); installed: \[.*'bpr'.*'top_k'",
    ) as error:
        vmoe_routing.get_router("top-k", num_experts=2)
    assert "\n" not in str(error.value)


def test_register_a_plugin_at_run_time_then_unregister_it():
    assert "constant" not in vmoe_routing.available_routers()
    name = vmoe_routing.register_plugin(ConstantPlugin(), name="constant-plugin")
    router = vmoe_routing.get_router("constant", num_experts=3)
    assert isinstance(router, vmoe_routing.Router)
    routing = router(router.init(None, 2), jnp.ones((1, 6, 2)))
    assert routing.valid[0].sum() == 4 and set(routing.expert[0].tolist()) == {0}
    assert "constant-plugin" in vmoe_routing.list_plugins()
    vmoe_routing.unregister_plugin(name)
    assert "constant" not in vmoe_routing.available_routers()
    with pytest.raises(ValueError, match="no plugin named 'constant-plugin' is registered"):
        vmoe_routing.unregister_plugin(name)


def test_two_plugins_claiming_one_name_is_an_error_naming_both():
    class Rival:
        @vmoe_routing.hookimpl
        def vmoe_routers(self):
            return {"constant": ConstantRouter}

    vmoe_routing.register_plugin(ConstantPlugin(), name="first")
    vmoe_routing.register_plugin(Rival(), name="second")
    with pytest.raises(
        ValueError, match="router name 'constant' is claimed by two plugins: first and second"
    ):
        vmoe_routing.available_routers()


def test_a_plugin_cannot_take_a_built_in_name():
    class Impostor:
        @vmoe_routing.hookimpl
        def vmoe_routers(self):
            return {"bpr": ConstantRouter}

    vmoe_routing.register_plugin(Impostor(), name="impostor")
    with pytest.raises(
        ValueError,
        match=r"'bpr' is claimed by two plugins: vmoe_routing.builtins \(built-in\) and impostor",
    ):
        vmoe_routing.get_router("bpr", num_experts=2)


def test_a_hook_that_raises_is_reported_and_the_rest_still_work():
    class Faulty:
        @vmoe_routing.hookimpl
        def vmoe_routers(self):
            raise RuntimeError("cannot build my table")

    vmoe_routing.register_plugin(Faulty(), name="faulty")
    vmoe_routing.register_plugin(ConstantPlugin(), name="constant-plugin")
    with pytest.warns(
        vmoe_routing.PluginImportWarning, match="faulty.*RuntimeError: cannot build my table"
    ):
        names = vmoe_routing.available_routers()
    assert {"top_k", "bpr", "constant"} <= set(names)


def test_a_hook_returning_a_non_mapping_is_reported():
    class Sloppy:
        @vmoe_routing.hookimpl
        def vmoe_routers(self):
            return ["constant"]

    vmoe_routing.register_plugin(Sloppy(), name="sloppy")
    with pytest.warns(
        vmoe_routing.PluginImportWarning, match="sloppy.*returned list, not a mapping"
    ):
        assert "bpr" in vmoe_routing.available_routers()


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """Two entry-point plugins in a fake installed distribution: one broken, one good."""
    dist_info = tmp_path / "fake_vmoe_plugins-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-vmoe-plugins\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[vmoe]\nbroken = fake_broken_plugin\ngood = fake_good_plugin\n"
    )
    (tmp_path / "fake_broken_plugin.py").write_text(
        "raise ImportError('needs a missing library')\n"
    )
    (tmp_path / "fake_good_plugin.py").write_text(
        textwrap.dedent(
            """
            import vmoe_routing

            @vmoe_routing.hookimpl
            def vmoe_routers():
                return {"good": vmoe_routing.TopKRouter}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for module in ("fake_broken_plugin", "fake_good_plugin"):
        sys.modules.pop(module, None)


def test_entry_points_load_lazily_and_a_broken_one_does_not_stop_the_others(installed_plugins):
    assert "fake_good_plugin" not in sys.modules  # nothing is imported before the first lookup
    with pytest.warns(
        vmoe_routing.PluginImportWarning,
        match=r'entry point "broken = fake_broken_plugin" from fake-vmoe-plugins 0.1: '
        r"ImportError: needs a missing library",
    ):
        names = vmoe_routing.available_routers()
    assert {"good", "top_k", "bpr"} <= set(names)
    assert "fake_good_plugin" in sys.modules
    errors = vmoe_routing.plugin_errors()
    assert [e.plugin for e in errors] == [
        'entry point "broken = fake_broken_plugin" from fake-vmoe-plugins 0.1'
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, not on every lookup
        router = vmoe_routing.get_router("good", num_experts=2)
    assert router.num_experts == 2
    with pytest.raises(
        ValueError,
        match=r"unknown router 'broken'.*plugins that failed to load: \['entry point \"broken",
    ):
        vmoe_routing.get_router("broken", num_experts=2)
    assert vmoe_routing.ROUTERS.provider("good").startswith(
        'good (entry point "good = fake_good_plugin"'
    )


def test_plugin_router_works_end_to_end(installed_plugins):
    with pytest.warns(vmoe_routing.PluginImportWarning):
        router = vmoe_routing.get_router("good", num_experts=2, k=1)
    params = router.init(jax.random.key(0), 3)
    routing = router(params, jnp.ones((1, 4, 3)))
    y = vmoe_routing.combine(vmoe_routing.dispatch(jnp.ones((1, 4, 3)), routing), routing)
    assert y.shape == (1, 4, 3)


def test_a_factory_may_have_an_option_called_name():
    @dataclasses.dataclass(frozen=True)
    class Named(ConstantRouter):
        name: str = ""

    class NamedPlugin:
        @vmoe_routing.hookimpl
        def vmoe_routers(self):
            return {"named": Named}

    vmoe_routing.register_plugin(NamedPlugin(), name="named-plugin")
    assert vmoe_routing.get_router("named", name="mine", num_experts=2).name == "mine"


def test_a_plugin_router_without_the_protocol_members_is_refused_naming_the_plugin():
    @dataclasses.dataclass(frozen=True)
    class NoReplace:  # a router cannot be changed at inference (k, capacity) without replace
        num_experts: int

        def init(self, rng, d_model):
            return {}

        def __call__(self, params, x_gsd, *, rng=None, deterministic=True):
            raise AssertionError("never called")

    class Incomplete:
        @vmoe_routing.hookimpl
        def vmoe_routers(self):
            return {"no_replace": NoReplace}

    vmoe_routing.register_plugin(Incomplete(), name="incomplete-plugin")
    with pytest.raises(
        ValueError,
        match=r"router 'no_replace' from incomplete-plugin is a NoReplace without \['replace'\]",
    ):
        vmoe_routing.get_router("no_replace", num_experts=2)


def test_protocol_members_hookspec_and_registry_agree():
    # The Protocol, the registry's check and the hookspec's documentation list the same members.
    protocol = {
        name
        for name in (*vmoe_routing.Router.__annotations__, *vars(vmoe_routing.Router))
        if not name.startswith("_") or name == "__call__"
    }
    assert set(vmoe_routing.ROUTER_MEMBERS) == protocol
    assert vmoe_routing.ROUTERS.members == vmoe_routing.ROUTER_MEMBERS
    # The hookspec documents the members as a bullet list: "- `name`..." or "- `name(...)`...".
    doc = vmoe_routing.hookspecs.vmoe_routers.__doc__
    documented = re.findall(r"^\s*- `([A-Za-z_]\w*)", doc, flags=re.MULTILINE)
    assert len(documented) == len(set(documented)), documented
    assert set(documented) == set(vmoe_routing.ROUTER_MEMBERS)


@pytest.mark.parametrize(
    "name",
    [
        "hookimpl",
        "hookspec",
        "register_plugin",
        "unregister_plugin",
        "list_plugins",
        "plugin_errors",
        "Registry",
        "PluginImportWarning",
        "PluginError",
    ],
)
def test_vmoe_routing_re_exports_the_plugin_host_objects_themselves(name):
    # Existing plugins use vmoe_routing.hookimpl and friends: they must stay the same objects.
    assert getattr(vmoe_routing, name) is getattr(plugins, name)
