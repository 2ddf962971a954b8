"""The plugin host and registries: built-ins through hooks, lazy entry points, broken plugins,
conflicts, option names and the protocol check on what a factory returns."""

import dataclasses
import sys
import textwrap
import types
import warnings

import pytest

import vmoe_plugins

specs = types.ModuleType("vmoe_test_specs")


@vmoe_plugins.hookspec
def vmoe_test_widgets():
    """A hook of this test file: {name: widget factory}."""


specs.vmoe_test_widgets = vmoe_test_widgets
vmoe_plugins.add_hookspecs(specs)

WIDGETS = vmoe_plugins.Registry("vmoe_test_widgets", "widget", members=("size", "__call__"))


@dataclasses.dataclass(frozen=True)
class Widget:
    size: int = 1

    def __call__(self, x):
        return x * self.size


class Builtins:
    @vmoe_plugins.hookimpl
    def vmoe_test_widgets(self):
        return {"plain": Widget}


vmoe_plugins.register_builtin("test.builtins", Builtins())


@pytest.fixture(autouse=True)
def fresh_host():
    vmoe_plugins.reset()
    yield
    vmoe_plugins.reset()


def test_built_ins_register_through_the_hook_and_survive_reset():
    assert "plain" in WIDGETS.names()
    assert WIDGETS.provider("plain") == "test.builtins (built-in)"
    vmoe_plugins.reset()
    assert WIDGETS.create("plain", size=3)(2) == 6


def test_unknown_name_lists_the_installed_ones_and_suggests_one_line():
    with pytest.raises(ValueError, match=r"unknown widget 'plane' \(did you mean 'plain'\?\)"):
        WIDGETS.create("plane")
    try:
        WIDGETS.create("plane")
    except ValueError as error:
        assert "\n" not in str(error) and "installed: ['plain']" in str(error)


def test_option_names_are_checked_against_the_factory():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sise'\] for widget 'plain'"):
        WIDGETS.create("plain", sise=2)

    class Needy:
        @vmoe_plugins.hookimpl
        def vmoe_test_widgets(self):
            return {"needy": lambda *, size: Widget(size)}

    vmoe_plugins.register_plugin(Needy(), name="needy-plugin")
    with pytest.raises(
        ValueError,
        match=r"missing required option\(s\) \['size'\] for widget 'needy' from needy-plugin$",
    ):
        WIDGETS.create("needy")


def test_both_create_errors_name_the_plugin():
    # The option-name error named only the registered name, not the plugin it came from.
    with pytest.raises(
        ValueError,
        match=r"^unknown option\(s\) \['sise'\] for widget 'plain' from test.builtins "
        r"\(built-in\); allowed: \['size'\]$",
    ):
        WIDGETS.create("plain", sise=2)


def test_with_article_picks_a_or_an():
    assert vmoe_plugins.with_article("Incomplete") == "an Incomplete"
    assert vmoe_plugins.with_article("object") == "an object"
    assert vmoe_plugins.with_article("expert type") == "an expert type"
    assert vmoe_plugins.with_article("TopKRouter") == "a TopKRouter"
    assert vmoe_plugins.with_article("int") == "an int"


def test_run_time_plugin_appears_then_disappears():
    class Extra:
        @vmoe_plugins.hookimpl
        def vmoe_test_widgets(self):
            return {"extra": Widget}

    name = vmoe_plugins.register_plugin(Extra(), name="extra-plugin")
    assert WIDGETS.names() == ["extra", "plain"]
    assert "extra-plugin" in vmoe_plugins.list_plugins()
    vmoe_plugins.unregister_plugin(name)
    assert WIDGETS.names() == ["plain"]
    with pytest.raises(ValueError, match="no plugin named 'extra-plugin' is registered"):
        vmoe_plugins.unregister_plugin(name)


def test_two_plugins_claiming_one_name_is_an_error_naming_both():
    class Impostor:
        @vmoe_plugins.hookimpl
        def vmoe_test_widgets(self):
            return {"plain": Widget}

    vmoe_plugins.register_plugin(Impostor(), name="impostor")
    with pytest.raises(
        ValueError,
        match=r"widget name 'plain' is claimed by two plugins: test.builtins "
        r"\(built-in\) and impostor",
    ):
        WIDGETS.names()


