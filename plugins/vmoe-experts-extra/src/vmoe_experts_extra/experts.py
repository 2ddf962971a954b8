"""Expert types beyond the MLP: the null expert, the low-rank expert, experts of mixed widths.

Each follows `vmoe_layers.ExpertType`: `param_specs(d_model)` declares ONE expert's params (the
layer stacks E of them), `__call__(params, x_etd, *, dtype)` applies the E experts to their
buffers [E, T, D]. Every factory takes `mlp_dim` (the models pass it to every expert type).

Shape legend: E experts, T tokens per expert, D model dim, H hidden (mlp_dim), R rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

import vmoe_layers
import vmoe_plugins

Array = jax.Array
ParamSpec = vmoe_layers.ParamSpec
_kernel_init = jax.nn.initializers.xavier_uniform()
_bias_init = jax.nn.initializers.normal(stddev=1e-6)


def _check_activation(activation: Any) -> None:
    vmoe_plugins.check_choice("activation", activation, tuple(sorted(vmoe_layers.ACTIVATIONS)))


@dataclasses.dataclass(frozen=True)
class IdentityExperts:
    """The null expert: returns its input, with no parameters and no FLOPs.

    A token routed to it skips the feed-forward compute (its MoE output is the token itself
    times the combine weight), the "conditional variable-length route" of the V-MoE seed.
    `mlp_dim` is accepted for the models' sake and unused.
    """

    name: ClassVar[str] = "identity"

    mlp_dim: int = 0

    def param_specs(self, d_model: int) -> dict[str, ParamSpec]:
        del d_model
        return {}

    def __call__(self, params: Mapping[str, Array], x_etd: Array, *, dtype: Any) -> Array:
        del params
        return x_etd.astype(dtype)


@dataclasses.dataclass(frozen=True)
class LowRankExperts:
    """An MLP whose two matrices are rank-R products: act(x U_in V_in + b_in) U_out V_out + b_out.

    Params per expert: u_in [D, R], v_in [R, H], b_in [H], u_out [H, R], v_out [R, D], b_out [D]:
    R*(2D + 2H) + H + D weights instead of 2*D*H + H + D; the FLOPs shrink the same way.

    Attributes:
      mlp_dim: H.
      rank: R, 1 <= R; default max(1, H // 8).
      activation: one of `vmoe_layers.ACTIVATIONS` (default GELU).
    """

    name: ClassVar[str] = "low_rank"

    mlp_dim: int
    rank: int | None = None
    activation: str = "gelu"

    def __post_init__(self) -> None:
        h = vmoe_plugins.check_int("mlp_dim", self.mlp_dim, low=1)
        rank = max(1, h // 8) if self.rank is None else self.rank
        object.__setattr__(self, "mlp_dim", h)
        object.__setattr__(self, "rank", vmoe_plugins.check_int("rank", rank, low=1))
        _check_activation(self.activation)

    def param_specs(self, d_model: int) -> dict[str, ParamSpec]:
        h, r = self.mlp_dim, self.rank
        return {
            "u_in": ParamSpec((d_model, r), _kernel_init),
            "v_in": ParamSpec((r, h), _kernel_init),
            "b_in": ParamSpec((h,), _bias_init),
            "u_out": ParamSpec((h, r), _kernel_init),
            "v_out": ParamSpec((r, d_model), _kernel_init),
            "b_out": ParamSpec((d_model,), _bias_init),
        }

    def __call__(self, params: Mapping[str, Array], x_etd: Array, *, dtype: Any) -> Array:
        p = {name: value.astype(dtype) for name, value in params.items()}
        low = jnp.einsum("etd,edr->etr", x_etd.astype(dtype), p["u_in"])
        h_eth = jnp.einsum("etr,erh->eth", low, p["v_in"]) + p["b_in"][:, None]
        h_eth = vmoe_layers.ACTIVATIONS[self.activation](h_eth)
        low = jnp.einsum("eth,ehr->etr", h_eth, p["u_out"])
        return jnp.einsum("etr,erd->etd", low, p["v_out"]) + p["b_out"][:, None]


@dataclasses.dataclass(frozen=True)
class MixedWidthExperts:
    """Experts of different widths in one layer; width 0 is the null (identity) expert.

    Expert e is an MLP (Dense -> activation -> Dense, with biases) of hidden width `widths[e]`,
    or returns its input when `widths[e]` is 0. The layer stacks params of equal shapes, so each
    expert holds the widest expert's matrices and masks its hidden units past its own width:
    those units output 0 and get zero gradients, so expert e behaves (and trains) exactly like an
    MLP of width `widths[e]`. Compute and memory are those of the widest expert, in this dense
    form; what the mixture changes is capacity per expert, not FLOPs.

    The widths are per expert, so the type needs all E experts in one call: the expert
    sharding strategy (E/n experts per device) is refused with an error.

    Attributes:
      mlp_dim: the models' hidden width; every width must be <= it (it sets the stacked shape).
      widths: one width per expert, 0 <= width <= mlp_dim; its length must be the layer's E.
      activation: one of `vmoe_layers.ACTIVATIONS`.
    """

    name: ClassVar[str] = "mixed_width"

    mlp_dim: int
    widths: tuple[int, ...] = ()
    activation: str = "gelu"

    def __post_init__(self) -> None:
        h = vmoe_plugins.check_int("mlp_dim", self.mlp_dim, low=1)
        if isinstance(self.widths, (str, bytes)) or not hasattr(self.widths, "__len__"):
            raise ValueError(f"widths={self.widths!r} must be a sequence of ints, one per expert")
        if not self.widths:
            raise ValueError("widths=() must name one width per expert, e.g. (128, 64, 0, 0)")
        widths = tuple(
            vmoe_plugins.check_int(f"widths[{i}]", w, low=0, high=h)
            for i, w in enumerate(self.widths)
        )
        object.__setattr__(self, "mlp_dim", h)
        object.__setattr__(self, "widths", widths)
        _check_activation(self.activation)

    def param_specs(self, d_model: int) -> dict[str, ParamSpec]:
        return vmoe_layers.MlpExperts(self.mlp_dim, self.activation).param_specs(d_model)

    def hidden_mask(self) -> Array:
        """[E, H] float32: 1 for the hidden units each expert has."""
        return (jnp.arange(self.mlp_dim)[None, :] < jnp.array(self.widths)[:, None]).astype(
            jnp.float32
        )

    def __call__(self, params: Mapping[str, Array], x_etd: Array, *, dtype: Any) -> Array:
        e = x_etd.shape[0]
        if e != len(self.widths):
            raise ValueError(
                f"mixed_width experts got {e} experts in one call but widths has "
                f"{len(self.widths)} entries: widths must have one entry per expert of the layer, "
                "and all experts must run in one call (the 'expert' sharding strategy splits "
                "them; use 'data' or 'fsdp')"
            )
        mask = self.hidden_mask().astype(dtype)[:, None, :]  # [E, 1, H]
        mlp = vmoe_layers.MlpExperts(self.mlp_dim, self.activation)
        y_etd = mlp(params, x_etd, dtype=dtype, hidden=lambda h_eth: h_eth * mask)
        is_null = (jnp.array(self.widths) == 0)[:, None, None]
        return jnp.where(is_null, x_etd.astype(dtype), y_etd)
