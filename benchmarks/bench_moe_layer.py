"""MoE layer vs dense MLPs of equal parameters-per-token and equal active FLOPs, on this backend.

    python benchmarks/bench_moe_layer.py [--quick | --smoke] [--malloc tuned|default] [--json FILE]

For each layer shape it times the vmoe MoE layer (forward, and forward+backward with respect to
params and input), next to, in the same run:
  dense H     a dense MLP with hidden H (the MLP the MoE layer replaces),
  dense K*H   a dense MLP with hidden K*H: the same active FLOPs as the MoE layer at capacity 1,
  einsum      the same MoE layer on the one-hot [G, S, E, C] reference dispatch path.
Ratios are MoE time / dense K*H time; the modules of a row are timed in turns (one run of each
per round, medians), so they see the same load on a shared machine. Then: the experts' matmul
computed four ways (batched, loop, ragged_dot, against one GEMM of the same FLOPs), the router's
share of the layer's time, memory at 8,192 tokens, and whole-model train-step throughput (V-MoE
vs its ViT twin).

Every MoE layer and router here runs as in training (mode "train"): deterministic=False, gating
noise from the "gating" rng, the training capacity factor C. What each row measured is observed,
not assumed: the router call made inside the timed layer (and the standalone router call of the
router-share rows) is recorded once, untimed, and the row's labels (mode, C, capacity) come from
that record. A router-share row refuses to run when its router and its layer differ in anything
but being timed alone or inside the layer.

`--malloc tuned` (the default) calls vmoe_train.tune_cpu_malloc() before anything runs;
`--malloc default` leaves the C library's allocator as it is. `--quick`: the target cases only.
`--smoke`: every table on tiny shapes, one repeat (checks the script, measures nothing).

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
from harness import peak_memory_mb, print_table, time_interleaved_ms, time_ms, write_json

import vmoe_layers as vl
import vmoe_train

# name -> (tokens, group size, D, H); "tiny" is for --smoke only.
SHAPES = {
    "S/32 g200": (1600, 200, 512, 2048),
    "S/32 g1600": (1600, 1600, 512, 2048),
    "B/16 g394": (1576, 394, 768, 3072),
    "tiny g16": (64, 16, 32, 64),
}
MODE = "train"  # how every MoE layer and router here is called (see the module docstring)
GATING_SEED = 2  # the gating rng, for the layer and the standalone router alike


class DenseMlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.hidden)(x)))


class _RecordingRouter:
    """A router that records how it is called (see `routing_call`), otherwise the router."""

    def __init__(self, router: Any, calls: list[dict[str, Any]]):
        self._router, self._calls = router, calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self._router, name)

    def __call__(self, params, x_gsd, *, rng=None, deterministic=True):
        routing = self._router(params, x_gsd, rng=rng, deterministic=deterministic)
        self._calls.append(routing_call(self._router, x_gsd, routing, rng, deterministic))
        return routing


def routing_call(router, x_gsd, routing, rng, deterministic) -> dict[str, Any]:
    """What one router call computed: mode, whether gating noise was drawn, the capacity factor
    in effect, the capacity (buffer slots per expert per group) and [G, S, D]."""
    factor = router.capacity_factor
    if deterministic and getattr(router, "eval_capacity_factor", None) is not None:
        factor = router.eval_capacity_factor
    return {
        "router": router.name,
        "mode": "eval" if deterministic else "train",
        "noise": bool(
            not deterministic and rng is not None and getattr(router, "noise_std", 0) > 0
        ),
        "C": float(factor),
        "capacity": int(routing.capacity),
        "E": router.num_experts,
        "K": router.k,
        "G, S, D": list(x_gsd.shape),
    }


def observed_layer_calls(loss, *args) -> list[dict[str, Any]]:
    """The router calls made inside MoE layers by `loss(*args)`, run once eagerly (untimed)."""
    calls: list[dict[str, Any]] = []

    def record(next_fun, args, kwargs, context):
        result = next_fun(*args, **kwargs)
        if isinstance(context.module, vl.MoeLayer) and context.method_name == "make_router":
            return _RecordingRouter(result, calls)
        return result

    with nn.intercept_methods(record):
        jax.block_until_ready(loss(*args))
    return calls


def _steps(module: nn.Module, x: jax.Array):
    """(params, loss, jitted forward, jitted forward+backward) for a dense MLP or an MoE layer.

    An MoE layer runs in MODE: deterministic=False with gating noise from GATING_SEED."""
    call: dict[str, Any] = {}
    if isinstance(module, vl.MoeLayer):
        rngs = {vl.GATING_RNG: jax.random.key(GATING_SEED)}
        call = {"deterministic": MODE != "train", "rngs": rngs}
    params = module.init(jax.random.key(0), x)["params"]

    def loss(params, x):
        out = module.apply({"params": params}, x, **call)
        if isinstance(out, vl.MoeOutput):
            return jnp.mean(out.output**2) + out.aux_loss
        return jnp.mean(out**2)

    return params, loss, jax.jit(loss), jax.jit(jax.grad(loss, argnums=(0, 1)))


def moe_layer(e: int, h: int, k: int, c: float, router: str) -> vl.MoeLayer:
    return vl.MoeLayer(
        num_experts=e, mlp_dim=h, router=router, router_options={"k": k, "capacity_factor": c}
    )


def _label(shape: str, call: dict[str, Any]) -> dict[str, Any]:
    """A row's labels, from the router call observed in it."""
    tokens, group, d, h = SHAPES[shape]
    return {
        "shape": shape,
        "tokens": tokens,
        "group": group,
        "D": d,
        "H": h,
        "E": call["E"],
        "K": call["K"],
        "C": call["C"],
        "mode": call["mode"],
        "capacity": call["capacity"],
        "router": call["router"],
    }


