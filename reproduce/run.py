"""Reproduce V-MoE's claims at small scale: train, evaluate, aggregate over seeds, plot.

    python reproduce/run.py [--claims a_bpr,b_dense,...] [--seeds 0 1 2] [--steps 2000]
                            [--runs runs/reproduce] [--out docs/results] [--override F=V ...]
                            [--dataset tfds:cifar10 [--image-size 32] [--data-dir D]]

(`nox -s reproduce` runs it with the defaults.) For each claim (reproduce/experiments.py) every
training it reads is trained once per seed into `--runs/<training>/seed<s>` (an existing
finished run is reused, a killed one resumes), then evaluated once on what its claims read
(test accuracy; for V-MoEs the capacity and K sweep with vanilla and BPR filling and the
routing analysis; few-shot transfer). Per-run
results go to `--out/runs/<training>-seed<s>.json`; each claim's aggregate (mean and standard
deviation over seeds) to `--out/<claim>.json` with its PNG, and the tables of every claim JSON
in `--out` (those of the claims not run too) to `--out/summary.md`, which the root README quotes
(a test checks that they agree).
`--override` applies to every training; `--dataset` moves every experiment to another dataset
(its name and matching pp specs, `experiments.dataset_overrides`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
import time
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

import experiments  # noqa: E402
import report  # noqa: E402


def run_settings(
    training: experiments.Training,
    seed: int,
    steps: int,
    runs: pathlib.Path,
    overrides: list[str],
) -> list[str]:
    """The overrides one run of `training` is trained with (what `reproduce.json` records)."""
    import vmoe_train as vt
    from vmoe_train.setup import open_dataset

    scale = training.steps_scale
    if training.equal_time:
        twin, reference = (runs / name / f"seed{seed}" for name in training.equal_time)
        scale = loop_speed(twin) / loop_speed(reference)
    settings = [
        *training.overrides,
        f"seed={seed}",
        f"num_steps={max(1, round(steps * scale))}",
        "eval.every_steps=0",
        "log.callbacks=('jsonl',)",
        *overrides,
    ]
    if training.classes:
        config = vt.apply_overrides(vt.load_config(training.config), settings)
        classes = experiments.class_halves(open_dataset(config).num_classes)[training.classes]
        pp_train, count = re.subn(r"onehot\(\s*\d+", f"onehot({len(classes)}", config.pp.train)
        if count != 1:
            raise SystemExit(
                f"training {training.name} keeps classes {classes}, so its pp.train must have one "
                f"onehot(...) to resize; got {config.pp.train!r}"
            )
        settings += [f"dataset.classes={classes}", f"pp.train={pp_train}"]
    if training.parent:
        settings.append(f"finetune.init_from={runs / training.parent / f'seed{seed}'}")
    return settings


def loop_speed(workdir: pathlib.Path) -> float:
    """A finished run's training speed: the median of its logged images per second (each over
    the steps since the previous log), leaving out the first window (it includes compiling)."""
    speeds = [
        row["train/images_per_second"]
        for row in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
        if "train/images_per_second" in row
    ]
    if not speeds:
        raise SystemExit(f"{workdir} logged no train/images_per_second; train it first")
    return float(np.median(speeds[1:] or speeds))


def train_once(
    training: experiments.Training,
    seed: int,
    steps: int,
    runs: pathlib.Path,
    overrides: list[str],
) -> tuple[pathlib.Path, list[str], bool]:
    """Trains `training` with `seed` unless its finished run is there: (workdir, its settings,
    trained now).

    The overrides a run was trained with are kept in `workdir/reproduce.json`; a run directory
    holding another setting is an error (reusing or resuming it would mix two experiments)."""
    import vmoe_train as vt

    workdir = runs / training.name / f"seed{seed}"
    settings = run_settings(training, seed, steps, runs, overrides)
    marker = workdir / "reproduce.json"
    if marker.exists():
        recorded = json.loads(marker.read_text())["overrides"]
        if recorded != settings:
            raise SystemExit(
                f"{workdir} was trained with {recorded}, not {settings}; use another --runs "
                "folder or delete that run"
            )
        if (workdir / "summary.json").exists():
            return workdir, settings, False
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"overrides": settings}) + "\n")
    config = vt.apply_overrides(vt.load_config(training.config), settings)
    vt.train(config, workdir)
    return workdir, settings, True


def trained_k(config: Any) -> int:
    """The K a run was trained with: its router option, else the layers' default."""
    import vmoe_layers
    from vmoe_train.config import config_get

    default = vmoe_layers.DEFAULT_ROUTER_OPTIONS["k"]
    return int(config_get(config, "model.moe.router_options.k", default))


