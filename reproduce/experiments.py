"""The training runs behind the reproduced claims, as overrides of the shipped digits configs.

Every run is `vmoe-train --config=<config> --config.seed=<seed> <overrides>` with
`--config.num_steps=<steps>`; each claim reads the runs it names. Routing groups: the configs'
8 images per group (8 x 17 = 136 tokens), so BPR ranks tokens across several images.
"""

from __future__ import annotations

import dataclasses

SEEDS = (0, 1, 2)
STEPS = 2000  # about a minute each on 2 cores; digits_vmoe's own 6,000 reach ~98%
CAPACITY_FACTORS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5)
SHOTS = (1, 5, 10)  # few-shot linear transfer (claims b and e)
FINETUNE_SCALE = 0.25  # claim e: fine-tuning (and its from-scratch baseline) train STEPS / 4
UPCYCLE_SCALE = 0.5  # claim g: T = U = STEPS / 2 (dense, then continued); from scratch: STEPS

# What each run is evaluated on: "accuracy" (test), "sweep" (capacity x K, vanilla and BPR
# filling), "routing" (expert-class/position statistics), "fewshot" (linear transfer on the
# model's own classes), "transfer_fewshot" (linear transfer to the classes it never saw),
# "curve" (the training's expert-load CV and dropped choices, step by step, and the MoE layer's
# FLOPs per token).
MOE_EVALUATIONS = ("accuracy", "sweep", "routing")
CURVE_EVALUATIONS = ("accuracy", "curve")


@dataclasses.dataclass(frozen=True)
class Training:
    """One trained model family: a shipped config plus overrides (trained once per seed).

    `classes` "first" / "second" trains on the first / second half of the dataset's classes
    (relabelled from 0, the pp's onehot depth set to match); `parent` names the training whose
    run of the same seed this one fine-tunes from (`finetune.init_from`: a new head unless the
    overrides set `finetune.new_head=False`; a new optimizer and learning-rate schedule, warmup
    and cosine over this run's own steps); the run trains
    round(steps * steps_scale) steps, or, with `equal_time` = (twin, reference), as many steps
    as fit in the reference run's training-loop time at the twin's speed: steps times the ratio
    of the two runs' median training throughput (same seed, both trained at `steps`)."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    description: str = ""
    evaluations: tuple[str, ...] = MOE_EVALUATIONS
    steps_scale: float = 1.0
    classes: str = ""  # "", "first" or "second"
    parent: str = ""
    equal_time: tuple[str, str] | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        """The trainings whose runs (same seed) this one's settings are made from."""
        return (*((self.parent,) if self.parent else ()), *(self.equal_time or ()))


_NO_AUX = (
    "model.moe.router_options.importance_loss_weight=0.0",
    "model.moe.router_options.load_loss_weight=0.0",
)

# Claim h's balancing arms: V-MoE-Mu/2 with 16 experts per MoE layer (every other block), K=2.
_E16 = ("model.moe.num_experts=16",)

# Claim g's dense model: the twin with the experts' MLP width (128, not the FLOP-matched 192),
# so that every expert can start as a copy of its block's MLP.
_UPCYCLE_DENSE = ("model.mlp_dim=128",)

