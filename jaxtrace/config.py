"""The run configuration: one ml_collections schema with every default in one place.

Config files (configs/*.py) start from `base()` and change what they need; the CLI locks the
config so that a misspelt `--config.key=value` fails with the key's name. `validate` checks
cross-field constraints before any compute.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
from ml_collections.config_dict import placeholder

from jaxtrace import algos
from jaxtrace.errors import ConfigError
from jaxtrace.models.config import ModelConfig, preset

ALGOS = tuple(algos.PRESETS)
ANNOTATORS = ("oracle", "file", "api", "self", "divergence", "none")
TASKS = ("arithmetic", "gsm8k", "jsonl")
ENGINES = ("continuous", "static")  # rollout.engine (jaxtrace.rollout.engine.ENGINES)
DECODE_LAYOUTS = ("train", "replicated", "tensor")  # rollout.decode_layout (sharding.*)


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
            # Rows decoded at once (engine: decode slots; static sampler: its row chunk):
            # decode_slots if > 0, else what cache_budget_gib GiB of KV cache per chip holds
            # (jaxtrace/rollout/layout.py has the formula; 0 = no budget, every row at once).
            decode_slots=0,
            cache_budget_gib=16.0,
            # The sampler's copy of the weights, made once per RL step and freed after:
            # train (as placed) | replicated (data-parallel decode) | tensor (tensor-parallel
            # over mesh.tensor, FSDP axis replicated); in the compute dtype when it differs.
            decode_layout="train",
            decode_in_compute_dtype=True,
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
            # None = the value `name`'s preset gives (jaxtrace.algos, which documents them).
            eps_low=placeholder(float),
            eps_high=placeholder(float),
            norm=placeholder(str),  # token | sequence | constant
            adv_scale=placeholder(str),  # std | none
            adv_std_ddof=placeholder(int),
            overlong_filter=placeholder(bool),
            dynamic_sampling=placeholder(bool),  # drop zero-variance groups, refill (DAPO)
            max_sampling_tries=4,  # dynamic sampling: rollout batches drawn per step at most
            overlong_cache_len=0,  # soft overlong penalty zone (tokens); shapes rewards only
            # PPO: optimizer updates per rollout batch = num_minibatches * ppo_epochs, each on a
            # mini-batch of whole groups; the ratio to the behaviour (pre-update) policy and
            # its clipping act from the second update on.
            num_minibatches=1,
            ppo_epochs=1,
            clip_ratio_c=0.0,  # dual clip (verl): cap on -A * ratio for A < 0; 0 = off, else > 1
            ref_kl_coef=0.0,  # KL to a frozen copy of the initial params, on GRPO tokens
            ref_kl_estimator="k3",  # k3 (low variance, >= 0) | k1 (plain log-ratio)
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
            micro_batch_rows=0,  # as train.micro_batch_rows, of sft.batch_size (rows divide it)
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
            # Micro-batches (jaxtrace.microbatch): each update's batch runs as micro-batches of
            # this many response rows (whole groups: a multiple of rollout.group_size dividing
            # prompts_per_step * group_size / algo.num_minibatches), gradients summed in fp32,
            # one optimizer update, equal to the full-batch step; also the log-prob, teacher and
            # divergence passes. 0 = the whole batch; -1 = the largest that fits
            # activation_budget_gib per device (microbatch.activation_bytes_per_row's estimate).
            micro_batch_rows=0,
            activation_budget_gib=0.0,  # with micro_batch_rows=-1 (and sft's): GiB per device
        )
    )
    c.eval = ml_collections.ConfigDict(dict(num_samples=1, temperature=0.0, batch_size=128))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # timeout_s: 5 s per check, not MathVerifier's 1 s: on a loaded machine a legitimate check
    # must not become a time-out (a run's rewards would then depend on the load). The call
    # budget still bounds a batch of hostile answers.
    c.verifier = ml_collections.ConfigDict(
        dict(
            timeout_s=5.0,
            num_workers=1,
            call_budget_s=10.0,
            call_budget_per_check_s=0.5,
            float_rounding=12,
        )
    )
    return c


__all__ = ["ConfigError", "base", "model_config", "model_dict", "validate"]

# The smallest sentencepiece vocabulary trained for a task: 4 specials, "####", 10 digits and the
# operators and letters of the text need more than this; below it sentencepiece fails inside C++.
MIN_TRAINED_VOCAB = 32

# key -> (lowest, highest, lowest_inclusive): every bounded number of the schema, checked before
# any compute. `math.inf` as highest means unbounded; every value must also be finite.
BOUNDS = {
    "seed": (0, math.inf, True),
    "data.num_train": (0, math.inf, True),
    "data.num_test": (0, math.inf, True),
    "data.vocab_size": (MIN_TRAINED_VOCAB, math.inf, True),
    "rollout.prompts_per_step": (1, math.inf, True),
    "rollout.group_size": (2, math.inf, True),
    "rollout.max_prompt_len": (1, math.inf, True),
    "rollout.max_privileged_len": (1, math.inf, True),
    "rollout.max_new_tokens": (1, math.inf, True),
    "rollout.temperature": (0, math.inf, False),
    "rollout.top_p": (0, 1, False),
    "rollout.decode_slots": (0, math.inf, True),
    "rollout.cache_budget_gib": (0, math.inf, True),  # 0 = no budget
    "algo.kl_lambda0": (0, math.inf, True),
    "algo.kl_warmup_steps": (0, math.inf, True),
    "algo.kl_decay_steps": (0, math.inf, True),
    "algo.eps_low": (0, math.inf, True),
    "algo.eps_high": (0, math.inf, True),
    "algo.ref_kl_coef": (0, math.inf, True),
    "algo.overlong_cache_len": (0, math.inf, True),
    "algo.api_timeout_s": (0, math.inf, False),
    "algo.divergence_top_frac": (0, 1, False),
    "algo.divergence_merge_gap": (0, math.inf, True),
    "optim.lr": (0, math.inf, False),
    "optim.warmup_steps": (0, math.inf, True),
    "optim.weight_decay": (0, math.inf, True),
    "optim.grad_clip": (0, math.inf, False),
    "optim.b1": (0, 1, True),
    "optim.b2": (0, 1, True),
    "sft.steps": (0, math.inf, True),
    "sft.batch_size": (1, math.inf, True),
    "sft.lr": (0, math.inf, False),
    "sft.warmup_steps": (0, math.inf, True),
    "sft.privileged_fraction": (0, 1, True),
    "sft.micro_batch_rows": (-1, math.inf, True),
    "train.steps": (0, math.inf, True),
    "train.log_every": (1, math.inf, True),
    "train.eval_every": (0, math.inf, True),
    "train.ckpt_every": (1, math.inf, True),
    "train.keep_ckpts": (1, math.inf, True),  # 0 would let retention delete every checkpoint
    "train.max_consecutive_nonfinite": (1, math.inf, True),
    "train.micro_batch_rows": (-1, math.inf, True),  # -1 = from train.activation_budget_gib
    "train.activation_budget_gib": (0, math.inf, True),
    "eval.num_samples": (1, math.inf, True),
    "eval.temperature": (0, math.inf, True),  # 0 = greedy
    "eval.batch_size": (1, math.inf, True),
    "verifier.timeout_s": (0, math.inf, False),
    "verifier.num_workers": (1, math.inf, True),
    "verifier.call_budget_s": (0, math.inf, False),
    "verifier.call_budget_per_check_s": (0, math.inf, True),
    "verifier.float_rounding": (1, 15, True),
}


# Keys whose None means "the algorithm preset's value" (jaxtrace.algos).
PRESET_KEYS = ("algo.eps_low", "algo.eps_high")


def _get(c: ml_collections.ConfigDict, key: str):
    for part in key.split("."):
        c = c[part]
    return c


def check_bounds(c: ml_collections.ConfigDict) -> None:
    """Every key of BOUNDS is a finite number in its range (ConfigError naming the key)."""
    for key, (lo, hi, lo_inclusive) in BOUNDS.items():
        v = _get(c, key)
        if v is None and key in PRESET_KEYS:
            continue  # the algorithm's preset fills it (checked resolved in _validate_algo)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"{key}={v!r} must be a finite number")
        above = v >= lo if lo_inclusive else v > lo
        if not (above and v <= hi):
            lo_s = f"{'>=' if lo_inclusive else '>'} {lo}"
            raise ConfigError(
                f"{key}={v!r} must be {lo_s}" + ("" if hi == math.inf else f" and <= {hi}")
            )


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
    check_bounds(c)
    need(isinstance(c.workdir, str) and bool(c.workdir), f"workdir={c.workdir!r} must be a path")
    if c.data.task == "arithmetic":
        need(c.data.num_train >= 1, "data.num_train=0: the arithmetic task needs >= 1 example")
    if not c.data.tokenizer:
        need(
            c.data.vocab_size <= c.model.vocab_size,
            f"tokenizer vocab to train (data.vocab_size={c.data.vocab_size}) is larger than "
            f"the model vocab (model.vocab_size={c.model.vocab_size})",
        )
    need(
        c.rollout.engine in ENGINES,
        f"rollout.engine={c.rollout.engine!r}; choose from {ENGINES}",
    )
    need(c.rollout.decode_slots >= 0, f"rollout.decode_slots={c.rollout.decode_slots} must be >= 0")
    need(
        c.rollout.decode_layout in DECODE_LAYOUTS,
        f"rollout.decode_layout={c.rollout.decode_layout!r}; choose from {DECODE_LAYOUTS}",
    )
    need(
        isinstance(c.rollout.decode_in_compute_dtype, bool),
        f"rollout.decode_in_compute_dtype={c.rollout.decode_in_compute_dtype!r} must be a bool",
    )
    need(
        c.algo.kl_decay in ("linear", "cosine", "constant"),
        f"algo.kl_decay={c.algo.kl_decay!r}; choose linear | cosine | constant",
    )
    need(c.algo.opsd_route in ("fkl", "rkl"), f"algo.opsd_route={c.algo.opsd_route!r}")
    _validate_algo(c, need)
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
    need(
        c.verifier.call_budget_s >= c.verifier.timeout_s,
        f"verifier.call_budget_s={c.verifier.call_budget_s} must be >= verifier.timeout_s",
    )
    try:
        model_cfg = model_config(c)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from e
    if not c.rollout.decode_slots:
        _check_cache_budget(c, model_cfg)


def _check_cache_budget(c, model_cfg) -> None:
    """The cache budget holds one decode slot of every sampler the run uses (its count per chip
    does not depend on the mesh)."""
    from jaxtrace.rollout import layout  # noqa: PLC0415 (imports jax models)

    r = c.rollout
    lengths = {"rollout": r.max_prompt_len + r.max_new_tokens}
    if c.algo.annotator == "self":  # trainer.self_annotation_sampling
        lengths["self-annotation"] = 4 * r.max_privileged_len + 2 * r.max_new_tokens
    for what, length in lengths.items():
        try:
            layout.slots_for_budget(model_cfg, length, r.cache_budget_gib)
        except ValueError as e:
            raise ConfigError(f"{e} ({what}); raise it, or set rollout.decode_slots") from e


def _validate_algo(c, need) -> None:
    a = c.algo
    r = algos.resolve(a)
    need(r.norm in ("token", "sequence", "constant"), f"algo.norm={r.norm!r}")
    need(r.adv_scale in ("std", "none"), f"algo.adv_scale={r.adv_scale!r}; choose std | none")
    need(r.adv_std_ddof in (0, 1), f"algo.adv_std_ddof={r.adv_std_ddof}; choose 0 | 1")
    need(r.eps_low >= 0 and r.eps_high >= 0, f"algo.eps_low/eps_high must be >= 0, got {r}")
    need(a.num_minibatches >= 1, f"algo.num_minibatches={a.num_minibatches} must be >= 1")
    need(a.ppo_epochs >= 1, f"algo.ppo_epochs={a.ppo_epochs} must be >= 1")
    need(
        c.rollout.prompts_per_step % a.num_minibatches == 0,
        f"algo.num_minibatches={a.num_minibatches} must divide rollout.prompts_per_step="
        f"{c.rollout.prompts_per_step}: a mini-batch takes whole groups",
    )
    _validate_micro_batches(c, need)
    need(
        a.clip_ratio_c == 0 or a.clip_ratio_c > 1,
        f"algo.clip_ratio_c={a.clip_ratio_c}: 0 (off) or > 1",
    )
    need(a.max_sampling_tries >= 1, f"algo.max_sampling_tries={a.max_sampling_tries} must be >= 1")
    need(a.overlong_cache_len >= 0, f"algo.overlong_cache_len={a.overlong_cache_len} must be >= 0")
    need(
        a.overlong_cache_len <= c.rollout.max_new_tokens,
        f"algo.overlong_cache_len={a.overlong_cache_len} exceeds rollout.max_new_tokens="
        f"{c.rollout.max_new_tokens}",
    )
    need(a.ref_kl_coef >= 0, f"algo.ref_kl_coef={a.ref_kl_coef} must be >= 0")
    need(
        a.ref_kl_estimator in ("k1", "k3"),
        f"algo.ref_kl_estimator={a.ref_kl_estimator!r}; choose k1 | k3",
    )
    need(
        not (a.ref_kl_coef > 0 and r.mode == "opsd"),
        f"algo.ref_kl_coef={a.ref_kl_coef} acts on GRPO tokens and algo.name=opsd has none "
        "(use opsd+grpo, or ref_kl_coef=0)",
    )


def _validate_micro_batches(c, need) -> None:
    """train.micro_batch_rows splits an update's rows into whole groups; sft's the SFT batch."""
    r = c.rollout
    update_rows = r.prompts_per_step * r.group_size // c.algo.num_minibatches
    for key, rows, group, what in (
        (
            "train.micro_batch_rows",
            update_rows,
            r.group_size,
            "an update's rows (rollout.prompts_per_step * rollout.group_size / "
            f"algo.num_minibatches = {update_rows})",
        ),
        ("sft.micro_batch_rows", c.sft.batch_size, 1, f"sft.batch_size={c.sft.batch_size}"),
    ):
        v = _get(c, key)
        need(isinstance(v, int) and not isinstance(v, bool), f"{key}={v!r} must be an integer")
        if v == -1:
            need(
                c.train.activation_budget_gib > 0,
                f"{key}=-1 derives the micro-batch from train.activation_budget_gib, which is "
                f"{c.train.activation_budget_gib}: set it (GiB per device) or give the rows",
            )
        elif v > 0:
            need(rows % v == 0, f"{key}={v} must divide {what}")
            need(
                v % group == 0,
                f"{key}={v} must be a multiple of rollout.group_size={group}: a micro-batch "
                "takes whole groups (the group's responses share one prompt row)",
            )


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    d = c.model.to_dict()
    for key in ("mlp_only_layers", "hybrid_layers"):
        d[key] = tuple(d[key])
    return ModelConfig(**d)
