"""Run with 8 host devices: every plugin router under every built-in strategy vs one device.

Prints one JSON line: {router: {strategy: {"loss": .., "reference": .., "grad_diff": ..} or
{"error": message}}}. The reference is the same jitted step without any sharding (device 0).
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import vmoe_layers as vl

# The built-in routers under every strategy and mesh: vmoe-layers' `nox -s sharding-matrix`.
ROUTERS = {
    "expert_choice": {"k": 2, "capacity_factor": 1.05},
    "dropless": {"k": 2, "block_size": 8},
    "soft": {"slots_per_expert": 2},
}
STRATEGIES = [("data", None), ("expert", (2, 4)), ("fsdp", (2, 4))]
NUM_IMAGES, EXPERTS = 16, 8


def model(router, options, exchange=None):
    return vl.VisionTransformer(
        num_classes=10,
        patch_size=2,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=32,
        moe=vl.MoeConfig(EXPERTS, "every-2", router=router, router_options=options, group_size=34),
        exchange=exchange,
    )


def loss_fn(m):
    def loss(params, images, labels):
        rngs = {"gating": jax.random.key(1)}
        out = m.apply({"params": params}, images, train=True, rngs=rngs)
        logp = jax.nn.log_softmax(out.logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)) + out.aux_loss

    return loss


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    rs = np.random.RandomState(0)
    images = rs.normal(size=(NUM_IMAGES, 8, 8, 1)).astype(np.float32)
    labels = np.arange(NUM_IMAGES, dtype=np.int32) % 10
    report: dict = {}
    for router, options in ROUTERS.items():
        params = jax.jit(model(router, options).init)(jax.random.key(0), images)["params"]
        head = params["head"]["kernel"]
        params["head"]["kernel"] = jnp.asarray(rs.normal(size=head.shape), jnp.float32)
        step = jax.jit(jax.value_and_grad(loss_fn(model(router, options))))
        ref_loss, ref_grads = step(params, images, labels)
        report[router] = {}
        for name, mesh_shape in STRATEGIES:
            options_s = {} if mesh_shape is None else {"mesh_shape": mesh_shape}
            strategy = vl.get_strategy(name, **options_s)
            try:
                sharded = jax.jit(
                    jax.value_and_grad(loss_fn(model(router, options, strategy.exchange)))
                )
                loss, grads = sharded(
                    vl.shard_params(strategy, params), *vl.shard_batch(strategy, (images, labels))
                )
            except ValueError as error:
                report[router][name] = {"error": str(error)}
                continue
            scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(ref_grads))
            diff = max(
                float(jnp.abs(np.asarray(g) - np.asarray(r)).max())
                for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
            )
            report[router][name] = {
                "loss": float(loss),
                "reference": float(ref_loss),
                "grad_diff": diff / scale,
            }
    json.dump(report, sys.stdout)
    print()


if __name__ == "__main__":
    main()