TRAININGS = {
    t.name: t
    for t in (
        Training(
            "vmoe_top_k",
            "digits_vmoe",
            (),
            "V-MoE-Mu/2, top-K K=2, vanilla filling",
            (*MOE_EVALUATIONS, "fewshot"),
        ),
        Training(
            "vmoe_bpr", "digits_vmoe", ("model.moe.router=bpr",), "the same, trained with BPR"
        ),
        Training(
            "vmoe_k1",
            "digits_vmoe",
            ("model.moe.router_options.k=1",),
            "the same, trained with K=1",
        ),
        Training(
            "vmoe_no_aux",
            "digits_vmoe",
            _NO_AUX,
            "the same, without the importance and load losses",
        ),
        Training(
            "vit",
            "digits_vit",
            (),
            "ViT-Mu/2, the dense twin (same per-token FLOPs), same steps",
            ("accuracy", "fewshot"),
        ),
        Training(
            "vit_equal_time",
            "digits_vit",
            (),
            "the dense twin trained for the V-MoE's training-loop time",
            ("accuracy", "fewshot"),
            equal_time=("vit", "vmoe_top_k"),
        ),
        Training(
            "vmoe_first_half",
            "digits_vmoe",
            (),
            "V-MoE pre-trained on the first half of the classes (digits 0-4)",
            ("accuracy", "transfer_fewshot"),
            classes="first",
        ),
        Training(
            "vit_first_half",
            "digits_vit",
            (),
            "ViT pre-trained on the first half of the classes",
            ("accuracy", "transfer_fewshot"),
            classes="first",
        ),
        Training(
            "vmoe_finetuned",
            "digits_vmoe",
            (),
            "vmoe_first_half fine-tuned on the second half (new head)",
            ("accuracy",),
            steps_scale=FINETUNE_SCALE,
            classes="second",
            parent="vmoe_first_half",
        ),
        Training(
            "vit_finetuned",
            "digits_vit",
            (),
            "vit_first_half fine-tuned on the second half (new head)",
            ("accuracy",),
            steps_scale=FINETUNE_SCALE,
            classes="second",
            parent="vit_first_half",
        ),
        Training(
            "vmoe_scratch_second_half",
            "digits_vmoe",
            (),
            "V-MoE trained from scratch on the second half, as many steps as fine-tuning",
            ("accuracy",),
            steps_scale=FINETUNE_SCALE,
            classes="second",
        ),
        Training(
            "vit_scratch_second_half",
            "digits_vit",
            (),
            "ViT trained from scratch on the second half, as many steps as fine-tuning",
            ("accuracy",),
            steps_scale=FINETUNE_SCALE,
            classes="second",
        ),
        Training(
            "vit_upcycle_source",
            "digits_vit",
            _UPCYCLE_DENSE,
            "the dense model upcycling starts from: ViT-Mu/2 with MLP hidden 128 (the experts'), "
            "STEPS / 2",
            ("accuracy",),
            steps_scale=UPCYCLE_SCALE,
        ),
        Training(
            "vit_continued",
            "digits_vit",
            (*_UPCYCLE_DENSE, "finetune.new_head=False"),
            "vit_upcycle_source trained STEPS / 2 more steps, dense",
            ("accuracy",),
            steps_scale=UPCYCLE_SCALE,
            parent="vit_upcycle_source",
        ),
        Training(
            "vmoe_upcycled",
            "digits_vmoe",
            ("finetune.upcycle=True", "finetune.new_head=False"),
            "vit_upcycle_source upcycled into V-MoE-Mu/2 (every expert a copy of its block's "
            "MLP, routers fresh), trained STEPS / 2 more steps",
            ("accuracy",),
            steps_scale=UPCYCLE_SCALE,
            parent="vit_upcycle_source",
        ),
        Training(
            "h_aux_loss",
            "digits_vmoe",
            _E16,
            "V-MoE-Mu/2 with E=16, K=2, balanced by V-MoE's importance and load losses",
            CURVE_EVALUATIONS,
        ),
        Training(
            "h_aux_free",
            "digits_vmoe",
            (*_E16, "model.moe.router=aux_free", *_NO_AUX),
            "the same, balanced by an aux-loss-free selection bias (sign rule, u = 0.001), no "
            "aux loss",
            CURVE_EVALUATIONS,
        ),
        Training(
            "h_no_balance",
            "digits_vmoe",
            (*_E16, *_NO_AUX),
            "the same, with no balancing at all",
            CURVE_EVALUATIONS,
        ),
        Training(
            "h_coarse",
            "digits_vmoe",
            (),
            "coarse: V-MoE-Mu/2, E=4 experts of width 128, K=2 (digits_vmoe itself)",
            CURVE_EVALUATIONS,
        ),
        Training(
            "h_fine",
            "digits_vmoe",
            ("model.moe.variants.fine_grained.m=4",),
            "fine-grained: E=16 experts of width 32, K=8 (the coarse model's expert FLOPs)",
            CURVE_EVALUATIONS,
        ),
        Training(
            "h_shared",
            "digits_vmoe",
            ("model.moe.router_options.k=1", "model.moe.variants.shared_experts.num_shared=1"),
            "coarse K=1 plus 1 shared expert of width 128 (the coarse model's expert FLOPs)",
            CURVE_EVALUATIONS,
        ),
    )
}

# claim -> the trainings it reads
CLAIMS = {
    "a_bpr": ("vmoe_top_k", "vmoe_bpr"),
    "b_dense": ("vmoe_top_k", "vit", "vit_equal_time"),
    "c_routing": ("vmoe_top_k",),
    "d_k": ("vmoe_top_k", "vmoe_k1"),
    "e_transfer": (
        "vmoe_first_half",
        "vit_first_half",
        "vmoe_finetuned",
        "vit_finetuned",
        "vmoe_scratch_second_half",
        "vit_scratch_second_half",
    ),
    "f_aux": ("vmoe_top_k", "vmoe_no_aux"),
    "g_upcycle": ("vit_upcycle_source", "vit_continued", "vmoe_upcycled", "vmoe_top_k"),
    "h_balance": ("h_aux_loss", "h_aux_free", "h_no_balance"),
    "h_granularity": ("h_coarse", "h_fine", "h_shared"),
}


def class_halves(num_classes: int) -> dict[str, tuple[int, ...]]:
    """The two halves of a dataset's classes (claim e): digits 0-4 and 5-9."""
    half = num_classes // 2
    return {"first": tuple(range(half)), "second": tuple(range(half, num_classes))}


def dataset_overrides(name: str, image_size: int | None = None, data_dir: str = "") -> list[str]:
    """The overrides that move every experiment to another dataset: its name and pp specs with
    the same recipe (random crops of 70-100% of the area, values in [-1, 1]), images resized to
    `image_size` (default: the size of the dataset's first image, so give it for datasets whose
    images differ in size). `[]` for the embedded digits, the configs' own dataset."""
    if name == "digits" and image_size is None and not data_dir:
        return []
    import numpy as np

    import vmoe_data

    options = {"data_dir": data_dir} if data_dir else {}
    dataset = vmoe_data.get_dataset(name, **options)
    missing = [s for s in ("train", "test") if s not in dataset.splits]
    if missing:
        raise ValueError(
            f"dataset {name!r} has splits {dataset.splits}; the experiments need 'train' and "
            f"'test' (missing: {missing})"
        )
    if image_size is None:
        first = next(
            iter(vmoe_data.eval_pipeline(dataset, split="test", batch_size=1, pp="decode"))
        )
        image_size = int(np.asarray(first["image"]).shape[1])
    overrides = [
        f"dataset.name={name}",
        f"pp.train=decode|inception_crop({image_size}, 70)|value_range(-1, 1)|"
        f"onehot({dataset.num_classes})",
        f"pp.eval=decode|resize({image_size})|value_range(-1, 1)",
    ]
    if data_dir:
        overrides.append(f"dataset.data_dir={data_dir}")
    if "validation" not in dataset.splits:
        overrides.append("dataset.eval_splits=()")
    return overrides
