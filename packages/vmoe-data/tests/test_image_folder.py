"""`image_folder:<path>`: users' own images, one sub-folder per class."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vmoe_data


def _write(path, value, size=(6, 5), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, format=fmt)


@pytest.fixture
def flat(tmp_path):
    """root/<class>/<image>: cats (3 images) and dogs (2), one of them a JPEG."""
    for i in range(3):
        _write(tmp_path / "cats" / f"{i}.png", 10 * i)
    _write(tmp_path / "dogs" / "a.png", 200)
    _write(tmp_path / "dogs" / "b.JPG", 100, fmt="JPEG")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    return tmp_path


def test_classes_are_the_sorted_folder_names(flat):
    dataset = vmoe_data.get_dataset("image_folder", path=str(flat))
    assert dataset.class_names == ("cats", "dogs")
    assert dataset.num_classes == 2
    assert dict(dataset.split_sizes) == {"train": 5}
    np.testing.assert_array_equal(dataset.labels("train"), [0, 0, 0, 1, 1])


def test_prefixed_name_gives_the_path(flat):
    dataset = vmoe_data.get_dataset(f"image_folder:{flat}")
    assert dataset.name == f"image_folder:{flat}"
    assert dataset.num_examples("train") == 5


def test_decode_gives_the_pixels_of_the_files(flat):
    dataset = vmoe_data.get_dataset("image_folder", path=str(flat))
    source = dataset.source("train")
    decode = vmoe_data.preprocess("decode")
    images = [decode(source[i], None)["image"] for i in range(3)]
    assert [img.shape for img in images] == [(5, 6, 3)] * 3
    assert [int(img[0, 0, 0]) for img in images] == [0, 10, 20]


def test_split_folders_become_splits_with_shared_classes(tmp_path):
    _write(tmp_path / "train" / "a" / "1.png", 1)
    _write(tmp_path / "train" / "b" / "1.png", 2)
    _write(tmp_path / "test" / "b" / "1.png", 3)
    dataset = vmoe_data.get_dataset("image_folder", path=str(tmp_path))
    assert dict(dataset.split_sizes) == {"train": 2, "test": 1}
    assert dataset.class_names == ("a", "b")
    np.testing.assert_array_equal(dataset.labels("test"), [1])


def test_images_of_different_sizes_batch_after_resize(flat):
    _write(flat / "cats" / "big.png", 50, size=(30, 20))
    batches = list(
        vmoe_data.eval_pipeline(
            f"image_folder:{flat}",
            split="train",
            batch_size=4,
            pp="decode|resize(8)|value_range(-1, 1)|keep('image', 'label')",
            process_index=0,
            process_count=1,
        )
    )
    assert [b["image"].shape for b in batches] == [(4, 8, 8, 3)] * 2
    assert int(sum(b["mask"].sum() for b in batches)) == 6


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        vmoe_data.get_dataset("image_folder", path=str(tmp_path / "nope"))


def test_folder_without_class_folders_is_an_error(tmp_path):
    _write(tmp_path / "1.png", 0)
    with pytest.raises(ValueError, match="no sub-folders; expected one folder per class"):
        vmoe_data.get_dataset("image_folder", path=str(tmp_path))


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'cats' holds neither images"):
        vmoe_data.get_dataset("image_folder", path=str(tmp_path))


def test_undecodable_file_is_a_decode_error(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    _write(tmp_path / "dogs" / "a.png", 1)
    dataset = vmoe_data.get_dataset("image_folder", path=str(tmp_path))
    with pytest.raises(ValueError, match="decode: cannot decode 9 bytes as an image"):
        vmoe_data.preprocess("decode")(dataset.source("train")[0], None)


def test_a_class_folder_with_images_one_level_deeper_is_an_error(flat):
    _write(flat / "birds" / "2020" / "1.png", 5)
    with pytest.raises(
        ValueError, match=r"class folders \['birds'\] hold no images .*sub-folders \['birds/2020'\]"
    ):
        vmoe_data.get_dataset("image_folder", path=str(flat))


def test_every_class_nested_one_level_deeper_is_an_error(tmp_path):
    _write(tmp_path / "cat" / "2020" / "1.png", 1)
    _write(tmp_path / "dog" / "2021" / "1.png", 2)
    with pytest.raises(ValueError, match=r"split 'cat' shares no class with the other splits"):
        vmoe_data.get_dataset("image_folder", path=str(tmp_path))


def test_split_named_folders_holding_images_directly_are_an_error(tmp_path):
    _write(tmp_path / "train" / "1.png", 1)
    _write(tmp_path / "test" / "1.png", 2)
    with pytest.raises(ValueError, match=r"look like splits but hold images directly"):
        vmoe_data.get_dataset("image_folder", path=str(tmp_path))


def test_a_single_class_is_an_error(tmp_path):
    _write(tmp_path / "cats" / "1.png", 1)
    with pytest.raises(ValueError, match=r"has one class, 'cats'"):
        vmoe_data.get_dataset("image_folder", path=str(tmp_path))


def test_a_split_folder_without_classes_is_an_error(tmp_path):
    _write(tmp_path / "train" / "a" / "1.png", 1)
    _write(tmp_path / "train" / "b" / "1.png", 1)
    (tmp_path / "test").mkdir()
    with pytest.raises(ValueError, match=r"'test' holds neither images .* nor class folders"):
        vmoe_data.get_dataset("image_folder", path=str(tmp_path))