def _only_call(calls: list[dict[str, Any]], what: str) -> dict[str, Any]:
    if len(calls) != 1:
        raise RuntimeError(f"{what}: expected one router call, observed {calls}")
    return calls[0]


def layer_row(shape, e, k, c, router, repeats, with_einsum):
    """The MoE layer (in MODE) vs dense MLPs of hidden H and K*H, forward and forward+backward,
    timed in turns."""
    tokens, group, d, h = SHAPES[shape]
    x = jax.random.normal(jax.random.key(1), (tokens // group, group, d))
    modules = {"dense H": DenseMlp(h), "dense K*H": DenseMlp(k * h)}
    moe = moe_layer(e, h, k, c, router)
    modules["moe"] = moe
    if with_einsum:
        modules["einsum"] = moe.clone(dispatch_path="einsum")
    row: dict[str, Any] = {}
    fwds, fwd_bwds = [], []
    for name, module in modules.items():
        params, loss, fwd, fwd_bwd = _steps(module, x)
        if name == "moe":
            call = _only_call(observed_layer_calls(loss, params, x), "layer")
            row = {**_label(shape, call), "layer's router call": call}
        fwds.append((fwd, (params, x)))
        fwd_bwds.append((fwd_bwd, (params, x)))
    # The modules in turns, so that their ratios see the same load on a shared machine.
    for step, calls in (("fwd", fwds), ("fwd+bwd", fwd_bwds)):
        for name, ms in zip(modules, time_interleaved_ms(calls, repeats=repeats), strict=True):
            row[f"{name} {step} ms"] = ms
    for step in ("fwd", "fwd+bwd"):
        row[f"moe/dense K*H {step}"] = row[f"moe {step} ms"] / row[f"dense K*H {step} ms"]
        if with_einsum:
            row[f"einsum/moe {step}"] = row[f"einsum {step} ms"] / row[f"moe {step} ms"]
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


def _route_loss(router):
    key = jax.random.key(GATING_SEED)

    def route_loss(p, x):
        routing = router(p, x, rng=key, deterministic=MODE != "train")
        return jnp.sum(routing.weight) + routing.aux_loss

    return route_loss


def router_share_row(shape, e, k, c, router, repeats):
    """The router alone (gate, noise, top-K, priority sort, slot assignment, losses) vs the MoE
    layer it belongs to, both forward+backward in MODE.

    The standalone router is the layer's own (`make_router()`) with the layer's router params,
    called the way the layer calls it; both calls are observed, and a row whose router and layer
    calls differ (mode, noise, C, capacity, shapes) is an error, not a figure. The two are timed
    in turns (medians), so that both see the same load on a shared machine."""
    tokens, group, d, h = SHAPES[shape]
    x = jax.random.normal(jax.random.key(1), (tokens // group, group, d))
    moe = moe_layer(e, h, k, c, router)
    params, loss, _, fwd_bwd = _steps(moe, x)
    r = moe.make_router()
    rparams = params["router"]
    router_calls: list[dict[str, Any]] = []
    jax.block_until_ready(_route_loss(_RecordingRouter(r, router_calls))(rparams, x))
    router_call = _only_call(router_calls, "router")
    layer_call = _only_call(observed_layer_calls(loss, params, x), "layer")
    if router_call != layer_call:
        raise RuntimeError(f"router {router_call} and layer {layer_call} calls differ")
    route = jax.jit(jax.grad(_route_loss(r), argnums=(0, 1)))
    # In turns, at least 5 rounds: the share is a ratio, and the router alone is cheap.
    t_route, t_layer = time_interleaved_ms(
        [(route, (rparams, x)), (fwd_bwd, (params, x))], repeats=max(repeats, 5)
    )
    return {
        **_label(shape, layer_call),
        "router call": router_call,
        "layer's router call": layer_call,
        "router fwd+bwd ms": t_route,
        "layer fwd+bwd ms": t_layer,
        "router share": t_route / t_layer,
    }


def memory_row(e, k, c, tokens=8192, group=200 * 8, d=512, h=2048):
    """XLA's buffers for forward+backward (MoE layer in MODE) without params and param grads."""
    x = jax.random.normal(jax.random.key(1), (tokens // group, group, d))
    moe = moe_layer(e, h, k, c, "top_k")
    row: dict[str, Any] = {"tokens": tokens, "group": group, "D": d, "H": h, "E": e, "K": k}
    row.update(C=None, mode=None, capacity=None)  # from the layer's observed router call
    for name, module in {
        "dense K*H": DenseMlp(k * h),
        "moe": moe,
        "einsum": moe.clone(dispatch_path="einsum"),
    }.items():
        params, loss, _, fwd_bwd = _steps(module, x)
        if name == "moe":
            call = _only_call(observed_layer_calls(loss, params, x), "layer")
            row.update(C=call["C"], mode=call["mode"], capacity=call["capacity"])
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
    row: dict[str, Any] = {"case": name, "batch": batch, "mode": "train"}  # train=True, rngs
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
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the target cases only")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (a check)")
    parser.add_argument("--json", default="bench-results/moe_layer.json")
    parser.add_argument(
        "--malloc",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned: vmoe_train.tune_cpu_malloc() first (the setting we recommend for CPU "
        "training); default: the C library's own behaviour",
    )
    args = parser.parse_args()
    repeats = 1 if args.smoke else 3 if args.quick else 5
    malloc = args.malloc
    if malloc == "tuned" and not vmoe_train.tune_cpu_malloc():
        malloc = "default (tuning does not apply here)"

    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, malloc: {malloc}")
    if args.smoke:
        target, other = ("tiny g16", 4, 2, 1.05), None
        layers = [layer_row(*target, "top_k", repeats, with_einsum=True)]
    else:
        target, other = ("S/32 g200", 32, 2, 1.05), ("S/32 g1600", 32, 2, 1.05)
        layers = [layer_row(*target, "top_k", repeats, with_einsum=True)]
        layers.append(layer_row(*other, "top_k", repeats, with_einsum=False))
    if not (args.quick or args.smoke):
        for shape in [s for s in SHAPES if s != "tiny g16"]:
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
    labels = ["shape", "tokens", "group", "D", "H", "E", "K", "C", "mode", "capacity", "router"]
    print(f"\nMoE layer ({MODE} mode) vs dense MLPs (times in ms, medians)")
    print_table(
        layers,
        [
            *labels, "dense H fwd+bwd ms", "dense K*H fwd+bwd ms", "moe fwd+bwd ms",
            "moe/dense K*H fwd+bwd", "moe/dense K*H fwd", "einsum/moe fwd+bwd",
        ],
    )  # fmt: skip

    # Tokens per expert at S/32, C=1.05: 112 with E=32 (groups of 200), 424 with E=8.
    if args.smoke:
        matmuls = [grouped_matmul_rows(8, 4, 32, 64, repeats)]
    else:
        matmuls = [grouped_matmul_rows(112, 32, 512, 2048, repeats)]
    if not (args.quick or args.smoke):
        matmuls.append(grouped_matmul_rows(424, 8, 512, 2048, repeats))
    print("\nThe experts' matmul, forward+backward, four ways (ms; ratios over one GEMM)")
    print_table(matmuls, list(matmuls[0]))

    # The same layer configuration as the first row of the layer table, bpr next to top_k.
    shares = [router_share_row(*target, r, repeats) for r in ("top_k", "bpr")]
    print(f"\nRouter share of the layer's forward+backward time (both in {MODE} mode)")
    print_table(shares, [*labels, "router fwd+bwd ms", "layer fwd+bwd ms", "router share"])

    if args.smoke:
        memory = [memory_row(4, 2, 1.05, tokens=64, group=16, d=32, h=64)]
    else:
        memory = [memory_row(32, 2, 1.05)]
    print("\nMemory of forward+backward without params and param grads (XLA buffers, MB)")
    print_table(memory, list(memory[0]))

    steps = [
        train_step_row(
            "digits 8x8 Mu/2", "V-MoE-Mu/2", (8, 8, 1), 8 if args.smoke else 128, repeats
        )
    ]
    if not args.smoke:
        steps.append(train_step_row("S/32 224px", "V-MoE-S/32", (224, 224, 3), 32, 3))
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
