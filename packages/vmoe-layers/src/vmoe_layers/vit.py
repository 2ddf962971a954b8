"""Vision Transformer (ViT) and V-MoE: a ViT whose MLP blocks are partly sparse MoE layers.

    images [B, H, W, 3] --patches (conv P x P, stride P)--> [B, N, D] --(+ class token)-->
    [B, T, D] + learned position embeddings --dropout--> L pre-LN encoder blocks:
        x = x + Dropout(Attention(LN(x)));   x = x + FeedForward(LN(x))   (dense or MoE)
    --LN--> pre-logits [B, D] (class token, or mean of tokens) --(representation)--> head.

The blocks listed by `MoeConfig.layers` use a `MoeLayer` as feed-forward; the others use one
dense expert of the same type (`mlp`: Dense-GELU-Dense, the ViT MLP).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

import vmoe_routing
from vmoe_layers.exchange import ExpertExchange
from vmoe_layers.experts import get_expert_type
from vmoe_layers.moe import ROUTER_KEY, MoeLayer
from vmoe_layers.placement import moe_block_indices
from vmoe_layers.variants import freeze_variants

Array = jax.Array
CLASSIFIERS = ("token", "gap")
# Which encoder blocks recompute their activations in the backward pass instead of keeping them
# (see `VisionTransformer.remat`).
REMAT = ("none", "block", "moe", "dots")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """The sparse part of a V-MoE.

    Attributes:
      num_experts: E per MoE layer.
      layers: which blocks are MoE: "every-2", "last-2", ... or explicit 0-indexed blocks.
      router: vmoe-routing router name ("top_k", "bpr", plugins such as "hash"), or a router
        object (see `MoeLayer.router`).
      router_options: router options (k, capacity_factor, eval_capacity_factor, noise_std, ...),
        merged over `vmoe_layers.DEFAULT_ROUTER_OPTIONS` (k=2, capacity_factor=1.05) by the layer;
        {} means exactly those defaults.
      group_size: tokens per routing group (must divide batch x tokens); None: one image each.
      expert_type: expert type of the MoE layers; None: the model's `mlp_type`.
      expert_options: its options besides mlp_dim; None: the model's `mlp_options`.
      dispatch_dtype: None, or the dtype expert buffers are rounded to on the way to and from
        the experts ("bfloat16" as the original V-MoE release; see `MoeLayer.dispatch_dtype`).
      expert_init: "independent" (each expert drawn with its own key) or "shared" (one draw
        copied to every expert, as the V-MoE release's `split_rngs=False`; see `MoeLayer`).
      dropout_rate: dropout on the MoE layers' output; None: the model's `dropout_rate`.
      variants: {name: {option: value}}: MoE layer variants (see `MoeLayer.variants`), e.g.
        {"fine_grained": {"m": 4}} or {"shared_experts": {"num_shared": 1}} (plugins).
    """

    num_experts: int
    layers: str | Sequence[int] = "every-2"
    router: str | vmoe_routing.Router = "top_k"
    router_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    group_size: int | None = None
    expert_type: str | None = None
    expert_options: Mapping[str, Any] | None = None
    dispatch_dtype: Any = None
    expert_init: str = "independent"
    dropout_rate: float | None = None
    variants: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Hashable (flax modules holding this config can be hashed, e.g. as static jit args).
        if not isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "router_options", FrozenDict(self.router_options or {}))
        if self.expert_options is not None:
            object.__setattr__(self, "expert_options", FrozenDict(self.expert_options))
        object.__setattr__(self, "variants", freeze_variants(self.variants))


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """What a ViT / V-MoE returns (a pytree).

    Attributes:
      logits: [B, num_classes]; equal to pre_logits when the model has no head.
      pre_logits: [B, D or representation_size], the representation (few-shot features).
      aux_loss: scalar, the sum of the MoE layers' weighted auxiliary losses (0 for a ViT).
      metrics: {"moe_block_<i>": {routing metrics}} per MoE block.
      aux_losses: {"moe_block_<i>": {unweighted aux losses}} per MoE block (kept apart from
        metrics, so a loss and a metric of the same name never overwrite each other).
    """

    logits: Array
    pre_logits: Array
    aux_loss: Array
    metrics: dict[str, dict[str, Array]]
    aux_losses: dict[str, dict[str, Array]] = dataclasses.field(default_factory=dict)


jax.tree_util.register_dataclass(
    ModelOutput,
    data_fields=["logits", "pre_logits", "aux_loss", "metrics", "aux_losses"],
    meta_fields=[],
)


class FeedForward(nn.Module):
    """One dense expert of a registered expert type on every token: [..., D] -> [..., D].

    As ViT's MlpBlock, dropout (`dropout_rate`, training only) is applied to the hidden
    activations (after GELU), for expert types that take a `hidden=` callable (the built-ins do).
    The dropout on the output is the encoder block's."""

    mlp_dim: int
    expert_type: str = "mlp"
    expert_options: Mapping[str, Any] | None = None
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        experts = get_expert_type(
            self.expert_type, mlp_dim=self.mlp_dim, **dict(self.expert_options or {})
        )
        d = x.shape[-1]
        params = {
            name: self.param(name, spec.init, spec.shape, self.param_dtype)
            for name, spec in sorted(experts.param_specs(d).items())
        }
        x_1td = x.reshape(1, -1, d)
        options = {}
        if "hidden" in inspect.signature(experts.__call__).parameters:
            dropout = nn.Dropout(self.dropout_rate, name="hidden_dropout")
            options["hidden"] = lambda h: dropout(h, deterministic=deterministic)
        y_1td = experts({n: p[None] for n, p in params.items()}, x_1td, dtype=self.dtype, **options)
        return y_1td.reshape(x.shape)


class EncoderBlock(nn.Module):
    """Pre-LN Transformer block; the feed-forward is dense, or a `MoeLayer` when `moe` is set.

    Dropout as ViT's Encoder1DBlock: on the attention output, and in the dense feed-forward on its
    hidden activations and its output. A MoE feed-forward has dropout on its output only (the
    `MoeLayer`'s `dropout_rate`), not inside the experts.
    """

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    mlp_type: str = "mlp"
    mlp_options: Mapping[str, Any] | None = None
    moe: MoeConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    exchange: ExpertExchange | None = None

    @nn.compact
    def __call__(self, x_btd, deterministic: bool, k=None, capacity_factor=None):
        # Positional (not keyword-only): `nn.remat` marks them static by position.
        y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm_attention")(
            x_btd
        )
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dropout_rate=self.attention_dropout_rate,
            broadcast_dropout=False,  # as ViT: an independent mask per head and query
            kernel_init=nn.initializers.xavier_uniform(),  # as ViT
            deterministic=deterministic,
            name="attention",
        )(y, y)
        x_btd = x_btd + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        # A MoE block keeps its norm's output in float32: its router gates the tokens before the
        # layer casts them to the compute dtype (a float32 gate_dtype then really gates in
        # float32 under bfloat16 compute); the experts still compute in self.dtype.
        norm_dtype = self.dtype if self.moe is None else jnp.promote_types(self.dtype, jnp.float32)
        y = nn.LayerNorm(dtype=norm_dtype, param_dtype=self.param_dtype, name="norm_mlp")(x_btd)
        if self.moe is None:
            y = FeedForward(
                self.mlp_dim,
                self.mlp_type,
                self.mlp_options,
                dropout_rate=self.dropout_rate,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="mlp",
            )(y, deterministic=deterministic)
            return x_btd + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic), None
        moe = self.moe
        out = _moe_layer_of(
            moe,
            self.mlp_dim,
            self.mlp_type,
            self.mlp_options,
            dropout_rate=self.dropout_rate if moe.dropout_rate is None else moe.dropout_rate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            exchange=self.exchange,
            name="moe",
        )(y, deterministic=deterministic, k=k, capacity_factor=capacity_factor)
        return x_btd + out.output, out


