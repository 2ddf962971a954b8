"""The hash router plugin: found through its entry point only, deterministic, balanced, valid."""

import jax.numpy as jnp
import numpy as np
import pytest

import vmoe_routing
import vmoe_routing as vr
from vmoe_router_hash import HashRouter
from vmoe_router_hash.router import mix32


def test_registered_through_its_entry_point():
    assert "hash" in vmoe_routing.available_routers()
    provider = vmoe_routing.ROUTERS.provider("hash")
    assert provider.startswith(
        'hash (entry point "hash = vmoe_router_hash.plugin" from vmoe-router-hash'
    )
    assert isinstance(vmoe_routing.get_router("hash", num_experts=4), HashRouter)


def test_same_position_same_experts_in_every_group_and_call():
    router = HashRouter(num_experts=8, k=2, capacity_factor=4.0)
    x = jnp.zeros((3, 32, 5))
    a = router({}, x)
    b = router({}, x + 1.0, deterministic=False)  # inputs and mode do not matter
    np.testing.assert_array_equal(a.expert, b.expert)
    assert (a.expert == a.expert[:1]).all()
    expected = router.experts_for_positions(32)  # [S, K]
    np.testing.assert_array_equal(a.expert[0].reshape(2, 32).T, expected)


def test_choices_of_a_position_are_distinct_and_seed_dependent():
    experts = np.asarray(HashRouter(num_experts=6, k=3).experts_for_positions(100))
    assert all(len(set(row)) == 3 for row in experts.tolist())
    other = np.asarray(HashRouter(num_experts=6, k=3, seed=1).experts_for_positions(100))
    assert (experts != other).any()


def test_positions_spread_evenly_over_experts():
    experts = np.asarray(HashRouter(num_experts=8).experts_for_positions(4096))[:, 0]
    counts = np.bincount(experts, minlength=8)
    assert counts.min() > 0.85 * 512 and counts.max() < 1.15 * 512, counts


def test_capacity_and_weights():
    router = HashRouter(num_experts=4, k=2, capacity_factor=0.5)
    routing = router({}, jnp.ones((2, 16, 3)))
    assert routing.capacity == 4  # ceil(2 * 0.5 * 16 / 4)
    for g in range(2):
        kept = np.asarray(routing.expert[g])[np.asarray(routing.valid[g])]
        assert np.bincount(kept, minlength=4).max() <= 4
    np.testing.assert_allclose(routing.weight[routing.valid], 0.5)
    assert float(routing.aux_loss) == 0.0


def test_dispatch_and_combine_match_the_dense_reference():
    router = HashRouter(num_experts=4, k=2, capacity_factor=0.75)
    x = jnp.arange(2 * 12 * 3, dtype=jnp.float32).reshape(2, 12, 3)
    routing = router({}, x)
    y = vmoe_routing.dispatch(x, routing) * 2.0
    np.testing.assert_allclose(
        vmoe_routing.combine(y, routing), vmoe_routing.combine(y, routing.to_dense()), rtol=1e-6
    )


def test_mix32_is_a_bijection_on_a_sample():
    values = np.asarray(mix32(jnp.arange(1 << 16, dtype=jnp.uint32)))
    assert len(np.unique(values)) == 1 << 16


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(num_experts=4, k=5), "k=5 must be <= num_experts=4"),
        (dict(num_experts=4, seed=-1), r"seed=-1 must be an integer in \[0, 4294967295\]"),
        (dict(num_experts=4, capacity_factor=0), "capacity_factor=0 must be a finite number > 0"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        vmoe_routing.get_router("hash", **options)


def test_wrong_rank_of_x():
    with pytest.raises(ValueError, match="x must have rank 3"):
        HashRouter(num_experts=2)({}, jnp.ones((4, 3)))


def test_capacity_uses_the_shared_rounding_and_multiple_of():
    # The plugin once re-implemented capacity selection and ignored these two options.
    x = jnp.ones((1, 16, 3))
    router = HashRouter(num_experts=4, k=1, capacity_factor=0.3, capacity_multiple_of=4)
    assert router(router.init(None, 3), x).capacity == 4  # ceil(0.3 * 16 / 4) = 2 -> 4
    floor = router.replace(capacity_rounding="floor", capacity_multiple_of=1)
    assert floor(floor.init(None, 3), x).capacity == 1  # floor(1.2)
    assert floor.capacity(16) == vr.TopKRouter(
        num_experts=4, capacity_factor=0.3, capacity_rounding="floor"
    ).capacity(16)
