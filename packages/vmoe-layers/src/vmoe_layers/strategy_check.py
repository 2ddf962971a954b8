"""Does a V-MoE give one device's loss and gradients under every sharding strategy? The check a
plugin (a router, an expert type, a layer variant) runs on 8 host devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m vmoe_layers.strategy_check \\
        --moe '{"num_experts": 4, "variants": {"shared_experts": {"num_shared": 2}}}'

prints one JSON line: per strategy (data, and expert / fsdp / expert_fsdp on a 2 x 4 mesh) one
training step's loss beside one device's, the largest relative gradient difference, whether
`init_sharded` made the one-device params in the strategy's layout, and how block 1's MoE
params are split (each leaf's per-device shape and spec). `compare_strategies(moe)` does the
same in a process that already has 8 devices (XLA_FLAGS must be set before jax starts), and
`run_strategy_check(moe)` runs it in such a subprocess from any process (a plugin's tests).

The model is tiny and fixed (`tiny_model`): ViT with 2x2 patches of 8x8 images (17 tokens), 2
blocks of width 16, MLP 32, block 1 a MoE layer configured by `moe` (routing groups of 2 images),
dropout and gating noise on, a random head (a zero one would hide the other layers' gradients).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vmoe_layers.moe import ROUTER_STATE
from vmoe_layers.sharding import (
    get_strategy,
    init_router_state,
    init_sharded,
    shard_batch,
    shard_params,
)
from vmoe_layers.vit import MoeConfig, VisionTransformer

STRATEGIES = (("data", None), ("expert", (2, 4)), ("fsdp", (2, 4)), ("expert_fsdp", (2, 4)))
NUM_IMAGES, IMAGE, CLASSES, TOKENS = 16, 8, 10, 17
# Params made by two programs (sharded init vs one device): float32 rounding may differ.
PARAMS_TOL = {"rtol": 1e-5, "atol": 1e-9}


def tiny_model(moe: Mapping[str, Any], exchange: Any = None) -> VisionTransformer:
    """The model the check trains: `moe` holds `MoeConfig` fields (num_experts defaults to 4,
    the router to bpr with K=2, C=1.05; groups of 2 images)."""
    fields = {
        "num_experts": 4,
        "layers": "every-2",
        "router": "bpr",
        "router_options": {"k": 2, "capacity_factor": 1.05},
        "group_size": 2 * TOKENS,
        **moe,
    }
    return VisionTransformer(
        num_classes=CLASSES,
        patch_size=2,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=32,
        dropout_rate=0.1,
        moe=MoeConfig(**fields),
        exchange=exchange,
    )


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(0)
    images = rs.normal(size=(NUM_IMAGES, IMAGE, IMAGE, 1)).astype(np.float32)
    return images, np.arange(NUM_IMAGES, dtype=np.int32) % CLASSES


def _loss_fn(model: VisionTransformer) -> Any:
    """(params, router state, images, labels) -> cross-entropy + aux loss, in training."""

    def loss(params, router_state, images, labels):
        rng = jax.random.key(42)
        rngs = {"dropout": jax.random.fold_in(rng, 0), "gating": jax.random.fold_in(rng, 1)}
        variables = {"params": params, **({ROUTER_STATE: router_state} if router_state else {})}
        out = model.apply(variables, images, train=True, rngs=rngs)
        logp = jax.nn.log_softmax(out.logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)) + out.aux_loss

    return loss


def max_relative_difference(grads: Any, reference: Any) -> float:
    """max over leaves of max|g - g_ref| / max(max|g_ref|, 1e-3 x the largest |g_ref|): the
    floor keeps gradients that are 0 in exact arithmetic from counting as relative errors."""
    leaves = jax.tree.leaves(reference)
    floor = 1e-3 * max(float(np.max(np.abs(r))) for r in leaves)
    worst = 0.0
    for g, r in zip(jax.tree.leaves(grads), leaves, strict=True):
        scale = max(float(np.max(np.abs(r))), floor)
        worst = max(worst, float(np.max(np.abs(np.asarray(g) - r))) / scale)
    return worst


def _paths(tree: Any) -> dict[str, Any]:
    return {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def compare_strategies(
    moe: Mapping[str, Any], strategies: Sequence[tuple[str, Any]] = STRATEGIES
) -> dict[str, dict[str, Any]]:
    """{strategy: {loss, reference_loss, grad_max_rel_diff, init_sharded: {values_match,
    layout_ok}, shard_shapes: {path: shape}, specs: {path: spec}}} for `tiny_model(moe)`; the
    paths are those of block 1's MoE params. Needs 8 devices."""
    if jax.device_count() < 8:
        raise RuntimeError(
            f"compare_strategies needs 8 devices, this process has {jax.device_count()}: set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax starts"
        )
    images, labels = _batch()
    variables = jax.jit(tiny_model(moe).init)(jax.random.key(0), images)
    initial = jax.tree.map(np.asarray, variables["params"])
    router_state = jax.tree.map(np.asarray, dict(variables.get(ROUTER_STATE, {})))
    params = jax.tree.map(np.copy, initial)
    kernel = params["head"]["kernel"]
    params["head"]["kernel"] = np.random.RandomState(1).normal(size=kernel.shape).astype(np.float32)
    reference_loss, reference_grads = jax.jit(jax.value_and_grad(_loss_fn(tiny_model(moe))))(
        params, router_state, images, labels
    )
    reference_grads = jax.tree.map(np.asarray, reference_grads)

    report = {}
    for name, mesh_shape in strategies:
        layout = get_strategy(name, **({} if mesh_shape is None else {"mesh_shape": mesh_shape}))
        model = tiny_model(moe, layout.exchange)
        replicated = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec())
        sharded = shard_params(layout, params)
        state = init_router_state(layout, model, images[:2]) if router_state else {}
        step = jax.jit(
            jax.value_and_grad(_loss_fn(model)),
            out_shardings=(replicated, jax.tree.map(lambda _, r=replicated: r, params)),
        )
        loss, grads = step(sharded, state, *shard_batch(layout, (images, labels)))
        local = lambda a: np.asarray(a.addressable_data(0))  # noqa: E731 (replicated: any copy)
        moe_params = _paths(sharded["block_1"]["moe"])
        specs = _paths(layout.param_specs(params)["block_1"]["moe"])
        report[name] = {
            "loss": float(local(loss)),
            "reference_loss": float(reference_loss),
            "grad_max_rel_diff": max_relative_difference(
                jax.tree.map(local, grads), reference_grads
            ),
            "init_sharded": _init_sharded_matches(layout, model, initial, images),
            "shard_shapes": {
                path: list(leaf.addressable_shards[0].data.shape)
                for path, leaf in moe_params.items()
            },
            "specs": {path: list(spec) for path, spec in specs.items()},
        }
    return report


