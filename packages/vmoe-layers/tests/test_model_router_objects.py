"""Router objects and gate precision at the model level (create_model / VisionTransformer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from test_router_api import _gate_dot_inputs

import vmoe_layers as vl
import vmoe_routing


def test_create_model_takes_num_experts_from_a_router_object():
    router = vmoe_routing.BprRouter(num_experts=8, k=2)
    model = vl.create_model("V-MoE-Nano/4", num_classes=3, router=router)
    assert model.moe.num_experts == 8
    images = jnp.zeros((2, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    assert params["block_1"]["moe"]["experts"]["w_in"].shape[0] == 8


def test_create_model_refuses_a_router_object_with_another_num_experts():
    with pytest.raises(ValueError, match=r"has num_experts=8 but num_experts=4; they must be"):
        vl.create_model(
            "V-MoE-Nano/4", num_classes=3, num_experts=4, router=vmoe_routing.TopKRouter(8)
        )


def test_a_bfloat16_model_gates_in_float32():
    # Was: the MoE block's LayerNorm returned bfloat16, so the router's float32 gate saw rounded
    # tokens (float32 -> bfloat16 -> float32) even though the layer itself routes before casting.
    model = vl.create_model(
        "V-MoE-Nano/4",
        num_classes=3,
        dtype=jnp.bfloat16,
        router_options={"gate_dtype": jnp.float32},
    )
    images = jnp.zeros((2, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    jaxpr = jax.make_jaxpr(lambda p, x: model.apply({"params": p}, x))(params, images).jaxpr
    gates = _gate_dot_inputs(jaxpr, 32, 4)
    assert len(gates) == 1  # one MoE block
    for chain, rhs_dtype in gates:
        assert rhs_dtype == jnp.float32
        assert all(dtype == jnp.float32 for dtype in chain), chain
    assert model.apply({"params": params}, images).logits.dtype == jnp.bfloat16
