"""Orbax checkpoints: async save, keep-N, exact resume, any path Orbax accepts (gs:// too).

A checkpoint holds the train state pytree (params, optimizer state, step) and a small JSON of
host state (data position, RNG seed, cumulative counters). Orbax commits a step atomically (a
temporary directory renamed when complete), so a step interrupted mid-save is never listed.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from jaxtrace import paths


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        self.directory = paths.absolute(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, host_state: dict, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host_state)
            ),
            force=force,
        )

    def restore(self, step: int | None, abstract_state):
        """(state, host_state) of `step` (default: latest), placed like `abstract_state`
        (a pytree of jax.ShapeDtypeStruct with shardings, or of arrays)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory!r}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["host"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(directory: str, abstract_params, step: int | None = None):
    """Only the params of a training checkpoint (for eval and export)."""
    mngr = ocp.CheckpointManager(paths.absolute(directory))
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {directory!r}")
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={"params": abstract_params},
                restore_args=jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(
                        dtype=x.dtype, sharding=getattr(x, "sharding", None)
                    ),
                    {"params": abstract_params},
                ),
                partial_restore=True,
            )
        ),
    )
    mngr.close()
    return restored["state"]["params"], step
