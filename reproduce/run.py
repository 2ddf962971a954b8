"""Reproduce V-MoE's claims at small scale: train, evaluate, aggregate over seeds, plot.

    python reproduce/run.py [--claims a_bpr,c_routing,d_k,f_aux] [--seeds 0 1 2] [--steps 2000]
                            [--runs runs/reproduce] [--out docs/results] [--override F=V ...]

(`nox -s reproduce` runs it with the defaults.) For each claim (reproduce/experiments.py) every
training it reads is trained once per seed into `--runs/<training>/seed<s>` (an existing
finished run is reused, a killed one resumes), then evaluated once: test accuracy at the trained
settings, the capacity and K sweep (vanilla and BPR filling), the routing analysis. Per-run
results go to `--out/runs/<training>-seed<s>.json`; each claim's aggregate (mean and standard
deviation over seeds) to `--out/<claim>.json` with its PNG, and the tables to
`--out/summary.md`, which the root README quotes (a test checks that they agree).
`--override` applies to every training (e.g. `dataset.name=tfds:cifar10` with a matching pp).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))

import experiments  # noqa: E402
import report  # noqa: E402


def train_once(
    training: experiments.Training, seed: int, steps: int, runs: pathlib.Path, overrides: list[str]
) -> tuple[pathlib.Path, bool]:
    """Trains `training` with `seed` unless its finished run is there: (workdir, trained now).

    The overrides a run was trained with are kept in `workdir/reproduce.json`; a run directory
    holding another setting is an error (reusing or resuming it would mix two experiments)."""
    import vmoe_train as vt

    workdir = runs / training.name / f"seed{seed}"
    settings = [
        *training.overrides,
        f"seed={seed}",
        f"num_steps={steps}",
        "eval.every_steps=0",
        "log.callbacks=('jsonl',)",
        *overrides,
    ]
    marker = workdir / "reproduce.json"
    if marker.exists():
        recorded = json.loads(marker.read_text())["overrides"]
        if recorded != settings:
            raise SystemExit(
                f"{workdir} was trained with {recorded}, not {settings}; use another --runs "
                "folder or delete that run"
            )
        if (workdir / "summary.json").exists():
            return workdir, False
    workdir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"overrides": settings}) + "\n")
    config = vt.apply_overrides(vt.load_config(training.config), settings)
    vt.train(config, workdir)
    return workdir, True


def trained_k(config: Any) -> int:
    """The K a run was trained with: its router option, else the layers' default."""
    import vmoe_layers
    from vmoe_train.config import config_get

    default = vmoe_layers.DEFAULT_ROUTER_OPTIONS["k"]
    return int(config_get(config, "model.moe.router_options.k", default))


def training_curve(path: pathlib.Path) -> dict[str, list[float]]:
    """Per logged step, the MoE layers' mean expert-load CV and dropped fraction (training)."""
    curve: dict[str, list[float]] = {"step": [], "load_cv": [], "dropped_fraction": []}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        columns = {
            field: [v for k, v in row.items() if k.startswith("train/moe_") and k.endswith(field)]
            for field in ("/load_cv", "/dropped_fraction")
        }
        if not all(columns.values()):
            continue  # an evaluation row, or a model without MoE layers
        curve["step"].append(row["step"])
        curve["load_cv"].append(float(np.mean(columns["/load_cv"])))
        curve["dropped_fraction"].append(float(np.mean(columns["/dropped_fraction"])))
    return curve


def evaluate_run(workdir: pathlib.Path) -> dict[str, Any]:
    """Test accuracy, the sweep and the routing analysis of one trained run."""
    import vmoe_eval

    run = vmoe_eval.load_run(workdir)
    start = time.perf_counter()
    accuracy = vmoe_eval.get_evaluator("accuracy", split="test").evaluate(run)
    points = vmoe_eval.sweep(run, experiments.CAPACITY_FACTORS, ks=(1, 2), routers=("top_k", "bpr"))
    analysis = vmoe_eval.routing_analysis(run)
    layers = {
        name: {
            "nmi_class": layer.nmi,
            "nmi_position": vmoe_eval.normalized_mutual_information(layer.position_counts),
            "dropped_fraction": layer.dropped_fraction,
        }
        for name, layer in analysis.layers.items()
    }
    return {
        "training_curve": training_curve(workdir / "metrics.jsonl"),
        "model": str(run.config.model.name),
        "router": str(run.config.model.moe.router),
        "k": trained_k(run.config),
        "test_accuracy": accuracy["test/accuracy"],
        "sweep": [{key: p[key] for key in report.SWEEP_FIELDS} for p in points],
        "routing": layers,
        "eval_seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", default=",".join(experiments.CLAIMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(experiments.SEEDS))
    parser.add_argument("--steps", type=int, default=experiments.STEPS)
    parser.add_argument("--runs", type=pathlib.Path, default=pathlib.Path("runs/reproduce"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/results"))
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    claims = [c.strip() for c in args.claims.split(",") if c.strip()]
    unknown = [c for c in claims if c not in experiments.CLAIMS]
    if unknown:
        parser.error(f"unknown claims {unknown}; known: {sorted(experiments.CLAIMS)}")

    per_run: dict[str, list[dict[str, Any]]] = {}
    for name in dict.fromkeys(t for c in claims for t in experiments.CLAIMS[c]):
        training = experiments.TRAININGS[name]
        for seed in args.seeds:
            cached = args.out / "runs" / f"{name}-seed{seed}.json"
            workdir, fresh = train_once(training, seed, args.steps, args.runs, args.override)
            settings = json.loads((workdir / "reproduce.json").read_text())["overrides"]
            result = json.loads(cached.read_text()) if cached.exists() else {}
            if fresh or result.get("settings") != settings:  # evaluate this run afresh
                result = {
                    "training": name,
                    "seed": seed,
                    "settings": settings,
                    "steps": args.steps,
                    "train_seconds": json.loads((workdir / "summary.json").read_text())["seconds"],
                    **evaluate_run(workdir),
                }
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(result, indent=1) + "\n")
            print(f"{name} seed {seed}: test accuracy {result['test_accuracy']:.4f}", flush=True)
            per_run.setdefault(name, []).append(result)

    aggregates = {claim: report.aggregate(claim, per_run) for claim in claims}
    for claim, aggregate in aggregates.items():
        (args.out / f"{claim}.json").write_text(json.dumps(aggregate, indent=1) + "\n")
        report.plot(claim, aggregate, args.out / f"{claim}.png")
    summary = report.tables(aggregates)
    (args.out / "summary.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
