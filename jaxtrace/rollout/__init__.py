"""Rollouts: batched KV-cache sampling from the policy."""

from jaxtrace.rollout import engine
from jaxtrace.rollout.sampler import SamplingConfig, generate, left_pad, make_generate

__all__ = ["SamplingConfig", "engine", "generate", "left_pad", "make_generate"]