class VisionTransformer(nn.Module):
    """ViT, or V-MoE when `moe` is set (see the module docstring and `vmoe_layers.presets`).

    Attributes:
      num_classes: size of the head; None: no head (logits = pre_logits).
      patch_size: P; image height and width must be multiples of it.
      hidden_size, num_layers, num_heads, mlp_dim: D, L, heads, H.
      classifier: "token" (a learned class token) or "gap" (mean of the patch tokens).
      representation_size: if set, a Dense + tanh pre-logits layer of this size (as ViT upstream).
      head_bias_init: the head's initial bias (its kernel starts at zero, as ViT), e.g.
        -log(num_classes) as the V-MoE release, so that a sigmoid loss starts near the prior.
      dropout_rate: after position embeddings, attention and feed-forward outputs.
      attention_dropout_rate: on attention weights.
      mlp_type, mlp_options: the expert type (and its options) of every feed-forward.
      moe: the MoE part; None makes a plain ViT.
      dtype, param_dtype: computation and parameter dtypes. Every parameter is created in
        `param_dtype` except the routers' own, which each router's `init` makes (the built-in
        routers' gates are float32: routing compares gate logits, and a gate rounded to
        bfloat16 would move tokens to other experts).
      exchange: passed to every MoE layer (from a sharding strategy); None: local experts.
      remat: rematerialisation (activation checkpointing) of the encoder blocks: "none" keeps
        every activation for the backward pass; "block" keeps only each block's input and
        recomputes the rest of the block; "moe" does that for the MoE blocks only (their
        buffers are the largest activations); "dots" recomputes every block but keeps its
        matmul outputs (`jax.checkpoint_policies.dots_saveable`: less recompute, more memory).
        The parameters, the outputs and the gradients are the same whatever the choice.

    Call: `model.apply(variables, images, train=False, k=None, capacity_factor=None)` with images
    [B, H, W, C] returns a `ModelOutput`. `train=True` needs rngs "dropout" (if dropout_rate > 0)
    and "gating" (noisy routers). `k` and `capacity_factor` override every MoE layer's router
    for this call only.
    """

    num_classes: int | None
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    classifier: str = "token"
    representation_size: int | None = None
    head_bias_init: float = 0.0
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    mlp_type: str = "mlp"
    mlp_options: Mapping[str, Any] | None = None
    moe: MoeConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    exchange: ExpertExchange | None = None
    remat: str = "none"

    def moe_blocks(self) -> tuple[int, ...]:
        """The 0-indexed encoder blocks that are MoE."""
        return () if self.moe is None else moe_block_indices(self.moe.layers, self.num_layers)

    def _check(self, images: Array) -> None:
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier={self.classifier!r} must be one of {CLASSIFIERS}")
        if self.remat not in REMAT:
            raise ValueError(f"remat={self.remat!r} must be one of {REMAT}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide hidden_size={self.hidden_size}"
            )
        if images.ndim != 4:
            raise ValueError(f"images must be [batch, height, width, channels]; got {images.shape}")
        p, (h, w) = self.patch_size, images.shape[1:3]
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise ValueError(f"patch_size={p!r} must be an integer >= 1")
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not divisible by patch_size={p}; allowed: height and "
                f"width multiples of {p}"
            )

    def _block_class(self, is_moe: bool) -> Any:
        """EncoderBlock, or its rematerialised form where `remat` asks for it."""
        if self.remat == "none" or (self.remat == "moe" and not is_moe):
            return EncoderBlock
        # deterministic, k and capacity_factor (arguments 2-4; self is 0) are Python values.
        policy = jax.checkpoint_policies.dots_saveable if self.remat == "dots" else None
        return nn.remat(EncoderBlock, static_argnums=(2, 3, 4), policy=policy)

    @nn.compact
    def __call__(self, images, *, train: bool = False, k=None, capacity_factor=None):
        self._check(images)
        p, d = self.patch_size, self.hidden_size
        dense = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="embedding", **dense)(
            images.astype(self.dtype)
        )
        b = x.shape[0]
        x_btd = x.reshape(b, -1, d)
        if self.classifier == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d), self.param_dtype)
            x_btd = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (b, 1, 1)), x_btd], axis=1)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (1, *x_btd.shape[1:]), self.param_dtype
        )
        x_btd = x_btd + pos.astype(self.dtype)
        x_btd = nn.Dropout(self.dropout_rate)(x_btd, deterministic=not train)

        moe_blocks = set(self.moe_blocks())
        aux_loss = jnp.zeros((), jnp.float32)
        metrics: dict[str, dict[str, Array]] = {}
        aux_losses: dict[str, dict[str, Array]] = {}
        for i in range(self.num_layers):
            x_btd, out = self._block_class(i in moe_blocks)(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                mlp_type=self.mlp_type,
                mlp_options=self.mlp_options,
                moe=self.moe if i in moe_blocks else None,
                exchange=self.exchange,
                name=f"block_{i}",
                **dense,
            )(x_btd, not train, k, capacity_factor)
            if out is not None:
                aux_loss = aux_loss + out.aux_loss
                metrics[f"moe_block_{i}"] = dict(out.metrics)
                aux_losses[f"moe_block_{i}"] = dict(out.aux_losses)
        x_btd = nn.LayerNorm(name="encoder_norm", **dense)(x_btd)

        pre_logits = x_btd[:, 0] if self.classifier == "token" else jnp.mean(x_btd, axis=1)
        if self.representation_size is not None:
            pre_logits = jnp.tanh(
                nn.Dense(self.representation_size, name="pre_logits", **dense)(pre_logits)
            )
        logits = pre_logits
        if self.num_classes is not None:
            logits = nn.Dense(
                self.num_classes,
                kernel_init=nn.initializers.zeros,
                bias_init=nn.initializers.constant(self.head_bias_init),
                name="head",
                **dense,
            )(pre_logits)
        return ModelOutput(
            logits=logits,
            pre_logits=pre_logits,
            aux_loss=aux_loss,
            metrics=metrics,
            aux_losses=aux_losses,
        )


