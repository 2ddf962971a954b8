"""Routers with state: the optional members of the router protocol, and how they are told apart."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

import vmoe_routing as vr


@dataclasses.dataclass(frozen=True)
class CountingRouter(vr.TopKRouter):
    """top_k that counts the training steps it was updated after (state, not routing with it)."""

    def init_state(self, d_model):
        return {"steps": jnp.zeros((), jnp.int32)}

    def __call__(self, params, x_gsd, *, rng=None, deterministic=True, state=None):
        return super().__call__(params, x_gsd, rng=rng, deterministic=deterministic)

    def update_state(self, state, metrics):
        return {"steps": state["steps"] + 1}


def test_the_state_members_are_named():
    assert vr.ROUTER_STATE_MEMBERS == ("init_state", "update_state")


def test_a_router_with_both_state_members_has_state():
    router = CountingRouter(num_experts=4)
    assert vr.has_state(router)
    assert isinstance(router, vr.StatefulRouter) and isinstance(router, vr.Router)


@pytest.mark.parametrize(
    "router", [vr.TopKRouter(num_experts=4), vr.BprRouter(num_experts=4, k=2)], ids=str
)
def test_the_built_in_routers_have_no_state(router):
    assert not vr.has_state(router)
    assert not isinstance(router, vr.StatefulRouter)


@pytest.mark.parametrize("member", vr.ROUTER_STATE_MEMBERS)
def test_a_router_with_one_state_member_only_is_refused(member):
    @dataclasses.dataclass(frozen=True)
    class Half(vr.TopKRouter):
        pass

    setattr(Half, member, lambda self, *args: None)
    other = next(m for m in vr.ROUTER_STATE_MEMBERS if m != member)
    with pytest.raises(ValueError, match=f"has {member} but not {other}; a router with state"):
        vr.has_state(Half(num_experts=4))


def test_update_state_takes_the_routing_metrics():
    router = CountingRouter(num_experts=4, k=2)
    params, state = {"gate": jnp.eye(3, 4)}, router.init_state(3)
    routing = router(params, jnp.ones((2, 5, 3)), state=state)
    assert "expert_load" in routing.metrics  # what a balancing router updates from
    assert int(router.update_state(state, routing.metrics)["steps"]) == 1


def test_the_aux_free_plugin_is_a_known_plugin_router():
    # Not installed, its name is still known: looking it up says which package to install.
    assert vr.PLUGIN_ROUTERS["aux_free"] == "vmoe-router-aux-free"
