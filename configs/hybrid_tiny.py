"""configs/tiny.py with a linearised model: a tiny Qwen3 whose layers 0-2 use hybrid attention
(sliding-window softmax over 16 tokens + gated linear attention beyond it; layer 3 stays dense),
so rollouts decode with a constant-size state in those layers. CPU, minutes:

    python -m jaxtrace.train --config=configs/hybrid_tiny.py
    python -m jaxtrace.train --config=configs/hybrid_tiny.py:grpo --config.workdir=runs/hybrid_grpo
    python -m jaxtrace.train --config=configs/hybrid_tiny.py --config.model.hybrid_window=8

The optional argument after ':' picks the algorithm, as in configs/tiny.py.
"""

import dataclasses
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from tiny import get_config as tiny_config  # noqa: E402

from jaxtrace.models.config import preset  # noqa: E402
from jaxtrace.models.hybrid import linearize  # noqa: E402


def get_config(arg=None):
    c = tiny_config(arg)
    c.workdir = "runs/hybrid_tiny"
    # Prompts (<= 40 tokens) plus responses (<= 40) outrun the 16-token window: both branches train.
    model = linearize(
        preset("tiny", vocab_size=384), layers=(0, 1, 2), hybrid_window=16, hybrid_chunk=16
    )
    c.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    return c
