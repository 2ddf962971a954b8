"""One of two jax processes (2 host devices each) running the sharding case with the expert_fsdp
strategy over a (1, 4) mesh, so the all-to-all and the param gathers cross processes. Run as a
script:

    python two_process_worker.py <coordinator address> <process id> <output .npz>
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
)

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))

import numpy as np  # noqa: E402
import sharding_case as case  # noqa: E402

# (strategy, mesh): expert_fsdp over (1, 4): the expert axis spans both processes, so the
# all-to-alls (the same AllToAllExchange as the expert strategy's) cross processes, and every
# other param is split over the 4 devices, so XLA's gathers and gradient reductions do too. One
# compiled step: this test is in the default run (the expert strategy's own layouts are checked
# on 8 devices in one process).
RUNS = {"expert_fsdp": (1, 4)}


def main() -> None:
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    arrays = {}
    for name, mesh_shape in RUNS.items():
        run = case.sharded_run(name, mesh_shape)
        init = case.init_sharded_matches(name, mesh_shape)
        leaves = {
            jax.tree_util.keystr(path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(run["grads"])
        }
        arrays |= {
            f"{name}/loss": run["loss"],
            f"{name}/all_to_all": "all-to-all" in run["hlo"],
            f"{name}/expert_shard_shape": np.asarray(run["expert_shard_shape"]),
            f"{name}/init_sharded_ok": init["values_match"] and init["layout_ok"],
            **{f"{name}/grad{key}": value for key, value in leaves.items()},
        }
    np.savez(sys.argv[3], **arrays)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
