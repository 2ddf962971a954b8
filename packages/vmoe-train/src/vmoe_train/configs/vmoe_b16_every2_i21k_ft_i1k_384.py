"""The V-MoE release's fine-tuning of V-MoE-B/16 "every 2" (ImageNet-21k) on ILSVRC2012, 384 px.

The release's vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012, field by field: 10,000 steps
of 1,024 images of train[:99%] (inception crop 384, flip), softmax loss, a new head, no
pre-logits layer, C=1.5, SGD with momentum 0.9, peak 3e-3 after 500 warmup steps, cosine decay to
1e-5, clipping at 10; position embeddings resized (bilinear) from 14x14 to 24x24.

Start it from `vmoe_b16_every2_i21k` or from the release's checkpoint converted with
`vmoe-train convert` (--config.finetune.init_from=...). The release reports (mean of 3
fine-tuning seeds): 89.2% on its validation split, 85.6% on the ILSVRC2012 validation set (our
test split), 84.1% ReaL, 76.1% ImageNet-V2; its config does not state the TPU time.
"""

from __future__ import annotations

from vmoe_train.configs._release import finetune


def get_config():
    return finetune("V-MoE-B/16", experts=8, layers="every-2")
