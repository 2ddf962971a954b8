"""Runs every sharding case, and the README's examples, on 8 host devices; prints one JSON report.

Run as a script; `--matrix`: every router x strategy x mesh of `sharding_case` instead. The
parent sets XLA_FLAGS=--xla_force_host_platform_device_count=8 before this process starts.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import traceback

import jax
import numpy as np
import sharding_case as case

import vmoe_layers as vl

README = pathlib.Path(__file__).parents[1] / "README.md"


def run_readme() -> str:
    """'ok', or the traceback of the first README example that fails on 8 devices."""
    namespace: dict = {}
    try:
        for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL):
            exec(compile(block, str(README), "exec"), namespace)
    except Exception:
        return traceback.format_exc()
    return "ok"


def run_case(name, mesh_shape, router="bpr") -> dict:
    reference_loss, reference_grads, reference_stats = case.single_device_run(router, True)
    reference_stats, reference_state = case.without_router_state(reference_stats)
    run = case.sharded_run(name, mesh_shape, router=router)
    stats, state = case.without_router_state(run["stats"])
    return {
        "loss": run["loss"],
        "reference_loss": reference_loss,
        "grad_max_rel_diff": case.max_relative_difference(run["grads"], reference_grads),
        "stats_max_diff": case.stats_max_difference(stats, reference_stats),
        # Routers with state: after STATE_STEPS steps (None for a stateless router).
        "router_state_max_diff": (
            None if state is None else case.router_state_max_difference(state, reference_state)
        ),
        "router_state_moved": (
            None
            if state is None
            else bool(any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(state)))
        ),
        "all_to_all": "all-to-all" in run["hlo"],
        "bytes_by_role": run["bytes_by_role"],
        # Every collective's arrays that are neither parameters nor statistics (for messages).
        "unexpected_arrays": [
            [c.kind, list(dims), c.op_name]
            for c in vl.collectives(run["hlo"], jax.device_count())
            for _, dims in c.shapes
            if vl.comm.array_role(c.kind, dims, run["param_shapes"], case.EXPERTS, c.op_name)
            in ("MoE layer arrays", "other arrays")
        ],
        "expert_shard_shape": run["expert_shard_shape"],
    }


def straddling_groups() -> dict:
    """Groups of 8 images (2 groups) on the 8 devices of `data`: they straddle devices, so
    the layer routes them as one program; the loss must still be one device's."""
    strategy = vl.get_strategy("data")
    images, labels = case.batch()
    params = case.init_params()
    reference = jax.jit(case.loss_fn(case.model(group_size=136)))(params, images, labels)
    sharded = jax.jit(case.loss_fn(case.model(strategy.exchange, group_size=136)))(
        vl.shard_params(strategy, params), *vl.shard_batch(strategy, (images, labels))
    )
    return {"loss": float(sharded), "reference": float(reference)}


def matrix() -> None:
    """Every router x strategy x mesh of `case.MATRIX_CASES`; prints one JSON report (a case a
    strategy refuses reports its error)."""
    report = {}
    for router in case.MATRIX_ROUTERS:
        for name, mesh_shape in case.MATRIX_CASES:
            try:
                result = run_case(name, mesh_shape, router)
            except ValueError as error:
                result = {"error": str(error)}
            report[f"{router}/{name}-{mesh_shape}"] = result
    print(json.dumps(report))


def extended() -> None:
    """What the default run leaves to `nox -s tests-extended`: init_sharded under the expert and
    fsdp strategies alone, and the README's examples on 8 devices."""
    report = {
        "init_sharded": {
            f"{name}-{shape}": case.init_sharded_matches(name, shape)
            for name, shape in case.CASES
            if name not in case.INIT_SHARDED_CASES
        },
        "readme": run_readme(),
    }
    print(json.dumps(report))


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    if sys.argv[1:] == ["--matrix"]:
        return matrix()
    if sys.argv[1:] == ["--extended"]:
        return extended()
    report = {"devices": jax.device_count(), "cases": {}}
    for name, mesh_shape in case.CASES:
        report["cases"][f"{name}-{mesh_shape}"] = run_case(name, mesh_shape)
    # The router with state (the aux-free plugin's bias) under every strategy once.
    report["router_state"] = {
        f"{name}-{mesh_shape}": run_case(name, mesh_shape, case.STATEFUL_ROUTER)
        for name, mesh_shape in case.CASES
    }
    report["init_sharded"] = {
        f"{name}-{shape}": case.init_sharded_matches(name, shape)
        for name, shape in case.CASES
        if name in case.INIT_SHARDED_CASES
    }
    report["straddling_groups"] = straddling_groups()
    try:
        vl.shard_batch(vl.get_strategy("expert", mesh_shape=(2, 4)), np.zeros((6, 3)))
        report["shard_batch_error"] = None
    except ValueError as error:
        report["shard_batch_error"] = str(error)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
