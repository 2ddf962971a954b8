"""Claim g, sparse upcycling: its aggregate, sentence, table and figure (report.py hands the
claim to this module)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from typing import Any

import numpy as np
from over_seeds import difference, pct, pm, span, stats, versus

CLAIM = "g_upcycle"
# Claim g's arms: (key, label, the trainings an arm is made of, in order; its accuracy is the
# last one's, its training time the sum of all of theirs, seed by seed).
UPCYCLE_ARMS = (
    ("source", "dense after T (the source)", ("vit_upcycle_source",)),
    ("dense", "(i) dense, continued", ("vit_upcycle_source", "vit_continued")),
    ("upcycled", "(ii) upcycled", ("vit_upcycle_source", "vmoe_upcycled")),
    ("scratch", "(iii) V-MoE from scratch", ("vmoe_top_k",)),
)
DIGITS_TRAIN_IMAGES = 1253


def aggregate(per_run: Mapping[str, list[dict]], dataset: str) -> dict[str, Any]:
    """The arms' accuracies and training times over seeds, and the sentence they make."""
    data = {"claim": CLAIM, "dataset": dataset}
    data["arms"] = [_upcycle_arm(per_run, *arm) for arm in UPCYCLE_ARMS]
    data["finding"] = upcycle_finding(data)
    return data


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
        "train_seconds": [stats(runs[s]["train_seconds"] for s in seeds) for runs in by_seed],
        "total_seconds": stats(sum(runs[s]["train_seconds"] for runs in by_seed) for s in seeds),
        "accuracy": stats(r["test_accuracy"] for r in last),
        "seed_accuracy": [r["test_accuracy"] for r in last],
    }


def upcycle_finding(data: Mapping[str, Any]) -> str:
    """Claim g's sentence, written from its numbers (the table prints it under it)."""
    arms = {arm["arm"]: arm for arm in data["arms"]}
    source, dense, upcycled, scratch = (arms[k] for k in ("source", "dense", "upcycled", "scratch"))
    seconds = {k: f"{arm['total_seconds']['mean']:.0f} s" for k, arm in arms.items()}
    text = (
        f"Upcycled after {span(source['steps'][0])} dense steps "
        f"({pct(source['accuracy'])}), the V-MoE reaches {pct(upcycled['accuracy'])} in "
        f"{span(upcycled['steps'][-1])} more steps: "
        f"{versus(upcycled['accuracy'], dense['accuracy'], 'continuing dense')} and "
        f"{versus(upcycled['accuracy'], scratch['accuracy'], 'the V-MoE from scratch')}, in "
        f"{seconds['upcycled']} of training against {seconds['dense']} dense and "
        f"{seconds['scratch']} from scratch."
    )
    if data["dataset"] != "digits":
        return text
    gap, spread = difference(upcycled["accuracy"], dense["accuracy"])
    gained = spread is not None and gap > spread
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


def table(data: Mapping[str, Any]) -> list[str]:
    """The claim's markdown lines."""
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
        seconds = pm(arm["total_seconds"], 1, 0)
        if len(arm["trainings"]) > 1:
            parts_seconds = " + ".join(f"{t['mean']:.0f}" for t in arm["train_seconds"])
            seconds = f"{parts_seconds} = {seconds}"
        lines.append(
            f"| {arm['label']} | {' + '.join(arm['trainings'])} | {arm['model']} | "
            f"{' + '.join(map(span, arm['steps']))} | {seconds} | "
            f"{pm(arm['accuracy'])} |"
        )
    return [*lines, "", data["finding"]]


def plot(data: Mapping[str, Any], axes: Any) -> None:
    """Accuracy per arm: mean ± std over seeds, and each seed."""
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


def _upcycle_tick(arm: Mapping[str, Any]) -> str:
    steps = " + ".join(map(span, arm["steps"]))
    seconds = arm["total_seconds"]["mean"]
    return f"{textwrap.fill(arm['label'], 16)}\n{steps} steps\n{seconds:.0f} s"
