"""Test-only hooks for the preemption tests, installed by a config file inside the trainer's
process (so the product code carries no test switches).

`install(hook_dir, block_call=None, hold_save=None, hang=False)`:
  * records every RL step's data (prompts, sampled response tokens, rewards) to
    hook_dir/record.jsonl, so a test can compare data order and rollouts across runs;
  * at the `block_call`-th RL step (1-based, counted from this process's start) touches
    hook_dir/at_call and waits for hook_dir/release;
  * when Orbax commits checkpoint step `hold_save` of the run's `ckpt/` directory (in its async
    save thread, after the arrays are written, before the atomic rename) touches
    hook_dir/in_save and waits for hook_dir/release, or forever with `hang`.
"""

import json
import os
import time

_state = {"calls": 0}


def _touch(hook_dir, name):
    open(os.path.join(hook_dir, name), "w").close()


def _wait(path, forever=False):
    while forever or not os.path.exists(path):
        time.sleep(0.02)


def install(hook_dir, block_call=None, hold_save=None, hang=False):
    from orbax.checkpoint._src.path import atomicity  # noqa: PLC0415

    from jaxtrace import rl  # noqa: PLC0415

    release = os.path.join(hook_dir, "release")
    build_batch = rl.build_batch

    def recording_build_batch(rollout, examples, rewards, **kw):
        _state["calls"] += 1
        row = {
            "questions": [e.question for e in examples],
            "response": rollout["response"].tolist(),
            "response_mask": rollout["response_mask"].astype(int).tolist(),
            "rewards": [float(r) for r in rewards],
        }
        with open(os.path.join(hook_dir, "record.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if _state["calls"] == block_call:
            _touch(hook_dir, "at_call")
            _wait(release)
        return build_batch(rollout, examples, rewards, **kw)

    rl.build_batch = recording_build_batch
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held_finalize(self, *args, **kwargs):
        final = self.get_final()
        if hold_save is not None and final.parent.name == "ckpt" and final.name == str(hold_save):
            _touch(hook_dir, "in_save")
            _wait(release, forever=hang)
        return await finalize(self, *args, **kwargs)

    atomicity.AtomicRenameTemporaryPath.finalize = held_finalize
