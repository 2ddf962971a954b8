"""`vmoe-eval`: evaluate a trained run from the command line.

    vmoe-eval accuracy RUN [--split test] [--capacity-factor 1.5] [--k 1] [--router bpr]
    vmoe-eval fewshot  RUN [--shots 1,5,10,25] [--seeds 0,1,2]
    vmoe-eval sweep    RUN [--capacity-factors 0.1,0.5,1] [--ks 1,2] [--routers top_k,bpr]
    vmoe-eval routing  RUN [--split test]
    vmoe-eval all      RUN          # all four, plus report.md linking every table and plot

RUN is a run directory (as `vmoe-train --workdir` made), its checkpoints/ or one step folder.
Outputs go to `--out` (default RUN/eval/<command>/); every command prints what it wrote.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

PROG = "vmoe-eval"
COMMANDS = ("accuracy", "fewshot", "sweep", "routing", "all")


def _numbers(kind: type) -> Any:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        sub = commands.add_parser(name, help=f"{name} of a trained run")
        sub.add_argument("run", help="run directory, its checkpoints/ or a <step>/ folder")
        sub.add_argument("--out", help="output folder (default: RUN/eval/<command>)")
        sub.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
        sub.add_argument("--split", help="split to evaluate (default: the config's test split)")
        sub.add_argument("--batch-size", type=int)
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="override a field of the run's config (e.g. dataset.data_dir=...)",
        )
        if name in ("accuracy", "fewshot", "routing"):
            sub.add_argument("--k", type=int)
            sub.add_argument("--capacity-factor", type=float)
            sub.add_argument("--router", help="evaluate the same params with another router")
        if name in ("fewshot", "all"):
            sub.add_argument("--shots", type=_numbers(int), default=(1, 5, 10, 25))
            sub.add_argument("--seeds", type=_numbers(int), default=(0, 1, 2))
        if name in ("sweep", "all"):
            sub.add_argument("--capacity-factors", type=_numbers(float))
            sub.add_argument("--ks", type=_numbers(int), default=(1, 2))
            sub.add_argument("--routers", type=_numbers(str), default=("top_k", "bpr"))
    return parser


def _write_json(path: pathlib.Path, data: Any) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def run_accuracy(run, args, out: pathlib.Path) -> tuple[dict, list[pathlib.Path]]:
    from vmoe_eval.evaluators import get_evaluator

    options = {
        "split": args.split,
        "batch_size": args.batch_size,
        "k": args.k,
        "capacity_factor": args.capacity_factor,
        "router": args.router,
    }
    results = get_evaluator("accuracy", **{k: v for k, v in options.items() if v is not None})
    results = results.evaluate(run)
    return results, [_write_json(out / "accuracy.json", results)]


def run_fewshot(run, args, out: pathlib.Path) -> tuple[dict, list[pathlib.Path]]:
    from vmoe_eval.evaluators import get_evaluator

    options = {
        "shots": args.shots,
        "seeds": args.seeds,
        "test_split": args.split,
        "batch_size": args.batch_size,
        "k": getattr(args, "k", None),
        "capacity_factor": getattr(args, "capacity_factor", None),
        "router": getattr(args, "router", None),
    }
    results = get_evaluator("fewshot", **{k: v for k, v in options.items() if v is not None})
    results = results.evaluate(run)
    return results, [_write_json(out / "fewshot.json", results)]


def run_sweep(run, args, out: pathlib.Path) -> tuple[list, list[pathlib.Path]]:
    from vmoe_eval.capacity_sweep import sweep, write_sweep

    options: dict[str, Any] = {"ks": args.ks, "routers": args.routers, "progress": True}
    if args.capacity_factors:
        options["capacity_factors"] = args.capacity_factors
    if args.split:
        options["split"] = args.split
    results = sweep(run, batch_size=args.batch_size, **options)
    return results, _paths(write_sweep(results, out))


def run_routing(run, args, out: pathlib.Path) -> tuple[Any, list[pathlib.Path]]:
    from vmoe_eval.routing_stats import routing_analysis, write_routing

    options = {
        "router": getattr(args, "router", None),
        "k": getattr(args, "k", None),
        "capacity_factor": getattr(args, "capacity_factor", None),
    }
    if args.split:
        options["split"] = args.split
    analysis = routing_analysis(run, batch_size=args.batch_size, progress=True, **options)
    return analysis, _paths(write_routing(analysis, out))


def _paths(written: dict[str, Any]) -> list[pathlib.Path]:
    """The files a writer reports ({kind: path or [paths]}), flattened."""
    paths: list[pathlib.Path] = []
    for value in written.values():
        paths += [pathlib.Path(p) for p in (value if isinstance(value, list) else [value])]
    return paths


RUNNERS = {
    "accuracy": run_accuracy,
    "fewshot": run_fewshot,
    "sweep": run_sweep,
    "routing": run_routing,
}


def write_report(
    run, results: dict[str, Any], files: dict[str, list[pathlib.Path]], out: pathlib.Path
) -> pathlib.Path:
    """report.md: the numbers of every command, with links to their tables and plots."""
    lines = [
        f"# Evaluation of {run.config.model.name} on {run.config.dataset.name}",
        "",
        f"Checkpoint: `{run.path}` (step {run.step}).",
        "",
    ]
    if "accuracy" in results:
        lines += ["## Accuracy", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(results["accuracy"].items())]
        lines.append("")
    if "fewshot" in results:
        lines += ["## Few-shot linear transfer", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(results["fewshot"].items())]
        lines.append("")
    for name, title in (("sweep", "Capacity and K sweep"), ("routing", "Routing analysis")):
        if name not in files:
            continue
        lines += [f"## {title}", ""]
        if name == "routing":
            lines += [results["routing"].table(), ""]
        for path in files[name]:
            relative = path.relative_to(out)
            lines.append(
                f"![{path.stem}]({relative})"
                if path.suffix == ".png"
                else f"- [{path.name}]({relative})"
            )
        lines.append("")
    _write_json(
        out / "report.json", {k: results[k] for k in ("accuracy", "fewshot") if k in results}
    )
    return _write_text(out / "report.md", "\n".join(lines))


def _write_text(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from vmoe_eval.loading import load_run

    try:
        run = load_run(args.run, args.step, overrides=args.set)
    except (FileNotFoundError, ValueError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    base = pathlib.Path(args.out) if args.out else pathlib.Path(args.run) / "eval"
    commands = list(RUNNERS) if args.command == "all" else [args.command]
    results: dict[str, Any] = {}
    files: dict[str, list[pathlib.Path]] = {}
    for command in commands:
        out = base / command if (args.command == "all" or not args.out) else base
        if args.command == "all":
            args = _with_defaults(args)
        results[command], files[command] = RUNNERS[command](run, args, out)
        for path in files[command]:
            print(f"{command}: wrote {path}")
    if args.command == "all":
        report = write_report(run, results, {k: v for k, v in files.items()}, base)
        print(f"report: {report}")
    return 0


def _with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    for name in ("k", "capacity_factor", "router", "shots", "seeds", "capacity_factors"):
        if not hasattr(args, name):
            setattr(args, name, None)
    if args.shots is None:
        args.shots = (1, 5, 10, 25)
    if args.seeds is None:
        args.seeds = (0, 1, 2)
    return args