def _init_sharded_matches(layout: Any, model: Any, reference: Any, images: Any) -> dict:
    """`init_sharded` gives, on every device, its slice of the one-device params, laid out by
    the strategy's specs."""
    sharded = init_sharded(layout, model, jax.random.key(0), images[:2])
    specs = layout.param_specs(sharded)
    values_match = layout_ok = True
    for leaf, ref, spec in zip(
        jax.tree.leaves(sharded), jax.tree.leaves(reference), jax.tree.leaves(specs), strict=True
    ):
        layout_ok &= leaf.sharding == jax.sharding.NamedSharding(layout.mesh, spec)
        for shard in leaf.addressable_shards:
            values_match &= bool(np.allclose(shard.data, ref[shard.index], **PARAMS_TOL))
    return {"values_match": bool(values_match), "layout_ok": bool(layout_ok)}


def run_strategy_check(
    moe: Mapping[str, Any], strategies: Sequence[str] | None = None, *, timeout: float = 600
) -> dict[str, dict[str, Any]]:
    """`compare_strategies(moe)` in a subprocess with 8 host devices (XLA_FLAGS must be set
    before jax starts, so a test's own process cannot): what plugin tests call. Raises
    RuntimeError with the subprocess's output if it fails."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    command = [sys.executable, "-m", "vmoe_layers.strategy_check", "--moe", json.dumps(moe)]
    if strategies is not None:
        command += ["--strategies", ",".join(strategies)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "XLA_FLAGS": flags},
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"strategy_check failed:\n{result.stdout}\n{result.stderr[-5000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", default="{}", help="MoeConfig fields as JSON")
    parser.add_argument(
        "--strategies",
        default=",".join(name for name, _ in STRATEGIES),
        help="a comma-separated subset of " + ",".join(name for name, _ in STRATEGIES),
    )
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.strategies.split(",") if s.strip()]
    known = dict(STRATEGIES)
    unknown = [s for s in chosen if s not in known]
    if unknown:
        parser.error(f"--strategies: unknown {unknown}; allowed: {list(known)}")
    report = compare_strategies(json.loads(args.moe), [(s, known[s]) for s in chosen])
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
