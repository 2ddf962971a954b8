"""Per-claim aggregates over seeds (mean and standard deviation), their tables and plots.

Pure functions of the per-run results that `run.py` writes, so the README's tables can be
checked against the committed JSON (`tables(load(out))` is what `summary.md` holds). Claims g
and h live in modules of their own (claim_g.py, claim_h.py), the numbers over seeds and their
text in over_seeds.py; this module dispatches.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

# The claims with modules of their own sit beside this file (importable however it is loaded).
if str(pathlib.Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
import claim_g
import claim_h
from over_seeds import pm as _pm
from over_seeds import span as _span
from over_seeds import stats as _stats

# The fields of a sweep point kept per run.
SWEEP_FIELDS = (
    "router",
    "k",
    "capacity_factor",
    "accuracy",
    "processed_fraction",
    "no_expert_fraction",
    "moe_flops_relative",
)
K_TABLE_CAPACITY = 1.0  # claim d compares K at this inference capacity factor


def _points(runs: list[dict], router: str, k: int, factor: float) -> list[dict]:
    found = []
    for result in runs:
        matches = [
            p
            for p in result["sweep"]
            if p["router"] == router and p["k"] == k and p["capacity_factor"] == factor
        ]
        if len(matches) != 1:
            raise ValueError(
                f"run {result['training']} seed {result['seed']} has {len(matches)} sweep points "
                f"for router={router} k={k} capacity_factor={factor}; expected 1"
            )
        found.append(matches[0])
    return found


def aggregate(claim: str, per_run: Mapping[str, list[dict]]) -> dict[str, Any]:
    """The claim's numbers: means and standard deviations over the seeds of each training."""
    if claim in claim_h.CLAIMS:
        return claim_h.aggregate(claim, per_run)
    if claim == "a_bpr":
        return {"claim": claim, "curves": _capacity_curves(per_run, ("vmoe_top_k", "vmoe_bpr"))}
    if claim == "d_k":
        rows = []
        for training in ("vmoe_top_k", "vmoe_k1"):
            runs = per_run[training]
            for k in (1, 2):
                points = _points(runs, "top_k", k, K_TABLE_CAPACITY)
                rows.append(
                    {
                        "training": training,
                        "trained_k": runs[0]["k"],
                        "eval_k": k,
                        "accuracy": _stats(p["accuracy"] for p in points),
                        "moe_flops_relative": points[0]["moe_flops_relative"],
                    }
                )
        return {"claim": claim, "capacity_factor": K_TABLE_CAPACITY, "rows": rows}
    if claim == "c_routing":
        runs = per_run["vmoe_top_k"]
        layers = sorted(runs[0]["routing"], key=lambda n: int(n.rsplit("_", 1)[-1]))
        return {
            "claim": claim,
            "layers": {
                name: {
                    field: _stats(r["routing"][name][field] for r in runs)
                    for field in ("nmi_class", "nmi_position", "dropped_fraction")
                }
                for name in layers
            },
        }
    if claim == "f_aux":
        trainings = {}
        for training in ("vmoe_top_k", "vmoe_no_aux"):
            runs = per_run[training]
            steps = runs[0]["training_curve"]["step"]
            tail = max(1, len(steps) // 10)  # the last tenth of the logged steps
            trainings[training] = {
                "accuracy": _stats(r["test_accuracy"] for r in runs),
                **{
                    f"final_{field}": _stats(
                        np.mean(r["training_curve"][field][-tail:]) for r in runs
                    )
                    for field in ("load_cv", "dropped_fraction")
                },
                "curve": {
                    "step": steps,
                    **{
                        field: np.mean([r["training_curve"][field] for r in runs], axis=0).tolist()
                        for field in ("load_cv", "dropped_fraction")
                    },
                },
            }
        return {"claim": claim, "trainings": trainings}
    if claim == "b_dense":
        rows = []
        for training in ("vmoe_top_k", "vit", "vit_equal_time"):
            runs = per_run[training]
            rows.append(
                {
                    "training": training,
                    "model": runs[0]["model"],
                    "steps": [r["steps"] for r in runs],  # per seed (equal time: they differ)
                    "train_seconds": _stats(r["train_seconds"] for r in runs),
                    "accuracy": _stats(r["test_accuracy"] for r in runs),
                    "fewshot": _per_shots(runs, "fewshot"),
                }
            )
        return {"claim": claim, "rows": rows}
    if claim == "e_transfer":
        first = per_run["vmoe_first_half"][0]
        models = {}
        for family in ("vmoe", "vit"):
            pretrained = per_run[f"{family}_first_half"]
            models[family] = {
                "model": pretrained[0]["model"],
                "pretrain_accuracy": _stats(r["test_accuracy"] for r in pretrained),
                "transfer_fewshot": _per_shots(pretrained, "transfer_fewshot"),
                "finetuned_accuracy": _stats(
                    r["test_accuracy"] for r in per_run[f"{family}_finetuned"]
                ),
                "scratch_accuracy": _stats(
                    r["test_accuracy"] for r in per_run[f"{family}_scratch_second_half"]
                ),
                "pretrain_steps": pretrained[0]["steps"],
                "finetune_steps": per_run[f"{family}_finetuned"][0]["steps"],
            }
        return {
            "claim": claim,
            "pretrain_classes": first["classes"],
            "transfer_classes": first["transfer_classes"],
            "models": models,
        }
    if claim == claim_g.CLAIM:
        return claim_g.aggregate(per_run, _dataset(per_run["vit_upcycle_source"][0]))
    raise ValueError(f"unknown claim {claim!r}")


def _dataset(result: dict) -> str:
    """The dataset a run trained on: its `dataset.name=` setting, else the configs' digits."""
    names = [
        s.split("=", 1)[1] for s in result.get("settings", ()) if s.startswith("dataset.name=")
    ]
    return names[-1] if names else "digits"


def _per_shots(runs: list[dict], field: str) -> dict[str, dict[str, float]]:
    """Per number of shots, the few-shot accuracy's mean and spread over the runs."""
    return {shots: _stats(r[field][shots] for r in runs) for shots in runs[0][field]}


def _capacity_curves(per_run: Mapping[str, list[dict]], trainings: tuple[str, ...]) -> list[dict]:
    curves = []
    for training in trainings:
        runs = per_run[training]
        k = runs[0]["k"]
        factors = sorted({p["capacity_factor"] for p in runs[0]["sweep"]})
        for router in ("top_k", "bpr"):
            points = []
            for factor in factors:
                found = _points(runs, router, k, factor)
                points.append(
                    {
                        "capacity_factor": factor,
                        "processed_fraction": _stats(p["processed_fraction"] for p in found),
                        "accuracy": _stats(p["accuracy"] for p in found),
                    }
                )
            curves.append({"training": training, "eval_router": router, "k": k, "points": points})
    return curves


def tables(aggregates: Mapping[str, dict]) -> str:
    """Markdown tables of every aggregate, in claim order (what summary.md and the README hold)."""
    parts = []
    for claim in sorted(aggregates):
        data = aggregates[claim]
        if claim == "a_bpr":
            curves = data["curves"]
            factors = [p["capacity_factor"] for p in curves[0]["points"]]
            head = "| trained | inference filling | " + " | ".join(f"C={f:g}" for f in factors)
            lines = [
                "**a. Accuracy (%) at reduced inference capacity** (tokens processed, %, below)",
                "",
                head + " |",
                "|---|---|" + "---|" * len(factors),
            ]
            for curve in curves:
                cells = " | ".join(
                    f"{_pm(p['accuracy'])}<br>{p['processed_fraction']['mean'] * 100:.0f}%"
                    for p in curve["points"]
                )
                lines.append(f"| {curve['training']} | {curve['eval_router']} | {cells} |")
        elif claim == "d_k":
            lines = [
                f"**d. K at inference** (top-K filling, C={data['capacity_factor']:g})",
                "",
                "| trained K | inference K | test accuracy (%) | MoE FLOPs (vs trained K, C=1) |",
                "|---|---|---|---|",
            ]
            for row in data["rows"]:
                lines.append(
                    f"| {row['trained_k']} | {row['eval_k']} | {_pm(row['accuracy'])} | "
                    f"{row['moe_flops_relative']:.2f}x |"
                )
        elif claim == "c_routing":
            lines = [
                "**c. Routing specialisation** (normalised mutual information, test split)",
                "",
                "| MoE layer | NMI(expert; class) | NMI(expert; position) | dropped choices (%) |",
                "|---|---|---|---|",
            ]
            for name, layer in data["layers"].items():
                lines.append(
                    f"| {name} | {_pm(layer['nmi_class'], 1, 3)} | "
                    f"{_pm(layer['nmi_position'], 1, 3)} | {_pm(layer['dropped_fraction'])} |"
                )
        elif claim == "f_aux":
            lines = [
                "**f. Auxiliary losses** (training: mean over the MoE layers and the last tenth "
                "of the logged steps)",
                "",
                "| trained | test accuracy (%) | expert load CV | dropped choices (%) |",
                "|---|---|---|---|",
            ]
            for training, row in data["trainings"].items():
                lines.append(
                    f"| {training} | {_pm(row['accuracy'])} | {_pm(row['final_load_cv'], 1, 3)} | "
                    f"{_pm(row['final_dropped_fraction'])} |"
                )
        elif claim == "b_dense":
            shots = list(data["rows"][0]["fewshot"])
            lines = [
                "**b. V-MoE vs its dense twin** (equal per-token FLOPs; few-shot: linear on "
                "frozen features, accuracy %)",
                "",
                "| trained | model | steps | training time (s) | test accuracy (%) | "
                + " | ".join(f"{n}-shot" for n in shots)
                + " |",
                "|---|---|---|---|---|" + "---|" * len(shots),
            ]
            for row in data["rows"]:
                cells = " | ".join(_pm(row["fewshot"][n]) for n in shots)
                lines.append(
                    f"| {row['training']} | {row['model']} | {_span(row['steps'])} | "
                    f"{_pm(row['train_seconds'], 1, 0)} | {_pm(row['accuracy'])} | {cells} |"
                )
        elif claim == "e_transfer":
            models = data["models"]
            shots = list(next(iter(models.values()))["transfer_fewshot"])
            first = ",".join(map(str, data["pretrain_classes"]))
            second = ",".join(map(str, data["transfer_classes"]))
            lines = [
                f"**e. Transfer** from classes {first} to classes {second} (accuracy %, "
                f"test split of the classes named)",
                "",
                f"| model | pre-trained on {first} | "
                + " | ".join(f"{n}-shot on {second}" for n in shots)
                + f" | fine-tuned on {second} | from scratch on {second} (same steps) |",
                "|---|---|" + "---|" * len(shots) + "---|---|",
            ]
            for row in models.values():
                cells = " | ".join(_pm(row["transfer_fewshot"][n]) for n in shots)
                lines.append(
                    f"| {row['model']} | {_pm(row['pretrain_accuracy'])} | {cells} | "
                    f"{_pm(row['finetuned_accuracy'])} | {_pm(row['scratch_accuracy'])} |"
                )
        elif claim == claim_g.CLAIM:
            lines = claim_g.table(data)
        elif claim in claim_h.CLAIMS:
            lines = claim_h.table(claim, data)
        else:
            raise ValueError(f"unknown claim {claim!r}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def load(out: pathlib.Path) -> dict[str, dict]:
    """The committed aggregates in `out` (one JSON per claim)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(out.glob("*_*.json"))}


def plot(claim: str, data: dict, path: pathlib.Path) -> pathlib.Path:
    """The claim's figure as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if claim in claim_h.CLAIMS:
        figure = plt.figure(figsize=(9, 4))
        claim_h.plot(claim, data, figure)
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path
    figure, axes = plt.subplots(figsize=(6, 4))
    if claim == "a_bpr":
        for curve in data["curves"]:
            x = [p["processed_fraction"]["mean"] for p in curve["points"]]
            y = [p["accuracy"]["mean"] for p in curve["points"]]
            err = [p["accuracy"]["std"] for p in curve["points"]]
            style = "-" if curve["eval_router"] == "bpr" else "--"
            axes.errorbar(
                x,
                y,
                yerr=err,
                fmt=style + "o",
                ms=3,
                capsize=2,
                label=f"trained {curve['training']}, inference {curve['eval_router']}",
            )
        axes.set_xlabel("fraction of token choices processed")
        axes.set_ylabel("test accuracy")
    elif claim == "d_k":
        labels = [f"train K={r['trained_k']}\neval K={r['eval_k']}" for r in data["rows"]]
        axes.bar(
            labels,
            [r["accuracy"]["mean"] for r in data["rows"]],
            yerr=[r["accuracy"]["std"] for r in data["rows"]],
            capsize=3,
        )
        axes.set_ylabel("test accuracy")
    elif claim == "c_routing":
        names = list(data["layers"])
        x = np.arange(len(names))
        for offset, field in ((-0.2, "nmi_class"), (0.2, "nmi_position")):
            axes.bar(
                x + offset,
                [data["layers"][n][field]["mean"] for n in names],
                0.4,
                yerr=[data["layers"][n][field]["std"] for n in names],
                capsize=3,
                label=field.replace("nmi_", "NMI(expert; ") + ")",
            )
        axes.set_xticks(x, names)
        axes.set_ylabel("normalised mutual information")
    elif claim == "f_aux":
        for training, row in data["trainings"].items():
            curve = row["curve"]
            axes.plot(curve["step"], curve["load_cv"], label=f"{training}: load CV")
            axes.plot(
                curve["step"],
                curve["dropped_fraction"],
                "--",
                label=f"{training}: dropped fraction",
            )
        axes.set_xlabel("training step")
    elif claim == "b_dense":
        _grouped_bars(
            axes,
            {
                r["training"]: {"test": r["accuracy"], **_shot_labels(r["fewshot"])}
                for r in data["rows"]
            },
        )
        axes.set_ylabel("accuracy")
    elif claim == "e_transfer":
        _grouped_bars(
            axes,
            {
                row["model"]: {
                    **_shot_labels(row["transfer_fewshot"]),
                    "fine-tuned": row["finetuned_accuracy"],
                    "from scratch": row["scratch_accuracy"],
                }
                for row in data["models"].values()
            },
        )
        axes.set_ylabel("accuracy on the held-out classes")
    elif claim == claim_g.CLAIM:
        claim_g.plot(data, axes)
    if claim != "d_k":
        axes.legend(fontsize=7)
    axes.set_title(claim)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _shot_labels(per_shots: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{n}-shot": stats for n, stats in per_shots.items()}


def _grouped_bars(axes: Any, groups: Mapping[str, Mapping[str, Mapping[str, float]]]) -> None:
    """One group of bars per key of `groups` (x axis), one bar per measure (legend)."""
    measures = list(next(iter(groups.values())))
    x = np.arange(len(measures))
    width = 0.8 / len(groups)
    for i, (label, values) in enumerate(groups.items()):
        axes.bar(
            x + (i - (len(groups) - 1) / 2) * width,
            [values[m]["mean"] for m in measures],
            width,
            yerr=[values[m]["std"] for m in measures],
            capsize=2,
            label=label,
        )
    axes.set_xticks(x, measures)
