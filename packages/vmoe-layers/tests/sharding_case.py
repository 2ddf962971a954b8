"""One small V-MoE training step, the same in every process: the sharding tests' subject.

Used by the single-device reference (in the pytest process), the 8-host-device worker and the
two-process workers, so all of them compute the same loss and gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import vmoe_layers as vl

NUM_IMAGES, IMAGE, CLASSES, EXPERTS = 16, 8, 10, 8
# A sharded run vs the single-device one: only float32 summation order differs. The loss within
# 1e-5 (relative); every gradient leaf within 1e-4 of its largest entry (floored at 1e-3 of the
# model's largest gradient entry, for leaves whose exact gradient is 0); aux losses and routing
# metrics (O(1) fractions) within 1e-5.
LOSS_RTOL, GRAD_RTOL, STATS_ATOL = 1e-5, 1e-4, 1e-5
# Cases: (strategy, mesh_shape); "data" has a one-axis mesh. The default run (BPR): each
# strategy once, on the mesh that splits both axes; the other meshes run in the matrix.
CASES = [
    ("data", None),
    ("expert", (2, 4)),
    ("fsdp", (2, 4)),
    ("expert_fsdp", (2, 4)),
]
# init_sharded vs init in the default run: replicated, and the layout that splits the most
# (experts over 'expert', their largest other dimension over 'data'); the others are extended.
INIT_SHARDED_CASES = ("data", "expert_fsdp")
# The full matrix (`nox -s sharding-matrix`): every strategy on every 8-device mesh, per router.
MESHES = [(1, 8), (2, 4), (4, 2)]
MATRIX_CASES = [("data", None)] + [
    (name, shape) for name in ("expert", "fsdp", "expert_fsdp") for shape in MESHES
]
ROUTERS = ("top_k", "bpr", "hash")  # hash: a plugin router (vmoe-router-hash)
# The matrix also runs the other plugin routers (`nox -s sharding-matrix` installs them), with
# the options each takes; a router not listed gets DEFAULT_OPTIONS.
MATRIX_ROUTERS = (*ROUTERS, "expert_choice", "soft", "dropless")
DEFAULT_OPTIONS = {"k": 2, "capacity_factor": 1.05}
ROUTER_OPTIONS = {
    "soft": {"slots_per_expert": 2},
    "dropless": {"k": 2, "block_size": 8},
}
# Routers the expert strategies refuse, with the message's key phrase: dropless blocks vary in
# number with the load, and an all-to-all carries one static shape.
REFUSED_BY_EXPERT_STRATEGIES = {"dropless": "routes without a capacity (BlockRouting)"}
# Statistics of where a router's work ran, not of its decision: not compared with one device.
LAYOUT_STATISTICS = ("padding_fraction",)  # dropless: the mean of the devices' block layouts


def expected_expert_shard_shape(strategy_name: str, mesh_shape) -> list[int]:
    """One device's block of the experts' w_in [E=8, 16, 32] under a strategy and mesh.

    expert / expert_fsdp: E / (size of the 'expert' axis) experts per device; expert_fsdp also
    splits the largest other dimension (32) over 'data'; fsdp splits that dimension over its
    second axis and keeps every expert; data replicates everything.
    """
    if strategy_name == "data":
        return [EXPERTS, 16, 32]
    if strategy_name == "fsdp":
        return [EXPERTS, 16, 32 // mesh_shape[1]]
    hidden = 32 // mesh_shape[0] if strategy_name == "expert_fsdp" else 32
    return [EXPERTS // mesh_shape[1], 16, hidden]


def model(exchange=None, group_size=34, router="bpr") -> vl.VisionTransformer:
    """2 blocks (dense, then MoE with 8 experts), K=2 (BPR by default), dropout on, groups of 2
    images."""
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
            router=router,
            router_options=ROUTER_OPTIONS.get(router, DEFAULT_OPTIONS),
            group_size=group_size,  # 2 images x 17 tokens
        ),
        exchange=exchange,
    )


def batch() -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(0)
    images = rs.normal(size=(NUM_IMAGES, IMAGE, IMAGE, 1)).astype(np.float32)
    return images, np.arange(NUM_IMAGES, dtype=np.int32) % CLASSES


@functools.cache
def initial_params(router: str = "bpr") -> dict:
    """`model(router=router).init` on the whole batch, as numpy arrays: compiled once per
    process and router (a new `jax.jit(model().init)` traces and compiles again, 2.6 s; routers
    differ in their params). Read-only: callers copy."""
    images, _ = batch()
    params = jax.jit(model(router=router).init)(jax.random.key(0), images)["params"]
    return jax.tree.map(np.asarray, params)


def init_params(router: str = "bpr") -> dict:
    """`initial_params(router)`, copied, with a random head."""
    params = jax.tree.map(np.copy, initial_params(router))
    # The head starts at zero; a random one makes the loss itself depend on every layer.
    kernel = params["head"]["kernel"]
    params["head"]["kernel"] = np.random.RandomState(1).normal(size=kernel.shape).astype(np.float32)
    return params


def loss_fn(model: vl.VisionTransformer, with_stats: bool = False):
    """(params, images, labels) -> cross-entropy + aux loss, in training mode (noise, dropout);
    with_stats: (loss, {"aux_losses": ..., "metrics": ...}) of the MoE layers."""

    def loss(params, images, labels):
        rng = jax.random.key(42)
        rngs = {"dropout": jax.random.fold_in(rng, 0), "gating": jax.random.fold_in(rng, 1)}
        out = model.apply({"params": params}, images, train=True, rngs=rngs)
        xent = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out.logits), labels[:, None], 1))
        if with_stats:
            return xent + out.aux_loss, {"aux_losses": out.aux_losses, "metrics": out.metrics}
        return xent + out.aux_loss

    return loss


@functools.cache
def jitted_loss():
    """`loss_fn(model())` under jit, one per process (each test that uses it saves a compile)."""
    return jax.jit(loss_fn(model()))


@functools.cache
def single_device_run(router: str = "bpr", with_stats: bool = False):
    """Loss and gradients on one device, no strategy (computed once per process); with_stats:
    also the MoE layers' aux losses and metrics."""
    params, (images, labels) = init_params(router), batch()
    step = jax.value_and_grad(loss_fn(model(router=router), with_stats), has_aux=with_stats)
    value, grads = jax.jit(step)(params, images, labels)
    grads = jax.tree.map(np.asarray, grads)
    if with_stats:
        return float(value[0]), grads, jax.tree.map(np.asarray, value[1])
    return float(value), grads