def training_curve(path: pathlib.Path) -> dict[str, list[float]]:
    """Per logged step, the MoE layers' mean expert-load CV and dropped fraction (training).

    A resumed run logs again the steps after its checkpoint: the last row of a step counts (the
    resumed run repeats the killed one's numbers bit for bit, so which one is moot)."""
    by_step: dict[int, tuple[float, float]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        columns = {
            field: [v for k, v in row.items() if k.startswith("train/moe_") and k.endswith(field)]
            for field in ("/load_cv", "/dropped_fraction")
        }
        if not all(columns.values()):
            continue  # an evaluation row, or a model without MoE layers
        by_step[int(row["step"])] = (
            float(np.mean(columns["/load_cv"])),
            float(np.mean(columns["/dropped_fraction"])),
        )
    steps = sorted(by_step)
    return {
        "step": steps,
        "load_cv": [by_step[s][0] for s in steps],
        "dropped_fraction": [by_step[s][1] for s in steps],
    }


def moe_flops(run: Any) -> dict[str, Any]:
    """One MoE layer's FLOPs per token at the training capacity (`vmoe_layers.layer_flops`,
    counted from its programs): the router, the chosen experts, the capacity buffers, the
    variants' branches (shared experts)."""
    import vmoe_layers as vl
    from vmoe_eval import routing_stats

    layer = vl.moe_layer(run.model)
    shape = layer.layer_shape()
    flops = vl.layer_flops(
        layer,
        run.model.hidden_size,
        routing_stats.group_size(run),
        capacity_factor=getattr(layer.make_router(), "capacity_factor", None),
    )
    return {
        "experts": shape.num_experts,
        "expert_width": shape.mlp_dim,
        **dataclasses.asdict(flops),
    }


def fewshot(run: Any) -> dict[str, float]:
    """Few-shot linear accuracy on frozen features, per number of shots (mean over 3 draws)."""
    import vmoe_eval

    results = vmoe_eval.get_evaluator("fewshot", shots=experiments.SHOTS).evaluate(run)
    return {str(n): results[f"fewshot/{n}shot/mean"] for n in experiments.SHOTS}


def evaluate_run(
    workdir: pathlib.Path, evaluations: tuple[str, ...], figures: pathlib.Path | None = None
) -> dict[str, Any]:
    """What `evaluations` names (see `experiments.MOE_EVALUATIONS`) for one trained run;
    `figures`: where to write its routing heatmaps, if wanted."""
    import vmoe_data
    import vmoe_eval
    from vmoe_train.setup import open_dataset

    run = vmoe_eval.load_run(workdir)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "model": str(run.config.model.name),
        "router": str(run.config.model.moe.router),
        "k": trained_k(run.config),
        "classes": list(run.config.dataset.classes),
        "test_accuracy": vmoe_eval.get_evaluator("accuracy", split="test").evaluate(run)[
            "test/accuracy"
        ],
    }
    if "sweep" in evaluations:
        points = vmoe_eval.sweep(
            run, experiments.CAPACITY_FACTORS, ks=(1, 2), routers=("top_k", "bpr")
        )
        result["sweep"] = [{key: p[key] for key in report.SWEEP_FIELDS} for p in points]
    if "sweep" in evaluations or "curve" in evaluations:
        result["training_curve"] = training_curve(workdir / "metrics.jsonl")
    if "curve" in evaluations:
        result["moe_flops"] = moe_flops(run)
    if "routing" in evaluations:
        analysis = vmoe_eval.routing_analysis(run)
        if figures is not None:
            vmoe_eval.write_routing(analysis, figures)
        result["routing"] = {
            name: {
                "nmi_class": layer.nmi,
                "nmi_position": vmoe_eval.normalized_mutual_information(layer.position_counts),
                "dropped_fraction": layer.dropped_fraction,
            }
            for name, layer in analysis.layers.items()
        }
    if "fewshot" in evaluations:
        result["fewshot"] = fewshot(run)
    if "transfer_fewshot" in evaluations:
        # The same params on the held-out classes: only the run's dataset changes (no second
        # checkpoint restore).
        config = run.config.copy_and_resolve_references()
        config.dataset.classes = ()
        everything = open_dataset(config)
        other = experiments.class_halves(everything.num_classes)["second"]
        config.dataset.classes = other
        held_out = dataclasses.replace(
            run,
            config=config,
            setup=dataclasses.replace(
                run.setup, dataset=vmoe_data.select_classes(everything, other)
            ),
        )
        result["transfer_classes"] = list(other)
        result["transfer_fewshot"] = fewshot(held_out)
    result["eval_seconds"] = time.perf_counter() - start
    return result


