"""Shared experts: N experts every token goes through, beside the routed ones (DeepSeekMoE).

    y = routed(x) + sum_{n < N} expert_n(x)          (weight 1 each: no gate)

A MoE layer variant (`vmoe_layers.variants`) of the branch kind: the layer creates its params
under `shared_experts/` and adds its output to the routed experts' for every token. The N
experts are of any registered expert type (`mlp` by default), each of hidden width `mlp_dim`
(default: the routed experts' width after any reshaping, e.g. fine-grained experts).

How it runs: the N experts' params are stacked along a leading axis (as a MoE layer stacks its
routed experts, each drawn with its own key by `vmoe_layers.experts.init_stacked`), the expert
type runs once on the same tokens broadcast to [N, T, D], and the N outputs are summed. For the
`mlp` type one expert of width N*H computes the same function with the same FLOPs (4 N D H per
token) without the broadcast; the stacked form is kept because it works for every expert type.

Shape legend: N shared experts, T tokens, D model dim, H each shared expert's hidden width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

import vmoe_layers as vl
import vmoe_plugins
from vmoe_layers.experts import ParamSpec, init_stacked

Array = jax.Array

WHERE = "shared_experts: "  # the prefix of every option error


def stacked_spec(spec: ParamSpec, num: int) -> ParamSpec:
    """`spec` of one expert as the spec of `num` stacked experts: shape [num, *spec.shape], and
    an init drawing `num` independent experts, one key each (`init_stacked`)."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
        if tuple(shape[1:]) != tuple(spec.shape):
            raise ValueError(f"shape {shape} is not [N, *{spec.shape}]")
        return init_stacked(spec, key, shape[0], dtype)

    return ParamSpec((num, *spec.shape), init)


@dataclasses.dataclass(frozen=True)
class SharedExperts:
    """`num_shared` experts every token goes through; their outputs are summed (no gate).

    Attributes:
      num_shared: N >= 1.
      mlp_dim: each shared expert's hidden width H; None: the routed experts' width
        (`LayerShape.mlp_dim`, after the other variants' reshaping).
      expert_type: a registered expert type ("mlp", "glu", or a plugin's).
      expert_options: the expert type's options besides mlp_dim (e.g. {"activation": "relu"}).
    """

    name: ClassVar[str] = "shared_experts"

    num_shared: int = 1
    mlp_dim: int | None = None
    expert_type: str = "mlp"
    expert_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        num = vmoe_plugins.check_int("num_shared", self.num_shared, low=1, where=WHERE)
        object.__setattr__(self, "num_shared", num)  # a plain int: it is a shape
        width = self.mlp_dim
        if width is not None:
            if not (vmoe_plugins.is_int(width) and width >= 1):
                raise ValueError(
                    f"{WHERE}mlp_dim={width!r} must be an integer >= 1, or None (the routed "
                    "experts' width)"
                )
            object.__setattr__(self, "mlp_dim", int(width))
        _check_expert_type(self.expert_type)
        options = self.expert_options
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(
                f"{WHERE}expert_options={options!r} must be a mapping of the expert type's "
                "options, or None"
            )
        if options is not None and "mlp_dim" in options:
            raise ValueError(
                f"{WHERE}expert_options={dict(options)!r} must not set mlp_dim; it is the "
                "variant's own option mlp_dim"
            )
        object.__setattr__(self, "expert_options", dict(options or {}))
        if self.mlp_dim is not None:
            self.experts(None)  # the expert type's own checks of its options, now

    def width(self, shape: vl.LayerShape | None) -> int:
        """H: `mlp_dim`, or the routed experts' width."""
        if self.mlp_dim is not None:
            return self.mlp_dim
        if shape is None:
            raise ValueError(f"{WHERE}mlp_dim=None needs the layer's shape (the routed width)")
        return shape.mlp_dim

    def experts(self, shape: vl.LayerShape | None) -> vl.ExpertType:
        """The expert type the N shared experts are, built with their width."""
        options = dict(self.expert_options or {})
        try:
            return vl.get_expert_type(self.expert_type, mlp_dim=self.width(shape), **options)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"{WHERE}expert_type={self.expert_type!r} with expert_options={options!r}: {error}"
            ) from error

    def param_specs(self, d_model: int, shape: vl.LayerShape) -> dict[str, ParamSpec]:
        """The expert type's params, each with a leading N axis: [N, *one expert's shape]."""
        one = self.experts(shape).param_specs(d_model)
        return {name: stacked_spec(spec, self.num_shared) for name, spec in one.items()}

    def __call__(
        self, params: Mapping[str, Array], x: Array, *, shape: vl.LayerShape, dtype: Any
    ) -> Array:
        """x [..., D] -> sum over the N shared experts of expert_n(x), [..., D]."""
        d = x.shape[-1]
        x_td = x.reshape(-1, d)
        x_ntd = jnp.broadcast_to(x_td[None], (self.num_shared, *x_td.shape))
        y_ntd = self.experts(shape)(params, x_ntd, dtype=dtype)
        return jnp.sum(y_ntd, axis=0).reshape(x.shape)


def _check_expert_type(name: Any) -> None:
    if not isinstance(name, str) or name not in vl.available_expert_types():
        hint = vl.EXPERT_TYPES.missing_hint(name) if isinstance(name, str) else ""
        raise ValueError(
            f"{WHERE}expert_type={name!r} is not a registered expert type"
            + (f" ({hint})" if hint else "")
            + f"; allowed: {vl.available_expert_types()}"
        )
