"""Fine-grained expert segmentation (DeepSeekMoE, Dai et al. 2024; MaxText's base_moe_mlp_dim).

Each of the E routed experts of hidden width H is cut into m narrower ones, and every token picks
m times more of them, so the routed compute per token stays K x 4DH while the number of ways to
combine experts grows:

    coarse: E experts of width H,     K choices,     capacity C = ceil(K S c / E)
    fine:   E*m experts of width H/m, K*m choices,   capacity ceil(K*m S c / (E*m)) = C

The capacity factor c and the router's other options are kept, so each fine expert has the
coarse capacity C (the same exact number, rounded the same way): E*m*C slots of cost 4DH/m,
the coarse buffers' FLOPs, held in m times the dispatch-buffer memory (each token is copied K*m
times instead of K). The gate grows from [D, E] to [D, E*m].

Only routers with a K are segmented (the variant multiplies `k`): top_k, bpr, and plugins such
as hash, aux_free, dropless, group_limited and expert_choice (whose `k` is the average number
of experts per token). A router without one (soft) is refused: for it the variant could only set
num_experts=E*m and mlp_dim=H/m, which the layer's own fields already say.

Shape legend: G groups, S tokens per group, D model dim, E experts, H expert width, K choices
per token, C capacity, m granularity.
"""

from __future__ import annotations

import dataclasses

import vmoe_plugins
from vmoe_layers import LayerShape

NAME = "fine_grained"


@dataclasses.dataclass(frozen=True)
class FineGrained:
    """The MoE layer variant "fine_grained": E experts of width H with K choices per token
    become E*m experts of width H/m with K*m choices (`configure`).

    Attributes:
      m: the granularity, an integer >= 1 that divides the experts' width H (1 changes nothing).
    """

    m: int

    def __post_init__(self) -> None:
        m = vmoe_plugins.check_int("m", self.m, low=1, where=f"{NAME}: ")
        object.__setattr__(self, "m", m)  # a plain int (numpy integers are accepted)

    def configure(self, shape: LayerShape) -> LayerShape:
        """E*m experts of width H/m, the router's k times m; every other router option kept."""
        m, h = self.m, shape.mlp_dim
        if h % m:
            divisors = [d for d in range(1, h + 1) if h % d == 0]
            raise ValueError(
                f"{NAME}: m={m} must divide the experts' hidden width mlp_dim H={h} (each of "
                f"the m segments holds H/m units); allowed: one of {divisors}"
            )
        options = dict(shape.router_options)
        if "k" not in options:
            raise ValueError(
                f"{NAME}: the router options {options} have no 'k' to multiply by m={m}. "
                "Routers without a K (e.g. 'soft') are not segmented: set num_experts and "
                "mlp_dim yourself instead. A router object is used as built: give its coarse K "
                "as router_options={'k': K} (the layer sets k=K*m) and build it with "
                f"num_experts=E*m={shape.num_experts * m}"
            )
        k = vmoe_plugins.check_int("k", options["k"], low=1, where=f"{NAME}: router option ")
        return shape.replace(
            num_experts=shape.num_experts * m,
            mlp_dim=h // m,
            router_options={**options, "k": k * m},
        )
