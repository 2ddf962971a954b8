"""FLOPs of a MoE layer per token, counted from the programs it runs.

    report = vl.layer_flops(layer, d_model=64, group_size=136)
    report.router, report.expert, report.routed, report.buffers, report.branches, report.total

Counted: the matrix multiplications (every `dot_general` in the traced program, 2 FLOPs per
multiply-add), which dominate; element-wise work (activations, biases, softmax) is not. The
count is read off the jaxpr of what the layer calls, so it holds for any router, expert type
or variant a plugin brings, with nothing for the plugin to declare.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from vmoe_layers.moe import EXPERTS_KEY, ROUTER_KEY, ROUTER_STATE, MoeLayer, override_router
from vmoe_layers.variants import is_branch, make_variants


def matmul_flops(fn: Any, *args: Any) -> int:
    """2 x the multiply-adds of every dot_general `fn(*args)` runs (args may be
    ShapeDtypeStructs), nested calls (jit, remat, custom derivatives, scans x their length)
    included."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_flops(jaxpr: Any) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            out_shape = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in contract_lhs)
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for sub in _subjaxprs(eqn.params):
            total += times * _jaxpr_flops(sub)
    return total


def _subjaxprs(params: dict) -> list[Any]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jex_core.Jaxpr):
                found.append(item)
    return found


@dataclasses.dataclass(frozen=True)
class LayerFlops:
    """FLOPs per token of one MoE layer (matmuls; see the module docstring).

    Attributes:
      router: the router's (the gate, D x E).
      expert: one routed expert applied to one token.
      k: the choices per token (None for routers without K, e.g. soft routing).
      routed: the experts a token chose: k x expert (None without K).
      capacity: C, the buffer slots per expert and group (None for routers without one).
      buffers: what the experts compute per token with capacity buffers, filled or not:
        E x C x expert / S (None without a capacity; then `routed` is the cost).
      branches: {variant name: FLOPs per token} of the variants' branches (shared experts).
      total: measured on the whole layer's program: router + (buffers, else routed) + the
        branches, for the layers of this package (tested).
    """

    router: int
    expert: int
    k: int | None
    routed: int | None
    capacity: int | None
    buffers: float | None
    branches: dict[str, float]
    total: float


def layer_flops(
    layer: MoeLayer, d_model: int, group_size: int, *, capacity_factor: float | None = None
) -> LayerFlops:
    """The FLOPs per token of `layer` (unbound) in evaluation mode, for tokens of width
    `d_model` in routing groups of `group_size` tokens, at the router's evaluation capacity or
    `capacity_factor` (e.g. the training one, to count a training step's experts)."""
    s, d = group_size, d_model
    x = jax.ShapeDtypeStruct((1, s, d), jnp.float32)
    layer = layer.clone(group_size=s)
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)

    def forward(v, x):
        return layer.apply(v, x, capacity_factor=capacity_factor).output

    total = matmul_flops(forward, variables, x) / s

    router = override_router(layer.make_router(), None, capacity_factor)
    # The router's state (a balancing bias) is an argument: traced, like its params.
    state = variables.get(ROUTER_STATE, {}).get(ROUTER_KEY)

    def route(p, state, x):
        return router(p, x, deterministic=True, **({} if state is None else {"state": state}))

    router_params = variables["params"][ROUTER_KEY]
    router_flops = matmul_flops(route, router_params, state, x)
    routing = jax.eval_shape(route, router_params, state, x)

    experts = layer.make_experts()
    one_expert = {
        name: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype)
        for name, v in variables["params"][EXPERTS_KEY].items()
    }
    token = jax.ShapeDtypeStruct((1, 1, d), jnp.float32)
    expert_flops = matmul_flops(lambda p, x: experts(p, x, dtype=jnp.float32), one_expert, token)
    k = getattr(router, "k", None)
    capacity = getattr(routing, "capacity", None)
    capacity = None if capacity is None else int(capacity)
    e = router.num_experts
    buffers = None if capacity is None else e * capacity * expert_flops / s

    branches = {}
    shape = layer.layer_shape()
    for name, variant in make_variants(layer.variants):
        if is_branch(variant):

            def branch(p, x, variant=variant):
                return variant(p, x, shape=shape, dtype=jnp.float32)

            branches[name] = matmul_flops(branch, variables["params"][name], x) / s
    return LayerFlops(
        router=router_flops // s,
        expert=expert_flops,
        k=None if k is None else int(k),
        routed=None if k is None else int(k) * expert_flops,
        capacity=capacity,
        buffers=buffers,
        branches=branches,
        total=total,
    )
