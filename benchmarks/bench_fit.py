"""What fits where: planned memory per device and traffic of V-MoE training, up to H/14.

    python benchmarks/bench_fit.py [--models V-MoE-S/32,V-MoE-B/16,V-MoE-L/16,V-MoE-H/14]
        [--devices 8,64,256] [--settings expert_fsdp/block/bf16,...] [--fewest V-MoE-H/14]
        [--fewest-settings expert_fsdp/block/bf16,...] [--largest] [--planner tpu|cpu]
        [--cache benchmarks/fit-points.json]

Compiles (never runs) one Adam training step (loss, gradients, Adam update; params and
optimizer state donated) of each model (every-2, E=32, K=2, C=1.05, 224x224, bfloat16 compute,
routing groups = one device's images) under each setting (strategy / remat / state dtype) on n
simulated devices, and reads from the compiled per-device program:

- planned memory: arguments + outputs + temporaries - donated (XLA's buffer assignment);
- the bytes one device sends per step, by role (`vmoe_layers.bytes_sent_by_role`: gradient
  reduction, parameter gather, expert all-to-all, statistics, other).

The planner. XLA:CPU (`--planner cpu`) does not honour rematerialisation in its plan (a
`jax.checkpoint`ed chain whose input gradient is needed plans the same memory as without it:
benchmarks/README.md), so the default planner is XLA's TPU compiler, deviceless: libtpu compiles
for a TPU v5p topology (`jax[tpu]`; no TPU needed) and plans per chip. Its figures stand in for
an accelerator with 80 GB: "fits" means planned memory <= 80e9 bytes (an 80 GB H100 has 79.1
GiB = 84.9e9 bytes usable: ~6% is left for the runtime). TPU layouts pad small trailing
dimensions to tiles, so the plan errs on the large side where shapes are small.

Depth is extrapolated, not guessed: every figure is linear in the number of blocks (each
(dense, MoE) block pair adds the same params, state, saved activations and collectives), so each
program is compiled at 2 and 4 blocks and the full model's figures lie on that line
(`--validate model/strategy/remat/dtype/n` compiles one full-depth model and prints the
difference). The largest batch per device that fits is compiled, not extrapolated: predicted
from the per-image slope between 4 and 8 images per device, then planned at that batch and
stepped down until it fits (the plan is convex in the batch: at a small batch the params'
state, not the activations, may set the peak). "Fewest devices": for a model, the first n of
1, 2, 4, ... whose plan has room for one image per device, under each of the leanest settings,
with its largest batch. The other rows (the grid) give the largest batch only with --largest.

Settings: strategy/remat/dtype, with dtype "f32" (params, gradients and Adam moments float32:
16 bytes a param), "bf16-nu32" (params, gradients and Adam's first moment bfloat16, its second
float32: 10 bytes a param, vmoe-train's default for `model.param_dtype=bfloat16`) or "bf16" (all
of them bfloat16, no float32 master copy: 8 bytes a param, `optimizer.nu_dtype=bfloat16`).
Meshes: data (n,), fsdp (1, n), expert and expert_fsdp
(n/X, X) with X = min(n, 8) devices on the expert axis.

Compiled points are cached in `--cache` (default benchmarks/fit-points.json, kept in the repo:
the table's measurements, keyed by everything that defines each program), so an interrupted run
resumes where it stopped and the table can be printed again without compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

BUDGET = 80e9  # bytes: an "80 GB" accelerator

NUM_EXPERTS, IMAGE, CLASSES = 32, 224, 1000
DEPTHS = (2, 4)  # compiled depths: one and two (dense, MoE) block pairs
BATCHES = (4, 8)  # compiled images per device for the table and the per-image slope
EXPERT_AXIS = 8
DEFAULT_SETTINGS = (
    "data/none/f32",
    "expert/none/f32",
    "fsdp/none/f32",
    "expert_fsdp/none/f32",
    "expert_fsdp/block/f32",
    "expert_fsdp/none/bf16",
    "expert_fsdp/block/bf16",
)
FEWEST_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# The largest batch searched: a plan that fits at this many images per device is reported as
# ">= BATCH_CAP" (small models on one device would fit >10,000 images of 224 px, and compiling
# such a batch takes many minutes on 2 cores; no one trains with it).
BATCH_CAP = 1024
FEWEST_SETTINGS = ("expert_fsdp/block/bf16", "expert_fsdp/block/f32", "expert_fsdp/none/bf16")


@dataclasses.dataclass(frozen=True)
class Point:
    """One compiled program: everything that defines it."""

    model: str
    strategy: str
    remat: str
    dtype: str
    devices: int
    depth: int
    images_per_device: int
    planner: str

    @property
    def key(self) -> str:
        return "|".join(str(v) for v in dataclasses.astuple(self))


DTYPES = ("f32", "bf16-nu32", "bf16")
STRATEGIES = ("data", "fsdp", "expert", "expert_fsdp")


def check_setting(setting: str) -> None:
    """A clear error for a setting that is not strategy/remat/dtype of known values."""
    parts = setting.split("/")
    if len(parts) != 3 or parts[0] not in STRATEGIES or parts[2] not in DTYPES:
        raise SystemExit(
            f"setting {setting!r}: expected strategy/remat/dtype with strategy in {STRATEGIES}, "
            f"dtype in {DTYPES} (remat: vmoe_layers' model.remat values)"
        )


def mesh_shape(strategy: str, n: int) -> tuple[int, ...]:
    if strategy == "data":
        return (n,)
    if strategy == "fsdp":
        return (1, n)
    x = min(n, EXPERT_AXIS)
    return (n // x, x)


def compile_devices(planner: str, n: int):
    """n devices to compile for: simulated CPU devices, or a deviceless TPU v5p topology."""
    import jax

    if planner == "cpu":
        return jax.devices()[:n]
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        platform="tpu",
        topology_name="v5p:8x8x4",
        chip_config_name="megacore",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    return topology.devices[:n]


def measure(point: Point) -> dict:
    """Compile `point`'s train step; its planned memory and bytes sent by role per device."""
    import harness  # benchmarks/, beside this script
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding

    import vmoe_layers as vl

    start = time.perf_counter()
    n, b = point.devices, point.images_per_device
    strategy = vl.get_strategy(
        point.strategy,
        mesh_shape=mesh_shape(point.strategy, n),
        devices=compile_devices(point.planner, n),
    )
    param_dtype = jnp.float32 if point.dtype == "f32" else jnp.bfloat16
    probe = vl.create_model(point.model, num_classes=CLASSES, num_experts=NUM_EXPERTS)
    tokens = (IMAGE // probe.patch_size) ** 2 + (probe.classifier == "token")
    model = vl.create_model(
        point.model,
        num_classes=CLASSES,
        num_experts=NUM_EXPERTS,
        group_size=b * tokens,
        exchange=strategy.exchange,
        remat=point.remat,
        dtype=jnp.bfloat16,
        param_dtype=param_dtype,
    ).clone(num_layers=point.depth)  # a preset's depth: cloned, as create_model keeps it
    sample = jax.ShapeDtypeStruct((b, IMAGE, IMAGE, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], sample)
    param_shardings = vl.param_shardings(strategy, params)
    optimizer = optax.adam(1e-3)
    state_shapes = jax.eval_shape(optimizer.init, params)
    if point.dtype == "bf16-nu32":
        # vmoe-train's default for bfloat16 params: Adam's second moment stays float32 (optax
        # keeps it in the params' dtype; its update then computes in float32 and keeps it so).
        state_shapes = jax.tree.map(
            lambda s: (
                s._replace(nu=jax.tree.map(lambda v: v.update(dtype=jnp.float32), s.nu))
                if isinstance(s, optax.ScaleByAdamState)
                else s
            ),
            state_shapes,
            is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState),
        )
    # Adam's moments are laid out as their params; its step count is replicated.
    state_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        state_shapes,
        param_shardings,
        transform_non_params=lambda _: NamedSharding(strategy.mesh, jax.sharding.PartitionSpec()),
    )
    batch_sharding = NamedSharding(strategy.mesh, strategy.batch_spec())
    images = jax.ShapeDtypeStruct((b * n, IMAGE, IMAGE, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((b * n,), jnp.int32)

    def loss_fn(params, images, labels):
        rngs = {"gating": jax.random.key(1)}
        out = model.apply({"params": params}, images, train=True, rngs=rngs)
        log_p = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1)) + out.aux_loss

    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    replicated = NamedSharding(strategy.mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(
        step,
        in_shardings=(param_shardings, state_shardings, batch_sharding, batch_sharding),
        out_shardings=(param_shardings, state_shardings, replicated),
        donate_argnums=(0, 1),
    )
    compiled = jitted.lower(params, state_shapes, images, labels).compile()
    memory = harness.planned_bytes(compiled)
    by_role = vl.bytes_sent_by_role(
        compiled.as_text(),
        n,
        vl.ParamShapes.of(param_shardings, params),
        statistic_size=NUM_EXPERTS,
    )
    return {
        "memory": float(memory),
        "by_role": by_role,
        "params": sum(math.prod(p.shape) for p in jax.tree.leaves(params)),
        "compile_s": time.perf_counter() - start,
    }


class NotCompiled(KeyError):
    """A point the cache lacks, asked for with compiling off (`--cached-only`)."""


class Cache:
    """Compiled points on disk: measure each once, resume an interrupted run."""

    def __init__(self, path: str, compile_missing: bool = True):
        self.compile_missing = compile_missing
        from vmoe_layers.comm import ROLES  # jax is imported once the planner is chosen

        self.path = pathlib.Path(path)
        self.points = json.loads(self.path.read_text()) if self.path.exists() else {}
        for key, point in self.points.items():
            if set(point["by_role"]) != set(ROLES):
                raise ValueError(
                    f"{self.path}: point {key} has roles {sorted(point['by_role'])}, not "
                    f"vmoe_layers.comm.ROLES {list(ROLES)}: measure it again (delete it)"
                )

    def get(self, point: Point) -> dict:
        if point.key not in self.points:
            if not self.compile_missing:
                raise NotCompiled(point.key)
            result = measure(point)
            print(
                f"  compiled {point.key}: {result['memory'] / 2**20:,.0f} MiB "
                f"({result['compile_s']:.0f} s)",
                flush=True,
            )
            self.points[point.key] = result
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.points, indent=1))
        return self.points[point.key]


