"""Worker for test_checkpoints: a V-MoE saved on an 8-device expert mesh, restored elsewhere.

Run as `python checkpoints_cross_mesh_worker.py DIRECTORY`; the 8 host devices are requested
before jax is imported, so the test session itself keeps its one device. Prints one JSON line.

Steps: a tiny V-MoE (8 experts, one per device) is initialised sharded under
`get_strategy("expert", mesh_shape=(1, 8))` and saved (inside a TrainState) as step 3; it is
restored onto one device (and its loss computed there with local experts), and back onto the
expert mesh; the one-device copy is saved as step 4 and restored onto the expert mesh too.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

import vmoe_layers as vl
from vmoe_train.checkpoints import Checkpointer, abstract_like
from vmoe_train.state import TrainState


def loss_fn(model, params, images, labels):
    out = model.apply({"params": params}, images)
    log_p = jax.nn.log_softmax(out.logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1)) + out.aux_loss


def host(tree):
    return jax.tree.map(np.asarray, tree)


def equal(a, b):
    return all(
        x.dtype == y.dtype and np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b)), strict=True)
    )


def main(directory: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    strategy = vl.get_strategy("expert", mesh_shape=(1, 8))
    model = vl.create_model(
        "V-MoE-Nano/2", num_classes=3, num_experts=8, exchange=strategy.exchange
    )
    local_model = vl.create_model("V-MoE-Nano/2", num_classes=3, num_experts=8)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=(16,)).astype(np.int32)

    params = vl.init_sharded(strategy, model, jax.random.key(0), images[:1])
    replicated = NamedSharding(strategy.mesh, PartitionSpec())
    state = TrainState(
        step=jax.device_put(jnp.int32(3), replicated),
        params=params,
        opt_state=optax.sgd(0.1).init(params),  # trivial: no arrays
        rng=jax.device_put(jax.random.key_data(jax.random.key(1)), replicated),
    )
    sharded_batch = vl.shard_batch(strategy, (images, labels))
    expert_loss = jax.jit(lambda p, x, y: loss_fn(model, p, x, y))
    loss_before = float(expert_loss(state.params, *sharded_batch))
    saved = host(state)
    expert_leaf = params["block_1"]["moe"]["experts"]["w_in"]  # [E=8, D, H]

    ckpt = Checkpointer(directory, every_steps=1, keep=2)
    ckpt.save(3, state, data_state={"batches": 3}, config={"model": "V-MoE-Nano/2"})
    ckpt.close()

    # Onto one device.
    fresh = Checkpointer(directory, every_steps=1, keep=2)
    one = SingleDeviceSharding(jax.devices()[0])
    on_one = fresh.restore(abstract_like(state, one))
    one_device = all(
        x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(on_one.state)
    )
    local_loss = jax.jit(lambda p: loss_fn(local_model, p, images, labels))
    loss_one = float(local_loss(on_one.state.params))

    # Back onto the expert mesh, from the 8-device save...
    abstract = abstract_like(state)  # the shardings of the original: experts split 8 ways
    on_mesh = fresh.restore(abstract, step=3)
    same_layout = all(
        x.sharding == a.sharding
        for x, a in zip(jax.tree.leaves(on_mesh.state), jax.tree.leaves(abstract), strict=True)
    )
    loss_after = float(expert_loss(on_mesh.state.params, *sharded_batch))

    # ...and from a save made on one device.
    fresh.save(4, on_one.state, data_state={"batches": 4}, config={"model": "V-MoE-Nano/2"})
    from_one = fresh.restore(abstract)
    fresh.close()
    loss_from_one = float(expert_loss(from_one.state.params, *sharded_batch))

    print(
        json.dumps(
            {
                "expert_spec": str(expert_leaf.sharding.spec),
                "expert_shard_shape": list(expert_leaf.addressable_shards[0].data.shape),
                "one_device": one_device,
                "equal_on_one": equal(on_one.state, saved),
                "equal_on_mesh": equal(on_mesh.state, saved),
                "same_layout": same_layout,
                "from_one_step": from_one.step,
                "equal_from_one": equal(from_one.state, saved),
                "same_layout_from_one": all(
                    x.sharding == a.sharding
                    for x, a in zip(
                        jax.tree.leaves(from_one.state), jax.tree.leaves(abstract), strict=True
                    )
                ),
                "loss_before": loss_before,
                "loss_one": loss_one,
                "loss_after": loss_after,
                "loss_from_one": loss_from_one,
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
