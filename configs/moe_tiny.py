"""configs/tiny.py with a mixture-of-experts model: a tiny Qwen3-MoE (4 experts of width 64,
top-2, renormalised) in layers 1-3, a dense MLP in layer 0; HF's router load-balancing loss is
added to the SFT and RL losses. CPU, minutes:

    python -m jaxtrace.train --config=configs/moe_tiny.py
    python -m jaxtrace.train --config=configs/moe_tiny.py:grpo --config.workdir=runs/moe_grpo
    python -m jaxtrace.train --config=configs/moe_tiny.py --config.model.moe_global_lbl=True

The optional argument after ':' picks the algorithm, as in configs/tiny.py.
"""

import dataclasses
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from tiny import get_config as tiny_config  # noqa: E402

from jaxtrace.models.config import preset  # noqa: E402


def get_config(arg=None):
    c = tiny_config(arg)
    c.workdir = "runs/moe_tiny"
    model = preset(
        "tiny",
        vocab_size=384,
        family="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        mlp_only_layers=(0,),
        router_aux_loss_coef=0.01,  # HF's 0.001 barely registers at this scale
    )
    c.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    return c
