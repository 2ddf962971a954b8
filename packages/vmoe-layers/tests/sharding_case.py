"""One small V-MoE training step, the same in every process: the sharding tests' subject.

Used by the single-device reference (in the pytest process), the 8-host-device worker and the
two-process workers, so all of them compute the same loss and gradients. For a router with state
(`aux_free`), `STATE_STEPS` training steps in a row, each fed the router state the previous one
returned: the last step's loss and gradients, and the final router state, are compared.
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
# hash and aux_free: plugin routers in vmoe-layers' test extra (vmoe-router-hash,
# vmoe-router-aux-free); aux_free has router state.
ROUTERS = ("top_k", "bpr", "hash", "aux_free")
# The matrix also runs the other plugin routers (`nox -s sharding-matrix` installs them), with
# the options each takes; a router not listed gets DEFAULT_OPTIONS.
MATRIX_ROUTERS = (*ROUTERS, "expert_choice", "soft", "dropless", "group_limited")
DEFAULT_OPTIONS = {"k": 2, "capacity_factor": 1.05}
ROUTER_OPTIONS = {
    "soft": {"slots_per_expert": 2},
    "dropless": {"k": 2, "block_size": 8},
    # A rate that moves the selection within a few steps (the gates start near 1/E), and BPR.
    "aux_free": {"k": 2, "capacity_factor": 1.05, "bias_rate": 0.02, "priority_score": "max"},
    # 4 groups of 2 experts, 2 kept per token (on the (2, 4) mesh: one group per expert shard).
    "group_limited": {"k": 2, "capacity_factor": 1.05, "num_expert_groups": 4, "topk_groups": 2},
}
# Routers with state: training steps run in a row, each fed the state the previous returned.
# The default run checks STATEFUL_ROUTER under every strategy once; the matrix, on every mesh.
STATE_STEPS = 3
STATEFUL_ROUTER = "aux_free"
# The router state after STATE_STEPS: the aux_free bias moves by +-bias_rate per step, or 0
# within 1e-6 of the mean load: a wrong join is off by a whole step (0.02).
STATE_ATOL = 1e-6
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
def initial_variables(router: str = "bpr") -> dict:
    """`model(router=router).init` on the whole batch, as numpy arrays: compiled once per
    process and router (a new `jax.jit(model().init)` traces and compiles again, 2.6 s; routers
    differ in their params). Read-only: callers copy."""
    images, _ = batch()
    variables = jax.jit(model(router=router).init)(jax.random.key(0), images)
    return jax.tree.map(np.asarray, dict(variables))


def initial_params(router: str = "bpr") -> dict:
    """The params of `initial_variables(router)` (read-only)."""
    return initial_variables(router)["params"]


def initial_router_state(router: str = "bpr") -> dict:
    """The router state of `initial_variables(router)`, copied; {} for a stateless router."""
    return jax.tree.map(np.copy, initial_variables(router).get(vl.ROUTER_STATE, {}))


def init_params(router: str = "bpr") -> dict:
    """`initial_params(router)`, copied, with a random head."""
    params = jax.tree.map(np.copy, initial_params(router))
    # The head starts at zero; a random one makes the loss itself depend on every layer.
    kernel = params["head"]["kernel"]
    params["head"]["kernel"] = np.random.RandomState(1).normal(size=kernel.shape).astype(np.float32)
    return params


def loss_fn(model: vl.VisionTransformer, with_stats: bool = False):
    """(params, images, labels) -> cross-entropy + aux loss, in training mode (noise, dropout);
    with_stats: (loss, {"aux_losses": ..., "metrics": ...}) of the MoE layers.

    A fourth argument, the router state, makes the router state mutable: with_stats then also
    returns the updated state, as stats["router_state"]."""

    def loss(params, images, labels, router_state=None):
        rng = jax.random.key(42)
        rngs = {"dropout": jax.random.fold_in(rng, 0), "gating": jax.random.fold_in(rng, 1)}
        if router_state is None:
            out = model.apply({"params": params}, images, train=True, rngs=rngs)
        else:
            variables = {"params": params, vl.ROUTER_STATE: router_state}
            out, updated = model.apply(
                variables, images, train=True, rngs=rngs, mutable=[vl.ROUTER_STATE]
            )
        xent = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out.logits), labels[:, None], 1))
        if with_stats:
            stats = {"aux_losses": out.aux_losses, "metrics": out.metrics}
            if router_state is not None:
                stats["router_state"] = updated[vl.ROUTER_STATE]
            return xent + out.aux_loss, stats
        return xent + out.aux_loss

    return loss


def _train_steps(step, params, images, labels, router_state):
    """((loss, stats), grads) of `step` (a value_and_grad of `loss_fn(..., with_stats=True)`),
    run STATE_STEPS times in a row with the router state fed back for a stateful router, once
    for a stateless one (router_state {})."""
    if not router_state:
        return step(params, images, labels)
    for _ in range(STATE_STEPS):
        (loss, stats), grads = step(params, images, labels, router_state)
        router_state = stats["router_state"]
    return (loss, stats), grads


@functools.cache
def jitted_loss():
    """`loss_fn(model())` under jit, one per process (each test that uses it saves a compile)."""
    return jax.jit(loss_fn(model()))


@functools.cache
def single_device_run(router: str = "bpr", with_stats: bool = False):
    """Loss and gradients on one device, no strategy (computed once per process); with_stats:
    also the MoE layers' aux losses and metrics (and, for a router with state, the state after
    STATE_STEPS steps as stats["router_state"]: see `_train_steps`)."""
    params, (images, labels) = init_params(router), batch()
    step = jax.value_and_grad(loss_fn(model(router=router), with_stats), has_aux=with_stats)
    if with_stats:
        value, grads = _train_steps(
            jax.jit(step), params, images, labels, initial_router_state(router)
        )
    else:
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
    # A router's state enters and leaves replicated, as the training state keeps it.
    router_state = initial_router_state(router)
    shardings = vl.router_state_shardings(strategy, router_state)
    router_state = jax.tree.map(jax.device_put, router_state, shardings)
    state_args = (router_state,) if router_state else ()
    step = jax.jit(
        jax.value_and_grad(
            loss_fn(model(strategy.exchange, router=router), with_stats=True), has_aux=True
        ),
        out_shardings=((replicated, replicated), jax.tree.map(lambda _: replicated, params)),
    )
    compiled = step.lower(sharded_params, *sharded_batch, *state_args).compile()
    param_shapes = vl.ParamShapes.of(vl.param_shardings(strategy, params), params)
    (loss, stats), grads = _train_steps(compiled, sharded_params, *sharded_batch, router_state)
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


def without_router_state(stats) -> tuple[dict, dict | None]:
    """(stats without "router_state", the router state or None)."""
    rest = {k: v for k, v in stats.items() if k != "router_state"}
    return rest, stats.get("router_state")


def router_state_max_difference(state, reference) -> float:
    """max over the router state's leaves of |value - reference| (0.0 for no state)."""
    pairs = zip(jax.tree.leaves(state), jax.tree.leaves(reference), strict=True)
    return max((float(np.max(np.abs(np.asarray(a) - b))) for a, b in pairs), default=0.0)


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
