"""TRACE on Qwen3-30B-A3B (48 layers, 128 experts of width 768, top-8 renormalised, 3B active)
with GSM8K; FKL on key spans, data / rollout / budget as configs/qwen3_1p7b_trace.py. Experts are
sharded over the `expert` mesh axis (8-way: 16 experts per chip), everything else FSDP over the
rest; the router load-balancing loss (coef 0.001, HF's) is added to the RL loss. TPU v5p-64 or
larger (params alone are ~61 GB in bf16; fp32 params + Adam need ~490 GB of HBM).

    python -m jaxtrace.train --config=configs/qwen3_moe_trace.py \
        --config.init_from=hf:/path/to/Qwen3-30B-A3B \
        --config.data.tokenizer=/path/to/Qwen3-30B-A3B \
        --config.data.train_path=gs://BUCKET/gsm8k/train.jsonl \
        --config.data.test_path=gs://BUCKET/gsm8k/test.jsonl \
        --config.workdir=gs://BUCKET/runs/q30a3_trace \
        --config.algo.api_base_url=https://api.openai.com/v1 --config.algo.api_model=gpt-4.1

Knobs: --config.model.moe_implementation=pallas_tpu (grouped-matmul kernel; default: best
available), --config.model.moe_global_lbl=True (balance each layer over the global batch),
--config.mesh.expert=16. Variants after ':' as in configs/qwen3_1p7b_trace.py (trace, trace_rkl,
grpo, dapo, drgrpo, opsd, trace_online).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen3_1p7b_trace import qwen3_config  # noqa: E402


def get_config(arg=None):
    c = qwen3_config("qwen3_30b_a3b", arg, fkl=True)
    c.workdir = "runs/q30a3_trace"
    c.mesh.update(data=1, fsdp=-1, tensor=1, expert=8)
    c.rollout.decode_layout = "tensor"  # experts stay split over `expert`, the rest replicated
    return c
