"""TRACE on Qwen3-1.7B with reverse KL on error spans (the paper's best routed action for 1.7B).

    python -m jaxtrace.train --config=configs/qwen3_1p7b_trace_rkl.py \
        --config.init_from=hf:/path/to/Qwen3-1.7B --config.data.tokenizer=/path/to/Qwen3-1.7B \
        --config.data.train_path=gs://BUCKET/gsm8k/train.jsonl --config.workdir=gs://BUCKET/runs/x
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen3_1p7b_trace import qwen3_config  # noqa: E402


def get_config(arg=None):
    return qwen3_config("qwen3_1p7b", arg or "trace_rkl", fkl=False)