def _with_needs_first(names: list[str]) -> list[str]:
    """`names` plus the trainings they need (`Training.needs`), each after what it needs."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name not in ordered:
            for needed in experiments.TRAININGS[name].needs:
                visit(needed)
            ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", default=",".join(experiments.CLAIMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(experiments.SEEDS))
    parser.add_argument("--steps", type=int, default=experiments.STEPS)
    parser.add_argument("--runs", type=pathlib.Path, default=pathlib.Path("runs/reproduce"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/results"))
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--dataset", default="digits", help="e.g. tfds:cifar10, image_folder:P")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--data-dir", default="")
    args = parser.parse_args(argv)
    claims = [c.strip() for c in args.claims.split(",") if c.strip()]
    unknown = [c for c in claims if c not in experiments.CLAIMS]
    if unknown:
        parser.error(f"unknown claims {unknown}; known: {sorted(experiments.CLAIMS)}")
    overrides = [
        *experiments.dataset_overrides(args.dataset, args.image_size, args.data_dir),
        *args.override,
    ]

    started = time.perf_counter()
    names = list(dict.fromkeys(t for c in claims for t in experiments.CLAIMS[c]))
    names = _with_needs_first(names)
    per_run: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        training = experiments.TRAININGS[name]
        for seed in args.seeds:
            cached = args.out / "runs" / f"{name}-seed{seed}.json"
            workdir, settings, fresh = train_once(training, seed, args.steps, args.runs, overrides)
            result = json.loads(cached.read_text()) if cached.exists() else {}
            evaluations = list(training.evaluations)
            if fresh or (result.get("settings"), result.get("evaluations")) != (
                settings,
                evaluations,
            ):  # evaluate this run afresh
                summary = json.loads((workdir / "summary.json").read_text())
                figures = None
                if name == "vmoe_top_k" and seed == args.seeds[0]:
                    figures = args.out / "routing"
                result = {
                    "training": name,
                    "seed": seed,
                    "settings": settings,
                    "evaluations": evaluations,
                    "steps": summary["steps"],
                    "train_seconds": summary["seconds"],
                    **evaluate_run(workdir, training.evaluations, figures),
                }
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{name} seed {seed}: test accuracy {result['test_accuracy']:.4f}", flush=True)
            per_run.setdefault(name, []).append(result)

    aggregates = {claim: report.aggregate(claim, per_run) for claim in claims}
    for claim, aggregate in aggregates.items():
        (args.out / f"{claim}.json").write_text(json.dumps(aggregate, indent=1) + "\n")
        report.plot(claim, aggregate, args.out / f"{claim}.png")
    summary = report.tables(report.load(args.out))  # every claim there: partial runs keep all
    (args.out / "summary.md").write_text(summary)
    print(summary)
    print(f"reproduce/run.py took {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
