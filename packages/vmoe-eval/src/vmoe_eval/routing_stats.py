"""Where the tokens go: per MoE layer, expert x class and expert x patch-position statistics.

    analysis = routing_analysis(load_run("runs/digits"), split="test")
    print(analysis.table())                  # layer | NMI(expert; class) | dropped | no expert
    write_routing(analysis, "out/routing")   # heatmaps, position maps, routing.json, routing.md

For every MoE layer, over the real (unpadded) examples of a split:

- `counts[e, c]`: valid assignments (token-choices that got a slot in expert e's buffer) of
  tokens of images of class c. Summed over experts and classes this is
  `tokens x K - dropped`: every token of every real image makes K choices and the dropped ones
  (buffer full) are not counted.
- `mean_weight[e, c]`: the mean combine weight of those assignments (0 where there are none).
- `position_counts[e, t]`: the same assignments by token position t within the image (t = 0 is
  the class token when the model has one; the patches follow in row-major order, see
  `RoutingAnalysis.position_grid` for the [E, H/P, W/P] map).
- `nmi`: normalised mutual information between expert choice and class,
  I(E; C) / sqrt(H(E) H(C)), of the joint distribution `counts / counts.sum()`: every valid
  assignment is one (expert, class) sample, so with K=2 a token that kept both choices counts
  twice. It is in [0, 1]: 0 when the expert says nothing about the class, 1 when each expert sees
  a single class and each class a single expert; 0 by convention when either entropy is 0.

How the assignments are obtained: the model is applied as usual, and a flax method interceptor
(`nn.intercept_methods`) recomputes each `MoeLayer`'s routing decision from that layer's input,
router and router parameters exactly as the layer does (`make_router`, the call's K / capacity
overrides, `group_tokens`, deterministic). Nothing in the model changes, and the recomputation is
checked against the layer's own `dropped_fraction` in the tests.

Padding: an assignment belongs to the image its token comes from (tokens are grouped by a plain
reshape of [B, T, D], so flat token g*S + s is token (g*S + s) % T of image (g*S + s) // T), and
assignments of padded images are left out. A padded image can still take slots from real images
of the same routing group; that happens only in the last batch of a split, and the accuracy
evaluator sees the same batches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import vmoe_layers as vl
import vmoe_routing
from vmoe_eval import loading, plots
from vmoe_layers.moe import group_tokens, override_router, router_name
from vmoe_train import setup as setup_lib

_BLOCK = re.compile(r"block_\d+")


# ---------------------------------------------------------------------------------------------
# Capturing the routing decisions


def layer_name(module: nn.Module) -> str:
    """The name "moe_block_<i>" of the MoE layer of block i (as in `ModelOutput.metrics`)."""
    path = tuple(module.scope.path) if module.scope is not None else ()
    blocks = [p for p in path if _BLOCK.fullmatch(p)]
    return f"moe_{blocks[-1]}" if blocks else "/".join(path) or module.name or "moe"


def apply_with_routing(
    model: vl.VisionTransformer,
    variables: Any,
    images: jax.Array,
    *,
    k: int | None = None,
    capacity_factor: float | None = None,
) -> tuple[vl.ModelOutput, dict[str, Any]]:
    """(`model.apply(variables, ...)` in evaluation mode, {layer name: its
    `vmoe_routing.Routing`}); `variables` as `LoadedRun.variables` (params, router state).

    Use it inside `jax.jit` (it is traceable). The routings are recomputed from each MoE layer's
    input by the layer's own router, with the call's K / capacity overrides: the decision the
    layer used.
    """
    routings: dict[str, Any] = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if (
            isinstance(module, vl.MoeLayer)
            and context.method_name == "__call__"
            and not module.is_initializing()
        ):
            if not kwargs.get("deterministic", True):
                raise ValueError("apply_with_routing captures evaluation-mode routing only")
            router = override_router(
                module.make_router(), kwargs.get("k"), kwargs.get("capacity_factor")
            )
            router_params = module.variables["params"]["router"]
            state = {}
            if vmoe_routing.has_state(router):  # e.g. a balancing bias, as the layer passes it
                state = {"state": module.variables[vl.ROUTER_STATE]["router"]}
            x_gsd = group_tokens(args[0], module.group_size)
            routings[layer_name(module)] = router(
                router_params, x_gsd, rng=None, deterministic=True, **state
            )
        return out

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, images, k=k, capacity_factor=capacity_factor)
    return out, routings


def assignment_index(routing: Any, tokens_per_image: int) -> tuple[jax.Array, jax.Array]:
    """(image [G, N], position [G, N]) of every assignment's token within the batch."""
    g = routing.token.shape[0]
    flat = jnp.arange(g, dtype=jnp.int32)[:, None] * routing.group_size + routing.token
    return flat // tokens_per_image, flat % tokens_per_image


