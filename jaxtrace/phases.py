"""The phases of one RL step and the settings they read, wired once per run by the trainer.

rollout -> score (DAPO dynamic sampling: repeated until the batch is full) -> annotate + build
batch -> update(s) (PPO mini-batches). `trainer.run` calls them in that order, one line each;
the host-side work is in `rl`, the device work in `steps`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace import algos, rl, sharding, steps
from jaxtrace.losses import trace as trace_lib


def prompt_indices(step: int, n: int, num_examples: int, seed: int) -> np.ndarray:
    """The examples of RL step `step`: a fresh permutation per epoch, a pure function of step."""
    out = []
    for k in range(step * n, (step + 1) * n):
        epoch, pos = divmod(k, num_examples)
        out.append(np.random.default_rng([seed, epoch]).permutation(num_examples)[pos])
    return np.asarray(out)


def sampling_indices(step: int, attempt: int, n: int, num_examples: int, seed: int):
    """The examples of rollout attempt `attempt` of RL step `step` (a pure function of seed,
    step and attempt, so a resumed run draws the same): attempt 0 is the epoch permutation of
    `prompt_indices`; later attempts (dynamic sampling) draw from a stream of their own."""
    if attempt == 0:
        return prompt_indices(step, n, num_examples, seed)
    rng = np.random.default_rng([seed, step, attempt])
    return rng.choice(num_examples, n, replace=n > num_examples)


def loss_config(config, algo: algos.Algorithm) -> steps.LossConfig:
    """The train step's loss settings: the resolved algorithm plus the run's other loss keys."""
    a = config.algo
    return steps.LossConfig(
        mode=algo.mode,
        eps_low=algo.eps_low,
        eps_high=algo.eps_high,
        norm=algo.norm,
        max_len=config.rollout.max_new_tokens,
        ref_kl_coef=a.ref_kl_coef,
        ref_kl_estimator=a.ref_kl_estimator,
        clip_ratio_c=a.clip_ratio_c,
        opsd_route=trace_lib.ROUTE_RKL if a.opsd_route == "rkl" else trace_lib.ROUTE_FKL,
        kl_implementation=a.kl_implementation or None,
    )


def kl_lambda(a, algo: algos.Algorithm, step: int) -> float:
    """The KL coefficient of `step`: TRACE's schedule, OPSD's constant, 0 for the PG baselines."""
    if algo.mode == "trace":
        return float(
            trace_lib.kl_coef(
                step,
                lambda0=a.kl_lambda0,
                warmup_steps=a.kl_warmup_steps,
                decay_steps=a.kl_decay_steps,
                decay=a.kl_decay,
            )
        )
    return a.kl_lambda0 if algo.mode.startswith("opsd") else 0.0


class RLPhases:
    """The phases of one RL step, each a method, with the wiring they share:
    rollout -> score (with DAPO dynamic sampling: repeated until the batch is full) ->
    annotate + build batch -> update(s) (PPO mini-batches over the rollout batch)."""

    def __init__(
        self,
        config,
        algo,
        graphdef,
        train,
        encoder,
        generate,
        verifier,
        annotator,
        mesh,
        rl_step,
        micro_batch_rows=0,
    ):
        self.config, self.algo, self.train, self.encoder = config, algo, train, encoder
        self.tokenizer = encoder.tok
        self.generate, self.verifier, self.annotator = generate, verifier, annotator
        self.mesh, self.rl_step = mesh, rl_step
        impl = config.algo.kl_implementation or None
        micro = micro_batch_rows  # train.micro_batch_rows, resolved (`microbatch.resolve_rows`)
        self.divergence = steps.make_divergence_fn(graphdef, impl, micro)
        self.logprob_fn = steps.make_logprob_fn(graphdef, impl, micro)
        self.teacher_fn = steps.make_teacher_hidden_fn(graphdef, micro)

    def rollout(self, params, indices, rng):
        """Samples group_size responses for each example of `indices` (numpy rollout dict)."""
        chosen = [self.train[i] for i in indices]
        placed = sharding.shard_rows(self.encoder.student(chosen), self.mesh)
        out = sharding.to_host(self.generate(params, *placed, rng, None))
        return out, [e for e in chosen for _ in range(self.config.rollout.group_size)]

    def score(self, rollout, examples):
        """The verifier's verdicts [R] (1 correct, 0 not) and its counters."""
        texts = [
            self.tokenizer.decode(row[m])
            for row, m in zip(rollout["response"], rollout["response_mask"])
        ]
        return rl.score_rewards(self.verifier, texts, [e.answer for e in examples])

    def rollout_and_score(self, params, step):
        """One rollout batch, scored: ((rollout, examples, verdicts), verifier counts, metrics).

        With dynamic sampling, groups whose shaped rewards do not vary are dropped and new
        prompts drawn (attempt t of step s: `sampling_indices`, rng fold_in(fold_in(seed, s), t))
        until the batch holds prompts_per_step groups, at most `max_sampling_tries` draws; if
        they run out, dropped groups fill the rest (shapes stay fixed) and are counted."""
        a, r, seed = self.config.algo, self.config.rollout, self.config.seed
        tries = a.max_sampling_tries if self.algo.dynamic_sampling else 1
        kept, spare, vstats, n_kept, n_correct, n_rows = [], [], {}, 0, 0.0, 0
        for attempt in range(tries):
            idx = sampling_indices(step, attempt, r.prompts_per_step, len(self.train), seed)
            rng = jax.random.fold_in(jax.random.key(seed), step)
            rng = jax.random.fold_in(rng, attempt) if attempt else rng
            rollout, examples = self.rollout(params, idx, rng)
            verdicts, stats = self.score(rollout, examples)
            for k, v in stats.items():
                vstats[k] = vstats.get(k, 0) + v
            if not self.algo.dynamic_sampling:
                return (rollout, examples, verdicts), vstats, {}
            n_correct, n_rows = n_correct + float(np.sum(verdicts > 0.5)), n_rows + len(verdicts)
            shaped = rl.shaped_rewards(verdicts, rollout["response_mask"], a)
            signal = rl.groups_with_signal(shaped, r.group_size)
            take = np.flatnonzero(signal)[: r.prompts_per_step - n_kept]
            kept.append((rollout, examples, verdicts, take))
            spare.append((rollout, examples, verdicts, np.flatnonzero(~signal)))
            n_kept += len(take)
            if n_kept == r.prompts_per_step:
                break
        short = r.prompts_per_step - n_kept
        fill, need = [], short
        for rollout, examples, verdicts, groups in spare:
            if need:
                fill.append((rollout, examples, verdicts, groups[:need]))
                need -= len(groups[:need])
        n_zero_var = sum(len(part[3]) for part in spare)
        sample_m = {
            "sampling_tries": attempt + 1,
            "sampling_groups_dropped": n_zero_var - short,
            "sampling_groups_short": short,  # zero-variance groups kept: tries ran out
            "sampled_accuracy": n_correct / max(n_rows, 1),  # over every drawn rollout
        }
        return rl.take_groups(kept + fill, r.group_size), vstats, sample_m

    def build_batch(self, sample, lam, params):
        """annotate + build batch: (numpy batch, host metrics, use_teacher)."""
        rollout, examples, verdicts = sample
        return rl.build_batch(
            rollout,
            examples,
            verdicts,
            group_size=self.config.rollout.group_size,
            tokenizer=self.tokenizer,
            encoder=self.encoder,
            algo=self.config.algo,
            annotator=self.annotator,
            lam=lam,
            divergence_fn=functools.partial(_divergence, self.divergence, params, self.mesh),
        )

    def update(self, state, batch, sample, lam, use_teacher, ref_params):
        """num_minibatches * ppo_epochs updates on the rollout batch; (state, float metrics).

        What the updates share is computed once, before the first, by the behaviour weights:
        with more than one update the old log-probs and (when used) the teacher's hidden states,
        with a reference KL the reference's log-probs. A single update is on-policy (ratio 1)
        and runs the teacher inside the step, as a batch without these keys does."""
        a = self.config.algo
        multi = a.num_minibatches * a.ppo_epochs > 1
        mbs = [
            sharding.shard_step_batch(mb, self.mesh)
            for mb in rl.minibatches(batch, a.num_minibatches)
        ]
        if multi or ref_params is not None:
            mbs = rl.add_behaviour_stats(
                mbs,
                state["params"],
                logprob_fn=self.logprob_fn,
                old_logp=multi,
                teacher_fn=self.teacher_fn if multi and use_teacher else None,
                ref_params=ref_params,
            )
        state, m = rl.ppo_updates(
            state, mbs, self.rl_step, jnp.float32(lam), use_teacher, epochs=a.ppo_epochs
        )
        if multi:  # the recomputed behaviour log-probs against the sampler's own
            old = np.concatenate([sharding.to_host(mb["old_logp"]) for mb in mbs])
            mask = np.asarray(batch["response_mask"], bool)
            gap = np.abs(old - sample[0]["logprobs"])[mask]
            m["old_logp_vs_sampler"] = float(gap.mean()) if gap.size else 0.0
        return state, m


def _divergence(fn, params, mesh, batch):
    return sharding.to_host(fn(params, sharding.shard_step_batch(batch, mesh)))