def update_router_state(
    model: VisionTransformer, router_state: Mapping[str, Any], metrics: Mapping[str, Any]
) -> dict[str, Any]:
    """The routers' state after a training step whose routing metrics were `metrics`
    (`ModelOutput.metrics`: {"moe_block_i": {...}}): what `model.apply(..., train=True,
    mutable=[ROUTER_STATE])` computes, done outside the apply.

    For a step that routes its batch in several applies (gradient accumulation): update once
    from their mean metrics (a mean of `expert_load` over equal microbatches is the whole
    batch's load), as one apply on the whole batch would. {} stays {}."""
    if not router_state:
        return {}
    if model.moe is None:
        raise ValueError("router_state given for a model without MoE blocks")
    router = model_router(model)
    updated: dict[str, Any] = {}
    for block, tree in router_state.items():
        key = f"moe_{block}"
        if key not in metrics:
            raise ValueError(
                f"router_state has {block!r} but the metrics have no {key!r}; they have "
                f"{sorted(metrics)}"
            )
        state = tree["moe"][ROUTER_KEY]
        new = jax.lax.stop_gradient(router.update_state(state, metrics[key]))
        updated[block] = {"moe": {ROUTER_KEY: new}}
    return updated


def moe_layer(model: VisionTransformer) -> MoeLayer:
    """The (unbound) MoE layer of `model`'s MoE blocks, configured as its blocks build it: for
    what a layer says of itself (`make_router()`, `layer_shape()`, `layer_flops`)."""
    if model.moe is None:
        raise ValueError("the model has no MoE blocks (model.moe is None)")
    return _moe_layer_of(model.moe, model.mlp_dim, model.mlp_type, model.mlp_options)


def _moe_layer_of(
    moe: MoeConfig, mlp_dim: int, mlp_type: str, mlp_options: Any, **layer: Any
) -> MoeLayer:
    """The MoeLayer `moe` describes in a model of MLP width `mlp_dim` and type `mlp_type`
    (the experts' type and options where `moe` sets none), with `layer`'s other fields."""
    return MoeLayer(
        num_experts=moe.num_experts,
        mlp_dim=mlp_dim,
        router=moe.router,
        router_options=moe.router_options,
        expert_type=moe.expert_type or mlp_type,
        expert_options=mlp_options if moe.expert_options is None else moe.expert_options,
        group_size=moe.group_size,
        dispatch_dtype=moe.dispatch_dtype,
        expert_init=moe.expert_init,
        variants=moe.variants,
        **layer,
    )


def model_router(model: VisionTransformer) -> Any:
    """The router object `model`'s MoE layers use (variants applied: e.g. a fine-grained K)."""
    return moe_layer(model).make_router()
