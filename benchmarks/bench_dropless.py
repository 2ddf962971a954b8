"""Dropless routing vs top_k at C=1.05: time and memory of the MoE layer, and its backend form.

    python benchmarks/bench_dropless.py [--smoke] [--json FILE]

Needs vmoe-train (tune_cpu_malloc) and the vmoe-router-dropless plugin. Every layer runs as in
training (gating noise, forward+backward with respect to params and input), timed in turns.
Rows, at the S/32 layer shape (D=512, H=2048; 1,600 tokens in groups of 200, K=2):
  top_k C=1.05      the capacity router of the V-MoE recipe (drops what overflows),
  top_k C=S/(K*S/E) a capacity router with room for everything (C = E/K: capacity S),
  dropless b=...    vmoe-router-dropless: choices sorted by expert into blocks of b rows, each
                    block run with its expert's gathered params (the plugin's backend form),
  dropless ragged   the same sorted rows through jax.lax.ragged_dot (group sizes = each
                    expert's padded rows) for the MLP's two matmuls: the grouped-matmul form.
Memory: XLA's buffer assignment for the compiled forward+backward (harness.peak_memory_mb),
params and input included.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
from harness import peak_memory_mb, print_table, time_interleaved_ms, write_json

import vmoe_layers as vl
import vmoe_routing as vr
import vmoe_train

GATING_SEED = 2


def _loss(layer: vl.MoeLayer):
    rngs = {vl.GATING_RNG: jax.random.key(GATING_SEED)}

    def loss(params, x):
        out = layer.apply({"params": params}, x, deterministic=False, rngs=rngs)
        return jnp.mean(out.output**2) + out.aux_loss

    return loss


def _ragged_loss(e: int, k: int, block_size: int, group: int):
    """Dropless with the MLP experts as two jax.lax.ragged_dot calls over the sorted rows."""
    router = vr.get_router("dropless", num_experts=e, k=k, block_size=block_size)
    rng = jax.random.key(GATING_SEED)

    def loss(params, x):
        x_gsd = x.reshape(-1, group, x.shape[-1])
        routing = router(params["router"], x_gsd, rng=rng, deterministic=False)
        rows = vr.dispatch(x_gsd, routing).reshape(-1, x.shape[-1])  # [B*b, D]
        sizes = jnp.zeros((e,), jnp.int32).at[routing.block_expert].add(block_size)
        expert_of_row = jnp.repeat(routing.block_expert, block_size)
        p = params["experts"]
        h = jax.lax.ragged_dot(rows, p["w_in"], sizes) + p["b_in"][expert_of_row]
        y = jax.lax.ragged_dot(jax.nn.gelu(h), p["w_out"], sizes) + p["b_out"][expert_of_row]
        out = vr.combine(y.reshape(-1, block_size, y.shape[-1]), routing)
        return jnp.mean(out**2) + routing.aux_loss

    return loss


def rows(tokens, group, d, h, e, k, repeats, block_sizes, with_ragged):
    x = jax.random.normal(jax.random.key(0), (tokens // group, group, d))
    cases = {}

    def layer(router, **options):
        return vl.MoeLayer(
            num_experts=e, mlp_dim=h, router=router, router_options={"k": k, **options}
        )

    for name, module in [
        ("top_k C=1.05", layer("top_k", capacity_factor=1.05)),
        (f"top_k C={e / k:g} (capacity S)", layer("top_k", capacity_factor=e / k)),
        *[(f"dropless b={b}", layer("dropless", block_size=b)) for b in block_sizes],
    ]:
        params = module.init(jax.random.key(1), x)["params"]
        cases[name] = (_loss(module), params)
    if with_ragged:
        params = layer("dropless", block_size=block_sizes[0]).init(jax.random.key(1), x)["params"]
        cases[f"dropless ragged_dot b={block_sizes[0]}"] = (
            _ragged_loss(e, k, block_sizes[0], group),
            params,
        )
    grads = {n: jax.jit(jax.grad(f, argnums=(0, 1))) for n, (f, _) in cases.items()}
    times = time_interleaved_ms([(grads[n], (p, x)) for n, (_, p) in cases.items()], repeats)
    out = []
    for (name, (_, params)), ms in zip(cases.items(), times, strict=True):
        out.append(
            {
                "tokens": tokens,
                "group": group,
                "D": d,
                "H": h,
                "E": e,
                "K": k,
                "layer": name,
                "fwd+bwd ms": ms,
                "memory MB": peak_memory_mb(grads[name], params, x),
            }
        )
    base = out[0]
    for row in out:
        row["time / top_k C=1.05"] = row["fwd+bwd ms"] / base["fwd+bwd ms"]
        row["memory / top_k C=1.05"] = row["memory MB"] / base["memory MB"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat")
    parser.add_argument("--json", default="bench-results/dropless.json")
    args = parser.parse_args()
    vmoe_train.tune_cpu_malloc()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    if args.smoke:
        table = rows(64, 16, 32, 64, 4, 2, 1, (8,), with_ragged=True)
    else:
        table = rows(1600, 200, 512, 2048, 8, 2, 5, (64, 128, 256), with_ragged=True)
        table += rows(1600, 200, 512, 2048, 32, 2, 5, (32, 64, 128), with_ragged=False)
    print("\nDropless vs top_k (training mode, forward+backward, medians in turns)")
    print_table(table, list(table[0]))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    write_json(args.json, {"dropless": table})


if __name__ == "__main__":
    main()
