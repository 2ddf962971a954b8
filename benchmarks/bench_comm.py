"""Communication and planned memory of one V-MoE training step, per device, as devices grow.

    python benchmarks/bench_comm.py [--models V-MoE-S/32,V-MoE-B/16] [--devices 8,16,32,64]
        [--strategies data,expert,fsdp,expert_fsdp] [--images-per-device 4] [--png PATH]

Compiles (never runs) one SGD training step (loss, gradients, params - lr * grads, params
donated) of each model under each sharding strategy on 8..64 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=64, set here before jax starts), at a fixed
number of images per device (weak scaling), and reads from the compiled per-device program:

- the bytes one device sends per collective kind (`vmoe_layers.bytes_sent_per_device`, the ring
  model), per step and, for all-to-all, per MoE layer;
- the memory XLA plans per device: arguments + outputs + temporaries - aliased (donated) bytes.

Meshes: data (n,); fsdp (1, n); expert and expert_fsdp (n/X, X) with X = 8 experts-axis
devices (E=32: 4 experts per device), so the all-to-all group stays 8 devices while the data
axis grows. Routing groups = the tokens of one device's images (the original recipe), K=2,
C=1.05, every-2 MoE layers, E=32, float32, 224x224 images.

The bytes are also attributed by role (`vmoe_layers.bytes_sent_by_role`): gradient reduction,
parameter gather, expert all-to-all, statistics, MoE layer arrays, other arrays. Exits 1 if,
with the expert strategy, the all-to-all bytes per device per MoE layer vary by more than 10%
between the device counts measured (the weak-scaling check), or if any step moves MoE layer
arrays (routing arrays, tokens, buffers) other than by the expert all-to-all: every strategy
routes per device.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64"
)

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

import vmoe_layers as vl
from vmoe_train.setup import tokens_per_image

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import harness

EXPERT_AXIS = 8  # devices on the 'expert' axis of the expert strategies' meshes
NUM_EXPERTS, IMAGE, CLASSES = 32, 224, 1000
TOLERANCE = 0.10  # the weak-scaling check


def mesh_shape(strategy: str, n: int):
    if strategy == "data":
        return (n,)
    if strategy == "fsdp":
        return (1, n)
    return (n // EXPERT_AXIS, EXPERT_AXIS)


def compile_step(model_name: str, strategy_name: str, n: int, images_per_device: int):
    """The compiled train step (a jax Compiled), the shapes its parameters may have in a
    collective (`vmoe_layers.ParamShapes`), and the number of MoE layers."""
    strategy = vl.get_strategy(
        strategy_name, mesh_shape=mesh_shape(strategy_name, n), devices=jax.devices()[:n]
    )
    probe = vl.create_model(model_name, num_classes=CLASSES, num_experts=NUM_EXPERTS)
    tokens = tokens_per_image(probe, (IMAGE, IMAGE))
    group_size = images_per_device * tokens
    model = vl.create_model(
        model_name,
        num_classes=CLASSES,
        num_experts=NUM_EXPERTS,
        group_size=group_size,
        exchange=strategy.exchange,
    )
    batch = images_per_device * n
    images = jax.ShapeDtypeStruct((batch, IMAGE, IMAGE, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    sample = jax.ShapeDtypeStruct((images_per_device, IMAGE, IMAGE, 3), jnp.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], sample)
    param_shardings = vl.param_shardings(strategy, params)
    batch_sharding = NamedSharding(strategy.mesh, strategy.batch_spec())

    def loss_fn(params, images, labels):
        rngs = {"gating": jax.random.key(1)}
        out = model.apply({"params": params}, images, train=True, rngs=rngs)
        log_p = jax.nn.log_softmax(out.logits)
        return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1)) + out.aux_loss

    def step(params, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), loss

    jitted = jax.jit(
        step,
        in_shardings=(param_shardings, batch_sharding, batch_sharding),
        out_shardings=(param_shardings, NamedSharding(strategy.mesh, PartitionSpec())),
        donate_argnums=0,
    )
    compiled = jitted.lower(params, images, labels).compile()
    param_shapes = vl.ParamShapes.of(param_shardings, params)
    return compiled, param_shapes, len(model.moe_blocks())


def measure(model_name: str, strategy: str, n: int, images_per_device: int) -> dict:
    start = time.perf_counter()
    compiled, param_shapes, moe_layers = compile_step(model_name, strategy, n, images_per_device)
    hlo = compiled.as_text()
    sent = vl.bytes_sent_per_device(hlo, n)
    by_role = vl.bytes_sent_by_role(hlo, n, param_shapes, statistic_size=NUM_EXPERTS)
    memory = harness.planned_bytes(compiled)
    return {
        "model": model_name,
        "strategy": strategy,
        "devices": n,
        "mesh": str(mesh_shape(strategy, n)),
        **{f"{kind} MB": sent[kind] / 2**20 for kind in vl.comm.KINDS},
        **{f"{role} MB": by_role[role] / 2**20 for role in vl.comm.ROLES},
        "all-to-all MB/MoE layer": sent["all-to-all"] / 2**20 / moe_layers,
        "total MB": sum(sent.values()) / 2**20,
        "planned memory MB": memory / 2**20,
        "compile s": time.perf_counter() - start,
    }


def failures(rows: list[dict]) -> list[str]:
    """The weak-scaling check (the expert strategy's all-to-all per MoE layer), and any MoE
    layer arrays crossing devices besides the expert all-to-all (every strategy routes per
    device: no routing array, token or buffer may cross)."""
    found = []
    for r in rows:
        if r["MoE layer arrays MB"] > 0:
            found.append(
                f"{r['model']} {r['strategy']} n={r['devices']}: {r['MoE layer arrays MB']:.2f} "
                "MB of a MoE layer's routing arrays, tokens or buffers cross devices"
            )
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model and r["strategy"] == "expert"]
        values = [r["all-to-all MB/MoE layer"] for r in mine]
        if len(values) > 1:
            spread = max(values) / min(values) - 1
            print(f"{model} expert: all-to-all per MoE layer varies {spread:.2%} over n")
            if spread > TOLERANCE:
                found.append(f"{model} expert: all-to-all/MoE layer varies {spread:.1%}")
    return found


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows}, key=lambda m: [r["model"] for r in rows].index(m))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for strategy in sorted({r["strategy"] for r in rows}):
            mine = [r for r in rows if r["model"] == model and r["strategy"] == strategy]
            ax.plot(
                [r["devices"] for r in mine], [r["total MB"] for r in mine], "o-", label=strategy
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([r["devices"] for r in rows if r["model"] == model])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("devices (fixed images per device)")
        ax.set_ylabel("MB sent per device per train step")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="V-MoE-S/32,V-MoE-B/16")
    parser.add_argument("--devices", default="8,16,32,64")
    parser.add_argument("--strategies", default="data,expert,fsdp,expert_fsdp")
    parser.add_argument("--images-per-device", type=int, default=4)
    parser.add_argument("--json", default="bench-results/comm.json")
    parser.add_argument("--png", default="benchmarks/comm.png")
    args = parser.parse_args()
    counts = [int(d) for d in args.devices.split(",")]
    expert_strategies = [s for s in args.strategies.split(",") if s.startswith("expert")]
    uneven = [n for n in counts if n % EXPERT_AXIS or n < EXPERT_AXIS]
    if expert_strategies and uneven:
        parser.error(
            f"--devices {uneven} do not fill the {EXPERT_AXIS}-device expert axis of "
            f"{expert_strategies}; allowed: multiples of {EXPERT_AXIS}"
        )
    rows = []
    columns = [
        "model",
        "strategy",
        "devices",
        "mesh",
        *(f"{kind} MB" for kind in vl.comm.KINDS[:4]),
        *(f"{role} MB" for role in vl.comm.ROLES),
        "all-to-all MB/MoE layer",
        "planned memory MB",
        "compile s",
    ]
    for model in args.models.split(","):
        for strategy in args.strategies.split(","):
            for n in counts:
                rows.append(measure(model, strategy, n, args.images_per_device))
                harness.print_table(rows[-1:], columns)
    print()
    harness.print_table(rows, columns)
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.json, {"images_per_device": args.images_per_device, "rows": rows})
    if args.png:
        plot(rows, args.png)
    found = failures(rows)
    for failure in found:
        print("FAIL:", failure, file=sys.stderr)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
