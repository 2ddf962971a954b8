"""Expert types: the feed-forward function each expert applies, with its parameters declared.

An expert type describes ONE expert's parameters (`param_specs`) and applies a whole stack of E
experts at once: params carry a leading expert axis and the tokens come in as per-expert buffers
`x_etd` [E, T, D] (T tokens per expert: groups x capacity), so the work is one batched matmul
per weight (`einsum("etd,edh->eth")`), not a loop over experts.

Built-ins:
  mlp  Dense -> activation (GELU) -> Dense, with biases: the ViT MLP block.
  glu  gated linear unit without biases, SwiGLU by default: (act(x Wg) * (x Wu)) Wo.

Shape legend: E experts, T tokens per expert, D model dim, H hidden (mlp_dim).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from vmoe_plugins import Registry, check_int

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]
Hidden = Callable[[Array], Array] | None  # applied to the hidden activations [E, T, H]

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": jax.nn.gelu,  # tanh approximation, as flax.linen.gelu and the ViT MLP
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One parameter of one expert: its shape (without the expert axis) and initialiser.

    `init(key, shape, dtype)` follows `jax.nn.initializers`. The MoE layer initialises each of
    the E experts with its own key, so fan-in based initialisers see one expert's shape.
    """

    shape: tuple[int, ...]
    init: Initializer


@runtime_checkable
class ExpertType(Protocol):
    """What an expert type provides (built-in or from a plugin)."""

    def param_specs(self, d_model: int) -> Mapping[str, ParamSpec]:
        """One expert's parameters for tokens of width d_model, by name."""
        ...

    def __call__(self, params: Mapping[str, Array], x_etd: Array, *, dtype: Any) -> Array:
        """Applies E experts: params with a leading E axis, x [E, T, D] -> [E, T, D].

        A type may also take `hidden=fn` (keyword, default None) and apply fn to its hidden
        activations [E, T, H] before the output projection: the dense ViT MLP passes its
        hidden dropout that way. Types without it are called without it (no hidden dropout).
        """
        ...


def init_stacked(spec: ParamSpec, key: Array, num_experts: int, dtype: Any) -> Array:
    """[E, *spec.shape]: E independent draws of `spec.init`, one key per expert."""
    keys = jax.random.split(key, num_experts)
    return jax.vmap(lambda k: spec.init(k, spec.shape, dtype))(keys)


def init_shared(spec: ParamSpec, key: Array, num_experts: int, dtype: Any) -> Array:
    """[E, *spec.shape]: one draw of `spec.init` copied to all E experts."""
    one = spec.init(key, spec.shape, dtype)
    return jnp.broadcast_to(one[None], (num_experts, *spec.shape))


def _check_mlp_options(experts: Any) -> None:
    """Checks mlp_dim and activation of a frozen expert type; mlp_dim becomes a Python int."""
    # The shared rule: numpy integers are integers (kept as a plain int: it is a shape and a
    # static field), bools are not.
    mlp_dim = check_int("mlp_dim", experts.mlp_dim, low=1)
    object.__setattr__(experts, "mlp_dim", mlp_dim)
    activation = experts.activation
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not one of {sorted(ACTIVATIONS)}")


_kernel_init = jax.nn.initializers.xavier_uniform()
_bias_init = jax.nn.initializers.normal(stddev=1e-6)


@dataclasses.dataclass(frozen=True)
class MlpExperts:
    """Dense(mlp_dim) -> activation -> Dense(d_model), with biases (the ViT MLP block).

    Params per expert: w_in [D, H], b_in [H], w_out [H, D], b_out [D].
    """

    name: ClassVar[str] = "mlp"

    mlp_dim: int
    activation: str = "gelu"

    def __post_init__(self) -> None:
        _check_mlp_options(self)

    def param_specs(self, d_model: int) -> dict[str, ParamSpec]:
        h = self.mlp_dim
        return {
            "w_in": ParamSpec((d_model, h), _kernel_init),
            "b_in": ParamSpec((h,), _bias_init),
            "w_out": ParamSpec((h, d_model), _kernel_init),
            "b_out": ParamSpec((d_model,), _bias_init),
        }

    def __call__(
        self, params: Mapping[str, Array], x_etd: Array, *, dtype: Any, hidden: Hidden = None
    ) -> Array:
        p = {name: value.astype(dtype) for name, value in params.items()}
        h_eth = jnp.einsum("etd,edh->eth", x_etd.astype(dtype), p["w_in"]) + p["b_in"][:, None]
        h_eth = ACTIVATIONS[self.activation](h_eth)
        if hidden is not None:
            h_eth = hidden(h_eth)
        return jnp.einsum("eth,ehd->etd", h_eth, p["w_out"]) + p["b_out"][:, None]


@dataclasses.dataclass(frozen=True)
class GluExperts:
    """Gated linear unit, no biases: (act(x Wg) * (x Wu)) Wo. SwiGLU with activation="silu".

    Params per expert: w_gate [D, H], w_up [D, H], w_out [H, D].
    """

    name: ClassVar[str] = "glu"

    mlp_dim: int
    activation: str = "silu"

    def __post_init__(self) -> None:
        _check_mlp_options(self)

    def param_specs(self, d_model: int) -> dict[str, ParamSpec]:
        h = self.mlp_dim
        return {
            "w_gate": ParamSpec((d_model, h), _kernel_init),
            "w_up": ParamSpec((d_model, h), _kernel_init),
            "w_out": ParamSpec((h, d_model), _kernel_init),
        }

    def __call__(
        self, params: Mapping[str, Array], x_etd: Array, *, dtype: Any, hidden: Hidden = None
    ) -> Array:
        p = {name: value.astype(dtype) for name, value in params.items()}
        x_etd = x_etd.astype(dtype)
        gate_eth = ACTIVATIONS[self.activation](jnp.einsum("etd,edh->eth", x_etd, p["w_gate"]))
        h_eth = gate_eth * jnp.einsum("etd,edh->eth", x_etd, p["w_up"])
        if hidden is not None:
            h_eth = hidden(h_eth)
        return jnp.einsum("eth,ehd->etd", h_eth, p["w_out"])


# The expert types of the vmoe repository's plugin packages (plugins/): a config naming one
# while its package is not installed is told which package to install.
PLUGIN_EXPERT_TYPES = {
    "identity": "vmoe-experts-extra",
    "low_rank": "vmoe-experts-extra",
    "mixed_width": "vmoe-experts-extra",
}

EXPERT_TYPES: Registry[ExpertType] = Registry(
    "vmoe_expert_types",
    "expert type",
    members=("param_specs", "__call__"),
    known=PLUGIN_EXPERT_TYPES,
)


def get_expert_type(name: str, **options: Any) -> ExpertType:
    """The expert type registered as `name`, built with `options` (e.g. mlp_dim=2048)."""
    return EXPERT_TYPES.create(name, **options)


def available_expert_types() -> list[str]:
    """Names of every installed expert type (built-ins and plugins), sorted."""
    return EXPERT_TYPES.names()
