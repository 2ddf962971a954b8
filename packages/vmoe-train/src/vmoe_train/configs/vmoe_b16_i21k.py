"""The paper's V-MoE-B/16 upstream recipe on ImageNet-21k (tfds:imagenet21k, prepared by you).

For users with the data and a pod slice. ViT-B/16 (12 blocks of width 768) with E=32 experts on
every other block ("every-2"), K=2, C=1.05, routing groups of the per-device batch, importance
and load losses 0.005, no BPR in pre-training (V-MoE paper, Sections 2-3 and Appendix A/B);
ViT's ImageNet-21k recipe for the rest (Adam, warmup 10k then linear decay, weight decay 0.03,
dropout 0.1, clipping 1.0, sigmoid cross-entropy, 90 epochs at batch 4096). tfds has no
ImageNet-21k builder of its own: prepare one under the name "imagenet21k" (ArrayRecord files
with "image" and "label"), or point `dataset.name` at `image_folder:/path/to/imagenet21k`.
"""

from __future__ import annotations

from vmoe_train.configs.vmoe_s32_i1k import get_config as s32_config

IMAGES = 12_743_321  # the commonly used ImageNet-21k (fall 2011) after removing duplicates


def get_config():
    c = s32_config()
    c.dataset.name = "tfds:imagenet21k"
    c.dataset.train_split = "train[:99%]"
    c.dataset.eval_splits = ("train[99%:]",)
    c.dataset.test_split = ""
    c.pp.train = "decode(3)|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(21843)"
    c.num_steps = 90 * IMAGES // 4096  # 90 epochs
    c.model.name = "V-MoE-B/16"
    c.model.dropout_rate = 0.1
    c.model.moe.layers = "every-2"
    c.optimizer.weight_decay = 0.03
    return c
