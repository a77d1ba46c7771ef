"""One process of a (possibly multi-process) tiny training run, for tests/test_multiprocess.py.

    python tests/multiprocess_worker.py WORKDIR OUT_NPZ NUM_PROCESSES PROCESS_ID PORT STEPS

Each process runs on CPU; with NUM_PROCESSES > 1 they join one JAX cluster through
`jax.distributed.initialize` (gloo collectives). Process 0 writes the final state (params,
optimizer state; fully replicated, so every process holds all of it) to OUT_NPZ.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(workdir, out_npz, num_processes, process_id, port, steps):
    import jax  # noqa: PLC0415

    jax.config.update("jax_threefry_partitionable", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
        )
    import numpy as np  # noqa: PLC0415

    from jaxtrace import trainer  # noqa: PLC0415
    from tests.test_train import mini_config  # noqa: PLC0415

    c = mini_config(workdir, steps=steps)
    c.mesh.update(data=-1)
    c.algo.overlong_cache_len = 20  # rewards vary with length, so the updates are not zero
    c.sft.steps = 0  # keeps the test short; the RL step is what crosses processes
    out = trainer.run(c)
    leaves = jax.tree.leaves(out["state"])
    if jax.process_index() == 0:
        np.savez(out_npz, *[np.asarray(x) for x in leaves])
    print(f"process {process_id}: done, {len(leaves)} leaves", flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]))