def full_depth(model: str) -> int:
    import vmoe_layers as vl

    return vl.create_model(model, num_classes=CLASSES, num_experts=NUM_EXPERTS).num_layers


def along_depth(low: float, high: float, depth: int) -> float:
    """The value at `depth` blocks on the line through the values at DEPTHS."""
    d1, d2 = DEPTHS
    return low + (depth - d1) / (d2 - d1) * (high - low)


def full_memory(cache: Cache, planner: str, model: str, setting: str, n: int, b: int) -> float:
    """Planned memory of the full-depth model at `b` images per device: on the line through the
    compiled depths."""
    strategy, remat, dtype = setting.split("/")
    low, high = (
        cache.get(Point(model, strategy, remat, dtype, n, d, b, planner))["memory"] for d in DEPTHS
    )
    return along_depth(low, high, full_depth(model))


def largest_batch(cache: Cache, planner: str, model: str, setting: str, n: int) -> int:
    """The most images per device whose full-depth plan fits in BUDGET: predicted from the
    per-image slope between BATCHES, then compiled at that batch and stepped down until it
    fits (the plan is convex in the batch: a small batch can sit where the params' state, not
    the activations, sets the peak, so a prediction alone could overshoot). At most BATCH_CAP."""
    b1, b2 = BATCHES
    m1, m2 = (full_memory(cache, planner, model, setting, n, b) for b in BATCHES)
    per_image = (m2 - m1) / (b2 - b1)
    if full_memory(cache, planner, model, setting, n, 1) > BUDGET:
        return 0
    guess = max(1, math.floor(b1 + (BUDGET - m1) / per_image)) if per_image > 0 else BATCH_CAP
    guess = min(guess, BATCH_CAP)
    for _ in range(4):
        memory = full_memory(cache, planner, model, setting, n, guess)
        if memory <= BUDGET or guess == 1:
            return guess if memory <= BUDGET else 0
        guess = max(1, math.floor(guess - (memory - BUDGET) / per_image) - 1)
    return guess if full_memory(cache, planner, model, setting, n, guess) <= BUDGET else 0


