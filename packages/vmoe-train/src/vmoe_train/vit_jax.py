"""Dense ViT checkpoints of google-research/vision_transformer ("vit_jax", .npz): read, write.

    import jax, jax.numpy as jnp, vmoe_layers as vl
    from vmoe_train import finetune_params, vit_jax

    arrays = vit_jax.load_npz("ViT-B_16.npz")                  # {vit_jax name: array}, no pickle
    model = vl.create_model("ViT-B/16", num_classes=21843, representation_size=768)
    images = jnp.zeros((1, 224, 224, 3))
    target = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    params = vit_jax.vit_jax_to_params(arrays, target)          # our params tree, or one error
    vit_jax.save_npz("mine.npz", vit_jax.params_to_vit_jax(params))   # and back

    # Fine-tune (new classes, new image size, no pre-logits): rename only, then as our own runs.
    params = finetune_params(fresh, vit_jax.vit_jax_to_params(arrays), new_head=True)

The format (vit_jax/checkpoint.py `load`: `np.load(path, allow_pickle=False)`, names split on
'/'): one flat archive of float32 arrays named as vit_jax/models_vit.py's `VisionTransformer`
names its flax parameters. Shape legend: P patch, C channels, D width, T tokens, H MLP width,
R representation size, N heads (D = N x D/N).

    vit_jax                                                       ours
    embedding/{kernel [P, P, C, D], bias [D]}                     embedding/...
    cls [1, 1, D]  (classifier "token")                           cls
    Transformer/posembed_input/pos_embedding [1, T, D]            pos_embedding
    Transformer/encoderblock_<i>/LayerNorm_0/{scale, bias}        block_<i>/norm_attention/...
    .../MultiHeadDotProductAttention_1/<query|key|value>/         block_<i>/attention/...
        kernel [D, N, D/N], bias [N, D/N];  out/kernel [N, D/N, D], out/bias [D]
    .../LayerNorm_2/{scale, bias}                                 block_<i>/norm_mlp/...
    .../MlpBlock_3/Dense_0/{kernel [D, H], bias [H]}              block_<i>/mlp/{w_in, b_in}
    .../MlpBlock_3/Dense_1/{kernel [H, D], bias [D]}              block_<i>/mlp/{w_out, b_out}
    Transformer/encoder_norm/{scale, bias}                        encoder_norm/...
    pre_logits/{kernel [D, R], bias [R]}  (representation_size)   pre_logits/...
    head/{kernel [D or R, classes], bias}                         head/...

The block's numbers are pre-Linen flax's automatic names (one counter across module types), as
the published checkpoints have them; vit_jax's loader also accepts Linen-era saves through
flax's `convert_pre_linen`, this module does not (the error says so). Both sides are the same
flax modules, so the mapping renames and never reshapes; and the same maths: pre-LN blocks,
LayerNorm epsilon 1e-6, `nn.gelu` (tanh approximation), attention scaled by 1/sqrt(D/N), the
class token's row (or the mean of the tokens, "gap") after `encoder_norm`, then
Dense + tanh (pre_logits, when representation_size is set), then the head. The V-MoE release's
dense parts are this ViT and `vmoe_train.original.mapping` already reads these names as
aliases: this module reuses it and adds vit_jax's spelling for writing and a strict fit check.

pre_logits: a checkpoint with a pre-logits layer (e.g. ImageNet-21k pre-training) fits only a
model of the same `representation_size`, since its head was trained on those features; against
a model without one it is reported like any extra array. To drop it, fine-tune with a new head:
`finetune_params(..., new_head=True)` leaves the old head and pre-logits behind, as it does for
our own checkpoints and as vit_jax's `load_pretrained` does ("drop-head variant").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from vmoe_train import mismatch
from vmoe_train.mismatch import TreeMismatchError
from vmoe_train.original import mapping

TRANSFORMER = "Transformer"
# The V-MoE release's block names (`mapping`) -> vit_jax's; `mapping` reads the reverse.
_BLOCK_NAMES = {
    "LayerNorm_0": "LayerNorm_0",
    "SelfAttention": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "Mlp": "MlpBlock_3",
}
_LINEN_BLOCK_NAMES = ("/MultiHeadDotProductAttention_0/", "/MlpBlock_0/")
_FINETUNE = "finetune_params(fresh, vit_jax_to_params(arrays), new_head=True)"


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{vit_jax name: array} from the .npz archive `path`, read without pickle.

    Raises:
      ValueError: `path` is not an .npz archive, or one of its arrays needs pickle (an object
        array: loading it could run code from the file); the error names the array.
    """
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{os.fspath(path)!r} is a single .npy array, not an .npz archive")
    arrays = {}
    with archive:
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as error:
                raise ValueError(
                    f"{os.fspath(path)!r}: array {name!r} cannot be read without pickle "
                    f"({error}); vit_jax checkpoints hold numeric arrays only, and pickled "
                    "objects are never loaded (they can run code)"
                ) from error
    return arrays


