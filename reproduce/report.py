"""Per-claim aggregates over seeds (mean and standard deviation), their tables and plots.

Pure functions of the per-run results that `run.py` writes, so the README's tables can be
checked against the committed JSON (`tables(load(out))` is what `summary.md` holds).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import textwrap
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# The claims with modules of their own sit beside this file (importable however it is loaded).
if str(pathlib.Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
import claim_h

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
# Claim g's arms: (key, label, the trainings an arm is made of, in order; its accuracy is the
# last one's, its training time the sum of all of theirs, seed by seed).
UPCYCLE_ARMS = (
    ("source", "dense after T (the source)", ("vit_upcycle_source",)),
    ("dense", "(i) dense, continued", ("vit_upcycle_source", "vit_continued")),
    ("upcycled", "(ii) upcycled", ("vit_upcycle_source", "vmoe_upcycled")),
    ("scratch", "(iii) V-MoE from scratch", ("vmoe_top_k",)),
)
DIGITS_TRAIN_IMAGES = 1253


def _stats(values: Iterable[float]) -> dict[str, float]:
    array = np.asarray(list(values), dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "n": len(array),
    }


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
        return claim_h.aggregate(claim, per_run, _stats, _versus)
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
    if claim == "g_upcycle":
        data = {"claim": claim, "dataset": _dataset(per_run["vit_upcycle_source"][0])}
        data["arms"] = [_upcycle_arm(per_run, *arm) for arm in UPCYCLE_ARMS]
        data["finding"] = upcycle_finding(data)
        return data
    raise ValueError(f"unknown claim {claim!r}")


def _dataset(result: dict) -> str:
    """The dataset a run trained on: its `dataset.name=` setting, else the configs' digits."""
    names = [
        s.split("=", 1)[1] for s in result.get("settings", ()) if s.startswith("dataset.name=")
    ]
    return names[-1] if names else "digits"


def _upcycle_arm(
    per_run: Mapping[str, list[dict]], key: str, label: str, trainings: tuple[str, ...]
) -> dict[str, Any]:
    """One arm of claim g: its runs paired by seed (the continuation with its own source)."""
    by_seed = [{r["seed"]: r for r in per_run[t]} for t in trainings]
    seeds = sorted(by_seed[-1])
    missing = [
        (t, s) for t, runs in zip(trainings, by_seed, strict=True) for s in seeds if s not in runs
    ]
    if missing:
        raise ValueError(
            f"claim g's arm {label!r} adds up {trainings} seed by seed; missing (training, seed): "
            f"{missing}"
        )
    last = [by_seed[-1][s] for s in seeds]
    return {
        "arm": key,
        "label": label,
        "trainings": list(trainings),
        "model": last[0]["model"],
        "seeds": seeds,
        "steps": [[runs[s]["steps"] for s in seeds] for runs in by_seed],  # per training, seed
        "train_seconds": [_stats(runs[s]["train_seconds"] for s in seeds) for runs in by_seed],
        "total_seconds": _stats(sum(runs[s]["train_seconds"] for runs in by_seed) for s in seeds),
        "accuracy": _stats(r["test_accuracy"] for r in last),
        "seed_accuracy": [r["test_accuracy"] for r in last],
    }


def _difference(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float | None]:
    """(mean a - mean b, the seeds' spread of that difference, sqrt(std_a^2 + std_b^2)), both
    in points; the spread is None with one seed."""
    spread = math.hypot(a["std"], b["std"]) * 100 if min(a["n"], b["n"]) > 1 else None
    return (a["mean"] - b["mean"]) * 100, spread


def _versus(a: Mapping[str, float], b: Mapping[str, float], name: str) -> str:
    """ "level with NAME (B%; +0.3 points, within the seeds' spread of 1.2)", or "1.5 points
    above / below NAME (B%)"."""
    difference, spread = _difference(a, b)
    side = "above" if difference > 0 else "below"
    if spread is None:
        return f"{abs(difference):.1f} points {side} {name} ({_pct(b)}; one seed: no spread)"
    if abs(difference) <= spread:
        return (
            f"level with {name} ({_pct(b)}; {difference:+.1f} points, within the seeds' spread "
            f"of {spread:.1f})"
        )
    return f"{abs(difference):.1f} points {side} {name} ({_pct(b)})"


def _pct(stats: Mapping[str, float]) -> str:
    return f"{stats['mean'] * 100:.1f}%"


