"""Routing and dispatch benchmarks (vmoe-routing only): routers, and index vs one-hot dispatch.

    python benchmarks/bench_routing.py [--quick] [--json out.json]

For each layer shape, E and K it prints the router's forward+backward time in training mode
(deterministic=False: gating noise, the training capacity factor C) and, for the index-based
dispatch/combine and the one-hot einsum reference, forward+backward time and XLA's peak memory,
moving tokens by a routing decided in evaluation mode (no noise; the capacity is the same, as
these routers' evaluation capacity factor defaults to C). Ratios are against the index path
measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os

import jax
import jax.numpy as jnp
from harness import peak_memory_mb, print_table, time_ms, write_json

import vmoe_routing as vr

# (name, tokens, group size, D): V-MoE S/32 at 224px is 50 tokens an image, B/16 is 197.
SHAPES = {"S/32": (1600, 200, 512), "B/16": (1576, 394, 768)}


def router_case(name, tokens, group, d, e, k, c, router_name, repeats):
    router = vr.get_router(router_name, num_experts=e, k=k, capacity_factor=c)
    key = jax.random.key(0)
    params = router.init(key, d)
    x = jax.random.normal(key, (tokens // group, group, d))

    def route_loss(params, x):
        r = router(params, x, rng=key, deterministic=False)
        return jnp.sum(r.weight) + r.aux_loss

    step = jax.jit(jax.grad(route_loss, argnums=(0, 1)))
    return {
        "shape": name,
        "tokens": tokens,
        "group": group,
        "D": d,
        "E": e,
        "K": k,
        "C": c,
        "mode": "train",
        "capacity": router(params, x, rng=key, deterministic=False).capacity,  # as it ran
        "router": router_name,
        "router fwd+bwd ms": time_ms(step, params, x, repeats=repeats),
    }


def dispatch_case(name, tokens, group, d, e, k, c, repeats):
    router = vr.TopKRouter(num_experts=e, k=k, capacity_factor=c)
    key = jax.random.key(0)
    params = router.init(key, d)
    x = jax.random.normal(key, (tokens // group, group, d))
    routing = router(params, x, deterministic=True)

    def move(x, routing, dense):
        if dense:
            routing = routing.to_dense()
        return jnp.sum(vr.combine(vr.dispatch(x, routing) * 2.0, routing) ** 2)

    row = {"shape": name, "tokens": tokens, "group": group, "D": d, "E": e, "K": k, "C": c}
    row.update({"routing mode": "eval", "capacity": routing.capacity})
    for path, dense in (("index", False), ("einsum", True)):
        step = jax.jit(jax.grad(functools.partial(move, dense=dense), (0, 1), allow_int=True))
        row[f"{path} ms"] = time_ms(step, x, routing, repeats=repeats)
        row[f"{path} MB"] = peak_memory_mb(step, x, routing)
    row["einsum/index time"] = row["einsum ms"] / row["index ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S/32 only, fewer repeats")
    parser.add_argument("--json", default="bench-results/routing.json")
    args = parser.parse_args()
    shapes = {"S/32": SHAPES["S/32"]} if args.quick else SHAPES
    repeats = 3 if args.quick else 7

    routers, moves = [], []
    routers_available = [n for n in ("top_k", "bpr", "hash") if n in vr.available_routers()]
    for (name, (tokens, group, d)), e, k in itertools.product(shapes.items(), (8, 32), (1, 2)):
        for router_name in routers_available:
            routers.append(router_case(name, tokens, group, d, e, k, 1.05, router_name, repeats))
        for c in (0.5, 1.05, 2.0):
            moves.append(dispatch_case(name, tokens, group, d, e, k, c, repeats))

    labels = ["shape", "tokens", "group", "D", "E", "K", "C"]
    print("\nRouter forward+backward, training mode (gate, noise, top-K, slots, aux losses)")
    print_table(routers, [*labels, "mode", "capacity", "router", "router fwd+bwd ms"])
    print("\nDispatch + combine forward+backward: index path vs one-hot einsum reference")
    columns = [*labels, "routing mode", "capacity", "index ms", "einsum ms", "einsum/index time"]
    print_table(moves, [*columns, "index MB", "einsum MB"])
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    write_json(args.json, {"routers": routers, "dispatch_combine": moves})


if __name__ == "__main__":
    main()
