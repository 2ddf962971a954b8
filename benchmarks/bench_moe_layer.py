"""MoE layer vs dense MLPs of equal parameters-per-token and equal active FLOPs, on this backend.

    python benchmarks/bench_moe_layer.py [--quick] [--malloc tuned|default] [--json FILE]

For each layer shape it times the vmoe MoE layer (forward, and forward+backward with respect to
params and input), next to, in the same run:
  dense H     a dense MLP with hidden H (the MLP the MoE layer replaces),
  dense K*H   a dense MLP with hidden K*H: the same active FLOPs as the MoE layer at capacity 1,
  einsum      the same MoE layer on the one-hot [G, S, E, C] reference dispatch path.
Ratios are MoE time / dense K*H time. Then: the experts' matmul computed four ways (batched,
loop, ragged_dot, against one GEMM of the same FLOPs), the router's share of the layer's time,
memory at 8,192 tokens, and whole-model train-step throughput (V-MoE vs its ViT twin).

`--malloc tuned` (the default) calls vmoe_layers.tune_cpu_malloc() before anything runs;
`--malloc default` leaves the C library's allocator as it is. `--quick`: the target cases only.

Shapes follow the V-MoE paper at 224px: S/32 has 50 tokens an image (D=512, H=2048), B/16 has
197 (D=768, H=3072). Groups are whole images: 4 images (200 tokens) or 32 (1,600) for S/32.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from harness import peak_memory_mb, print_table, time_ms, write_json

import vmoe_layers as vl
import vmoe_routing as vr

# name -> (tokens, group size, D, H)
SHAPES = {
    "S/32 g200": (1600, 200, 512, 2048),
    "S/32 g1600": (1600, 1600, 512, 2048),
    "B/16 g394": (1576, 394, 768, 3072),
}


class DenseMlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.hidden)(x)))


def _steps(module: nn.Module, x: jax.Array, **call: Any):
    """(params, jitted forward, jitted forward+backward) for a module returning an array or
    a MoeOutput."""
    params = module.init(jax.random.key(0), x, **call)["params"]

    def loss(params, x):
        out = module.apply({"params": params}, x, **call)
        if isinstance(out, vl.MoeOutput):
            return jnp.mean(out.output**2) + out.aux_loss
        return jnp.mean(out**2)

    return params, jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1)))


def layer_row(shape, e, k, c, router, repeats, with_einsum):
    tokens, group, d, h = SHAPES[shape]
    x = jax.random.normal(jax.random.key(1), (tokens // group, group, d))
    row: dict[str, Any] = {"shape": shape, "E": e, "K": k, "C": c, "router": router}
    modules = {"dense H": DenseMlp(h), "dense K*H": DenseMlp(k * h)}
    options = {"k": k, "capacity_factor": c}
    moe = vl.MoeLayer(num_experts=e, mlp_dim=h, router=router, router_options=options)
    modules["moe"] = moe
    if with_einsum:
        modules["einsum"] = moe.clone(dispatch_path="einsum")
    for name, module in modules.items():
        params, fwd, fwd_bwd = _steps(module, x)
        row[f"{name} fwd ms"] = time_ms(fwd, params, x, repeats=repeats)
        row[f"{name} fwd+bwd ms"] = time_ms(fwd_bwd, params, x, repeats=repeats)
    for mode in ("fwd", "fwd+bwd"):
        row[f"moe/dense K*H {mode}"] = row[f"moe {mode} ms"] / row[f"dense K*H {mode} ms"]
        if with_einsum:
            row[f"einsum/moe {mode}"] = row[f"einsum {mode} ms"] / row[f"moe {mode} ms"]
    row["capacity"] = vr.compute_capacity(group, e, k, c)
    return row


def grouped_matmul_rows(tokens_per_expert, e, d, h, repeats, dtype=jnp.float32):
    """The experts' matmul [E, T, D] x [E, D, H] (forward+backward) computed four ways.

    The MoE layer needs E independent matmuls, one per expert. Candidates:
      one GEMM        [E*T, D] x [D, H]: the same FLOPs with no expert structure (lower bound),
      batched         one batched matmul over the [E, T, D] buffers (the layer's default),
      loop            one matmul per expert under lax.map,
      ragged_dot      jax.lax.ragged_dot over the tokens sorted by expert, with group sizes
                      (the dropless / grouped-GEMM form).
    Ratios are over the one-GEMM time.
    """
    t = tokens_per_expert
    x_etd = jax.random.normal(jax.random.key(0), (e, t, d), dtype)
    w_edh = jax.random.normal(jax.random.key(1), (e, d, h), dtype) * 0.02
    x_nd = x_etd.reshape(e * t, d)
    sizes = jnp.full((e,), t, jnp.int32)
    candidates = {  # name: (matmul, x, w); "one GEMM" gets one [D, H] weight (its grad too)
        "one GEMM": (lambda x, w: x @ w, x_nd, w_edh[0]),
        "batched": (lambda x, w: jnp.einsum("etd,edh->eth", x, w), x_etd, w_edh),
        "loop": (lambda x, w: jax.lax.map(lambda xw: xw[0] @ xw[1], (x, w)), x_etd, w_edh),
        "ragged_dot": (lambda x, w: jax.lax.ragged_dot(x, w, sizes), x_nd, w_edh),
    }
    row: dict[str, Any] = {"E": e, "T": t, "D": d, "H": h, "dtype": jnp.dtype(dtype).name}
    for name, (matmul, x, w) in candidates.items():

        def loss(x, w, matmul=matmul):
            return jnp.mean(matmul(x, w).astype(jnp.float32) ** 2)

        row[f"{name} ms"] = time_ms(jax.jit(jax.grad(loss, argnums=(0, 1))), x, w, repeats=repeats)
    for name in list(candidates)[1:]:
        row[f"{name}/one GEMM"] = row[f"{name} ms"] / row["one GEMM ms"]
    return row


def router_share_row(shape, e, k, c, router, repeats):
    """Router alone (gate, noise, top-K, priority sort, slot assignment, losses) vs the layer."""
    tokens, group, d, h = SHAPES[shape]
    x = jax.random.normal(jax.random.key(1), (tokens // group, group, d))
    r = vr.get_router(router, num_experts=e, k=k, capacity_factor=c)
    rparams = r.init(jax.random.key(0), d)
    key = jax.random.key(2)

    def route_loss(p, x):
        routing = r(p, x, rng=key, deterministic=False)
        return jnp.sum(routing.weight) + routing.aux_loss

    route = jax.jit(jax.grad(route_loss, argnums=(0, 1)))
    moe = vl.MoeLayer(num_experts=e, mlp_dim=h, router=router, router_options={"k": k})
    params, _, fwd_bwd = _steps(moe, x)
    t_route = time_ms(route, rparams, x, repeats=repeats)
    t_layer = time_ms(fwd_bwd, params, x, repeats=repeats)
    return {
        "shape": shape,
        "E": e,
        "K": k,
        "router": router,
        "router fwd+bwd ms": t_route,
        "layer fwd+bwd ms": t_layer,
        "router share": t_route / t_layer,
    }


def memory_row(e, k, c, tokens=8192, group=200 * 8, d=512, h=2048):
    x = jax.random.normal(jax.random.key(1), (tokens // group, group, d))
    row: dict[str, Any] = {"tokens": tokens, "group": group, "E": e, "K": k, "C": c}
    moe = vl.MoeLayer(num_experts=e, mlp_dim=h, router_options={"k": k, "capacity_factor": c})
    for name, module in {
        "dense K*H": DenseMlp(k * h),
        "moe": moe,
        "einsum": moe.clone(dispatch_path="einsum"),
    }.items():
        params, _, fwd_bwd = _steps(module, x)
        # Params and their gradients are E/K times larger for the MoE by design; what dispatch
        # costs shows in the rest: activations, buffers, temporaries.
        param_mb = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params)) / 2**20
        row[f"{name} MB"] = peak_memory_mb(fwd_bwd, params, x) - 2 * param_mb
    row["moe/dense K*H"] = row["moe MB"] / row["dense K*H MB"]
    return row


def sgd_step(model: nn.Module):
    """A jitted SGD train step (cross-entropy + the MoE aux loss; forward, backward, update)."""
    rngs = {"gating": jax.random.key(3), "dropout": jax.random.key(4)}

    def loss_fn(params, images, labels):
        out = model.apply({"params": params}, images, train=True, rngs=rngs)
        logp = jax.nn.log_softmax(out.logits.astype(jnp.float32))
        ce = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
        return ce + out.aux_loss

    @jax.jit
    def step(params, images, labels):
        grads = jax.grad(loss_fn)(params, images, labels)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)

    return step


def train_step_row(name, model_name, image_shape, batch, repeats, **model_kw):
    """Images/s of SGD train steps (forward, backward, update) of a V-MoE and its ViT twin."""
    vmoe = vl.create_model(model_name, num_classes=10, **model_kw)
    row: dict[str, Any] = {"case": name, "batch": batch}
    images = jax.random.normal(jax.random.key(0), (batch, *image_shape))
    labels = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    for tag, model in (("V-MoE", vmoe), ("ViT twin", vmoe.clone(moe=None))):
        params = model.init(jax.random.key(2), images)["params"]
        ms = time_ms(sgd_step(model), params, images, labels, repeats=repeats)
        row[f"{tag} img/s"] = batch / ms * 1e3
    row["V-MoE/ViT step time"] = row["ViT twin img/s"] / row["V-MoE img/s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the target cases only")
    parser.add_argument("--json", default="bench-results/moe_layer.json")
    parser.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned: vmoe_layers.tune_cpu_malloc() first (the setting we recommend for CPU "
        "training); default: the C library's own behaviour",
    )
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    malloc = args.malloc
    if malloc == "tuned" and not vl.tune_cpu_malloc():
        malloc = "default (tuning does not apply here)"

    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, malloc: {malloc}")
    layers = [layer_row("S/32 g200", 32, 2, 1.05, "top_k", repeats, with_einsum=True)]
    layers.append(layer_row("S/32 g1600", 32, 2, 1.05, "top_k", repeats, with_einsum=False))
    if not args.quick:
        for shape in SHAPES:
            for e, k, c, router in (
                (32, 2, 1.05, "bpr"),
                (32, 1, 1.05, "top_k"),
                (8, 2, 1.05, "top_k"),
                (32, 2, 0.5, "bpr"),
                (32, 2, 2.0, "top_k"),
                (32, 2, 1.05, "hash"),
            ):
                layers.append(layer_row(shape, e, k, c, router, repeats, with_einsum=False))
        layers.append(layer_row("B/16 g394", 32, 2, 1.05, "top_k", repeats, with_einsum=True))
    print("\nMoE layer vs dense MLPs (times in ms, medians)")
    print_table(
        layers,
        [
            "shape", "E", "K", "C", "router", "capacity", "dense H fwd+bwd ms",
            "dense K*H fwd+bwd ms", "moe fwd+bwd ms", "moe/dense K*H fwd+bwd",
            "moe/dense K*H fwd", "einsum/moe fwd+bwd",
        ],
    )  # fmt: skip

    # Tokens per expert at S/32, C=1.05: 112 with E=32 (groups of 200), 424 with E=8.
    matmuls = [grouped_matmul_rows(112, 32, 512, 2048, repeats)]
    if not args.quick:
        matmuls.append(grouped_matmul_rows(424, 8, 512, 2048, repeats))
    print("\nThe experts' matmul, forward+backward, four ways (ms; ratios over one GEMM)")
    print_table(matmuls, list(matmuls[0]))

    shares = [router_share_row("S/32 g200", 32, 2, 1.05, r, repeats) for r in ("top_k", "bpr")]
    print("\nRouter share of the layer's forward+backward time")
    print_table(shares, list(shares[0]))

    memory = [memory_row(32, 2, 1.05)]
    print("\nMemory of forward+backward without params and param grads (XLA buffers, MB)")
    print_table(memory, list(memory[0]))

    steps = [
        train_step_row("digits 8x8 Mu/2", "V-MoE-Mu/2", (8, 8, 1), 128, repeats),
        train_step_row("S/32 224px", "V-MoE-S/32", (224, 224, 3), 32, 3),
    ]
    print("\nTrain step throughput (SGD step: forward, backward, update)")
    print_table(steps, list(steps[0]))

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    write_json(
        args.json,
        {
            "malloc": malloc,
            "layers": layers,
            "expert_matmul": matmuls,
            "router_share": shares,
            "memory": memory,
            "train": steps,
        },
    )


if __name__ == "__main__":
    main()
