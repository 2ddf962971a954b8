"""Capacity and K sweep of one checkpoint: vanilla (top-K) vs Batch Priority Routing at inference.

    results = sweep(load_run("runs/digits"), capacity_factors=(0.1, 0.5, 1.0), ks=(1, 2))
    write_sweep(results, "out/sweep")        # sweep.csv, sweep.json, sweep.png

The same parameters are evaluated at every point (router filling, K, capacity factor C): the
routers are swapped (`loading.with_routing`: "top_k" fills buffers in token order, "bpr" by
priority) and K / C are per-call overrides; nothing is retrained. Per point:

- `accuracy`: precision@1 over the real examples (padding masked), counted as the trainer and
  the accuracy evaluator do (`vmoe_train.losses.top1_correct`): top-1 accuracy for single-label
  data.
- `capacity`: C_e, slots per expert per routing group, `ceil(K * C * S / E)` capped at S (the
  router's `compute_capacity`; S tokens per group, E experts).
- per MoE layer (`layers["moe_block_<i>"]`), over the real examples:
  `processed_fraction`: the share of token-choices (tokens x K) that got a slot in an expert's
  buffer, i.e. 1 - dropped fraction; `no_expert_fraction`: the share of tokens none of whose K
  choices got a slot (the residual connection alone carries them).
- `processed_fraction` / `no_expert_fraction` at the top level: the mean over the MoE layers;
  `processed_fraction` is the x-axis of the plot ("fraction of tokens processed").
- `moe_flops_relative`: the FLOPs of the MoE layers' experts relative to full capacity, defined
  as `capacity / capacity_full`, where `capacity_full` is the capacity at capacity factor 1.0
  with the model's own K (each expert has room for K*S/E choices: every token-choice of a
  perfectly balanced group is processed). The experts run on all E x C_e buffer slots of every
  group, filled or not, so their FLOPs scale with C_e; the router's gate (D x E per token, the
  same at every point) and the rest of the network are left out. With the model's K=2 and
  C=1.0 it is 1.0; K=1, C=1.0 is about 0.5.

Exactness with padding: the statistics are computed from the routing decisions themselves
(recomputed per layer, see `routing_analysis.apply_with_routing`), token by token, and each token
is attributed to its image, so padded images never enter the sums (the layer's own metrics are
means over routing groups, padded images included). Padded images in the last batch can still
take buffer slots from real images of the same routing group, as in any padded evaluation.

Speed: one jitted function per distinct point, reused over all batches: it is traced and
compiled once per (router, K, capacity), not per batch. Capacity factors that round to the same
capacity share one computation (for token-choice routers the routing depends on the factor only
through the capacity). All points are evaluated batch by batch in one pass over the split.
`TRACES` counts the traces per (router, K, capacity), for checking exactly that.
"""

from __future__ import annotations

import collections
import csv
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import vmoe_layers as vl
import vmoe_routing
from vmoe_eval import loading, plots
from vmoe_eval import routing_stats as ra
from vmoe_layers.moe import override_router
from vmoe_train.losses import top1_correct

DEFAULT_CAPACITY_FACTORS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5)
DEFAULT_KS = (1, 2)
DEFAULT_ROUTERS = ("top_k", "bpr")
ROUTER_LABELS = {"top_k": "vanilla", "bpr": "BPR"}

# The columns of sweep.csv before the per-layer ones ("moe_block_<i>/processed_fraction", ...).
FIELDS = (
    "model",
    "split",
    "router",
    "k",
    "capacity_factor",
    "capacity",
    "group_size",
    "num_experts",
    "examples",
    "accuracy",
    "processed_fraction",
    "no_expert_fraction",
    "moe_flops_relative",
)
LAYER_FIELDS = ("processed_fraction", "no_expert_fraction")

# (router, K, capacity) -> times its sweep function was traced (a trace precedes every compile).
TRACES: collections.Counter = collections.Counter()


