"""The original V-MoE forward pass, slow and obvious, in float64 NumPy, on the original tree.

Written from the release's published semantics (vmoe/nn/vit_moe.py, routing.py, moe.py, and
vit_jax's MlpBlock), not from our code: per-token loops for the routing, explicit formulas for
LayerNorm (epsilon 1e-6), GELU (tanh approximation) and attention. Not part of the package.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

EPS = 1e-6


def original_tree(
    rng: np.random.Generator,
    *,
    patch=2,
    channels=1,
    hidden=32,
    layers=2,
    heads=2,
    mlp=64,
    experts=4,
    moe_blocks=(1,),
    tokens=17,
    classes=10,
    representation=16,
    cls=True,
) -> dict[str, np.ndarray]:
    """A V-MoE parameter tree in the original layout (names spelled out here), random float32."""

    def normal(*shape, scale=0.3):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    head_dim = hidden // heads
    tree = {
        "embedding/kernel": normal(patch, patch, channels, hidden),
        "embedding/bias": normal(hidden),
        "Encoder/posembed_input/pos_embedding": normal(1, tokens, hidden),
        "Encoder/encoder_norm/scale": 1 + normal(hidden, scale=0.1),
        "Encoder/encoder_norm/bias": normal(hidden, scale=0.1),
        "head/kernel": normal(representation or hidden, classes),
        "head/bias": normal(classes),
    }
    if cls:
        tree["cls"] = normal(1, 1, hidden)
    if representation:
        tree["pre_logits/kernel"] = normal(hidden, representation)
        tree["pre_logits/bias"] = normal(representation)
    for i in range(layers):
        block = f"Encoder/encoderblock_{i}"
        for norm in ("LayerNorm_0", "LayerNorm_1"):
            tree[f"{block}/{norm}/scale"] = 1 + normal(hidden, scale=0.1)
            tree[f"{block}/{norm}/bias"] = normal(hidden, scale=0.1)
        for part in ("query", "key", "value"):
            tree[f"{block}/SelfAttention/{part}/kernel"] = normal(hidden, heads, head_dim)
            tree[f"{block}/SelfAttention/{part}/bias"] = normal(heads, head_dim)
        tree[f"{block}/SelfAttention/out/kernel"] = normal(heads, head_dim, hidden)
        tree[f"{block}/SelfAttention/out/bias"] = normal(hidden)
        if i in moe_blocks:
            tree[f"{block}/Moe/Router/dense/kernel"] = normal(hidden, experts, scale=1.0)
            tree[f"{block}/Moe/Mlp/Dense_0/kernel"] = normal(experts, hidden, mlp)
            tree[f"{block}/Moe/Mlp/Dense_0/bias"] = normal(experts, mlp)
            tree[f"{block}/Moe/Mlp/Dense_1/kernel"] = normal(experts, mlp, hidden)
            tree[f"{block}/Moe/Mlp/Dense_1/bias"] = normal(experts, hidden)
        else:
            tree[f"{block}/Mlp/Dense_0/kernel"] = normal(hidden, mlp)
            tree[f"{block}/Mlp/Dense_0/bias"] = normal(mlp)
            tree[f"{block}/Mlp/Dense_1/kernel"] = normal(mlp, hidden)
            tree[f"{block}/Mlp/Dense_1/bias"] = normal(hidden)
    return tree


def _layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * scale + bias


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _bfloat16(x):
    """Rounded to bfloat16 (from float32, as the release's float32 activations were)."""
    return np.asarray(x, np.float32).astype(jnp.bfloat16).astype(np.float64)


def _attention(p, prefix, x):
    q, k, v = (
        np.einsum("btd,dhe->bthe", x, p[f"{prefix}/{n}/kernel"]) + p[f"{prefix}/{n}/bias"]
        for n in ("query", "key", "value")
    )
    logits = np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(q.shape[-1])
    mixed = np.einsum("bhqk,bkhe->bqhe", _softmax(logits), v)
    return np.einsum("bqhe,hed->bqd", mixed, p[f"{prefix}/out/kernel"]) + p[f"{prefix}/out/bias"]


def capacity(group_size, k, capacity_factor, experts, multiple_of):
    """The release's rule: ceil(S K C / E) (floats), then up to a multiple of `multiple_of`."""
    c = math.ceil(group_size * k * capacity_factor / experts)
    return c + (-c) % multiple_of if multiple_of else c


def _moe(p, prefix, x_gsd, *, k, capacity_factor, multiple_of, batch_priority, bf16):
    out = np.zeros_like(x_gsd)
    experts = p[f"{prefix}/Router/dense/kernel"].shape[-1]
    for g, tokens in enumerate(x_gsd):
        gates = _softmax(tokens @ p[f"{prefix}/Router/dense/kernel"])  # [S, E]
        s_count = len(tokens)
        # Top-K per token, best first (ties: the lower expert index).
        choice = np.argsort(-gates, axis=-1, kind="stable")[:, :k]
        order = np.arange(s_count)
        if batch_priority:
            order = np.argsort(-gates[np.arange(s_count), choice[:, 0]], kind="stable")
        cap = capacity(s_count, k, capacity_factor, experts, multiple_of)
        filled = [0] * experts
        for rank in range(k):  # every token's first choice before any second choice
            for s in order:
                e = choice[s, rank]
                slot, filled[e] = filled[e], filled[e] + 1
                if slot >= cap:
                    continue  # dropped: no capacity left in expert e
                x_in = _bfloat16(tokens[s]) if bf16 else tokens[s]
                w0, b0 = p[f"{prefix}/Mlp/Dense_0/kernel"][e], p[f"{prefix}/Mlp/Dense_0/bias"][e]
                w1, b1 = p[f"{prefix}/Mlp/Dense_1/kernel"][e], p[f"{prefix}/Mlp/Dense_1/bias"][e]
                y = _gelu(x_in @ w0 + b0) @ w1 + b1
                out[g, s] += gates[s, e] * (_bfloat16(y) if bf16 else y)
    return out


def forward(
    tree,
    images,
    *,
    group_size,
    k=2,
    capacity_factor=4.0,
    multiple_of=4,
    batch_priority=False,
    bf16_dispatch=False,
):
    """(logits [B, classes], pre_logits [B, R]) of the original V-MoE at evaluation."""
    p = {path: np.asarray(a, np.float64) for path, a in tree.items()}
    kernel = p["embedding/kernel"]
    size = kernel.shape[0]
    b, h, w, c = images.shape
    patches = (
        np.asarray(images, np.float64)
        .reshape(b, h // size, size, w // size, size, c)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(b, (h // size) * (w // size), size * size * c)
    )
    x = patches @ kernel.reshape(-1, kernel.shape[-1]) + p["embedding/bias"]
    if "cls" in p:
        x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], axis=1)
    x = x + p["Encoder/posembed_input/pos_embedding"]
    layers = 1 + max(
        int(path.split("/")[1].split("_")[1])
        for path in p
        if path.startswith("Encoder/encoderblock_")
    )
    for i in range(layers):
        block = f"Encoder/encoderblock_{i}"
        y = _layer_norm(x, p[f"{block}/LayerNorm_0/scale"], p[f"{block}/LayerNorm_0/bias"])
        x = x + _attention(p, f"{block}/SelfAttention", y)
        y = _layer_norm(x, p[f"{block}/LayerNorm_1/scale"], p[f"{block}/LayerNorm_1/bias"])
        if f"{block}/Moe/Router/dense/kernel" in p:
            y_gsd = _moe(
                p,
                f"{block}/Moe",
                y.reshape(-1, group_size, y.shape[-1]),
                k=k,
                capacity_factor=capacity_factor,
                multiple_of=multiple_of,
                batch_priority=batch_priority,
                bf16=bf16_dispatch,
            )
            y = y_gsd.reshape(y.shape)
        else:
            hidden = _gelu(y @ p[f"{block}/Mlp/Dense_0/kernel"] + p[f"{block}/Mlp/Dense_0/bias"])
            y = hidden @ p[f"{block}/Mlp/Dense_1/kernel"] + p[f"{block}/Mlp/Dense_1/bias"]
        x = x + y
    x = _layer_norm(x, p["Encoder/encoder_norm/scale"], p["Encoder/encoder_norm/bias"])
    pre = x[:, 0] if "cls" in p else x.mean(axis=1)
    if "pre_logits/kernel" in p:
        pre = np.tanh(pre @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    return pre @ p["head/kernel"] + p["head/bias"], pre
