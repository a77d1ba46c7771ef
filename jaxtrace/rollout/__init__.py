"""Rollouts: batched KV-cache sampling from the policy. `make_generate` is the static sampler
(every row to the full budget in lockstep), `engine.make_generate` the continuous-batching engine
(cost follows the generated tokens); `select` picks one for the callers (`rollout.engine`)."""

from jaxtrace.rollout import engine
from jaxtrace.rollout.engine import select
from jaxtrace.rollout.sampler import SamplingConfig, generate, left_pad, make_generate

__all__ = ["SamplingConfig", "engine", "generate", "left_pad", "make_generate", "select"]
