"""The dense twin of `digits_vmoe`: ViT-Mu/2 with the same per-token FLOPs, same recipe.

V-MoE-Mu/2 runs K=2 experts of hidden 128 in 2 of its 4 blocks and one MLP of hidden 128 in
the others: 2*128 + 2*(2*128) = 768 hidden units per token. This ViT gives each of its 4 blocks
an MLP of hidden 192 (4*192 = 768), so both spend the same matmul FLOPs per token (the V-MoE
adds its router: 64x4 per token per MoE block, under 1%).
"""

from __future__ import annotations

from vmoe_train.configs.digits_vmoe import get_config as vmoe_config


def get_config():
    c = vmoe_config()
    c.model.name = "ViT-Mu/2"
    c.model.mlp_dim = 192
    return c