def test_a_hook_that_raises_or_returns_a_non_mapping_is_reported_and_others_still_work():
    class Faulty:
        @vmoe_plugins.hookimpl
        def vmoe_test_widgets(self):
            raise RuntimeError("cannot build my table")

    class Sloppy:
        @vmoe_plugins.hookimpl
        def vmoe_test_widgets(self):
            return ["plain"]

    vmoe_plugins.register_plugin(Faulty(), name="faulty")
    vmoe_plugins.register_plugin(Sloppy(), name="sloppy")
    with pytest.warns(vmoe_plugins.PluginImportWarning) as record:
        assert WIDGETS.names() == ["plain"]
    messages = " ".join(str(w.message) for w in record)
    assert "faulty (vmoe_test_widgets): RuntimeError: cannot build my table" in messages
    assert "sloppy (vmoe_test_widgets): TypeError: returned list, not a mapping" in messages
    assert [e.plugin for e in vmoe_plugins.plugin_errors()] == [
        "faulty (vmoe_test_widgets)",
        "sloppy (vmoe_test_widgets)",
    ]


def test_a_created_object_without_the_protocol_members_is_refused_naming_the_plugin():
    class Incomplete:  # has size, is not callable
        size = 2

    class Lacking:
        @vmoe_plugins.hookimpl
        def vmoe_test_widgets(self):
            return {"lacking": Incomplete}

    vmoe_plugins.register_plugin(Lacking(), name="lacking-plugin")
    with pytest.raises(
        ValueError,
        match=r"widget 'lacking' from lacking-plugin is an Incomplete without \['__call__'\]; "
        r"a widget must have \['size', '__call__'\]",
    ):
        WIDGETS.create("lacking")


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """Entry-point plugins in a fake installed distribution: broken, good, and incomplete."""
    dist_info = tmp_path / "fake_widgets-0.3.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-widgets\nVersion: 0.3\n")
    (dist_info / "entry_points.txt").write_text(
        "[vmoe]\nbroken = fake_broken_widgets\ngood = fake_good_widgets\n"
    )
    (tmp_path / "fake_broken_widgets.py").write_text("raise ImportError('needs a missing lib')\n")
    (tmp_path / "fake_good_widgets.py").write_text(
        textwrap.dedent(
            """
            import vmoe_plugins

            class Half:  # no size: fails the protocol check
                def __call__(self, x):
                    return x / 2

            @vmoe_plugins.hookimpl
            def vmoe_test_widgets():
                return {"good": lambda size=1: type("W", (), {"size": size,
                        "__call__": lambda self, x: x})(), "half": Half}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for module in ("fake_broken_widgets", "fake_good_widgets"):
        sys.modules.pop(module, None)


def test_entry_points_load_lazily_and_a_broken_one_does_not_stop_the_others(installed_plugins):
    assert "fake_good_widgets" not in sys.modules  # nothing imported before the first lookup
    with pytest.warns(
        vmoe_plugins.PluginImportWarning,
        match=r'entry point "broken = fake_broken_widgets" from fake-widgets 0.3: '
        r"ImportError: needs a missing lib",
    ):
        names = WIDGETS.names()
    assert names == ["good", "half", "plain"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once, not on every lookup
        assert WIDGETS.create("good", size=4).size == 4
    with pytest.raises(ValueError, match=r"plugins that failed to load: \['entry point \"broken"):
        WIDGETS.create("broken")
    assert WIDGETS.provider("good").startswith('good (entry point "good = fake_good_widgets"')


def test_the_protocol_error_names_the_entry_point_and_distribution(installed_plugins):
    with pytest.warns(vmoe_plugins.PluginImportWarning):
        WIDGETS.names()
    with pytest.raises(
        ValueError,
        match=r"widget 'half' from good \(entry point \"good = fake_good_widgets\" from "
        r"fake-widgets 0.3\) is a Half without \['size'\]",
    ):
        WIDGETS.create("half")


def test_missing_members_counts_call_only_for_callables():
    assert vmoe_plugins.missing_members(Widget(), ("size", "__call__")) == []
    assert vmoe_plugins.missing_members(object(), ("size", "__call__")) == ["size", "__call__"]


def test_accepts_reads_the_factory_options():
    class More:
        @vmoe_plugins.hookimpl
        def vmoe_test_widgets(self):
            return {"kw": lambda **options: Widget(), "pos": lambda *sizes: Widget()}

    vmoe_plugins.register_plugin(More(), name="more")
    assert WIDGETS.accepts("plain", "size") and not WIDGETS.accepts("plain", "colour")
    assert WIDGETS.accepts("kw", "anything")
    assert not WIDGETS.accepts("pos", "sizes")


def test_a_known_plugin_name_that_is_not_installed_says_what_to_install():
    registry = vmoe_plugins.Registry(
        "vmoe_test_widgets", "widget", known={"fancy": "vmoe-widget-fancy"}
    )
    assert registry.missing_hint("fancy") == (
        "widget 'fancy' comes with the plugin package vmoe-widget-fancy, which is not "
        "installed: pip install vmoe-widget-fancy"
    )
    assert registry.missing_hint("other") == ""
    with pytest.raises(ValueError, match=r"pip install vmoe-widget-fancy; installed: \["):
        registry.create("fancy")
