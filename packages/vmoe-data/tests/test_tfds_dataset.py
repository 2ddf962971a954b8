"""`tfds:<name>`: any tfds dataset prepared as ArrayRecord files, and clear errors otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

import vmoe_data


class VmoeTestSquares(tfds.core.GeneratorBasedBuilder):
    """A tiny tfds dataset prepared by the tests: 4x4 images whose pixels are the label."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
                    "shape": tfds.features.ClassLabel(names=["a", "b", "c"]),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(12), "test": self._generate_examples(6)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((4, 4, 3), i % 3, np.uint8), "shape": i % 3}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    tfds.display_progress_bar(False)
    VmoeTestSquares(data_dir=str(path), file_format="array_record").download_and_prepare()
    return path


def test_prepared_tfds_dataset_reads_by_name(tfds_dir):
    dataset = vmoe_data.get_dataset(
        "tfds:vmoe_test_squares", data_dir=str(tfds_dir), label_key="shape"
    )
    assert dataset.name == "tfds:vmoe_test_squares"
    assert dict(dataset.split_sizes) == {"train": 12, "test": 6}
    assert dataset.num_classes == 3
    assert dataset.class_names == ("a", "b", "c")


def test_examples_carry_the_label_key_as_label(tfds_dir):
    dataset = vmoe_data.get_dataset(
        "tfds:vmoe_test_squares", data_dir=str(tfds_dir), label_key="shape"
    )
    source = dataset.source("test")
    for i in range(len(source)):
        example = source[i]
        assert int(example["label"]) == int(example["shape"]) == int(example["image"][0, 0, 0])


def test_prepared_tfds_dataset_feeds_a_pipeline(tfds_dir):
    dataset = vmoe_data.get_dataset(
        "tfds:vmoe_test_squares", data_dir=str(tfds_dir), label_key="shape"
    )
    batches = list(
        vmoe_data.eval_pipeline(
            dataset, batch_size=4, pp="resize(8)|onehot(3)", process_index=0, process_count=1
        )
    )
    assert [b["image"].shape for b in batches] == [(4, 8, 8, 3), (4, 8, 8, 3)]
    assert int(sum(b["mask"].sum() for b in batches)) == 6


def test_missing_label_feature_names_the_features(tfds_dir):
    with pytest.raises(ValueError, match=r"no ClassLabel feature 'label'.*\['image', 'shape'\]"):
        vmoe_data.get_dataset("tfds:vmoe_test_squares", data_dir=str(tfds_dir))


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(
        ValueError, match=r"'cifar10' is not prepared in data_dir=.*tfds build cifar10"
    ):
        vmoe_data.get_dataset("tfds:cifar10", data_dir=str(tmp_path))


def test_unknown_tfds_dataset_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"tfds dataset 'no_such_set' is not known to tfds"):
        vmoe_data.get_dataset("tfds:no_such_set", data_dir=str(tmp_path))


def test_labels_are_read_in_source_order(tfds_dir):
    dataset = vmoe_data.get_dataset(
        "tfds:vmoe_test_squares", data_dir=str(tfds_dir), label_key="shape"
    )
    source = dataset.source("train")
    expected = [int(source[i]["shape"]) for i in range(len(source))]
    assert dataset.labels("train").tolist() == expected
    assert dataset.labels("train[2:5]").tolist() == expected[2:5]


def test_few_shot_over_a_tfds_dataset(tfds_dir):
    dataset = vmoe_data.get_dataset(
        "tfds:vmoe_test_squares", data_dir=str(tfds_dir), label_key="shape"
    )
    batches = vmoe_data.few_shot_pipeline(
        dataset, shots=2, batch_size=6, process_index=0, process_count=1
    )
    labels = sorted(int(x) for b in batches for x in b["label"][b["mask"]])
    assert labels == [0, 0, 1, 1, 2, 2]