def save_npz(path: str | os.PathLike, arrays: Mapping[str, Any]) -> None:
    """Writes {name: array} (e.g. `params_to_vit_jax(params)`) as the .npz archive `path`
    (numpy appends ".npz" to a path without it). Object arrays are refused: a ValueError."""
    arrays = {name: np.asarray(array) for name, array in arrays.items()}
    objects = sorted(name for name, array in arrays.items() if array.dtype == object)
    if objects:
        raise ValueError(f"object arrays cannot be written without pickle: {objects}")
    np.savez(path, **arrays)


def to_vit_jax(our_path: str) -> str | None:
    """The vit_jax name of one of our parameter paths, or None (MoE blocks, expert types other
    than the ViT MLP `mlp`: vit_jax checkpoints are dense ViTs)."""
    original = mapping.to_original(our_path)
    if original is None:
        return None
    parts = original.split("/")
    if parts[0] == mapping.ENCODER:
        parts[0] = TRANSFORMER
        if parts[1].startswith("encoderblock_"):
            block = _BLOCK_NAMES.get(parts[2])
            if block is None:
                return None
            parts[2] = block
    return "/".join(parts)


def vit_jax_to_params(arrays: Mapping[str, Any], target: Any = None) -> dict[str, Any]:
    """Our params tree (nested dicts) from {vit_jax name: array} (see the module doc).

    Args:
      arrays: a vit_jax checkpoint's arrays, e.g. from `load_npz`.
      target: our model's parameters, as a tree or flat by '/'-joined path, with leaves that
        have `.shape` and `.dtype` (arrays, or `jax.eval_shape(model.init, ...)["params"]`).
        Given, the checkpoint must fit it exactly and each array is cast to its leaf's dtype;
        None: the arrays are only renamed (for `finetune_params`, which resizes position
        embeddings and replaces the head).

    Raises:
      TreeMismatchError: every missing, extra and mis-shaped array at once, by vit_jax name
        (without a target: every name that is not a vit_jax ViT name, as extra).
      ValueError: `target` has parameters without a vit_jax name (a V-MoE, other experts).
    """
    found = {name: tuple(np.shape(array)) for name, array in arrays.items()}
    leaves = None
    if target is not None:
        leaves = mapping.flatten(target)
        names = _vit_jax_names(leaves)
        expected = {names[path]: tuple(leaf.shape) for path, leaf in leaves.items()}
        mismatch.check_fit(expected, found, hints=_hints(found, expected))
    flat, unknown = {}, []
    for name, array in arrays.items():
        path = mapping.to_ours(name)
        if path is None or to_vit_jax(path) != name:  # `mapping` also reads V-MoE spellings
            unknown.append(name)
        else:
            flat[path] = array if leaves is None else np.asarray(array, leaves[path].dtype)
    if unknown:
        raise TreeMismatchError([], sorted(unknown), [], _hints(found, None))
    return mapping.unflatten(flat)


def params_to_vit_jax(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{vit_jax name: float32 array} from our params tree (a dense ViT with `mlp` feed-forwards),
    as the published checkpoints store them; `vit_jax_to_params` reads it back.

    Raises:
      ValueError: parameters without a vit_jax name (a V-MoE, other experts), all named.
    """
    flat = mapping.flatten(params)
    names = _vit_jax_names(flat)
    return {names[path]: np.asarray(value, np.float32) for path, value in flat.items()}


def _vit_jax_names(flat: Mapping[str, Any]) -> dict[str, str]:
    """{our path: vit_jax name}; a ValueError names every path without one."""
    layout = (
        "a vit_jax checkpoint, which holds a dense ViT with the ViT MLP (no MoE blocks, "
        "expert type `mlp`)"
    )
    return mapping.rename_all(flat, to_vit_jax, layout)


def _hints(found: Mapping[str, tuple], expected: Mapping[str, tuple] | None) -> list[str]:
    """Why the usual mismatches happen, for the error."""
    hints = []
    pre_logits = found.get("pre_logits/kernel")
    if expected is not None and pre_logits and "pre_logits/kernel" not in expected:
        size = pre_logits[-1]
        hints.append(
            f"the checkpoint has a pre-logits layer (representation_size={size}): build the "
            f"model with representation_size={size} to keep the head trained on it, or "
            f"fine-tune with a new head, which leaves both behind: {_FINETUNE}"
        )
    if expected is not None and any(
        name in found and name in expected and found[name] != expected[name]
        for name in ("head/kernel", f"{TRANSFORMER}/posembed_input/pos_embedding")
    ):
        hints.append(
            "another class count or image size than the model's: fine-tune with "
            f"{_FINETUNE}, which replaces the head and resizes the position embeddings"
        )
    if "conv_root/kernel" in found:
        hints.append("a hybrid ResNet+ViT checkpoint: our ViT has no ResNet stem")
    if any(part in name for name in found for part in _LINEN_BLOCK_NAMES):
        hints.append(
            "Linen-era block names (MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0): "
            "rename them to the published pre-Linen ones (MultiHeadDotProductAttention_1, "
            "LayerNorm_2, MlpBlock_3)"
        )
    return hints
