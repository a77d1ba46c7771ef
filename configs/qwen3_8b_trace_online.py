"""Qwen3-8B, trace_online (same data, rollout and budget as configs/qwen3_8b_trace.py).

    python -m jaxtrace.train --config=configs/qwen3_8b_trace_online.py \
        --config.init_from=hf:gs://BUCKET/Qwen3-8B --config.data.tokenizer=/path/to/Qwen3-8B \
        --config.data.train_path=gs://BUCKET/gsm8k/train.jsonl --config.workdir=gs://BUCKET/runs/x
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from qwen3_8b_trace import get_config as _trace_config  # noqa: E402


def get_config(arg=None):
    return _trace_config(arg or "trace_online")
