"""Timers for google-tunix (0.1.7) GRPO on CPU, imported by `benchmarks/vs_peers.py`.

Each timer builds everything once and returns a zero-arg callable; the first call compiles, so
the caller warms up once and then times repeated calls (call 2 is still measurably slower than
later ones, so take a median). All models are tunix's own Qwen3
(`tunix.models.qwen3.model.Qwen3`) with tunix's random initialisation, float32.

What one call runs:

* `train_step_timer`: one GRPO policy update exactly as `GRPOLearner` issues it per mini-batch,
  `RLCluster.update_actor([example], None)`: tunix's RL `Trainer.train` on a fixed pre-built
  `TrainExample` (nnx.jit of value_and_grad of the registered "grpo" policy loss, then the adamw
  update; tunix wraps the optimizer in `optax.MultiSteps(..., 1)` because RL training always sets
  gradient_accumulation_steps = mini_batch_size // train_micro_batch_size). beta=0.0 (no reference
  model), num_iterations=1 (no old-policy log-prob pass), mini_batch_size =
  train_micro_batch_size = the whole batch. Blocks on the new actor params. No rollout.
* `full_step_timer`: one `GRPOLearner.train` call over a one-batch dataset: vanilla rollout
  (tunix `Sampler`, temperature 1.0, top_p 1.0) of group_size completions per prompt, the reward
  fn, GRPO advantages, the actor update, and tunix's per-step bookkeeping (metric buffers,
  `RLCluster.close`). Returns the number of generated tokens.
* `decode_timer`: `tunix.generate.sampler.Sampler.__call__`, greedy: jitted prefill plus a jitted
  while-loop decode over its KV cache, including its host-side tokenize/detokenize.

Set-up choices (no tunix internals are patched):

* One CPU device; actor, reference and rollout roles share one 1x1 ("fsdp", "tp") mesh, so the
  actor and the rollout model share weights and no weight sync runs (tunix's colocated path).
* Tokenizer: `WordTokenizer` below (id i <-> word "t{i}"), which tunix's `TokenizerAdapter`
  accepts through its generic path (any object with encode/decode/bos_id/eos_id/pad_id). It
  needs no download or training, gives prompts of exactly prompt_len tokens, decodes every id of
  the model's vocab, and lets the reward fn count generated tokens from the text (one word per
  token). pad = 0, no bos, eos = vocab_size: an id the model can never sample, so generation
  never stops early and every sequence gets exactly response_len / new_tokens tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.models.qwen3 import model as qwen3_lib
from tunix.rl import rl_cluster as rl_cluster_lib
from tunix.rl.grpo import grpo_learner
from tunix.rl.rollout import base_rollout
from tunix.utils import mesh as mesh_lib

_NEVER = 10**9  # eval cadence / step cap that is never reached


class WordTokenizer:
    """Word-level tokenizer: id i <-> "t{i}"; pad 0, no bos, eos outside the vocab."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **kwargs) -> list[int]:
        return [int(word[1:]) for word in text.split()]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(f"t{i}" for i in ids)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return self.vocab_size

    def pad_id(self) -> int:
        return 0


def make_model(shape: dict, seed: int = 0):
    """A tunix Qwen3 with random weights, fp32.

    shape keys: num_layers, vocab_size, embed_dim, hidden_dim, num_heads, head_dim, num_kv_heads,
    rope_theta, norm_eps, tied (bool).
    """
    config = qwen3_lib.ModelConfig(
        num_layers=shape["num_layers"],
        vocab_size=shape["vocab_size"],
        embed_dim=shape["embed_dim"],
        hidden_dim=shape["hidden_dim"],
        num_heads=shape["num_heads"],
        head_dim=shape["head_dim"],
        num_kv_heads=shape["num_kv_heads"],
        rope_theta=int(shape["rope_theta"]),
        norm_eps=shape["norm_eps"],
        use_tied_embedding=bool(shape["tied"]),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    return qwen3_lib.Qwen3(config, rngs=nnx.Rngs(seed))


def _random_prompts(rng, n: int, length: int, vocab_size: int) -> list[str]:
    """n prompts of exactly `length` WordTokenizer tokens, ids in [1, vocab) (never pad)."""
    tokenizer = WordTokenizer(vocab_size)
    return [tokenizer.decode(row) for row in rng.integers(1, vocab_size, size=(n, length))]


def _grpo_learner(shape, *, num_prompts, group_size, prompt_len, response_len, lr, seed, reward):
    """RLCluster (vanilla rollout, everything on one 1x1 mesh) + GRPOLearner, beta=0."""
    # tunix's helper: a mesh with Auto axes (jax.make_mesh now defaults to Explicit axes, which
    # tunix's with_sharding_constraint calls reject).
    mesh = mesh_lib.create_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])
    roles = rl_cluster_lib.Role
    cluster_config = rl_cluster_lib.ClusterConfig(
        role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optax.adamw(lr),
            eval_every_n_steps=_NEVER,
            max_steps=_NEVER,
            mini_batch_size=num_prompts,
            train_micro_batch_size=num_prompts,
        ),
        rollout_config=base_rollout.RolloutConfig(
            max_tokens_to_generate=response_len,
            max_prompt_length=prompt_len,
            kv_cache_size=prompt_len + response_len,
            temperature=1.0,
            top_p=1.0,
            seed=seed,
        ),
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=make_model(shape, seed),
        tokenizer=WordTokenizer(shape["vocab_size"]),
        cluster_config=cluster_config,
    )
    algo_config = grpo_learner.GRPOConfig(num_generations=group_size, num_iterations=1, beta=0.0)
    return grpo_learner.GRPOLearner(cluster, algo_config=algo_config, reward_fns=reward)


