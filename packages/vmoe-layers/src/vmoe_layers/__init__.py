"""vmoe-layers: the MoE layer, expert types, ViT / V-MoE models and sharding strategies.

Shape legend: G groups, S tokens per group, D model dim, E experts, C capacity, K choices per
token, T tokens per expert buffer.

    import vmoe_layers as vl
    layer = vl.MoeLayer(num_experts=8, mlp_dim=64, router="bpr", router_options={"k": 2})
    variables = layer.init(jax.random.key(0), x_btd)
    out = layer.apply(variables, x_btd)            # MoeOutput: output, aux_loss, metrics
"""

from __future__ import annotations

import importlib.metadata

import vmoe_plugins
from vmoe_layers import hookspecs
from vmoe_layers.comm import (
    Collective,
    ParamShapes,
    bytes_sent_by_role,
    bytes_sent_per_device,
    collectives,
)
from vmoe_layers.exchange import (
    AllToAllExchange,
    ExpertExchange,
    PerShardExchange,
    run_local_experts,
)
from vmoe_layers.experts import (
    ACTIVATIONS,
    EXPERT_TYPES,
    PLUGIN_EXPERT_TYPES,
    ExpertType,
    GluExperts,
    MlpExperts,
    ParamSpec,
    available_expert_types,
    get_expert_type,
)
from vmoe_layers.flops import LayerFlops, layer_flops, matmul_flops
from vmoe_layers.moe import (
    DEFAULT_ROUTER_OPTIONS,
    EXPERTS_KEY,
    GATING_RNG,
    ROUTER_STATE,
    MoeLayer,
    MoeOutput,
    group_tokens,
)
from vmoe_layers.placement import moe_block_indices
from vmoe_layers.presets import count_params, create_model, preset_names
from vmoe_layers.sharding import (
    STRATEGIES,
    DataParallel,
    ExpertFullySharded,
    ExpertParallel,
    FullySharded,
    ShardingStrategy,
    available_strategies,
    get_strategy,
    init_router_state,
    init_sharded,
    is_expert_param,
    make_mesh,
    param_shardings,
    router_state_shardings,
    shard_batch,
    shard_params,
)
from vmoe_layers.variants import (
    PLUGIN_VARIANTS,
    VARIANTS,
    LayerShape,
    available_variants,
    get_variant,
)
from vmoe_layers.vit import (
    REMAT,
    EncoderBlock,
    FeedForward,
    ModelOutput,
    MoeConfig,
    VisionTransformer,
    model_router,
    moe_layer,
    update_router_state,
)

__version__ = importlib.metadata.version("vmoe-layers")

vmoe_plugins.add_hookspecs(hookspecs)


def _register_builtins() -> None:
    from vmoe_layers import _builtins

    vmoe_plugins.register_builtin("vmoe_layers.builtins", _builtins)


_register_builtins()

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_ROUTER_OPTIONS",
    "EXPERTS_KEY",
    "EXPERT_TYPES",
    "GATING_RNG",
    "PLUGIN_EXPERT_TYPES",
    "PLUGIN_VARIANTS",
    "REMAT",
    "ROUTER_STATE",
    "STRATEGIES",
    "VARIANTS",
    "AllToAllExchange",
    "Collective",
    "DataParallel",
    "EncoderBlock",
    "ExpertExchange",
    "ExpertFullySharded",
    "ExpertParallel",
    "ExpertType",
    "FeedForward",
    "FullySharded",
    "GluExperts",
    "LayerFlops",
    "LayerShape",
    "MlpExperts",
    "ModelOutput",
    "MoeConfig",
    "MoeLayer",
    "MoeOutput",
    "ParamShapes",
    "ParamSpec",
    "PerShardExchange",
    "ShardingStrategy",
    "VisionTransformer",
    "__version__",
    "available_expert_types",
    "available_strategies",
    "available_variants",
    "bytes_sent_by_role",
    "bytes_sent_per_device",
    "collectives",
    "count_params",
    "create_model",
    "get_expert_type",
    "get_strategy",
    "get_variant",
    "group_tokens",
    "init_router_state",
    "init_sharded",
    "is_expert_param",
    "layer_flops",
    "make_mesh",
    "matmul_flops",
    "model_router",
    "moe_block_indices",
    "moe_layer",
    "param_shardings",
    "preset_names",
    "router_state_shardings",
    "run_local_experts",
    "shard_batch",
    "shard_params",
    "update_router_state",
]
