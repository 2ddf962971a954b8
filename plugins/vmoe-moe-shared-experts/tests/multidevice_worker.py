"""A tiny V-MoE with shared experts on 8 host devices under every built-in sharding strategy vs
one device; prints one JSON report (its last line).

Run as a script by test_shared_experts.py, with XLA_FLAGS=--xla_force_host_platform_device_count=8
set before jax starts. The model: 2 blocks (dense, then MoE: 8 routed experts, BPR K=2, 2 shared
experts), dropout on, groups of 2 images: each device routes one group.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

import vmoe_layers as vl

NUM_IMAGES, IMAGE, CLASSES, EXPERTS, NUM_SHARED = 16, 8, 10, 8, 2
CASES = [("data", None), ("expert", (2, 4)), ("fsdp", (2, 4)), ("expert_fsdp", (2, 4))]
# Params made by two programs (sharded init vs one device): float32 rounding may differ.
PARAMS_TOL = {"rtol": 1e-5, "atol": 1e-9}


def model(exchange=None) -> vl.VisionTransformer:
    return vl.VisionTransformer(
        num_classes=CLASSES,
        patch_size=2,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=32,
        dropout_rate=0.1,
        moe=vl.MoeConfig(
            EXPERTS,
            "every-2",
            router="bpr",
            router_options={"k": 2, "capacity_factor": 1.05},
            group_size=34,  # 2 images x 17 tokens
            variants={"shared_experts": {"num_shared": NUM_SHARED}},
        ),
        exchange=exchange,
    )


def batch() -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(0)
    images = rs.normal(size=(NUM_IMAGES, IMAGE, IMAGE, 1)).astype(np.float32)
    return images, np.arange(NUM_IMAGES, dtype=np.int32) % CLASSES


def loss_fn(model: vl.VisionTransformer):
    """(params, images, labels) -> cross-entropy + aux loss, in training (noise, dropout)."""

    def loss(params, images, labels):
        rng = jax.random.key(42)
        rngs = {"dropout": jax.random.fold_in(rng, 0), "gating": jax.random.fold_in(rng, 1)}
        out = model.apply({"params": params}, images, train=True, rngs=rngs)
        logp = jax.nn.log_softmax(out.logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)) + out.aux_loss

    return loss


def max_relative_difference(grads, reference) -> float:
    """max over leaves of max|g - g_ref| / max(max|g_ref|, 1e-3 x the largest |g_ref|): the
    floor keeps gradients that are 0 in exact arithmetic from counting as relative errors."""
    leaves = jax.tree.leaves(reference)
    floor = 1e-3 * max(float(np.max(np.abs(r))) for r in leaves)
    worst = 0.0
    for g, r in zip(jax.tree.leaves(grads), leaves, strict=True):
        scale = max(float(np.max(np.abs(r))), floor)
        worst = max(worst, float(np.max(np.abs(np.asarray(g) - r))) / scale)
    return worst


def init_sharded_matches(name, mesh_shape, reference, images) -> dict:
    """`init_sharded` gives, on every device, its slice of the single-device params, laid out
    by the strategy's specs."""
    layout = strategy(name, mesh_shape)
    sharded = vl.init_sharded(layout, model(layout.exchange), jax.random.key(0), images[:2])
    specs = layout.param_specs(sharded)
    values_match = layout_ok = True
    for leaf, ref, spec in zip(
        jax.tree.leaves(sharded), jax.tree.leaves(reference), jax.tree.leaves(specs), strict=True
    ):
        layout_ok &= leaf.sharding == jax.sharding.NamedSharding(layout.mesh, spec)
        for shard in leaf.addressable_shards:
            values_match &= bool(np.allclose(shard.data, ref[shard.index], **PARAMS_TOL))
    return {"values_match": bool(values_match), "layout_ok": bool(layout_ok)}


def strategy(name, mesh_shape):
    return vl.get_strategy(name, **({} if mesh_shape is None else {"mesh_shape": mesh_shape}))


def run_case(name, mesh_shape, params, batch, reference_loss, reference_grads) -> dict:
    """One training step's loss and gradients under a strategy vs one device's, and how the
    MoE layer's routed and shared experts are laid out (specs: one list per leaf)."""
    layout = strategy(name, mesh_shape)
    replicated = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec())
    sharded_params = vl.shard_params(layout, params)
    step = jax.jit(
        jax.value_and_grad(loss_fn(model(layout.exchange))),
        out_shardings=(replicated, jax.tree.map(lambda _: replicated, params)),
    )
    loss, grads = step(sharded_params, *vl.shard_batch(layout, batch))
    local = lambda a: np.asarray(a.addressable_data(0))  # noqa: E731 (replicated: any copy)
    moe = sharded_params["block_1"]["moe"]
    specs = layout.param_specs(params)["block_1"]["moe"]
    return {
        "loss": float(local(loss)),
        "reference_loss": float(reference_loss),
        "grad_max_rel_diff": max_relative_difference(jax.tree.map(local, grads), reference_grads),
        "shard_shapes": {
            key: list(moe[key]["w_in"].addressable_shards[0].data.shape)
            for key in ("experts", "shared_experts")
        },
        "specs": {
            key: {leaf: list(spec) for leaf, spec in specs[key].items()}
            for key in ("experts", "shared_experts")
        },
    }


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    images, labels = batch()
    initial = jax.tree.map(np.asarray, jax.jit(model().init)(jax.random.key(0), images)["params"])
    params = jax.tree.map(np.copy, initial)
    # The head starts at zero; a random one makes the loss depend on every layer.
    kernel = params["head"]["kernel"]
    params["head"]["kernel"] = np.random.RandomState(1).normal(size=kernel.shape).astype(np.float32)
    assert params["block_1"]["moe"]["shared_experts"]["w_in"].shape == (NUM_SHARED, 16, 32)

    reference_loss, reference_grads = jax.jit(jax.value_and_grad(loss_fn(model())))(
        params, images, labels
    )
    reference_grads = jax.tree.map(np.asarray, reference_grads)

    report = {
        name: run_case(name, mesh_shape, params, (images, labels), reference_loss, reference_grads)
        | {"init_sharded": init_sharded_matches(name, mesh_shape, initial, images)}
        for name, mesh_shape in CASES
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
