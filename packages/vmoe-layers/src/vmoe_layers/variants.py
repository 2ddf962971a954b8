"""MoE layer variants: what later MoE practice changes around the routed experts, as plugins.

    layer = vl.MoeLayer(num_experts=4, mlp_dim=128,
                        variants={"fine_grained": {"m": 4}, "shared_experts": {"num_shared": 1}})

A variant is registered through the hook `vmoe_moe_variants` (name -> `factory(**options)`) and
does one or both of:

- reshape the routed part (`configure(shape: LayerShape) -> LayerShape`): the number of experts,
  their hidden width and the router's options, before the layer builds its router and experts.
  Fine-grained experts (plugin vmoe-moe-fine-grained): E*m experts of width H/m, K*m choices.
- add a dense branch every token goes through, beside the routed experts: `param_specs(d_model,
  shape) -> {name: ParamSpec}` (created under the layer's params as `<variant name>/<name>`:
  dense parameters, laid out like any non-expert parameter by the sharding strategies) and
  `__call__(params, x, *, shape, dtype) -> y`, [..., D] -> [..., D], added to the layer's output.
  Shared experts (plugin vmoe-moe-shared-experts).

`vmoe_layers.layer_flops` counts a branch's FLOPs from what it runs, beside the router's and the
routed experts'. Variants reshape in the order given; branches see the final shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import jax
from flax.core import FrozenDict

from vmoe_plugins import Registry

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """The routed part of a MoE layer, as variants see and change it.

    Attributes:
      num_experts: E, the routed experts.
      mlp_dim: each routed expert's hidden width H.
      router_options: the router's options as the layer passes them (k, capacity_factor, ...:
        `MoeLayer.router_options`; K is `DEFAULT_ROUTER_OPTIONS`' 2 where not set).
    """

    num_experts: int
    mlp_dim: int
    router_options: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "router_options", FrozenDict(self.router_options or {}))

    def replace(self, **changes: Any) -> LayerShape:
        return dataclasses.replace(self, **changes)


@runtime_checkable
class Reshape(Protocol):
    def configure(self, shape: LayerShape) -> LayerShape: ...


@runtime_checkable
class Branch(Protocol):
    def param_specs(self, d_model: int, shape: LayerShape) -> Mapping[str, Any]: ...

    def __call__(
        self, params: Mapping[str, Array], x: Array, *, shape: LayerShape, dtype: Any
    ) -> Array: ...


# Variants of separately installed plugin packages: asking for one that is not installed says
# which package to install.
PLUGIN_VARIANTS = {
    "fine_grained": "vmoe-moe-fine-grained",
    "shared_experts": "vmoe-moe-shared-experts",
}

VARIANTS: Registry[Any] = Registry("vmoe_moe_variants", "MoE layer variant", known=PLUGIN_VARIANTS)

BRANCH_MEMBERS = ("param_specs", "__call__")


def get_variant(name: str, **options: Any) -> Any:
    """The variant registered as `name`, built with `options`; it must reshape the layer
    (`configure`), add a branch (`param_specs` and `__call__`), or both."""
    variant = VARIANTS.create(name, **options)
    reshapes = callable(getattr(variant, "configure", None))
    branch = [m for m in BRANCH_MEMBERS if hasattr(variant, m)]
    if not reshapes and not branch:
        raise TypeError(
            f"MoE layer variant {name!r} ({type(variant).__name__}) has neither `configure` nor "
            f"the branch members {list(BRANCH_MEMBERS)}: it must have one or both"
        )
    if branch and len(branch) < len(BRANCH_MEMBERS) and not reshapes:
        missing = [m for m in BRANCH_MEMBERS if m not in branch]
        raise TypeError(f"MoE layer variant {name!r} is a branch without {missing}")
    return variant


def available_variants() -> list[str]:
    """Names of every installed MoE layer variant, sorted."""
    return VARIANTS.names()


def is_branch(variant: Any) -> bool:
    return all(hasattr(variant, m) for m in BRANCH_MEMBERS)


def make_variants(variants: Mapping[str, Mapping[str, Any]] | None) -> list[tuple[str, Any]]:
    """[(name, variant)] in the given order, each built with its options."""
    out = []
    for name, options in (variants or {}).items():
        if not isinstance(options, Mapping):
            raise TypeError(
                f"variants[{name!r}]={options!r}: must be a mapping of the variant's options "
                "({} for its defaults)"
            )
        out.append((name, get_variant(name, **dict(options))))
    return out


def reshaped(shape: LayerShape, variants: list[tuple[str, Any]]) -> LayerShape:
    """`shape` after every variant's `configure`, in order."""
    for name, variant in variants:
        configure = getattr(variant, "configure", None)
        if callable(configure):
            new = configure(shape)
            if not isinstance(new, LayerShape):
                raise TypeError(
                    f"MoE layer variant {name!r}: configure() returned {type(new).__name__}, "
                    "not a vmoe_layers.LayerShape"
                )
            shape = new
    return shape


def freeze_variants(variants: Any) -> FrozenDict:
    """A hashable {name: {option: value}} (flax module fields must hash)."""
    if variants is None:
        return FrozenDict()
    if not isinstance(variants, Mapping):
        raise TypeError(
            f"variants={variants!r}: must be a mapping {{name: {{option: value}}}}, e.g. "
            '{"shared_experts": {"num_shared": 1}}'
        )
    return FrozenDict({str(k): FrozenDict(dict(v or {})) for k, v in variants.items()})
