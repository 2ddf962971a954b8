"""Where a fine-tuning or upcycled run starts: `finetune.init_from` read, and mapped by rules.

    flat = read_source(config.finetune.init_from, step)        # {our path: host array}
    rules, keep_fresh, unmatched = rules_of(config.finetune, model, fresh)
    params = params_by_rules(fresh, flat, rules, keep_fresh=keep_fresh, unmatched=unmatched)

The source is one of our runs or checkpoints (any directory `checkpoints.locate` accepts,
through the same discovery path as resuming; the params are read on the host) or a
google-research/vision_transformer `.npz` file (`vmoe_train.vit_jax`: names mapped to ours).
The rules are `finetune.init_rules` as given, or with `finetune.upcycle` the rules that turn
the dense twin of the model into it (`init_rules.upcycle_rules`), with the routers kept fresh,
and, with `finetune.new_head`, the head (and a pre-logits layer the model lacks) left behind.
Each produced array is placed as the fresh parameter it replaces (its sharding: each process
puts its own slices); the others keep their fresh values.

`finetune.upcycle_noise` > 0 adds to every expert copy Gaussian noise of that std relative to
the copied array's std (drawn on the host from `seed`, so every process adds the same), so
that experts of one block differ before the first step; 0 (default) keeps them exact copies,
as Komatsuzaki et al. (2022) start, and leaves routing to set them apart.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from vmoe_train import checkpoints, init_rules, vit_jax
from vmoe_train.config.serialisation import config_get
from vmoe_train.finetune import HEAD_PREFIX, PRE_LOGITS_PREFIX, place

NPZ_SUFFIX = ".npz"
EXPERTS = re.compile(r"block_\d+/moe/experts/.+")


def is_npz(init_from: str | pathlib.Path) -> bool:
    """Whether `init_from` names a vit_jax .npz file (else a run or checkpoint directory)."""
    return str(init_from).endswith(NPZ_SUFFIX)


def uses_rules(finetune_config: Any) -> bool:
    """Whether the config maps the source by rules (`init_rules` or `upcycle`)."""
    rules = tuple(config_get(finetune_config, "init_rules", ()))
    return bool(rules) or bool(config_get(finetune_config, "upcycle", False))


def read_source(init_from: str | pathlib.Path, step: int | None = None) -> dict[str, np.ndarray]:
    """{our "/"-joined path: host array} of the params `init_from` names: a .npz file of vit_jax
    names (renamed to ours), or a run / checkpoints / step directory (`step`: None = the step it
    names or the latest)."""
    if is_npz(init_from):
        renamed = vit_jax.vit_jax_to_params(vit_jax.load_npz(init_from))
        return traverse_util.flatten_dict(renamed, sep="/")
    location = checkpoints.locate(init_from)
    step = location.step if step is None else step
    params = checkpoints.restore_params(location.directory, None, step=step)
    return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(params, sep="/").items()}


def rules_of(
    finetune_config: Any, moe_blocks: tuple[int, ...], fresh: Any
) -> tuple[tuple[init_rules.Rule, ...], str, str]:
    """(rules, keep_fresh, unmatched) of `finetune.*` for a model with `moe_blocks` whose fresh
    params are `fresh` (see the module doc)."""
    keep_fresh = config_get(finetune_config, "keep_fresh", "")
    keep = [keep_fresh] if keep_fresh else []
    if config_get(finetune_config, "upcycle", False):
        rules = list(init_rules.upcycle_rules(moe_blocks))
        keep.append(init_rules.UPCYCLE_KEEP_FRESH)
    else:
        rules = list(init_rules.parse_rules(tuple(config_get(finetune_config, "init_rules", ()))))
    if finetune_config.new_head:
        paths = traverse_util.flatten_dict(fresh, sep="/")
        left_behind = [HEAD_PREFIX]
        if not any(p.startswith(PRE_LOGITS_PREFIX) for p in paths):
            left_behind.append(PRE_LOGITS_PREFIX)
        rules = [init_rules.Rule(f"{re.escape(p)}.*", "", "drop") for p in left_behind] + rules
        keep.append(f"{re.escape(HEAD_PREFIX)}.*")
    unmatched = str(config_get(finetune_config, "unmatched", "error"))
    return tuple(rules), "|".join(f"(?:{k})" for k in keep), unmatched


def params_by_rules(
    fresh: Any,
    source: Mapping[str, np.ndarray],
    rules: Any,
    *,
    keep_fresh: str = "",
    unmatched: str = "error",
    expert_noise: float = 0.0,
    seed: int = 0,
) -> Any:
    """`fresh` (a params tree, laid out or not) with every target the rules produce from
    `source` replaced, placed as the fresh parameter; `expert_noise` as `finetune.upcycle_noise`
    on the produced expert stacks. Raises `init_rules.InitRulesError` with every problem."""
    fresh_flat = traverse_util.flatten_dict(fresh, sep="/")
    produced = init_rules.apply_rules(
        rules, source, fresh_flat, unmatched=unmatched, keep_fresh=keep_fresh
    )
    rng = np.random.default_rng(seed)
    out = dict(fresh_flat)
    for path, value in produced.items():  # the fresh tree's order: the same draws everywhere
        if expert_noise > 0 and EXPERTS.fullmatch(path):
            wide = np.asarray(value, np.float64)
            wide = wide + expert_noise * wide.std() * rng.standard_normal(wide.shape)
            value = wide.astype(value.dtype)
        out[path] = place(value, fresh_flat[path])
    return traverse_util.unflatten_dict(out, sep="/")
