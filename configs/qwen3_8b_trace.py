"""TRACE on Qwen3-8B, forward KL on key spans (the paper's best routed action for 8B).
TPU v5p-64 / v6e-64 and up; FSDP over all chips with 4-way tensor parallelism.

    python -m jaxtrace.train --config=configs/qwen3_8b_trace.py \
        --config.init_from=hf:gs://BUCKET/Qwen3-8B --config.data.tokenizer=/path/to/Qwen3-8B \
        --config.data.train_path=gs://BUCKET/gsm8k/train.jsonl --config.workdir=gs://BUCKET/runs/q8

Variants after ':': trace (default), trace_rkl, grpo, dapo, drgrpo, opsd, trace_online.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen3_1p7b_trace import qwen3_config  # noqa: E402


def get_config(arg=None):
    c = qwen3_config("qwen3_8b", arg, fkl=True)
    c.mesh.update(data=1, fsdp=-1, tensor=4)
    c.rollout.decode_layout = "tensor"  # the bf16 copy 4-way tensor-parallel: 4 GB per chip
    # Each slot's KV cache is split 4-way over the heads too (0.30 GiB per chip at 8,704 tokens):
    # 10 GiB holds 33 slots per chip, 264 rows decoding at once on v5p-64 and 528 on v6e-64
    # (of 1,024). AOT at 10 GiB (`python -m jaxtrace.compile --topology=v6e-64`): rollout decode
    # 16.7 of 32 GiB per chip, trace_online self-annotation decode (176 slots of 22,528 tokens)
    # 23.4; on v5p-64 18.6 and 27.3 of 96.
    c.rollout.cache_budget_gib = 10.0
    c.rollout.prompts_per_step = 128
    return c
