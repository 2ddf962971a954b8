"""One of two jax processes (2 host devices each) running the sharding case with the expert
strategy over a (1, 4) mesh, so the all-to-all crosses processes. Run as a script:

    python two_process_worker.py <coordinator address> <process id> <output .npz>
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))

import numpy as np  # noqa: E402
import sharding_case as case  # noqa: E402


def main() -> None:
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    run = case.sharded_run("expert", (1, 4))
    init = case.init_sharded_matches("expert", (1, 4))
    leaves = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(run["grads"])
    }
    np.savez(
        sys.argv[3],
        loss=run["loss"],
        all_to_all="all-to-all" in run["hlo"],
        expert_shard_shape=np.asarray(run["expert_shard_shape"]),
        init_sharded_ok=init["values_equal"] and init["layout_ok"],
        **{f"grad{key}": value for key, value in leaves.items()},
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