def token_stats(routing: Any, mask: jax.Array, tokens_per_image: int) -> dict[str, jax.Array]:
    """Sums over the real images (`mask` [B]) of a batch, from one layer's routing:

    choices: token-choices made (tokens x K); kept: those that got a slot (valid assignments);
    no_expert: tokens none of whose choices got a slot; tokens: tokens.
    """
    b = mask.shape[0]
    g = routing.token.shape[0]
    k = routing.token.shape[1] // routing.group_size
    flat = jnp.arange(g, dtype=jnp.int32)[:, None] * routing.group_size + routing.token
    kept_bt = (
        jnp.zeros((b * tokens_per_image,), jnp.int32)
        .at[flat.reshape(-1)]
        .add(routing.valid.reshape(-1).astype(jnp.int32), mode="drop")
        .reshape(b, tokens_per_image)
    )
    real_b = mask.astype(jnp.int32)
    tokens = jnp.sum(real_b) * tokens_per_image
    return {
        "tokens": tokens,
        "choices": tokens * k,
        "kept": jnp.sum(kept_bt * real_b[:, None]),
        "no_expert": jnp.sum((kept_bt == 0) * real_b[:, None]),
    }


# ---------------------------------------------------------------------------------------------
# Results


def normalized_mutual_information(counts: np.ndarray) -> float:
    """I(X; Y) / sqrt(H(X) H(Y)) of the joint distribution proportional to `counts` [X, Y];
    0.0 when either marginal has zero entropy (or there are no counts)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return 0.0
    joint = counts / total
    px, py = joint.sum(1), joint.sum(0)

    def entropy(p):
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    hx, hy = entropy(px), entropy(py)
    if hx <= 0 or hy <= 0:
        return 0.0
    nz = joint > 0
    mi = float((joint[nz] * np.log(joint[nz] / np.outer(px, py)[nz])).sum())
    return float(np.clip(mi / math.sqrt(hx * hy), 0.0, 1.0))


def expert_order(counts: np.ndarray) -> np.ndarray:
    """Experts sorted by the class they see most (as a share of their own selections), then by
    how dominant that class is (descending): specialised experts line up along a diagonal."""
    counts = np.asarray(counts, dtype=np.float64)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    top = share.argmax(1)
    return np.lexsort((-share[np.arange(len(share)), top], top))


@dataclasses.dataclass
class LayerRouting:
    """One MoE layer's routing over a split (real examples only); see the module docstring.

    Attributes:
      name: "moe_block_<i>".
      counts: [E, classes] valid assignments by expert and the image's class.
      weight_sums: [E, classes] summed combine weights of those assignments.
      position_counts: [E, T] valid assignments by expert and token position.
      tokens: tokens of the real images; choices: tokens x K.
      no_expert_tokens: tokens whose every choice was dropped.
    """

    name: str
    counts: np.ndarray
    weight_sums: np.ndarray
    position_counts: np.ndarray
    tokens: int
    choices: int
    no_expert_tokens: int

    @property
    def selected(self) -> int:
        """Valid assignments: `choices - dropped`."""
        return int(self.counts.sum())

    @property
    def dropped(self) -> int:
        return self.choices - self.selected

    @property
    def dropped_fraction(self) -> float:
        return self.dropped / max(self.choices, 1)

    @property
    def no_expert_fraction(self) -> float:
        return self.no_expert_tokens / max(self.tokens, 1)

    @property
    def mean_weight(self) -> np.ndarray:
        """[E, classes] mean combine weight of the counted assignments; 0 where none."""
        return np.where(self.counts > 0, self.weight_sums / np.maximum(self.counts, 1), 0.0)

    @property
    def nmi(self) -> float:
        return normalized_mutual_information(self.counts)

    def expert_order(self) -> np.ndarray:
        return expert_order(self.counts)


@dataclasses.dataclass
class RoutingAnalysis:
    """The routing of every MoE layer of a model on one split (see `routing_analysis`)."""

    model: str
    split: str
    router: str
    k: int
    capacity_factor: float | None
    capacity: int
    group_size: int
    num_experts: int
    num_classes: int
    class_names: tuple[str, ...]
    tokens_per_image: int
    patch_grid: tuple[int, int]
    class_token: bool
    examples: int
    layers: dict[str, LayerRouting]

    def position_grid(self, name: str) -> np.ndarray:
        """[E, H/P, W/P] selection counts of the patch tokens of layer `name` (class token out)."""
        counts = self.layers[name].position_counts[:, 1 if self.class_token else 0 :]
        return counts.reshape(self.num_experts, *self.patch_grid)

    def table(self) -> str:
        """A markdown table: layer, NMI(expert; class), dropped choices, tokens with no expert."""
        lines = [
            "| layer | NMI(expert; class) | dropped choices | tokens with no expert |",
            "|---|---|---|---|",
        ]
        for name, layer in self.layers.items():
            lines.append(
                f"| {name} | {layer.nmi:.3f} | {layer.dropped} ({layer.dropped_fraction:.1%}) | "
                f"{layer.no_expert_tokens} ({layer.no_expert_fraction:.1%}) |"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        layers = {
            name: {
                "nmi": layer.nmi,
                "tokens": layer.tokens,
                "choices": layer.choices,
                "selected": layer.selected,
                "dropped": layer.dropped,
                "dropped_fraction": layer.dropped_fraction,
                "no_expert_tokens": layer.no_expert_tokens,
                "no_expert_fraction": layer.no_expert_fraction,
                "expert_order": layer.expert_order().tolist(),
                "counts": layer.counts.tolist(),
                "mean_weight": np.round(layer.mean_weight, 6).tolist(),
                "position_counts": layer.position_counts.tolist(),
            }
            for name, layer in self.layers.items()
        }
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.update(
            class_names=list(self.class_names), patch_grid=list(self.patch_grid), layers=layers
        )
        return fields


# ---------------------------------------------------------------------------------------------
# The analysis


def tokens_per_image(run: loading.LoadedRun) -> int:
    return setup_lib.tokens_per_image(run.model, run.setup.sample_images.shape[1:])


def group_size(run: loading.LoadedRun) -> int:
    """S, tokens per routing group (the model's group size; None means one image)."""
    size = run.model.moe.group_size if run.model.moe is not None else None
    return size or tokens_per_image(run)


def check_moe(run: loading.LoadedRun) -> None:
    if run.model.moe is None or not run.model.moe_blocks():
        raise ValueError(
            f"the model of {str(run.path)!r} ({run.config.model.name}) has no MoE layer: routing "
            "analysis and capacity sweeps need a V-MoE"
        )


def global_batches(
    run: loading.LoadedRun, split: str, batch_size: int | None
) -> Iterable[tuple[jax.Array, dict[str, np.ndarray]]]:
    """(global images, host batch) of every padded eval batch of `split`: `loading.forward`'s
    batches, with the model call left to the caller."""
    return loading.forward(run, split, batch_size=batch_size, apply_fn=lambda params, x: x)


def progress_bar(items: Iterable, enabled: bool, total: int | None, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit="batch")


def num_batches(run: loading.LoadedRun, split: str, batch_size: int | None) -> int:
    size = batch_size or run.config.eval_batch_size
    return -(-run.dataset.num_examples(split) // size)


def int_labels(batch: dict[str, np.ndarray]) -> np.ndarray:
    """[B] int32 class of each example: `batch["label"]`, or the argmax of a [B, C] (multi-)hot
    `label` / `labels` (the first true class of a multi-label example)."""
    labels = np.asarray(batch["label"] if "label" in batch else batch["labels"])
    return (labels.argmax(-1) if labels.ndim == 2 else labels).astype(np.int32)


def routing_analysis(
    run: loading.LoadedRun,
    split: str = "test",
    *,
    batch_size: int | None = None,
    router: str | None = None,
    k: int | None = None,
    capacity_factor: float | None = None,
    progress: bool = False,
) -> RoutingAnalysis:
    """The routing of every MoE layer of `run`'s model over every real example of `split`.

    `router` ("top_k", "bpr", ...), `k` and `capacity_factor` evaluate the same parameters with
    other routing settings (None: the model's own). One jitted function runs over all batches.
    """
    check_moe(run)
    model = loading.with_routing(run.model, router)
    t = tokens_per_image(run)
    e, num_classes = model.moe.num_experts, run.dataset.num_classes
    static: dict[str, Any] = {}

    def batch_stats(variables, images, labels, mask):
        _, routings = apply_with_routing(
            model, variables, images, k=k, capacity_factor=capacity_factor
        )
        stats = {}
        for name, routing in routings.items():
            static[name] = (routing.capacity, routing.token.shape[1] // routing.group_size)
            image, position = assignment_index(routing, t)
            selected = routing.valid & mask[image]
            expert, label = routing.expert, labels[image]
            ones = selected.astype(jnp.int32)
            weights = jnp.where(selected, routing.weight, 0).astype(jnp.float32)
            stats[name] = {
                "counts": jnp.zeros((e, num_classes), jnp.int32)
                .at[expert, label]
                .add(ones, mode="drop"),
                "weight_sums": jnp.zeros((e, num_classes), jnp.float32)
                .at[expert, label]
                .add(weights, mode="drop"),
                "position_counts": jnp.zeros((e, t), jnp.int32)
                .at[expert, position]
                .add(ones, mode="drop"),
                **token_stats(routing, mask, t),
            }
        return stats

    fn = jax.jit(batch_stats)
    totals: dict[str, dict[str, np.ndarray]] = {}
    examples = 0
    batches = global_batches(run, split, batch_size)
    for images, batch in progress_bar(
        batches, progress, num_batches(run, split, batch_size), f"routing {split}"
    ):
        mask = np.asarray(batch["mask"], dtype=bool)
        examples += int(mask.sum())
        stats = fn(run.variables, images, int_labels(batch), mask)
        for name, layer in stats.items():
            acc = totals.setdefault(name, {})
            for key, value in layer.items():
                value = loading.to_host(value)
                value = value.astype(np.float64 if value.dtype.kind == "f" else np.int64)
                acc[key] = acc[key] + value if key in acc else value
    if not totals:
        raise ValueError(f"split {split!r} of {run.dataset.name!r} has no examples")
    layers = {
        name: LayerRouting(
            name=name,
            counts=acc["counts"],
            weight_sums=acc["weight_sums"],
            position_counts=acc["position_counts"],
            tokens=int(acc["tokens"]),
            choices=int(acc["choices"]),
            no_expert_tokens=int(acc["no_expert"]),
        )
        for name, acc in sorted(totals.items(), key=lambda item: block_index(item[0]))
    }
    capacity, k_used = next(iter(static.values()))
    h, w = (s // model.patch_size for s in run.setup.sample_images.shape[1:3])
    return RoutingAnalysis(
        model=str(run.config.model.name),
        split=split,
        router=model_router_name(model),
        k=int(k_used),
        capacity_factor=capacity_factor,
        capacity=int(capacity),
        group_size=group_size(run),
        num_experts=e,
        num_classes=num_classes,
        class_names=tuple(run.dataset.class_names) or tuple(map(str, range(num_classes))),
        tokens_per_image=t,
        patch_grid=(h, w),
        class_token=model.classifier == "token",
        examples=examples,
        layers=layers,
    )


def model_router_name(model: vl.VisionTransformer) -> str:
    return router_name(model.moe.router)


def block_index(name: str) -> tuple[int, str]:
    digits = re.findall(r"\d+", name)
    return (int(digits[-1]) if digits else -1, name)


# ---------------------------------------------------------------------------------------------
# Output


def write_routing(analysis: RoutingAnalysis, outdir: str | pathlib.Path) -> dict[str, Any]:
    """Writes, into `outdir`: `routing.json` (everything, NMI per layer), `routing.md` (the
    table), and per layer `routing_<layer>.png` (expert x class heatmaps: share of the expert's
    selections per class, and mean combine weight; experts ordered by `expert_order`) and
    `positions_<layer>.png` (per expert, the share of images whose patch p it processed).
    Returns {"json": path, "markdown": path, "heatmaps": [paths], "positions": [paths]}."""
    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"heatmaps": [], "positions": []}
    json_path = outdir / "routing.json"
    json_path.write_text(json.dumps(analysis.to_json(), indent=1) + "\n")
    paths["json"] = json_path
    md_path = outdir / "routing.md"
    md_path.write_text(
        f"# Routing of {analysis.model} on {analysis.split}\n\n"
        f"{analysis.examples} examples, router {analysis.router}, K={analysis.k}, "
        f"capacity {analysis.capacity} slots per expert per group of {analysis.group_size} "
        "tokens. NMI: normalised mutual information I(E; C) / sqrt(H(E) H(C)) over the valid "
        "assignments.\n\n" + analysis.table() + "\n"
    )
    paths["markdown"] = md_path
    for name, layer in analysis.layers.items():
        paths["heatmaps"].append(_plot_classes(analysis, layer, outdir / f"routing_{name}.png"))
        paths["positions"].append(
            _plot_positions(analysis, layer, outdir / f"positions_{name}.png")
        )
    return paths


def _plot_classes(analysis: RoutingAnalysis, layer: LayerRouting, path: pathlib.Path):
    order = layer.expert_order()
    counts = layer.counts[order].astype(np.float64)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    weight = layer.mean_weight[order]
    classes = list(analysis.class_names)
    columns = np.arange(len(classes))
    if len(classes) > 30:  # too many to label: order classes by their favourite expert
        columns = np.lexsort((-share.max(0), share.argmax(0)))
    col_labels = [classes[c] for c in columns] if len(classes) <= 30 else None
    row_labels = [str(e) for e in order] if len(order) <= 64 else None
    annotate = len(order) * len(columns) <= 160
    width = min(3 + 0.4 * len(columns), 16)
    height = min(2.5 + 0.4 * len(order), 14)
    fig, (left, right) = plots.new_figure(2 * width, height, ncols=2)
    common = {"row_labels": row_labels, "col_labels": col_labels, "annotate": annotate}
    common.update(xlabel="class", ylabel="expert (ordered by top class)")
    plots.heatmap(
        left,
        share[:, columns],
        title="share of the expert's tokens per class",
        vmin=0.0,
        colorbar_label="share of selections",
        **common,
    )
    plots.heatmap(
        right,
        weight[:, columns],
        title="mean combine weight",
        vmin=0.0,
        cmap="magma",
        colorbar_label="mean weight",
        **common,
    )
    fig.suptitle(
        f"{analysis.model} {layer.name} on {analysis.split}: NMI(expert; class) = "
        f"{layer.nmi:.3f}, dropped {layer.dropped_fraction:.1%}"
    )
    return plots.save(fig, path)


def _plot_positions(analysis: RoutingAnalysis, layer: LayerRouting, path: pathlib.Path):
    e = analysis.num_experts
    ncols = min(e, 8)
    nrows = -(-e // ncols)
    grid = analysis.position_grid(layer.name) / max(analysis.examples, 1)
    fig, axes = plots.new_figure(1.8 * ncols + 1, 1.8 * nrows + 0.8, nrows=nrows, ncols=ncols)
    axes = np.atleast_1d(axes).reshape(-1)
    image = None
    for expert, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if expert >= e:
            ax.set_axis_off()
            continue
        image = ax.imshow(grid[expert], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="none")
        title = f"expert {expert}"
        if analysis.class_token:
            cls = layer.position_counts[expert, 0] / max(analysis.examples, 1)
            title += f"\ncls {cls:.2f}"
        ax.set_title(title, fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="share of images", shrink=0.8)
    fig.suptitle(f"{analysis.model} {layer.name}: patch positions per expert ({analysis.split})")
    return plots.save(fig, path)
