"""Claim h, what MoE practice added since V-MoE, measured on the digits: its aggregates, tables,
sentences and figures (report.py hands these two claims to this module).

- h_balance: E=16 experts per MoE layer, K=2: V-MoE's importance and load losses vs the
  aux-loss-free selection bias (DeepSeek-V3) vs no balancing: the expert-load CV and the
  dropped choices over training, and the test accuracy.
- h_granularity: equal expert FLOPs per token: coarse (E=4, K=2, width H) vs fine-grained
  (E=16, K=8, width H/4) vs coarse with K=1 plus one shared expert of width H.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from over_seeds import pm, stats, versus

CLAIMS = ("h_balance", "h_granularity")
BALANCE = (
    ("h_aux_loss", "aux losses (V-MoE)"),
    ("h_aux_free", "aux-loss-free bias"),
    ("h_no_balance", "no balancing"),
)
GRANULARITY = (
    ("h_coarse", "coarse E=4, K=2"),
    ("h_fine", "fine E=16, K=8, H/4"),
    ("h_shared", "coarse K=1 + 1 shared"),
)
TAIL = 10  # the final values: the mean over the last tenth of the logged steps


def aggregate(claim: str, per_run: Mapping[str, list[dict]]) -> dict:
    """The claim's numbers: each arm's means and spreads over seeds, and its sentence."""
    arms = BALANCE if claim == "h_balance" else GRANULARITY
    rows = [_row(training, label, per_run[training]) for training, label in arms]
    data = {"claim": claim, "rows": rows}
    data["finding"] = (_balance_finding if claim == "h_balance" else _granularity_finding)(data)
    return data


def _row(training: str, label: str, runs: list[dict]) -> dict[str, Any]:
    steps = runs[0]["training_curve"]["step"]
    tail = max(1, len(steps) // TAIL)
    flops = runs[0]["moe_flops"]
    return {
        "training": training,
        "label": label,
        "seeds": [r["seed"] for r in runs],
        "accuracy": stats(r["test_accuracy"] for r in runs),
        "seed_accuracy": [r["test_accuracy"] for r in runs],
        **{
            f"final_{field}": stats(np.mean(r["training_curve"][field][-tail:]) for r in runs)
            for field in ("load_cv", "dropped_fraction")
        },
        "curve": {
            "step": steps,
            **{
                field: np.mean([r["training_curve"][field] for r in runs], axis=0).tolist()
                for field in ("load_cv", "dropped_fraction")
            },
        },
        "experts": flops["experts"],
        "expert_width": flops["expert_width"],
        "k": flops["k"],
        # Per token, one MoE layer, matmul FLOPs (vmoe_layers.layer_flops at the training
        # capacity): the experts a token goes through (chosen + shared), the gate, the buffers.
        "expert_flops": round(flops["routed"] + sum(flops["branches"].values())),
        "router_flops": flops["router"],
        "buffer_flops": flops["buffers"],
        "shared_flops": round(sum(flops["branches"].values())),
        "train_seconds": stats(r["train_seconds"] for r in runs),
    }


def _by(data: Mapping[str, Any]) -> dict[str, dict]:
    return {row["training"]: row for row in data["rows"]}


def _cv(row: Mapping[str, Any]) -> str:
    return f"{row['final_load_cv']['mean']:.2f}"


def _dropped(row: Mapping[str, Any]) -> str:
    return f"{row['final_dropped_fraction']['mean'] * 100:.1f}%"


def _balance_finding(data: Mapping[str, Any]) -> str:
    rows = _by(data)
    loss, free, none = rows["h_aux_loss"], rows["h_aux_free"], rows["h_no_balance"]
    return (
        f"At the end of training the expert load's CV is {_cv(free)} with the aux-loss-free "
        f"bias, {_cv(loss)} with V-MoE's aux losses and {_cv(none)} with no balancing "
        f"(dropped choices {_dropped(free)}, {_dropped(loss)}, {_dropped(none)}); the bias "
        f"model's test accuracy is {versus(free['accuracy'], loss['accuracy'], 'the aux-loss')}"
        f" model's and {versus(free['accuracy'], none['accuracy'], 'the unbalanced')} one's."
    )


def _granularity_finding(data: Mapping[str, Any]) -> str:
    rows = _by(data)
    coarse, fine, shared = rows["h_coarse"], rows["h_fine"], rows["h_shared"]
    equal = len({row["expert_flops"] for row in data["rows"]}) == 1
    flops = (
        f"At equal expert FLOPs per token ({coarse['expert_flops']:,} per MoE layer)"
        if equal
        else "At expert FLOPs per token of "
        + ", ".join(f"{row['expert_flops']:,}" for row in data["rows"])
    )
    return (
        f"{flops}, the fine-grained model is "
        f"{versus(fine['accuracy'], coarse['accuracy'], 'the coarse')} one and the model with "
        f"a shared expert is {versus(shared['accuracy'], coarse['accuracy'], 'the coarse')} one; "
        f"the fine-grained gate costs {fine['router_flops'] / coarse['router_flops']:.0f}x the "
        f"coarse one's FLOPs ({fine['router_flops']:,}, "
        f"{fine['router_flops'] / fine['expert_flops']:.0%} of the experts')."
    )


def table(claim: str, data: Mapping[str, Any]) -> list[str]:
    """The claim's markdown lines."""
    if claim == "h_balance":
        lines = [
            "**h. Balancing** (E=16 experts per MoE layer, K=2; load CV and dropped choices: "
            "training, mean over the MoE layers and the last tenth of the logged steps)",
            "",
            "| balancing | trained | test accuracy (%) | expert load CV | dropped choices (%) |",
            "|---|---|---|---|---|",
        ]
        for row in data["rows"]:
            lines.append(
                f"| {row['label']} | {row['training']} | {pm(row['accuracy'])} | "
                f"{pm(row['final_load_cv'], 1, 3)} | {pm(row['final_dropped_fraction'])} |"
            )
    else:
        lines = [
            "**h. Granularity at equal expert FLOPs** (per token and MoE layer, matmul FLOPs "
            "counted by `vmoe_layers.layer_flops`: the experts a token goes through, the gate)",
            "",
            "| model | trained | experts x width, K | expert FLOPs | gate FLOPs | "
            "test accuracy (%) | expert load CV | dropped choices (%) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in data["rows"]:
            shared = " + 1 shared" if row["shared_flops"] else ""
            lines.append(
                f"| {row['label']} | {row['training']} | {row['experts']} x {row['expert_width']}"
                f", K={row['k']}{shared} | {row['expert_flops']:,} | {row['router_flops']:,} | "
                f"{pm(row['accuracy'])} | {pm(row['final_load_cv'], 1, 3)} | "
                f"{pm(row['final_dropped_fraction'])} |"
            )
    return [*lines, "", data["finding"]]


def plot(claim: str, data: Mapping[str, Any], figure: Any) -> None:
    """Load CV over training (left) and test accuracy per seed (right)."""
    left, right = figure.subplots(1, 2)
    for row in data["rows"]:
        curve = row["curve"]
        left.plot(curve["step"], curve["load_cv"], label=row["label"])
    left.set_xlabel("training step")
    left.set_ylabel("expert load CV (mean of 3 seeds)")
    left.legend(fontsize=7)
    x = np.arange(len(data["rows"]))
    right.errorbar(
        x,
        [row["accuracy"]["mean"] for row in data["rows"]],
        yerr=[row["accuracy"]["std"] for row in data["rows"]],
        fmt="o",
        capsize=4,
    )
    for i, row in enumerate(data["rows"]):
        right.plot([i + 0.12] * len(row["seed_accuracy"]), row["seed_accuracy"], "k.", ms=4)
    right.set_xticks(x, [row["label"].replace(", ", "\n") for row in data["rows"]], fontsize=7)
    right.set_xlim(-0.6, len(x) - 0.4)
    right.set_ylabel("test accuracy (dots: seeds)")
    figure.suptitle(claim)
