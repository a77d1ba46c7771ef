"""The embedded default: a tiny Qwen3 learns multi-step arithmetic on a CPU in minutes.

A supervised warm start on worked solutions, then TRACE (forward KL to the privileged self-teacher
on key spans of correct rollouts, GRPO elsewhere, KL annealed to 0):

    python -m jaxtrace.train --config=configs/tiny.py
    python -m jaxtrace.train --config=configs/tiny.py:grpo --config.workdir=runs/tiny_grpo

The optional argument after ':' picks the algorithm: trace (default), trace_rkl, grpo, dapo,
drgrpo, opsd.
"""

from jaxtrace import config as base_config


def get_config(arg=None):
    c = base_config.base()
    c.workdir = "runs/tiny"
    c.model = base_config.model_dict("tiny", vocab_size=384)
    c.data.vocab_size = 320
    c.sft.update(steps=400, batch_size=64, lr=1e-3, privileged_fraction=0.25)
    c.rollout.prompts_per_step = 16
    c.optim.lr = 5e-5
    c.train.steps = 80
    variant = arg or "trace"
    if variant == "trace_rkl":
        c.algo.fkl_on_key_spans, c.algo.rkl_on_error_spans = False, True
    elif variant != "trace":
        c.algo.name = variant
    return c