def _parity_reward(prompts, completions, **kwargs):
    return [float(len(c) % 2) for c in completions]


def _block_on_actor(cluster):
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model, nnx.Param))


def train_step_timer(shape, *, num_prompts, group_size, prompt_len, response_len, lr=1e-6, seed=0):
    """Zero-arg callable running one tunix GRPO actor update on a fixed TrainExample.

    The batch is num_prompts * group_size sequences of prompt_len prompt and response_len
    completion tokens (random ids, no padding; each prompt repeated for its group, as
    GRPOLearner lays out a step) with random advantages. Returns the number of
    tokens in the batch (prompt + completion), like the jaxtrace row of `vs_peers.py`.
    """
    learner = _grpo_learner(
        shape,
        num_prompts=num_prompts,
        group_size=group_size,
        prompt_len=prompt_len,
        response_len=response_len,
        lr=lr,
        seed=seed,
        reward=_parity_reward,
    )
    cluster = learner.rl_cluster
    rng = np.random.default_rng(seed)
    batch = num_prompts * group_size
    vocab = shape["vocab_size"]
    # Same array kinds as GRPOLearner._generate_and_compute_advantage produces.
    # GRPO's layout: each of the num_prompts prompts repeated for its group_size completions.
    prompts = rng.integers(1, vocab, size=(num_prompts, prompt_len))
    prompt_ids = jnp.asarray(np.repeat(prompts, group_size, axis=0), jnp.int32)
    completion_ids = jnp.asarray(rng.integers(1, vocab, size=(batch, response_len)), jnp.int32)
    example = grpo_learner.TrainExample(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_ids != 0,
        completion_ids=completion_ids,
        completion_mask=completion_ids != 0,
        ref_per_token_logps=None,
        advantages=jax.device_put(rng.standard_normal(batch).astype(np.float32)),
        old_per_token_logps=None,
    )

    def step():
        cluster.update_actor([example], None)
        _block_on_actor(cluster)
        return batch * (prompt_len + response_len)

    return step


def full_step_timer(shape, *, num_prompts, group_size, prompt_len, response_len, seed=0):
    """Zero-arg callable running one full tunix GRPO step (rollout + rewards + update).

    Prompts are fixed strings of exactly prompt_len tokens; reward = len(completion) % 2.
    Returns the number of tokens generated in the step.
    """
    generated = []

    def reward(prompts, completions, **kwargs):
        generated.append(sum(len(c.split()) for c in completions))
        return _parity_reward(prompts, completions)

    learner = _grpo_learner(
        shape,
        num_prompts=num_prompts,
        group_size=group_size,
        prompt_len=prompt_len,
        response_len=response_len,
        lr=1e-6,
        seed=seed,
        reward=reward,
    )
    prompts = _random_prompts(
        np.random.default_rng(seed), num_prompts, prompt_len, shape["vocab_size"]
    )
    dataset = [{"prompts": np.array(prompts)}]

    def step():
        generated.clear()
        learner.train(dataset)
        _block_on_actor(learner.rl_cluster)
        return sum(generated)

    return step


def decode_timer(shape, *, batch, prompt_len, new_tokens, seed=0):
    """Zero-arg callable decoding `new_tokens` greedy tokens for `batch` random prompts.

    Uses tunix's `Sampler` with a KV cache of prompt_len + new_tokens; eos is outside the vocab,
    so nothing stops early. Returns the number of generated tokens.
    """
    model = make_model(shape, seed)
    config = model.config
    tokenizer = WordTokenizer(config.vocab_size)
    sampler = sampler_lib.Sampler(
        model,
        tokenizer,
        sampler_lib.CacheConfig(
            cache_size=prompt_len + new_tokens,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
        ),
    )
    prompts = _random_prompts(np.random.default_rng(seed), batch, prompt_len, config.vocab_size)

    def step():
        out = sampler(
            prompts,
            max_generation_steps=new_tokens,
            max_prompt_length=prompt_len,
            temperature=0.0,
            eos_tokens=[tokenizer.eos_id()],
        )
        return sum(len(t) for t in out.tokens)

    return step
