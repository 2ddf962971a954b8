"""vmoe-layers applies the shared option rule (vmoe_plugins): numpy integers are integers (and
become plain ints where they are shapes or static fields), bools are not; per-call capacity
factors reach the router exactly as given; router option errors are one-line ValueErrors."""

from __future__ import annotations

import dataclasses
import decimal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_layers as vl
import vmoe_routing
from vmoe_layers.moe import override_router

D = 6


# Expert types: mlp_dim.


@pytest.mark.parametrize("name", ["mlp", "glu"])
def test_a_numpy_integer_mlp_dim_is_accepted_as_a_plain_int(name):
    # Was "mlp_dim=8 must be an integer >= 1" (an isinstance(int) check).
    experts = vl.get_expert_type(name, mlp_dim=np.int64(8))
    assert experts.mlp_dim == 8 and type(experts.mlp_dim) is int
    assert experts == vl.get_expert_type(name, mlp_dim=8)


@pytest.mark.parametrize("name", ["mlp", "glu"])
@pytest.mark.parametrize("mlp_dim", [True, np.bool_(True), 8.0, "8"])
def test_a_bool_or_non_integer_mlp_dim_is_refused(name, mlp_dim):
    # mlp_dim=True was accepted (a bool is an int).
    with pytest.raises(ValueError, match=r"^mlp_dim=.* must be an integer >= 1$"):
        vl.get_expert_type(name, mlp_dim=mlp_dim)


def test_moe_layer_takes_a_numpy_mlp_dim_and_refuses_a_bool():
    x = jnp.ones((1, 8, D))
    params = vl.MoeLayer(4, np.int64(8)).init(jax.random.key(0), x)["params"]
    assert params["experts"]["w_in"].shape == (4, D, 8)
    with pytest.raises(ValueError, match=r"^mlp_dim=True must be an integer >= 1"):
        vl.MoeLayer(4, True).init(jax.random.key(0), x)


# Sharding: mesh shapes and min_size.


def test_a_mesh_shape_of_numpy_integers_is_accepted():
    # Was "mesh_shape=(1,) must be positive integers" for np.int64(1).
    mesh = vl.make_mesh((np.int64(1),), ("data",), jax.devices()[:1])
    assert mesh.devices.shape == (1,)
    assert vl.get_strategy("fsdp", mesh_shape=np.array([1, 1])).mesh.devices.shape == (1, 1)


@pytest.mark.parametrize("bad", [True, 1.0, 0])
def test_a_mesh_shape_of_bools_or_floats_is_refused(bad):
    with pytest.raises(ValueError, match=r"must be positive integers, one per axis"):
        vl.make_mesh((bad,), ("data",), jax.devices()[:1])


def test_fsdp_min_size_follows_the_shared_rule():
    strategy = vl.get_strategy("fsdp", min_size=np.int64(16))
    assert strategy.min_size == 16 and type(strategy.min_size) is int
    for bad in (True, -1, 16.0):
        with pytest.raises(ValueError, match=rf"^min_size={bad!r} must be an integer >= 0$"):
            vl.get_strategy("fsdp", min_size=bad)


# Placement: block indices.


def test_numpy_block_indices_are_accepted_as_plain_ints():
    # np.int64 indices were "out of range" (an isinstance(int) check).
    indices = vl.moe_block_indices([np.int64(3), np.int32(1)], 8)
    assert indices == (1, 3) and all(type(i) is int for i in indices)
    with pytest.raises(ValueError, match=r"moe layer index True is out of range"):
        vl.moe_block_indices([True], 8)
    with pytest.raises(ValueError, match=r"moe layers \[1, 1\] name a block twice"):
        vl.moe_block_indices([np.int64(1), 1], 8)


# group_tokens.


def test_group_size_follows_the_shared_rule():
    x = jnp.ones((2, 8, D))
    assert vl.group_tokens(x, np.int64(4)).shape == (4, 4, D)
    for bad in (True, np.bool_(True), 4.0):
        with pytest.raises(ValueError, match=r"must be an integer >= 1, or None"):
            vl.group_tokens(x, bad)


