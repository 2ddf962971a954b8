"""A tiny fine-grained V-MoE on 8 host devices: each sharding strategy vs one device.

Run as a script by test_fine_grained.py with XLA_FLAGS=--xla_force_host_platform_device_count=8
set before jax starts; prints one JSON report: per strategy, the loss and the single-device loss,
the largest relative gradient difference, and one device's block of the fine experts' w_in.

The model: 2 blocks (dense, then MoE), E=4 coarse experts of width 32 segmented with m=2 into
E*m=8 experts of width 16 (the expert axis of the (2, 4) mesh holds 2 each), BPR with K=2 -> 4
choices per token, capacity factor 1.05, groups of 2 images, dropout and gating noise on.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

import vmoe_layers as vl

NUM_IMAGES, IMAGE, CLASSES, E, M = 16, 8, 10, 4, 2
STRATEGIES = [("data", None), ("expert", (2, 4)), ("fsdp", (2, 4)), ("expert_fsdp", (2, 4))]


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
            E,
            "every-2",
            router="bpr",
            router_options={"k": 2, "capacity_factor": 1.05},
            group_size=34,  # 2 images x 17 tokens
            variants={"fine_grained": {"m": M}},
        ),
        exchange=exchange,
    )


def batch() -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(0)
    images = rs.normal(size=(NUM_IMAGES, IMAGE, IMAGE, 1)).astype(np.float32)
    return images, np.arange(NUM_IMAGES, dtype=np.int32) % CLASSES


def init_params() -> dict:
    params = jax.jit(model().init)(jax.random.key(0), batch()[0])["params"]
    params = jax.tree.map(np.asarray, params)
    # The head starts at zero; a random one makes the loss depend on every layer.
    kernel = params["head"]["kernel"]
    params["head"]["kernel"] = np.random.RandomState(1).normal(size=kernel.shape).astype(np.float32)
    return params


def loss_fn(m: vl.VisionTransformer):
    """Cross-entropy + aux loss in training mode (dropout, gating noise)."""

    def loss(params, images, labels):
        rng = jax.random.key(42)
        rngs = {"dropout": jax.random.fold_in(rng, 0), "gating": jax.random.fold_in(rng, 1)}
        out = m.apply({"params": params}, images, train=True, rngs=rngs)
        logp = jax.nn.log_softmax(out.logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)) + out.aux_loss

    return loss


def max_relative_difference(grads, reference) -> float:
    """max over leaves of max|g - g_ref| / max(max|g_ref|, 1e-3 x the largest |g_ref|)."""
    leaves = jax.tree.leaves(reference)
    floor = 1e-3 * max(float(np.max(np.abs(r))) for r in leaves)
    worst = 0.0
    for g, r in zip(jax.tree.leaves(grads), leaves, strict=True):
        worst = max(worst, float(np.max(np.abs(g - r))) / max(float(np.max(np.abs(r))), floor))
    return worst


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    params, (images, labels) = init_params(), batch()
    reference_loss, reference_grads = jax.jit(jax.value_and_grad(loss_fn(model())))(
        params, images, labels
    )
    reference_grads = jax.tree.map(np.asarray, reference_grads)
    report = {}
    for name, mesh_shape in STRATEGIES:
        strategy = vl.get_strategy(
            name, **({} if mesh_shape is None else {"mesh_shape": mesh_shape})
        )
        sharded = vl.shard_params(strategy, params)
        replicated = jax.sharding.NamedSharding(strategy.mesh, jax.sharding.PartitionSpec())
        step = jax.jit(
            jax.value_and_grad(loss_fn(model(strategy.exchange))),
            out_shardings=(replicated, jax.tree.map(lambda _, r=replicated: r, params)),
        )
        loss, grads = step(sharded, *vl.shard_batch(strategy, (images, labels)))
        local = lambda a: np.asarray(a.addressable_data(0))  # noqa: E731 (replicated)
        w_in = sharded["block_1"]["moe"]["experts"]["w_in"]
        report[name] = {
            "loss": float(local(loss)),
            "reference_loss": float(reference_loss),
            "grad_max_rel_diff": max_relative_difference(
                jax.tree.map(local, grads), reference_grads
            ),
            "w_in_shape": list(w_in.shape),
            "w_in_shard_shape": list(w_in.addressable_shards[0].data.shape),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
