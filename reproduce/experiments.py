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


@dataclasses.dataclass(frozen=True)
class Training:
    """One trained model family: a shipped config plus overrides (trained once per seed)."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    description: str = ""


TRAININGS = {
    t.name: t
    for t in (
        Training("vmoe_top_k", "digits_vmoe", (), "V-MoE-Mu/2, top-K K=2, vanilla filling"),
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
            (
                "model.moe.router_options.importance_loss_weight=0.0",
                "model.moe.router_options.load_loss_weight=0.0",
            ),
            "the same, without the importance and load losses",
        ),
    )
}

# claim -> the trainings it reads
CLAIMS = {
    "a_bpr": ("vmoe_top_k", "vmoe_bpr"),
    "c_routing": ("vmoe_top_k",),
    "d_k": ("vmoe_top_k", "vmoe_k1"),
    "f_aux": ("vmoe_top_k", "vmoe_no_aux"),
}
