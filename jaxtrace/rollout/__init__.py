"""Rollouts: batched KV-cache sampling from the policy."""

from jaxtrace.rollout.sampler import SamplingConfig, generate, left_pad, make_generate

__all__ = ["SamplingConfig", "generate", "left_pad", "make_generate"]
