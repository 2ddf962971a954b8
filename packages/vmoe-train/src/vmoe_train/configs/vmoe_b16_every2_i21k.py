"""The V-MoE release's V-MoE-B/16 "every 2", E=8, on ImageNet-21k ("randaug strong").

For users with ImageNet-21k prepared as tfds:imagenet21k (ArrayRecord files with "image" and
"label"; or point `dataset.name` at `image_folder:/path/to/imagenet21k`) and a pod slice. The
release's pretrain_imagenet21k ("ViT-B/16, E=8, K=2, Every 2, 300 Epochs"), field by field: B/16
(12 blocks of width 768) with MoE on blocks 1, 3, ..., 11, no pre-logits layer, head bias -10;
300 epochs at batch 4,096 of full[102400:] (full[:102400] held out) with inception crop 224,
flip, RandAugment(2, 20), mixup 0.5; sigmoid loss; Adam at peak 8e-4, 10k warmup steps then
linear decay to 1e-5, weight decay 0.1 on kernels, clipping at 1.0. The release's file sets no
evaluation capacity, so evaluation routes at the training C=1.05 (raise `eval.capacity_factor`
to see the model with fewer drops).

The release does not report this model's upstream accuracy or TPU time in its config; its
ILSVRC2012 fine-tuning (`vmoe_b16_every2_i21k_ft_i1k_384`) reaches 85.6%.
"""

from __future__ import annotations

from vmoe_train.configs._release import IMAGENET21K_CLASSES, pretrain


def get_config():
    c = pretrain(
        "V-MoE-B/16",
        experts=8,
        layers="every-2",
        classes=IMAGENET21K_CLASSES,
        batch_size=4096,
        learning_rate=8e-4,
        randaug=(2, 20),
        mixup=0.5,
    )
    c.dataset.name = "tfds:imagenet21k"
    c.dataset.train_split = "full[102400:]"
    c.dataset.eval_splits = ("full[:102400]",)
    c.dataset.test_split = ""
    c.model.representation_size = 0
    c.model.head_bias_init = -10.0
    return c