# Per-call overrides: k and capacity_factor.


def test_a_per_call_numpy_capacity_factor_keeps_exact_capacity():
    # override_router did float(np.float32(1.1)) = 1.100000023841858: capacity(200) was 56.
    router = vmoe_routing.TopKRouter(num_experts=4)
    expected = router.replace(capacity_factor=np.float32(1.1)).capacity(200)
    assert expected == 55
    assert override_router(router, capacity_factor=np.float32(1.1)).capacity(200) == 55
    assert override_router(router, capacity_factor=decimal.Decimal("1.1")).capacity(200) == 55
    overridden = override_router(router, k=np.int64(2), capacity_factor=np.float32(1.1))
    assert overridden.k == 2 and type(overridden.k) is int


def test_a_per_call_capacity_factor_in_the_layer_is_exact():
    # Identical tokens all pick the same expert: it keeps `capacity` of the 200, the rest drop.
    layer = vl.MoeLayer(4, 8, router="top_k", router_options={"k": 1})
    x = jnp.ones((1, 200, D))
    params = layer.init(jax.random.key(0), x)["params"]
    out = layer.apply({"params": params}, x, k=1, capacity_factor=np.float32(1.1))
    assert float(out.metrics["dropped_fraction"]) == pytest.approx((200 - 55) / 200)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": True}, r"^k=True must be an integer >= 1$"),
        ({"k": 0}, r"^k=0 must be an integer >= 1$"),
        ({"capacity_factor": True}, r"^capacity_factor=True must be a finite number > 0$"),
        ({"capacity_factor": -1.0}, r"^capacity_factor=-1.0 must be a finite number > 0$"),
        ({"capacity_factor": "1.1"}, r"^capacity_factor='1.1' must be a finite number > 0$"),
        ({"capacity_factor": jnp.float32(1.1)}, r"must be a static Python number"),
    ],
)
def test_bad_per_call_overrides_are_one_line_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        override_router(vmoe_routing.TopKRouter(num_experts=4), **options)


# Router objects with options.


def test_an_unknown_option_for_a_router_object_lists_its_fields():
    # Was a raw TypeError from dataclasses.replace.
    layer = vl.MoeLayer(
        4, 8, router=vmoe_routing.TopKRouter(num_experts=4), router_options={"noise": 0.5}
    )
    with pytest.raises(ValueError) as error:
        layer.make_router()
    message = str(error.value)
    assert message.startswith(
        "unknown router option(s) ['noise'] for router TopKRouter; allowed: ['num_experts', 'k', "
    )
    assert "'noise_std'" in message and "\n" not in message


class Fussy:
    """A router that is not a dataclass; its replace() takes only k."""

    num_experts = 4

    def init(self, rng, d_model):
        return {}

    def __call__(self, params, x_gsd, *, rng=None, deterministic=True):
        raise NotImplementedError

    def replace(self, *, k=None):
        return self


def test_an_option_refused_by_a_non_dataclass_router_says_replace_refused_it():
    layer = vl.MoeLayer(4, 8, router=Fussy(), router_options={"noise_std": 0.5})
    with pytest.raises(
        ValueError,
        match=r"^router Fussy\.replace\(\) refused the option\(s\) \['noise_std'\]: .*noise_std",
    ):
        layer.make_router()


def test_not_a_router_message_uses_the_right_article():
    # Said "a object without [...]".
    layer = vl.MoeLayer(4, 8, router=object())
    with pytest.raises(ValueError, match=r"neither a router name nor a router: an object without"):
        layer.make_router()

    @dataclasses.dataclass(frozen=True)
    class Gate:
        num_experts: int = 4

    layer = vl.MoeLayer(4, 8, router=Gate())
    with pytest.raises(ValueError, match=r"a Gate without \['init', '__call__', 'replace'\]"):
        layer.make_router()