def upcycle_finding(data: Mapping[str, Any]) -> str:
    """Claim g's sentence, written from its numbers (the table prints it under it)."""
    arms = {arm["arm"]: arm for arm in data["arms"]}
    source, dense, upcycled, scratch = (arms[k] for k in ("source", "dense", "upcycled", "scratch"))
    seconds = {k: f"{arm['total_seconds']['mean']:.0f} s" for k, arm in arms.items()}
    text = (
        f"Upcycled after {_span(source['steps'][0])} dense steps "
        f"({_pct(source['accuracy'])}), the V-MoE reaches {_pct(upcycled['accuracy'])} in "
        f"{_span(upcycled['steps'][-1])} more steps: "
        f"{_versus(upcycled['accuracy'], dense['accuracy'], 'continuing dense')} and "
        f"{_versus(upcycled['accuracy'], scratch['accuracy'], 'the V-MoE from scratch')}, in "
        f"{seconds['upcycled']} of training against {seconds['dense']} dense and "
        f"{seconds['scratch']} from scratch."
    )
    if data["dataset"] != "digits":
        return text
    difference, spread = _difference(upcycled["accuracy"], dense["accuracy"])
    gained = spread is not None and difference > spread
    return text + (
        f" The digits are data-limited (the models fit their {DIGITS_TRAIN_IMAGES:,} training "
        "images): "
        + (
            "this gain need not come from the experts' added parameters, the capacity that "
            "upcycling adds at scale: the V-MoE also spends 1.5x the dense model's MLP compute "
            "per token."
            if gained
            else "the experts' added parameters have little left to learn here, so the gain "
            "upcycling is for at scale (capacity added to a trained dense model) is not to be "
            "expected."
        )
    )


def _span(values: list[int]) -> str:
    """ "2000", or "1928-2062" where the seeds' values differ."""
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}-{high}"


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


def _pm(stats: Mapping[str, float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


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
        elif claim == "g_upcycle":
            lines = [
                "**g. Sparse upcycling** (ViT-Mu/2 with MLP hidden 128 trained T steps, then U "
                "more: dense, or upcycled into the V-MoE, every expert a copy of its block's MLP "
                "and the routers fresh, each continuation with a new warmup and cosine schedule; "
                "against the V-MoE from scratch for T + U steps; training time: the trainer's "
                "loop seconds, summed over the runs an arm is made of)",
                "",
                "| arm | trained | model | steps | training time (s) | test accuracy (%) |",
                "|---|---|---|---|---|---|",
            ]
            for arm in data["arms"]:
                seconds = _pm(arm["total_seconds"], 1, 0)
                if len(arm["trainings"]) > 1:
                    parts_seconds = " + ".join(f"{t['mean']:.0f}" for t in arm["train_seconds"])
                    seconds = f"{parts_seconds} = {seconds}"
                lines.append(
                    f"| {arm['label']} | {' + '.join(arm['trainings'])} | {arm['model']} | "
                    f"{' + '.join(map(_span, arm['steps']))} | {seconds} | "
                    f"{_pm(arm['accuracy'])} |"
                )
            lines += ["", data["finding"]]
        elif claim in claim_h.CLAIMS:
            lines = claim_h.table(claim, data, _pm)
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
    elif claim == "g_upcycle":
        # points, not bars: the arms differ by a point or two near 95%, which bars from 0 hide
        arms = data["arms"]
        x = np.arange(len(arms))
        means = [arm["accuracy"]["mean"] for arm in arms]
        axes.errorbar(
            x,
            means,
            yerr=[arm["accuracy"]["std"] for arm in arms],
            fmt="o",
            capsize=4,
            label="mean ± std over seeds",
        )
        for i, arm in enumerate(arms):
            axes.plot(
                [i + 0.12] * len(arm["seed_accuracy"]),
                arm["seed_accuracy"],
                "k.",
                ms=4,
                label="one seed" if i == 0 else None,
            )
            axes.annotate(f"{means[i] * 100:.1f}%", (i - 0.12, means[i]), ha="right", fontsize=7)
        axes.set_xticks(x, [_upcycle_tick(arm) for arm in arms], fontsize=7)
        axes.set_xlim(-0.6, len(arms) - 0.4)
        axes.set_ylabel("test accuracy")
    if claim != "d_k":
        axes.legend(fontsize=7)
    axes.set_title(claim)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _upcycle_tick(arm: Mapping[str, Any]) -> str:
    steps = " + ".join(map(_span, arm["steps"]))
    seconds = arm["total_seconds"]["mean"]
    return f"{textwrap.fill(arm['label'], 16)}\n{steps} steps\n{seconds:.0f} s"


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
