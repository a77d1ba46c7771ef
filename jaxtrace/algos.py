"""What each algorithm name means: the one table of presets the trainer reads.

`config.algo.name` picks a preset; every setting a preset fixes is a config field that defaults
to None ("the preset's value"), so `--config.algo.name=dapo` alone gives DAPO, and
`--config.algo.norm=sequence` on top of it changes only that. `resolve(config.algo)` merges the
two; the trainer, `rl.build_batch` and the loss all read the result, nothing else.

name       mode       advantage      clip low/high  loss aggregation (norm)
grpo       grpo       (r - mean)/std 0.2 / 0.2      sequence: mean per response, then over them
dapo       grpo       (r - mean)/std 0.2 / 0.28     token: sum / #response tokens in the batch
drgrpo     grpo       r - mean       0.2 / 0.2      constant: sum / (B * max_len)
trace      trace      (r - mean)/std 0.2 / 0.28     token (TRACE.md: DAPO-style per-token)
opsd       opsd       (unused)       (unused)       token (KL on every response token, no PG)
opsd+grpo  opsd+grpo  (r - mean)/std 0.2 / 0.28     token (KL and the surrogate on every token)

The reference conventions they match:
- grpo: verl loss_agg_mode="seq-mean-token-mean", clip_ratio=0.2; TRL loss_type="grpo",
  epsilon=0.2, scale_rewards on (DeepSeekMath GRPO without its reference KL, which is
  `ref_kl_coef=0.04` here).
- dapo: verl loss_agg_mode="token-mean", clip_ratio_low/high=0.2/0.28, filter_groups on (dynamic
  sampling); TRL loss_type="dapo", epsilon_high=0.28, mask_truncated_completions=True (overlong
  filtering).
- drgrpo: TRL loss_type="dr_grpo" (sum / (B * max_completion_length)), scale_rewards off; verl
  norm_adv_by_std_in_grpo=False with loss_agg_mode="seq-mean-token-sum-norm" (a sum over tokens
  divided by a constant, the same loss up to that constant).
- trace: its GRPO tokens are trained as dapo trains them, without overlong filtering or dynamic
  sampling (TRACE.md does not ask for them; both can be switched on).

Advantage std: ddof=1 (unbiased, torch.std) in every preset, as verl's GRPO estimator and TRL's
GRPOTrainer compute it. DAPO also filters truncated responses (overlong filtering) and samples
dynamically (drops zero-variance groups, refills the batch). The soft overlong penalty
(`overlong_cache_len`) is opt-in for every algorithm.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Every setting an algorithm name implies (see the module table)."""

    mode: str  # jaxtrace.losses.trace.MODES
    adv_scale: str = "std"  # "std" | "none" (Dr. GRPO: centred only)
    adv_std_ddof: int = 1
    eps_low: float = 0.2
    eps_high: float = 0.28
    norm: str = "token"  # token | sequence | constant
    overlong_filter: bool = False  # truncated responses get no loss
    dynamic_sampling: bool = False  # drop zero-variance groups and refill the batch


PRESETS = {
    "grpo": Algorithm("grpo", eps_high=0.2, norm="sequence"),
    "dapo": Algorithm("grpo", overlong_filter=True, dynamic_sampling=True),
    "drgrpo": Algorithm("grpo", adv_scale="none", eps_high=0.2, norm="constant"),
    "trace": Algorithm("trace"),
    "opsd": Algorithm("opsd"),
    "opsd+grpo": Algorithm("opsd+grpo"),
}
# The `config.algo` fields a preset fills in when they are None.
PRESET_FIELDS = tuple(f.name for f in dataclasses.fields(Algorithm) if f.name != "mode")


def resolve(algo) -> Algorithm:
    """The algorithm `algo` (a `config.algo` section, or any object with its attributes) runs:
    its name's preset with every explicitly set (non-None) field on top."""
    if algo.name not in PRESETS:
        raise ValueError(f"algo.name={algo.name!r}; choose from {tuple(PRESETS)}")
    explicit = {k: getattr(algo, k) for k in PRESET_FIELDS if getattr(algo, k, None) is not None}
    return dataclasses.replace(PRESETS[algo.name], **explicit)