def sharded_run(strategy_name: str, mesh_shape=None, router: str = "bpr", **options):
    """Loss, gradients and the MoE layers' aux losses and metrics with a strategy; also the
    compiled HLO text (to look for all-to-all)."""
    if mesh_shape is not None:
        options["mesh_shape"] = mesh_shape
    strategy = vl.get_strategy(strategy_name, **options)
    params = init_params(router)
    images, labels = batch()
    sharded_params = vl.shard_params(strategy, params)
    sharded_batch = vl.shard_batch(strategy, (images, labels))
    replicated = jax.sharding.NamedSharding(strategy.mesh, jax.sharding.PartitionSpec())
    step = jax.jit(
        jax.value_and_grad(
            loss_fn(model(strategy.exchange, router=router), with_stats=True), has_aux=True
        ),
        out_shardings=((replicated, replicated), jax.tree.map(lambda _: replicated, params)),
    )
    compiled = step.lower(sharded_params, *sharded_batch).compile()
    param_shapes = vl.ParamShapes.of(vl.param_shardings(strategy, params), params)
    (loss, stats), grads = compiled(sharded_params, *sharded_batch)
    local = lambda a: np.asarray(a.addressable_data(0))  # noqa: E731 (replicated: any copy)
    expert_leaf = sharded_params["block_1"]["moe"]["experts"]["w_in"]
    return {
        "loss": float(local(loss)),
        "grads": jax.tree.map(local, grads),
        "stats": jax.tree.map(local, stats),
        "hlo": compiled.as_text(),
        "expert_shard_shape": list(expert_leaf.addressable_shards[0].data.shape),
        # What each device sends, by role: a step routed per device sends no MoE layer arrays.
        "param_shapes": param_shapes,
        "bytes_by_role": vl.bytes_sent_by_role(
            compiled.as_text(), jax.device_count(), param_shapes, statistic_size=EXPERTS
        ),
    }


def stats_max_difference(stats, reference) -> float:
    """max over the aux losses and metrics of |value - reference| (all are O(1) fractions or
    losses, so an absolute difference is the meaningful one), `LAYOUT_STATISTICS` left out."""

    def decision(tree):
        flat = jax.tree_util.tree_leaves_with_path(tree)
        return [v for p, v in flat if str(getattr(p[-1], "key", "")) not in LAYOUT_STATISTICS]

    pairs = zip(decision(stats), decision(reference), strict=True)
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)


def max_relative_difference(grads, reference) -> float:
    """max over leaves of max|g - g_ref| / max(max|g_ref|, 1e-3 * largest |g_ref| of all leaves).

    The floor keeps gradients that are zero in exact arithmetic (attention key biases: softmax
    ignores them, and both runs return rounding noise ~1e-8) from counting as relative errors."""
    leaves = jax.tree.leaves(reference)
    floor = 1e-3 * max(float(np.max(np.abs(r))) for r in leaves)
    worst = 0.0
    for g, r in zip(jax.tree.leaves(grads), leaves, strict=True):
        scale = max(float(np.max(np.abs(r))), floor)
        worst = max(worst, float(np.max(np.abs(g - r))) / scale)
    return worst


# Params made by two programs (e.g. sharded from 2 images vs one device from 16): XLA does not
# promise the same float32 rounding across them; a wrong key or slice is off by O(1) relative.
PARAMS_TOL = {"rtol": 1e-5, "atol": 1e-9}


def init_sharded_matches(strategy_name: str, mesh_shape=None) -> dict:
    """Whether `init_sharded` (from 2 images) gives, on this process's devices, the slices of
    the single-device `model.init` (to float32 rounding) and the layout of the strategy's
    specs."""
    options = {} if mesh_shape is None else {"mesh_shape": mesh_shape}
    strategy = vl.get_strategy(strategy_name, **options)
    images, _ = batch()
    sharded = vl.init_sharded(strategy, model(strategy.exchange), jax.random.key(0), images[:2])
    reference = initial_params()
    specs = strategy.param_specs(sharded)
    values_match = layout_ok = True
    for leaf, ref, spec in zip(
        jax.tree.leaves(sharded), jax.tree.leaves(reference), jax.tree.leaves(specs), strict=True
    ):
        layout_ok &= leaf.sharding == jax.sharding.NamedSharding(strategy.mesh, spec)
        for shard in leaf.addressable_shards:
            values_match &= bool(
                np.allclose(shard.data, np.asarray(ref)[shard.index], **PARAMS_TOL)
            )
    return {"values_match": bool(values_match), "layout_ok": bool(layout_ok)}