def plan(cache: Cache, planner: str, model: str, setting: str, n: int, largest: bool) -> dict:
    """Full-depth planned memory at BATCHES[0] images per device and bytes sent by role; with
    `largest`, also the per-image slope and the largest batch per device that fits in BUDGET
    (compiled: several more programs)."""
    strategy, remat, dtype = setting.split("/")
    depth = full_depth(model)
    b1, b2 = BATCHES
    low, high = (cache.get(Point(model, strategy, remat, dtype, n, d, b1, planner)) for d in DEPTHS)
    memory = full_memory(cache, planner, model, setting, n, b1)
    per_image = batch = None
    if largest:
        per_image = (full_memory(cache, planner, model, setting, n, b2) - memory) / (b2 - b1)
        batch = largest_batch(cache, planner, model, setting, n)
    roles = {
        role: along_depth(low["by_role"][role], high["by_role"][role], depth)
        for role in low["by_role"]
    }
    return {
        "model": model,
        "setting": setting,
        "devices": n,
        "mesh": str(mesh_shape(strategy, n)),
        "params": along_depth(low["params"], high["params"], depth),
        "memory": memory,
        "per_image": per_image,
        "largest_batch": batch,
        "by_role": roles,
    }


def print_rows(rows: list[dict]) -> None:
    header = (
        f"| model | strategy/remat/dtype | devices | mesh | params (B) | planned GB ({BATCHES[0]} "
        "img/device) | GB/image | largest batch/device in 80 GB | grad. reduction MB | "
        "param. gather MB | expert all-to-all MB | MoE layer arrays MB | other arrays MB |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        roles = r["by_role"]
        measured = r["per_image"] is not None
        per_image = f"{r['per_image'] / 1e9:,.3f}" if measured else "-"
        batch = f"{r['largest_batch']:,}" if measured else "-"
        if measured and r["largest_batch"] >= BATCH_CAP:
            batch = f">= {BATCH_CAP:,}"
        print(
            f"| {r['model']} | {r['setting']} | {r['devices']} | {r['mesh']} | "
            f"{r['params'] / 1e9:.2f} | {r['memory'] / 1e9:,.2f} | {per_image} | {batch} | "
            f"{roles['gradient reduction'] / 1e6:,.0f} | "
            f"{roles['parameter gather'] / 1e6:,.0f} | {roles['expert all-to-all'] / 1e6:,.0f} | "
            f"{roles['MoE layer arrays'] / 1e6:,.0f} | {roles['other arrays'] / 1e6:,.0f} |",
            flush=True,
        )


def plot(rows: list[dict], path: str) -> None:
    """Top: MB sent per device per step against devices, a line per strategy (solid: every
    role; dotted: gradient reduction alone), a panel per model measured on several device
    counts. Bottom: planned memory per device at BATCHES[0] images per device, a bar per
    setting, grouped by model, at the most devices measured for every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    swept = [m for m in models if len({r["devices"] for r in rows if r["model"] == m}) > 1]
    fig = plt.figure(figsize=(6 * max(len(swept), 2), 9))
    grid = fig.add_gridspec(2, max(len(swept), 1))
    for column, model in enumerate(swept):
        ax = fig.add_subplot(grid[0, column])
        for strategy in dict.fromkeys(r["setting"] for r in rows if r["model"] == model):
            mine = sorted(
                (r for r in rows if r["model"] == model and r["setting"] == strategy),
                key=lambda r: r["devices"],
            )
            if len(mine) < 2:
                continue
            n = [r["devices"] for r in mine]
            line = ax.plot(n, [sum(r["by_role"].values()) / 1e6 for r in mine], "o-")[0]
            line.set_label(strategy)
            grads = [r["by_role"]["gradient reduction"] / 1e6 for r in mine]
            ax.plot(n, grads, ":", color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(f"devices ({BATCHES[0]} images per device)")
        ax.set_ylabel("MB sent per device per step (dotted: gradients)")
        ax.set_title(f"{model}, XLA:TPU plan")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    common = max(
        (
            n
            for n in {r["devices"] for r in rows}
            if all(any(r["devices"] == n and r["model"] == m for r in rows) for m in models)
        ),
        default=None,
    )
    ax = fig.add_subplot(grid[1, :])
    if common is not None:
        at = [r for r in rows if r["devices"] == common]
        settings = list(dict.fromkeys(r["setting"] for r in at))
        width = 0.8 / len(settings)
        for i, setting in enumerate(settings):
            xs = [models.index(r["model"]) + i * width for r in at if r["setting"] == setting]
            gb = [r["memory"] / 1e9 for r in at if r["setting"] == setting]
            ax.bar(xs, gb, width, label=setting)
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(models))], models)
        ax.axhline(BUDGET / 1e9, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_ylabel(f"planned GB per device ({BATCHES[0]} images per device)")
        ax.set_title(f"Planned memory per device on {common} devices (dashed: 80 GB)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def planner_check(planner_names: tuple[str, ...] = ("cpu", "tpu")) -> list[dict]:
    """Does a planner honour rematerialisation? A chain of 8 blocks (x + gelu(gelu(x W1) W2) W3,
    x [8192, 512] float32), its weight gradients, with and without `jax.checkpoint` per block,
    and with the input's gradient needed too (as in a model whose first layer trains: the
    patch embedding). Returns the planned temporaries (MiB) per case and planner."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    def block(w, x):
        h = jax.nn.gelu(jax.nn.gelu(x @ w[0]) @ w[1])
        return x + h @ w[2]

    rows = []
    for planner in planner_names:
        device = compile_devices(planner, 1)[0]
        sharding = NamedSharding(jax.sharding.Mesh([device], ("d",)), PartitionSpec())
        ws = [jax.ShapeDtypeStruct((3, 512, 512), jnp.float32, sharding=sharding)] * 8
        x = jax.ShapeDtypeStruct((8192, 512), jnp.float32, sharding=sharding)
        for input_grad in (False, True):
            for remat in (False, True):
                f = jax.checkpoint(block) if remat else block

                def loss(ws, x, f=f):
                    for w in ws:
                        x = f(w, x)
                    return jnp.sum(x**2)

                argnums = (0, 1) if input_grad else 0
                compiled = jax.jit(jax.grad(loss, argnums=argnums)).lower(ws, x).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
                rows.append(
                    {"planner": planner, "input_grad": input_grad, "remat": remat, "temp": temp}
                )
                print(
                    f"planner {planner}: input gradient {input_grad}, checkpoint {remat}: "
                    f"{temp:,.0f} MiB of temporaries",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="V-MoE-S/32,V-MoE-B/16,V-MoE-L/16,V-MoE-H/14")
    parser.add_argument("--devices", default="64")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    parser.add_argument("--fewest", default="V-MoE-H/14", help="models to find the fewest devices")
    parser.add_argument("--fewest-settings", default=",".join(FEWEST_SETTINGS))
    parser.add_argument("--planner", choices=("tpu", "cpu"), default="tpu")
    parser.add_argument("--cache", default="benchmarks/fit-points.json")
    parser.add_argument("--json", default="bench-results/fit.json")
    parser.add_argument(
        "--cached-only", action="store_true", help="compile nothing: rows of cached points only"
    )
    parser.add_argument("--png", default="", help="plot the rows here, e.g. benchmarks/fit.png")
    parser.add_argument(
        "--largest", action="store_true", help="also the largest batch of every row (compiles)"
    )
    parser.add_argument("--validate", default="", help="model/strategy/remat/dtype/n: full depth")
    parser.add_argument(
        "--planner-check", action="store_true", help="only: which planner honours remat"
    )
    args = parser.parse_args()
    counts = [int(d) for d in args.devices.split(",")]
    for setting in [*args.settings.split(","), *args.fewest_settings.split(",")]:
        if setting:
            check_setting(setting)
    if args.planner == "cpu":
        most = max([*counts, *FEWEST_CANDIDATES])
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={most}"
        )
    else:
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # runs side by side
    if args.planner_check:
        planner_check(("cpu", "tpu") if args.planner == "tpu" else ("cpu",))
        return
    cache = Cache(args.cache, compile_missing=not args.cached_only)
    rows = []
    for model in [m for m in args.models.split(",") if m]:
        for setting in [s for s in args.settings.split(",") if s]:
            for n in counts:
                try:
                    rows.append(plan(cache, args.planner, model, setting, n, args.largest))
                except NotCompiled as missing:
                    print(f"{model} {setting} n={n}: not compiled yet ({missing})")
                    continue
                print_rows(rows[-1:])
    fewest = []
    for model in [m for m in args.fewest.split(",") if m]:
        for setting in [s for s in args.fewest_settings.split(",") if s]:
            for n in FEWEST_CANDIDATES:
                try:
                    one_image = full_memory(cache, args.planner, model, setting, n, 1)
                except NotCompiled as missing:
                    print(f"{model} {setting} n={n}: not compiled yet ({missing})")
                    break
                print(f"{model} {setting} n={n}: {one_image / 1e9:.2f} GB at 1 image/device")
                if one_image <= BUDGET:
                    try:
                        fewest.append(plan(cache, args.planner, model, setting, n, largest=True))
                    except NotCompiled as missing:
                        print(f"{model} {setting} n={n}: largest batch not compiled ({missing})")
                        break
                    print_rows(fewest[-1:])
                    break
    if args.validate:
        model, strategy, remat, dtype, n = args.validate.split("/")
        n = int(n)
        row = plan(cache, args.planner, model, f"{strategy}/{remat}/{dtype}", n, largest=False)
        full = cache.get(
            Point(model, strategy, remat, dtype, n, full_depth(model), BATCHES[0], args.planner)
        )
        error = row["memory"] / full["memory"] - 1
        print(
            f"validate {args.validate}: extrapolated {row['memory'] / 1e9:.3f} GB, "
            f"compiled {full['memory'] / 1e9:.3f} GB ({error:+.1%})"
        )
    print("\nAll rows:")
    print_rows(rows)
    print("\nFewest 80 GB devices (first n with room for one image per device):")
    print_rows(fewest)
    if args.png:
        plot(rows, args.png)
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(
        json.dumps({"planner": args.planner, "rows": rows, "fewest": fewest}, indent=1)
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
