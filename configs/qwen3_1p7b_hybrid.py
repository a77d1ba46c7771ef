"""TRACE on a linearised Qwen3-1.7B: hybrid attention (sliding-window softmax over 512 tokens +
gated linear attention beyond it, Liger style, no new parameters) in 3 of every 4 layers, dense
attention in layers 3, 7, ..., 27. Same data, rollout and budget as configs/qwen3_1p7b_trace.py;
the hybrid layers' rollout state stays constant as responses grow. TPU v5p-8 / v6e-8 or pods.

The dense checkpoint loads unchanged. Convert it once to Orbax (the run's model config then
builds the hybrid graph around those params), then train:

    python -m jaxtrace.export --from_hf=/path/to/Qwen3-1.7B --out=gs://BUCKET/q17_orbax
    python -m jaxtrace.train --config=configs/qwen3_1p7b_hybrid.py \
        --config.init_from=ckpt:gs://BUCKET/q17_orbax/ckpt \
        --config.data.tokenizer=/path/to/Qwen3-1.7B \
        --config.data.train_path=gs://BUCKET/gsm8k/train.jsonl \
        --config.data.test_path=gs://BUCKET/gsm8k/test.jsonl \
        --config.workdir=gs://BUCKET/runs/q17_hybrid_trace \
        --config.algo.api_base_url=https://api.openai.com/v1 --config.algo.api_model=gpt-4.1

Knobs: --config.model.hybrid_window=1024, --config.model.hybrid_beta=0.25 (weight of the far
linear branch), --config.model.hybrid_implementation=pallas_tpu. Variants after ':' as in
configs/qwen3_1p7b_trace.py (trace, trace_rkl, grpo, dapo, drgrpo, opsd, trace_online).
"""

import dataclasses
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
from qwen3_1p7b_trace import qwen3_config  # noqa: E402

from jaxtrace.models.config import ModelConfig  # noqa: E402
from jaxtrace.models.hybrid import linearize  # noqa: E402

NUM_LAYERS = 28


def get_config(arg=None):
    c = qwen3_config("qwen3_1p7b", arg, fkl=True)
    dense = ModelConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in c.model.to_dict().items()}
    )
    hybrid_layers = [i for i in range(NUM_LAYERS) if i % 4 != 3]
    model = linearize(dense, hybrid_layers, hybrid_window=512, hybrid_chunk=128)
    c.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    c.workdir = "runs/q17_hybrid"
    # TPU: FSDP over every chip (params and optimizer state sharded; batch over the same axis).
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
