"""TRACE on Qwen3-1.7B with GSM8K, RKL on error spans is the paper's best for this base
(use the `_rkl` config); this one routes FKL on key spans. TPU v5p-8 / v6e-8 (one host) or pods.

    python -m jaxtrace.train --config=configs/qwen3_1p7b_trace.py \
        --config.init_from=hf:/path/to/Qwen3-1.7B --config.data.tokenizer=/path/to/Qwen3-1.7B \
        --config.data.train_path=gs://BUCKET/gsm8k/train.jsonl \
        --config.data.test_path=gs://BUCKET/gsm8k/test.jsonl \
        --config.workdir=gs://BUCKET/runs/q17_trace \
        --config.algo.api_base_url=https://api.openai.com/v1 --config.algo.api_model=gpt-4.1

Variants after ':' (shared with the other Qwen3 configs): trace (default), trace_rkl, grpo, dapo,
drgrpo, opsd, trace_online (self-annotation instead of the API annotator).
"""

from jaxtrace import config as base_config


def qwen3_config(preset: str, arg=None, *, fkl: bool = True):
    c = base_config.base()
    c.model = base_config.model_dict(preset, dtype="bfloat16", param_dtype="float32", remat=True)
    c.data.task = "gsm8k"
    c.data.template = "qwen_chat"
    c.data.num_train = 0
    c.data.num_test = 0
    c.rollout.update(
        prompts_per_step=64,
        group_size=8,
        max_prompt_len=512,
        max_privileged_len=1536,
        max_new_tokens=2048,
        temperature=1.0,
    )
    c.algo.update(
        name="trace",
        fkl_on_key_spans=fkl,
        rkl_on_error_spans=not fkl,
        kl_lambda0=1.0,
        kl_warmup_steps=20,
        kl_decay_steps=30,
        annotator="api",
    )
    c.optim.update(lr=1e-6, warmup_steps=10, weight_decay=0.0, grad_clip=1.0)
    c.train.update(steps=300, log_every=1, eval_every=50, ckpt_every=25, keep_ckpts=3)
    c.eval.update(num_samples=4, temperature=0.6, batch_size=256)
    # TPU: FSDP over every chip; switch to {"fsdp": -1, "tensor": 4} past one host of 8B.
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    # Rollouts decode on a bf16 copy of the weights, whole on every chip (1.7B: 3.4 GB), the
    # rows split over the chips; the KV cache of the decode slots within rollout.cache_budget_gib.
    c.rollout.decode_layout = "replicated"
    c.verifier.num_workers = 8
    variant = arg or "trace"
    if variant == "trace_rkl":
        c.algo.fkl_on_key_spans, c.algo.rkl_on_error_spans = False, True
    elif variant == "trace_online":
        c.algo.annotator = "self"
    elif variant != "trace":
        c.algo.name = variant
        c.algo.annotator = "none"
    return c


def get_config(arg=None):
    return qwen3_config("qwen3_1p7b", arg, fkl=True)
