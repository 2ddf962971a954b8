"""The V-MoE release's fine-tuning of V-MoE-S/32 "last 2" on ILSVRC2012 at 384 px.

The release's vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012, field by field: 10,000
steps of 1,024 images of train[:99%] (inception crop 384, flip), softmax loss (the upstream model
used sigmoid, so its head is not kept), no pre-logits layer, C=1.5 in training and evaluation,
SGD with momentum 0.9, peak 3e-3 after 500 warmup steps, cosine decay to 1e-5, clipping at 10;
position embeddings resized (bilinear) from the 7x7 grid of 224 px to 12x12.

Start it from a pre-trained run (`vmoe_s32_last2_i1k`) or from the release's checkpoint
converted with `vmoe-train convert`:
    vmoe-train --config=vmoe_s32_last2_i1k_ft_i1k_384 --config.finetune.init_from=runs/s32

The release reports (mean of 3 fine-tuning seeds): 78.8% on its validation split, 75.9% on the
ILSVRC2012 validation set (our test split), 77.1% ReaL, 62.0% ImageNet-V2; about 48m on a TPUv3-8.
"""

from __future__ import annotations

from vmoe_train.configs._release import finetune


def get_config():
    return finetune("V-MoE-S/32", experts=8, layers="last-2")
