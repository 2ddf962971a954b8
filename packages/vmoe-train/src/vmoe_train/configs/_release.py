"""What the V-MoE release's paper recipes share (google-research/vmoe, vmoe/configs/vmoe_paper/).

Not a recipe: `pretrain(...)` and `finetune(...)` fill the fields the release's recipes have in
common, and each recipe module sets what is its own. The values are the release's, read from its
config files (common.py, the per-recipe files); the tests compare every shipped recipe with a
table of them (packages/vmoe-train/tests/test_recipes.py).

How the release's settings map onto ours:
- Its "adam" with `weight_decay` added before the learning-rate scaling is optax's adamw (the
  decay is multiplied by the learning rate); its `[('.*/kernel', 0.1)]` decays every kernel, which
  on our parameter names is `weight_decay_on="matrices"` (tested in test_optim.py).
- Its group_size = 8 images x tokens per image is `model.moe.group_images = 8`.
- Its `split_rngs=False` is `model.moe.expert_init = "shared"`; its bfloat16 einsum dispatcher is
  `model.moe.dispatch_dtype = "bfloat16"`; its router noise_std 1.0 means 1/E, as ours.
- Its `train_epochs` is our `num_epochs` (steps from the split's size when the run is built).
- Its mixup (`granularity='device'`, `size=2`) is the pp's last op with one group per local
  device (`groups={local_devices}`, filled in by vmoe-train) and `largest_first=True` (each
  example keeps the larger of the two weights, as the release).

Deliberate differences, the same in every recipe:
- The release's MoE dropout is applied inside each expert (hidden and output activations); ours
  drops the MoE layer's combined output (`model.moe.dropout_rate`), since dropout keys do not
  travel into the expert exchange. Only the S/32 pre-training recipe uses MoE dropout (0.2).
- Mixup mixes example i with i - 1 of its group, the release with i + 1: the same distribution,
  since batches are shuffled (vmoe_data's `mixup` keeps its earlier default).
- The expert strategy's default mesh puts gcd(E, devices) on the expert axis, as the release's
  `num_expert_partitions = num_experts` (E=8 on a TPUv3-32: a (4, 8) mesh).
"""

from __future__ import annotations

import math

from ml_collections import ConfigDict

from vmoe_train.config.fields import LOCAL_DEVICES
from vmoe_train.configs.base import base_config

ILSVRC2012_CLASSES = 1_000
IMAGENET21K_CLASSES = 21_843


def _model(c: ConfigDict, name: str, *, experts: int, layers: str) -> None:
    c.model.name = name
    c.model.dtype = "float32"  # as the release (bfloat16 compute: --config.model.dtype=bfloat16)
    c.model.dropout_rate = 0.0
    c.model.classifier = "token"
    c.model.moe.num_experts = experts
    c.model.moe.layers = layers
    c.model.moe.router = "top_k"
    c.model.moe.router_options.k = 2
    c.model.moe.router_options.capacity_factor = 1.05
    c.model.moe.router_options.capacity_multiple_of = 4  # the release's compute_capacity default
    c.model.moe.router_options.noise_std = 1.0  # std 1/E, as the release
    c.model.moe.router_options.importance_loss_weight = 0.005
    c.model.moe.router_options.load_loss_weight = 0.005
    c.model.moe.group_images = 8
    c.model.moe.dispatch_dtype = "bfloat16"
    c.model.moe.expert_init = "shared"
    c.model.moe.dropout_rate = 0.0
    c.sharding.strategy = "expert"  # experts split over the 'expert' mesh axis, as the release


def pretrain(
    name: str,
    *,
    experts: int,
    layers: str,
    classes: int,
    batch_size: int,
    learning_rate: float,
    randaug: tuple[int, int],
    mixup: float,
) -> ConfigDict:
    """A release pre-training recipe: 300 epochs, Adam + linear decay to 1e-5, sigmoid loss,
    inception crop 224 + flip + RandAugment + mixup; the caller sets data splits and overrides."""
    c = base_config()
    num_layers, magnitude = randaug
    c.pp.train = (
        f"decode(3)|inception_crop(224)|flip_lr|randaug({num_layers}, {magnitude})|"
        f"value_range(-1, 1)|onehot({classes})|"
        f"mixup({mixup}, groups={LOCAL_DEVICES}, largest_first=True)"
    )
    c.pp.eval = "decode(3)|resize_small(256)|central_crop(224)|value_range(-1, 1)"
    c.dataset.num_workers = 8
    c.batch_size = batch_size
    c.eval_batch_size = batch_size
    c.num_steps = 0
    c.num_epochs = 300.0
    _model(c, name, experts=experts, layers=layers)
    c.loss.kind = "sigmoid"
    c.optimizer.name = "adamw"
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.mu_dtype = ""  # float32, as the release (bfloat16 is its memory-saving option)
    c.optimizer.learning_rate = learning_rate
    c.optimizer.schedule = "linear"
    c.optimizer.warmup_steps = 10_000
    c.optimizer.end_learning_rate = 1e-5
    c.optimizer.weight_decay = 0.1
    c.optimizer.weight_decay_on = "matrices"  # the release's '.*/kernel'
    c.optimizer.grad_clip_norm = 1.0
    c.eval.every_steps = 1_000
    c.checkpoint.every_steps = 1_000
    c.log.every_steps = 100
    return c


def finetune(name: str, *, experts: int, layers: str) -> ConfigDict:
    """A release fine-tuning recipe on ILSVRC2012 at 384 px: 10,000 SGD steps of 1,024 images,
    softmax loss, no pre-logits layer, C=1.5; the caller names the upstream model."""
    c = base_config()
    c.dataset.name = "tfds:imagenet2012"
    c.dataset.train_split = "train[:99%]"
    c.dataset.eval_splits = ("train[99%:]",)
    c.dataset.test_split = "validation"
    c.dataset.num_workers = 8
    c.pp.train = (
        f"decode(3)|inception_crop(384)|flip_lr|value_range(-1, 1)|onehot({ILSVRC2012_CLASSES})"
    )
    c.pp.eval = "decode(3)|resize(384)|value_range(-1, 1)"
    c.batch_size = 1024
    c.eval_batch_size = 1024
    c.num_steps = 10_000
    _model(c, name, experts=experts, layers=layers)
    c.model.representation_size = 0  # the release fine-tunes without the pre-logits layer
    c.model.head_bias_init = -math.log(ILSVRC2012_CLASSES)
    c.model.moe.router_options.capacity_factor = 1.5
    c.loss.kind = "softmax"
    c.optimizer.name = "sgd"
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = 3e-3
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 500
    c.optimizer.end_learning_rate = 1e-5
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 10.0
    c.finetune.new_head = True  # the release keeps the new model's head (a new loss)
    c.eval.every_steps = 1_000
    c.checkpoint.every_steps = 1_000
    c.log.every_steps = 100
    return c
