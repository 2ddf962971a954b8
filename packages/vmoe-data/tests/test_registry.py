"""The dataset and preprocessing-op registries: built-ins and plugins through the same hooks."""

from __future__ import annotations

import numpy as np
import pytest

import vmoe_data
import vmoe_plugins
from vmoe_data import ArraySource, Dataset


class _Plugin:
    """A third-party plugin: one dataset and one op."""

    @vmoe_plugins.hookimpl
    def vmoe_datasets(self):
        def ones(size: int = 4):
            arrays = {"image": np.ones((size, 2, 2, 1), np.uint8), "label": np.zeros(size, int)}
            return Dataset("ones", 1, {"train": size}, lambda split: ArraySource(arrays))

        return {"ones": ones}

    @vmoe_plugins.hookimpl
    def vmoe_preprocess_ops(self):
        def invert():
            def op(example, rng):
                return {**example, "image": 255 - example["image"]}

            return op

        return {"invert": invert}


@pytest.fixture
def plugin():
    name = vmoe_plugins.register_plugin(_Plugin(), name="test_data_plugin")
    yield
    vmoe_plugins.unregister_plugin(name)


def test_builtin_datasets_are_registered():
    assert {"digits", "tfds", "image_folder", "synthetic"} <= set(vmoe_data.available_datasets())


def test_builtin_preprocess_ops_are_registered():
    expected = {"decode", "resize", "random_crop", "inception_crop", "flip_lr", "value_range"}
    expected |= {"normalize", "onehot", "mixup", "keep", "central_crop", "resize_small"}
    assert expected <= set(vmoe_data.available_preprocess_ops())


def test_builtins_come_from_the_builtin_plugin():
    assert vmoe_data.DATASETS.provider("digits") == "vmoe_data.builtins (built-in)"
    assert vmoe_data.PP_OPS.provider("decode") == "vmoe_data.builtins (built-in)"


def test_unknown_dataset_lists_the_installed_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'digitz' \(did you mean 'digits'\?\)"):
        vmoe_data.get_dataset("digitz")


def test_unknown_dataset_family_in_a_prefixed_name():
    with pytest.raises(ValueError, match=r"unknown dataset 'hub'.*installed: \['digits'"):
        vmoe_data.get_dataset("hub:cifar10")


def test_unknown_dataset_option_lists_the_allowed_ones():
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['size'\].*allowed: \['data_dir'\]"
    ):
        vmoe_data.get_dataset("digits", size=3)


def test_argument_given_twice_is_an_error():
    with pytest.raises(ValueError, match="names its path twice"):
        vmoe_data.get_dataset("image_folder:/a", path="/b")


def test_plugin_dataset_is_available_by_name(plugin):
    assert "ones" in vmoe_data.available_datasets()
    dataset = vmoe_data.get_dataset("ones", size=3)
    assert len(dataset.source("train")) == 3


def test_plugin_op_is_usable_in_a_spec(plugin):
    out = vmoe_data.preprocess("invert")({"image": np.zeros((1, 1, 1), np.uint8)}, None)
    assert out["image"].item() == 255


def test_plugin_names_disappear_when_unregistered():
    name = vmoe_plugins.register_plugin(_Plugin(), name="test_data_plugin_2")
    vmoe_plugins.unregister_plugin(name)
    assert "ones" not in vmoe_data.available_datasets()


def test_a_name_claimed_twice_is_an_error_naming_both():
    class Clash:
        @vmoe_plugins.hookimpl
        def vmoe_datasets(self):
            return {"digits": lambda: None}

    name = vmoe_plugins.register_plugin(Clash(), name="clashing_plugin")
    try:
        with pytest.raises(ValueError, match=r"'digits' is claimed by two plugins.*clashing"):
            vmoe_data.get_dataset("digits")
    finally:
        vmoe_plugins.unregister_plugin(name)


def test_data_hooks_are_listed_for_the_builtin_plugin():
    hooks = vmoe_plugins.list_plugins()["vmoe_data.builtins (built-in)"]
    assert hooks == ["vmoe_datasets", "vmoe_preprocess_ops"]


def test_a_factory_that_does_not_return_a_dataset_is_an_error_naming_its_plugin():
    class Broken:
        @vmoe_plugins.hookimpl
        def vmoe_datasets(self):
            return {"not_a_dataset": lambda: {"train": []}}

    name = vmoe_plugins.register_plugin(Broken(), name="broken_data_plugin")
    try:
        with pytest.raises(
            ValueError,
            match=r"dataset 'not_a_dataset' \(from broken_data_plugin\) returned a dict, not a",
        ):
            vmoe_data.get_dataset("not_a_dataset")
    finally:
        vmoe_plugins.unregister_plugin(name)


def test_a_prefixed_name_without_an_argument_is_an_error():
    with pytest.raises(ValueError, match=r"^dataset name 'tfds:' has nothing after ':'; give the"):
        vmoe_data.get_dataset("tfds:")
