"""The built-in datasets and preprocessing ops, registered through the same hooks as plugins."""

from __future__ import annotations

from vmoe_data import pp_image, pp_label, randaug
from vmoe_data.digits import digits
from vmoe_data.image_folder import image_folder
from vmoe_data.synthetic import synthetic
from vmoe_data.tfds_dataset import tfds_dataset
from vmoe_plugins import hookimpl


@hookimpl
def vmoe_datasets():
    return {
        "digits": digits,
        "tfds": tfds_dataset,
        "image_folder": image_folder,
        "synthetic": synthetic,
    }


@hookimpl
def vmoe_preprocess_ops():
    return {
        "decode": pp_image.decode,
        "resize": pp_image.resize,
        "resize_small": pp_image.resize_small,
        "central_crop": pp_image.central_crop,
        "random_crop": pp_image.random_crop,
        "inception_crop": pp_image.inception_crop,
        "flip_lr": pp_image.flip_lr,
        "randaug": randaug.randaug,
        "value_range": pp_image.value_range,
        "normalize": pp_image.normalize,
        "onehot": pp_label.onehot,
        "mixup": pp_label.mixup,
        "keep": pp_label.keep,
    }
