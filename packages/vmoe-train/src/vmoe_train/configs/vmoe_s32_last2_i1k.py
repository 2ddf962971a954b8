"""The V-MoE release's V-MoE-S/32 "last 2", E=8, on ILSVRC2012 from scratch ("randaug light1").

For users with tfds:imagenet2012 prepared and accelerators; not a CPU job. The release's
vmoe_s32_last2_ilsvrc2012_randaug_light1, field by field ("ViT-S/32, E=8, K=2, Last 2, 300
Epochs"): the release's 8-block S/32 (width 512, MLP 2048, 8 heads; not the 12-block ViT-S),
MoE on blocks 5 and 7, pre-logits layer of 512, head bias -log(1000); 300 epochs at batch 8,192
of train[:99%] with inception crop 224, flip, RandAugment(2, 10), mixup 0.2 per device; sigmoid
loss; Adam at peak 3e-3 (not the paper's common 1e-3), 10k warmup steps then linear decay to 1e-5,
weight decay 0.1 on kernels, clipping at global norm 1.0; MoE dropout 0.2; evaluation at C=4.0.

The release reports (mean of 3 seeds): 76.8% on its validation split (train[99%:]), 73.1% on
the ILSVRC2012 validation set (our test split), 74.4% ReaL, 59.2% ImageNet-V2; about 5h50m on a
TPUv3-32. Its 384 px fine-tuning: `vmoe_s32_last2_i1k_ft_i1k_384`. Differences from the release:
see `vmoe_train.configs._release` (MoE dropout on the layer's output, not inside the experts).
"""

from __future__ import annotations

import math

from vmoe_train.configs._release import ILSVRC2012_CLASSES, pretrain


def get_config():
    c = pretrain(
        "V-MoE-S/32",
        experts=8,
        layers="last-2",
        classes=ILSVRC2012_CLASSES,
        batch_size=8192,
        learning_rate=3e-3,
        randaug=(2, 10),
        mixup=0.2,
    )
    c.dataset.name = "tfds:imagenet2012"
    c.dataset.train_split = "train[:99%]"
    c.dataset.eval_splits = ("train[99%:]",)  # model selection never on the test set
    c.dataset.test_split = "validation"  # the ILSVRC2012 validation set is the test set
    c.model.representation_size = 512
    c.model.head_bias_init = -math.log(ILSVRC2012_CLASSES)
    c.model.moe.dropout_rate = 0.2
    c.eval.capacity_factor = 4.0  # the release evaluates its pre-trained models at C=4
    return c