def make_router(model: vl.VisionTransformer, *, k: int | None, capacity_factor: float | None):
    """The router object the model's MoE layers use with these per-call overrides."""
    return override_router(vl.model_router(model), k, capacity_factor)


def point_capacity(
    model: vl.VisionTransformer, *, k: int | None, capacity_factor: float | None, group_size: int
) -> tuple[int, int]:
    """(capacity, K) of the model's routers at these overrides, for groups of `group_size`
    tokens: read off the router's decision on a dummy group (shapes only, nothing computed)."""
    router = make_router(model, k=k, capacity_factor=capacity_factor)
    d = model.hidden_size

    def route():
        params = router.init(jax.random.key(0), d)
        state = {"state": router.init_state(d)} if vmoe_routing.has_state(router) else {}
        x = jnp.zeros((1, group_size, d), jnp.float32)
        return router(params, x, deterministic=True, **state)

    routing = jax.eval_shape(route)
    return int(routing.capacity), int(routing.token.shape[1] // group_size)


def _point_fn(model: vl.VisionTransformer, key: tuple, k: int, capacity_factor: float, t: int):
    def sweep_point(variables, images, labels, mask):
        TRACES[key] += 1  # Python side effect: runs once per trace, never per call
        out, routings = ra.apply_with_routing(
            model, variables, images, k=k, capacity_factor=capacity_factor
        )
        return {
            "predicted": jnp.argmax(out.logits, axis=-1),
            "layers": {name: ra.token_stats(r, mask, t) for name, r in routings.items()},
        }

    return jax.jit(sweep_point)


def sweep(
    run: loading.LoadedRun,
    capacity_factors: Sequence[float] = DEFAULT_CAPACITY_FACTORS,
    ks: Sequence[int] = DEFAULT_KS,
    routers: Sequence[str] = DEFAULT_ROUTERS,
    split: str = "test",
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One result per (router, K, capacity factor), in that nesting order; see the module
    docstring for the fields and their definitions. Parameters are never changed."""
    ra.check_moe(run)
    if not capacity_factors or not ks or not routers:
        raise ValueError("capacity_factors, ks and routers must each name at least one value")
    t, s = ra.tokens_per_image(run), ra.group_size(run)
    capacity_full, _ = point_capacity(run.model, k=None, capacity_factor=1.0, group_size=s)

    requests = []  # (router, k, capacity factor, key of its computation, capacity)
    functions: dict[tuple, Any] = {}
    for router in routers:
        model = loading.with_routing(run.model, router)
        for k in ks:
            for factor in capacity_factors:
                capacity, _ = point_capacity(model, k=k, capacity_factor=factor, group_size=s)
                router_object = make_router(model, k=k, capacity_factor=factor)
                by_capacity = isinstance(router_object, vmoe_routing.TokenChoiceRouter)
                key = (router, int(k), capacity) if by_capacity else (router, int(k), factor)
                if key not in functions:
                    functions[key] = _point_fn(model, key, int(k), float(factor), t)
                requests.append((router, int(k), float(factor), key, capacity))

    totals: dict[tuple, dict[str, Any]] = {key: {"correct": 0, "layers": {}} for key in functions}
    examples = 0
    batches = ra.global_batches(run, split, batch_size)
    total = ra.num_batches(run, split, batch_size)
    for images, batch in ra.progress_bar(batches, progress, total, f"sweep {split}"):
        mask = np.asarray(batch["mask"], dtype=bool)
        labels = ra.int_labels(batch)
        examples += int(mask.sum())
        outputs = {key: fn(run.variables, images, labels, mask) for key, fn in functions.items()}
        for key, out in outputs.items():
            acc = totals[key]
            predicted = np.asarray(loading.to_host(out["predicted"]))
            acc["correct"] += int(np.sum(top1_correct(predicted, batch) & mask))
            for name, stats in out["layers"].items():
                layer = acc["layers"].setdefault(name, collections.Counter())
                layer.update({s_: int(loading.to_host(v)) for s_, v in stats.items()})
    if examples == 0:
        raise ValueError(f"split {split!r} of {run.dataset.name!r} has no examples")

    results = []
    for router, k, factor, key, capacity in requests:
        acc = totals[key]
        layers = {
            name: {
                "processed_fraction": stats["kept"] / max(stats["choices"], 1),
                "no_expert_fraction": stats["no_expert"] / max(stats["tokens"], 1),
            }
            for name, stats in sorted(acc["layers"].items(), key=lambda i: ra.block_index(i[0]))
        }
        results.append(
            {
                "model": str(run.config.model.name),
                "split": split,
                "router": router,
                "k": k,
                "capacity_factor": factor,
                "capacity": capacity,
                "group_size": s,
                "num_experts": run.model.moe.num_experts,
                "examples": examples,
                "accuracy": acc["correct"] / examples,
                "processed_fraction": float(
                    np.mean([v["processed_fraction"] for v in layers.values()])
                ),
                "no_expert_fraction": float(
                    np.mean([v["no_expert_fraction"] for v in layers.values()])
                ),
                "moe_flops_relative": capacity / capacity_full,
                "layers": layers,
            }
        )
    return results


# ---------------------------------------------------------------------------------------------
# Output


def flat_row(result: dict[str, Any]) -> dict[str, Any]:
    """A result as one CSV row: the top-level fields, then "<layer>/<field>" per MoE layer."""
    row = {field: result[field] for field in FIELDS}
    for name, layer in result["layers"].items():
        for field in LAYER_FIELDS:
            row[f"{name}/{field}"] = layer[field]
    return row


def write_sweep(results: Sequence[dict[str, Any]], outdir: str | pathlib.Path) -> dict[str, Any]:
    """Writes sweep.csv (one row per point), sweep.json (the results as returned) and sweep.png
    (accuracy vs fraction of tokens processed, one line per router and K) into `outdir`.
    Returns {"csv": path, "json": path, "png": path}."""
    if not results:
        raise ValueError("no sweep results to write")
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = [flat_row(r) for r in results]
    columns = list(FIELDS) + [c for c in rows[0] if c not in FIELDS]
    csv_path = outdir / "sweep.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path = outdir / "sweep.json"
    json_path.write_text(json.dumps(list(results), indent=1) + "\n")
    png_path = plot_sweep(results, outdir / "sweep.png")
    return {"csv": csv_path, "json": json_path, "png": png_path}


def plot_sweep(results: Sequence[dict[str, Any]], path: str | pathlib.Path) -> pathlib.Path:
    """Accuracy vs fraction of tokens processed (mean over MoE layers), one line per (router,
    K): BPR solid, vanilla dashed, one colour per K; as the V-MoE paper's BPR figure."""
    fig, ax = plots.new_figure(6.4, 4.4)
    lines: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for result in results:
        lines.setdefault((result["router"], result["k"]), []).append(result)
    ks = sorted({k for _, k in lines})
    routers = list(dict.fromkeys(r for r, _ in lines))
    for (router, k), points in lines.items():
        r = routers.index(router)
        plots.line(
            ax,
            [p["processed_fraction"] for p in points],
            [p["accuracy"] for p in points],
            label=f"{ROUTER_LABELS.get(router, router)}, K={k}",
            marker=plots.MARKERS[r % len(plots.MARKERS)],
            color=plots.COLORS[ks.index(k) % len(plots.COLORS)],
            linestyle="-" if router == "bpr" else "--",
        )
    accuracies = [r["accuracy"] for r in results]
    margin = max(0.02, 0.1 * (max(accuracies) - min(accuracies)))
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(max(0.0, min(accuracies) - margin), min(1.0, max(accuracies) + margin))
    ax.set_xlabel("fraction of tokens processed (per MoE layer, mean)")
    ax.set_ylabel(f"{results[0]['split']} accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"{results[0]['model']}: accuracy vs tokens processed")
    return plots.save(fig, path)
