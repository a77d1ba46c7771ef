"""The run configuration: one ml_collections schema with every default in one place.

Config files (configs/*.py) start from `base()` and change what they need; the CLI locks the
config so that a misspelt `--config.key=value` fails with the key's name. `validate` checks
cross-field constraints before any compute.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxtrace.models.config import ModelConfig, preset

ALGOS = ("trace", "grpo", "dapo", "drgrpo", "opsd", "opsd+grpo")
ANNOTATORS = ("oracle", "file", "api", "self", "divergence", "none")
TASKS = ("arithmetic", "gsm8k", "jsonl")
ENGINES = ("continuous", "static")  # rollout.engine (jaxtrace.rollout.engine.ENGINES)


def model_dict(name: str = "tiny", **overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dataclasses.asdict(preset(name, **overrides)))


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"
    c.model = model_dict("tiny")
    c.init_from = ""  # "" (random / SFT warm start) | "hf:DIR" | "ckpt:DIR"

    c.data = ml_collections.ConfigDict(
        dict(
            task="arithmetic",  # arithmetic (generated) | gsm8k | jsonl (math_eval format)
            train_path="",
            test_path="",  # for gsm8k / jsonl
            num_train=4000,
            num_test=256,  # arithmetic: generated sizes; others: caps (0 = all)
            template="plain",  # plain | qwen_chat
            tokenizer="",  # "" -> train a sentencepiece model on the task text into workdir
            vocab_size=320,  # for the trained sentencepiece model
        )
    )
    c.rollout = ml_collections.ConfigDict(
        dict(
            prompts_per_step=8,
            group_size=8,
            max_prompt_len=40,
            max_privileged_len=88,
            max_new_tokens=40,
            temperature=1.0,
            top_p=1.0,
            engine="continuous",  # continuous (rollout/engine.py) | static (rollout/sampler.py)
            decode_slots=0,  # continuous engine: decode slots (0 = one per rollout row)
        )
    )
    c.algo = ml_collections.ConfigDict(
        dict(
            name="trace",
            fkl_on_key_spans=True,
            rkl_on_error_spans=False,
            kl_lambda0=1.0,
            kl_warmup_steps=20,
            kl_decay_steps=20,
            kl_decay="linear",
            opsd_route="fkl",  # opsd modes: the KL on every token (fkl | rkl)
            eps_low=0.2,
            eps_high=0.28,
            norm="token",
            adv_scale="std",
            ref_kl_coef=0.0,
            overlong_filter=False,
            overlong_cache_len=0,
            annotator="oracle",  # oracle (task's own checker) | file | api | self | divergence
            annotation_file="",
            api_base_url="",
            api_model="",
            api_key_env="OPENAI_API_KEY",
            api_timeout_s=30.0,
            divergence_top_frac=0.15,
            divergence_merge_gap=1,
            kl_implementation="",  # "" = best for the backend (span_kl op)
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=2e-4,
            warmup_steps=5,
            weight_decay=0.0,
            grad_clip=1.0,
            b1=0.9,
            b2=0.99,
        )
    )
    c.sft = ml_collections.ConfigDict(
        dict(
            steps=0,
            batch_size=64,
            lr=2e-3,
            warmup_steps=20,
            privileged_fraction=0.5,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=60,
            log_every=5,
            eval_every=0,
            ckpt_every=20,
            keep_ckpts=2,
            max_consecutive_nonfinite=3,
            progress=True,
        )
    )
    c.eval = ml_collections.ConfigDict(dict(num_samples=1, temperature=0.0, batch_size=128))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.verifier = ml_collections.ConfigDict(dict(timeout_s=5.0, num_workers=1))
    return c


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending key."""


def validate(c: ml_collections.ConfigDict) -> None:
    """Cross-field checks, before any compute. Raises ConfigError naming the key."""

    def need(ok: bool, msg: str):
        if not ok:
            raise ConfigError(msg)

    need(c.algo.name in ALGOS, f"algo.name={c.algo.name!r}; choose from {ALGOS}")
    need(
        c.algo.annotator in ANNOTATORS,
        f"algo.annotator={c.algo.annotator!r}; choose from {ANNOTATORS}",
    )
    need(c.data.task in TASKS, f"data.task={c.data.task!r}; choose from {TASKS}")
    need(
        c.rollout.group_size >= 2,
        f"rollout.group_size={c.rollout.group_size}: GRPO needs at least 2 samples per prompt",
    )
    need(c.rollout.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1")
    need(c.rollout.temperature > 0, f"rollout.temperature={c.rollout.temperature} must be > 0")
    need(0 < c.rollout.top_p <= 1, f"rollout.top_p={c.rollout.top_p} must be in (0, 1]")
    need(c.rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    need(
        c.rollout.engine in ENGINES,
        f"rollout.engine={c.rollout.engine!r}; choose from {ENGINES}",
    )
    need(c.rollout.decode_slots >= 0, f"rollout.decode_slots={c.rollout.decode_slots} must be >= 0")
    need(c.train.steps >= 0, f"train.steps={c.train.steps} must be >= 0")
    need(c.optim.lr > 0, f"optim.lr={c.optim.lr} must be > 0")
    need(
        c.algo.kl_decay in ("linear", "cosine", "constant"),
        f"algo.kl_decay={c.algo.kl_decay!r}; choose linear | cosine | constant",
    )
    need(c.algo.opsd_route in ("fkl", "rkl"), f"algo.opsd_route={c.algo.opsd_route!r}")
    need(c.algo.norm in ("token", "sequence", "constant"), f"algo.norm={c.algo.norm!r}")
    need(c.data.template in ("plain", "qwen_chat"), f"data.template={c.data.template!r}")
    if c.data.task in ("gsm8k", "jsonl"):
        need(bool(c.data.train_path), f"data.train_path is required for data.task={c.data.task}")
    if c.algo.annotator == "file":
        need(bool(c.algo.annotation_file), "algo.annotator=file needs algo.annotation_file")
    if c.algo.annotator == "api":
        need(
            bool(c.algo.api_base_url) and bool(c.algo.api_model),
            "algo.annotator=api needs algo.api_base_url and algo.api_model",
        )
    if c.algo.annotator == "oracle":
        need(
            c.data.task == "arithmetic",
            "algo.annotator=oracle exists only for data.task=arithmetic",
        )
    if c.init_from:
        need(
            c.init_from.split(":", 1)[0] in ("hf", "ckpt") and ":" in c.init_from,
            f"init_from={c.init_from!r}: use hf:DIR or ckpt:DIR",
        )
    try:
        model_config(c)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    d = c.model.to_dict()
    for key in ("mlp_only_layers", "hybrid_layers"):
        d[key] = tuple(d[key])
    return ModelConfig(**d)
