"""Orbax checkpoints: async save, keep-N, exact resume, any path Orbax accepts (gs:// too).

A checkpoint holds the train state pytree (params, optimizer state, step) and a small JSON of
host state (data position, RNG seed, cumulative counters). Orbax commits a step atomically (a
temporary directory renamed when complete), so a step interrupted mid-save is never listed.

A step that is listed but does not restore (an array file truncated or deleted behind Orbax's
back, a corrupt host JSON) is skipped: restoring without an explicit step tries the steps newest
first, logs which step it skipped and why, and returns the newest one that restores. Nothing is
deleted on the way; the trainer then moves the skipped steps aside (`quarantine`, a rename to
`<step>.corrupt-<n>`), so that retention does not count them and later saves can reuse the step
numbers. Retention keeps at least one step (`keep` >= 1, or None = all).
"""

from __future__ import annotations

import json
import logging
import re

import jax
import orbax.checkpoint as ocp

from jaxtrace import paths
from jaxtrace.errors import InputError

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, keep: int | None = 2, async_save: bool = True):
        if keep is not None and not (isinstance(keep, int) and keep >= 1):
            # Orbax's max_to_keep=0 deletes every step, the one just saved included.
            raise ValueError(f"keep={keep!r}: keep at least 1 checkpoint (None keeps all)")
        self.directory = paths.absolute(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )
        self.skipped: list[tuple[int, str]] = []  # (step, why) of the last restore(None, ...)

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

    def restore(self, step: int | None, abstract_state, host_keys=()):
        """(state, host_state) of `step` (default: the newest step that restores), placed like
        `abstract_state` (a pytree of jax.ShapeDtypeStruct with shardings, or of arrays).
        A host state without every key of `host_keys` does not restore (an edited or truncated
        JSON that still parses). The steps skipped on the way are in `self.skipped`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)

        def restore_step(s):
            out = self.manager.restore(
                s,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), host=ocp.args.JsonRestore()
                ),
            )
            if not isinstance(out["host"], dict):
                raise ValueError(f"host state is a {type(out['host']).__name__}, not an object")
            missing = [k for k in host_keys if k not in out["host"]]
            if missing:
                raise ValueError(f"host state lacks the keys {missing}")
            return out["state"], out["host"]

        (state, host), _, self.skipped = restore_newest(
            self.directory, self.all_steps(), step, restore_step
        )
        return state, host

    def quarantine(self, steps: list[int]) -> list[str]:
        """Moves the directories of `steps` (ones that did not restore) aside, to
        `<step>.corrupt-<n>`, out of Orbax's listing; returns the new paths. Not a deletion:
        the files stay for inspection."""
        self.manager.wait_until_finished()
        moved = []
        for s in steps:
            src = paths.join(self.directory, str(s))
            n = 0
            while paths.exists(dst := f"{src}.corrupt-{n}"):
                n += 1
            paths.rename(src, dst)
            log.warning("moved checkpoint step %d that does not restore aside to %s", s, dst)
            moved.append(dst)
        if moved:
            self.manager.reload()
        return moved

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _why(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def restore_newest(directory: str, steps: list[int], step: int | None, restore_step):
    """(restore_step(s), s, skipped) for `step`, or when it is None for the newest of `steps`
    whose restore does not raise (twice: one failure may be a transient read error); `skipped`
    lists (step, why) of the newer ones that raised, each also logged. InputError naming the
    directory when none restores (or `step` does not)."""
    if step is not None:
        if step not in steps:
            raise InputError(f"checkpoint step {step} is not in {directory!r} (steps: {steps})")
        candidates = [step]
    else:
        candidates = sorted(steps, reverse=True)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {directory!r}")
    skipped: list[tuple[int, str]] = []
    for s in candidates:
        try:
            try:
                out = restore_step(s)
            except Exception:  # noqa: BLE001 (once more: a transient read error is not corruption)
                out = restore_step(s)
        except Exception as e:  # noqa: BLE001 (TensorStore, JSON, shape errors: all mean "not this step")
            skipped.append((s, _why(e)))
            if step is None:
                log.warning("checkpoint step %d in %s does not restore (%s)", s, directory, _why(e))
            continue
        if skipped:
            log.warning(
                "restored checkpoint step %d of %s; skipped newer step(s) %s that do not restore",
                s,
                directory,
                [k for k, _ in skipped],
            )
        return out, s, skipped
    old = [k for k, _ in skipped if per_layer_layout(directory, k)]
    if old:
        raise InputError(
            f"checkpoint step(s) {old} in {directory!r} hold the per-layer params layout "
            "(params/layers/<i>/..., from before decoder layers were stacked for the scan); "
            "this jaxtrace stores layer j's params stacked in params/layers/<j mod period> and "
            "cannot read them. Export them with the jaxtrace that wrote them "
            "(python -m jaxtrace.export) and start from --config.init_from=hf:DIR."
        )
    if step is not None:
        raise InputError(
            f"checkpoint step {step} in {directory!r} does not restore ({skipped[0][1]})"
        )
    detail = "; ".join(f"step {k}: {why}" for k, why in skipped)
    raise InputError(f"no checkpoint step in {directory!r} restores ({detail})")


_NORM_KEY = re.compile(r"\('params', 'layers', '\d+', 'input_layernorm', 'weight'\)")


def per_layer_layout(directory: str, step: int) -> bool:
    """Whether `step` was saved with one params subtree per decoder layer (a layer norm of
    shape [D]) rather than stacked ([L / period, D]); False when its metadata does not say."""
    try:
        path = paths.join(directory, str(step), "state", "_METADATA")
        with paths.open_path(path) as f:
            tree = json.load(f)["tree_metadata"]
        shapes = [
            v["value_metadata"].get("write_shape")
            for k, v in tree.items()
            if _NORM_KEY.fullmatch(k)
        ]
    except Exception:  # noqa: BLE001 (a hint only: any unreadable metadata means "cannot tell")
        return False
    return any(s is not None and len(s) == 1 for s in shapes)


def restore_params(directory: str, abstract_params, step: int | None = None):
    """Only the params of a training checkpoint (for eval and export): of `step`, or of the
    newest step that restores. Never creates or changes `directory`."""
    directory = paths.absolute(directory)
    if not paths.exists(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory!r}")
    mngr = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(create=False, read_only=True)
    )
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=getattr(x, "sharding", None)),
        {"params": abstract_params},
    )

    def restore_step(s):
        return mngr.restore(
            s,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args=restore_args,
                    partial_restore=True,
                )
            ),
        )["state"]["params"]

    try:
        params, step, _ = restore_newest(directory, list(mngr.all_steps()), step, restore_step)
    finally:
        mngr.close()
    return params, step
