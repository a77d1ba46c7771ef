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

Responses of up to 8,192 tokens (Qwen3 thinking on math runs 4k-16k). The update runs over
micro-batches of `train.micro_batch_rows` rows (one GRPO group of 8), gradients accumulated in
fp32, one optimizer step per mini-batch; the layers run under scan with full remat; attention is
splash on TPU. Rollouts decode in slots whose KV cache fits `rollout.cache_budget_gib` per chip.
Check a change on a CPU host first: `python -m jaxtrace.compile --config=<this> --topology=v5p-8`
prints every program's HBM per chip (benchmarks/tpu_preflight.py --lengths finds the longest
response that fits). To go to 16k: `--config.rollout.max_new_tokens=16384`. The micro-batch is
already one group, so the activations per chip double: on v5p-8 the RL step with the teacher
then takes 43.1 GiB per chip (28.6 at 8k, 70.6 at 32k; AOT), and the samplers 32.7 (rollout
decode) and 34.3 (eval decode). On a slice where that does not fit, give the step more chips (a
larger slice splits the rows over more of them), or shorten the privileged prompt.
"""

from jaxtrace import config as base_config


def qwen3_config(preset: str, arg=None, *, fkl: bool = True):
    c = base_config.base()
    c.model = base_config.model_dict(preset, dtype="bfloat16", param_dtype="float32", remat="full")
    c.data.task = "gsm8k"
    c.data.template = "qwen_chat"
    c.data.num_train = 0
    c.data.num_test = 0
    c.rollout.update(
        prompts_per_step=64,
        group_size=8,
        max_prompt_len=512,
        max_privileged_len=1536,
        max_new_tokens=8192,
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
    # One group per micro-batch: at 8k tokens a row's activations are ~12 GiB per chip on v5p-8
    # (AOT, remat full), so 8 rows (2 per chip) is what fits beside the state.
    c.train.micro_batch_rows = 8
    c.eval.update(num_samples=4, temperature=0.6, batch_size=256)
    # TPU: FSDP over every chip; switch to {"fsdp": -1, "tensor": 4} past one host of 8B.
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    # Rollouts decode on a bf16 copy of the weights, whole on every chip (1.7B: 3.4 GB), the
    # rows split over the chips; the KV cache of the decode slots within rollout.cache_budget_gib.
    c.rollout.decode_layout = "replicated"
    # 10 GiB of KV cache per chip: the largest decode segment then fits v6e's 32 GiB (AOT: 23.9
    # GiB for rollouts, 28.9 for eval at 8k on v6e-8; 16 GiB needed 36.2) and v5p's 96 GiB.
    c.rollout.cache_budget_gib = 10.0
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
