"""Host side of one RL step: prompts in, a routed training batch out.

rollout -> reward (verifier) -> advantages -> annotate (spans) -> token routes -> privileged
teacher prompts. Everything here is numpy on the host; the device work is in `steps`.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from jaxtrace import algos
from jaxtrace.annotate import AnnotationRequest, char_spans_to_token_mask, divergence_mask
from jaxtrace.annotate.prompt import PARSE_FAILURE
from jaxtrace.data import templates
from jaxtrace.losses import grpo as grpo_lib
from jaxtrace.losses import trace as trace_lib
from jaxtrace.rollout import left_pad

log = logging.getLogger("jaxtrace")


class PromptEncoder:
    """Tokenises student and privileged prompts to fixed widths (P and Q)."""

    def __init__(self, tokenizer, template: str, max_prompt_len: int, max_privileged_len: int):
        self.tok = tokenizer
        self.student_fn, self.privileged_fn = templates.get(template)
        self.p, self.q = max_prompt_len, max_privileged_len
        self._cache: dict = {}

    def _ids(self, text: str, limit: int, what: str) -> list[int]:
        key = (text, limit)
        if key not in self._cache:
            ids = self.tok.encode(text)
            if self.tok.bos_id is not None:
                ids = [self.tok.bos_id] + ids
            if len(ids) > limit:
                raise ValueError(
                    f"{what} has {len(ids)} tokens, more than its budget {limit} "
                    f"(raise rollout.max_{'privileged' if what.startswith('priv') else 'prompt'}"
                    "_len): "
                    f"{text[:80]!r}..."
                )
            self._cache[key] = ids
        return self._cache[key]

    def student(self, examples):
        ids = [self._ids(self.student_fn(e.question), self.p, "prompt") for e in examples]
        return left_pad(ids, self.p, self.tok.pad_id)

    def privileged(self, examples, correct):
        ids = [
            self._ids(
                self.privileged_fn(e.question, e.reference, bool(c)), self.q, "privileged prompt"
            )
            for e, c in zip(examples, correct)
        ]
        return left_pad(ids, self.q, self.tok.pad_id)

    def response_ids(self, text: str) -> list[int]:
        """A supervised response: ' ' + text, then the end-of-sequence token."""
        return self.tok.encode(" " + text) + [self.tok.eos_id]


def decode_responses(tokenizer, response, mask):
    ids = [row[m].tolist() for row, m in zip(response, mask)]
    return ids, [tokenizer.decode(r) for r in ids]


def annotate_masks(annotator, tokenizer, examples, ids, texts, correct, num_tokens):
    """Character spans from the annotator -> key / error token masks [R, N], and counts.

    Annotator output is untrusted: an annotator that raises, returns the wrong number of
    results, or a result without usable spans costs those rows their spans (GRPO only), never
    the run. Returns (key, err, counts) with counts {"dropped_spans", "failed", "timeouts",
    "parse_failed"} (replies with no JSON list of quotes, e.g. from self-annotation).
    """
    requests = [
        AnnotationRequest(e.question, e.reference, t, bool(c))
        for e, t, c in zip(examples, texts, correct)
    ]
    key = np.zeros((len(texts), num_tokens), bool)
    err = np.zeros_like(key)
    counts = {"dropped_spans": 0, "failed": 0, "timeouts": 0, "parse_failed": 0}
    try:
        results = list(annotator.annotate(requests))
    except Exception as e:  # noqa: BLE001 (a broken annotator must not end a long run)
        log.warning("annotator raised %s: %s; this step has no spans", type(e).__name__, e)
        results = []
    if len(results) != len(requests):
        counts["failed"] = len(requests)
        return key, err, counts
    for i, (res, row_ids, text) in enumerate(zip(results, ids, texts)):
        status = getattr(res, "status", "failed")
        counts["failed"] += status in ("failed", "missing")
        counts["timeouts"] += status == "timeout"
        # Quote-based annotators drop quotes not found in the response before there are spans.
        dropped = getattr(res, "dropped_spans", 0)
        if isinstance(dropped, int) and not isinstance(dropped, bool) and dropped > 0:
            counts["dropped_spans"] += dropped
        counts["parse_failed"] += getattr(res, "detail", "") == PARSE_FAILURE
        spans = getattr(res, "spans", None)
        if not spans:
            continue
        # int [T, 2] even for an empty response (np.asarray([]) would be float and rejected)
        offsets = np.asarray(tokenizer.offsets(row_ids), np.int64).reshape(-1, 2)
        mask, n_bad = char_spans_to_token_mask(
            spans, offsets, num_tokens, text=text, return_dropped=True
        )
        counts["dropped_spans"] += n_bad
        (key if correct[i] else err)[i] = mask
    return key, err, counts


def score_rewards(verifier, texts, golds):
    """Rewards float32 [R] and verifier counts. A verifier call that raises scores the whole
    batch 0 and is counted ("error"), so a crashed checker costs one step, not the run."""
    try:
        rewards, stats = verifier.score(texts, golds)
    except Exception as e:  # noqa: BLE001
        log.warning("verifier raised %s: %s; rewards of this step are 0", type(e).__name__, e)
        return np.zeros(len(texts), np.float32), {"error": len(texts), "raised": 1}
    return np.asarray(rewards, np.float32), dict(stats)


def group_prompts(prompt_RxP, valid_RxP, group_size: int):
    """The sampler's prompts [R, P] (each repeated `group_size` times, prompt-major) as one row
    per group [R / group_size, P], the layout in which the train step runs each prompt once."""
    prompt, valid = (np.asarray(x)[::group_size] for x in (prompt_RxP, valid_RxP))
    for name, rows, one in (("prompt", prompt_RxP, prompt), ("prompt_valid", valid_RxP, valid)):
        if not np.array_equal(np.repeat(one, group_size, axis=0), rows):
            raise ValueError(
                f"rollout {name} rows are not groups of {group_size} identical rows "
                f"(shape {np.shape(rows)}): expected the sampler's prompt-major layout"
            )
    return prompt, valid


def shaped_rewards(verdicts_R, response_mask_RxN, algo):
    """The rewards advantages are computed from: the verifier's verdicts [R] plus the shaping
    terms (DAPO's soft overlong penalty when `algo.overlong_cache_len` > 0). Shaping moves
    advantages only; spans are routed and accuracy counted on the verdicts."""
    rewards = np.asarray(verdicts_R, np.float32)
    if algo.overlong_cache_len > 0:
        length = np.asarray(response_mask_RxN).astype(bool).sum(1)
        rewards = rewards + np.asarray(
            grpo_lib.overlong_penalty(
                length, np.shape(response_mask_RxN)[1], algo.overlong_cache_len
            )
        )
    return rewards


def groups_with_signal(rewards_R, group_size: int):
    """bool [G]: the groups whose rewards differ (a zero-variance group has zero advantage)."""
    r = np.asarray(rewards_R).reshape(-1, group_size)
    return r.max(axis=1) != r.min(axis=1)


def take_groups(parts, group_size: int):
    """Joins chosen groups of several rollouts into one.

    `parts`: list of (rollout dict [R_i rows], examples [R_i], verdicts [R_i], groups), `groups`
    the group indices to keep from that rollout, in order. Returns (rollout, examples,
    verdicts) with the kept groups' rows, prompt-major as the sampler lays them out."""
    rollouts, examples, verdicts = [], [], []
    for rollout, ex, ver, groups in parts:
        rows = (np.asarray(groups, int)[:, None] * group_size + np.arange(group_size)).ravel()
        rollouts.append({k: np.asarray(v)[rows] for k, v in rollout.items()})
        examples += [ex[i] for i in rows]
        verdicts.append(np.asarray(ver)[rows])
    joined = {k: np.concatenate([r[k] for r in rollouts]) for k in rollouts[0]}
    return joined, examples, np.concatenate(verdicts)


def build_batch(
    rollout,
    examples,
    verdicts,
    *,
    group_size,
    tokenizer,
    encoder,
    algo,
    annotator,
    lam: float,
    divergence_fn=None,
):
    """The training batch (numpy) and host metrics for one step.

    `rollout`: numpy dict from the sampler; `examples`: the R examples (repeated per sample);
    `verdicts`: float [R], the verifier's 1 (correct) / 0; `algo`: the `config.algo` section
    (its name's preset fills unset fields, `jaxtrace.algos`); `divergence_fn(batch) -> kl
    [R, N]` for the automatic annotator. The verdicts route spans and give the accuracy; the
    advantages come from the shaped rewards (`shaped_rewards`).
    """
    resolved = algos.resolve(algo)
    mask = rollout["response_mask"].astype(bool)
    length = mask.sum(1)
    truncated = ~rollout["stopped"].astype(bool)
    correct = np.asarray(verdicts) > 0.5
    rewards = shaped_rewards(verdicts, mask, algo)
    adv, zero_var = (
        np.asarray(x)
        for x in grpo_lib.group_advantages(
            rewards, group_size, scale=resolved.adv_scale, ddof=resolved.adv_std_ddof
        )
    )
    prompt, prompt_valid = group_prompts(rollout["prompt"], rollout["prompt_valid"], group_size)
    batch = {
        "prompt": prompt,  # one row per group, shared by its responses
        "prompt_valid": prompt_valid,
        "response": rollout["response"],
        "response_mask": mask,
        "advantages": adv.astype(np.float32),
    }
    metrics = {
        "reward": float(rewards.mean()),
        "accuracy": float(correct.mean()),
        "response_length": float(length.mean()),
        "truncated_frac": float(truncated.mean()),
        "zero_variance_group_frac": float(zero_var.mean()),
    }
    needs_teacher = resolved.mode in ("opsd", "opsd+grpo") or (resolved.mode == "trace" and lam > 0)
    key = err = None
    if needs_teacher:
        batch["privileged"], batch["privileged_valid"] = encoder.privileged(examples, correct)
    if resolved.mode == "trace" and lam > 0:
        if algo.annotator == "divergence":
            kl = np.asarray(divergence_fn(batch))
            picked = np.asarray(
                divergence_mask(
                    kl, mask, top_frac=algo.divergence_top_frac, merge_gap=algo.divergence_merge_gap
                )
            )
            key, err = picked & correct[:, None], picked & ~correct[:, None]
        elif algo.annotator != "none":
            ids, texts = decode_responses(tokenizer, rollout["response"], mask)
            key, err, counts = annotate_masks(
                annotator, tokenizer, examples, ids, texts, correct, mask.shape[1]
            )
            metrics.update({f"annotator_{k}": v for k, v in counts.items()})
            metrics["annotator_failed_frac"] = counts["failed"] / max(len(texts), 1)
            metrics["annotator_parse_failed_frac"] = counts["parse_failed"] / max(len(texts), 1)
    route = np.asarray(
        trace_lib.token_routes(
            mask,
            key,
            err,
            correct,
            fkl_on_key_spans=algo.fkl_on_key_spans,
            rkl_on_error_spans=algo.rkl_on_error_spans,
        )
    )
    if resolved.overlong_filter:
        route = np.where(truncated[:, None], trace_lib.ROUTE_IGNORE, route)
    batch["route"] = route.astype(np.int32)
    return batch, metrics, needs_teacher


# ---------------------------------------------------------------------------- PPO updates
PROMPT_KEYS = ("prompt", "prompt_valid")  # one row per group; every other key one per response


def minibatches(batch, num_minibatches: int):
    """Splits a step batch (numpy) into `num_minibatches` batches of whole groups: mini-batch i
    holds groups [i * G/M, (i + 1) * G/M) with their prompt rows and their R/M response rows."""
    g, r = len(batch["prompt"]), len(batch["response"])
    if g % num_minibatches:
        raise ValueError(f"{num_minibatches} mini-batches do not split {g} groups evenly")
    out = []
    for i in range(num_minibatches):
        out.append(
            {
                key: value[
                    slice(i * g // num_minibatches, (i + 1) * g // num_minibatches)
                    if key in PROMPT_KEYS
                    else slice(i * r // num_minibatches, (i + 1) * r // num_minibatches)
                ]
                for key, value in batch.items()
            }
        )
    return out


def add_behaviour_stats(
    minibatches_, params, *, logprob_fn, old_logp=True, teacher_fn=None, ref_params=None
):
    """Adds what every update of a rollout batch reuses to each (device) mini-batch, computed
    before any update: old_logp (`logprob_fn` of `params`, the behaviour weights, when
    `old_logp`), teacher_hidden (`teacher_fn` of `params`, when given and the batch has
    privileged prompts) and ref_logp (`logprob_fn` of `ref_params`, when given)."""
    out = []
    for mb in minibatches_:
        extra = {}
        if old_logp:
            extra["old_logp"] = logprob_fn(params, mb)
        if teacher_fn is not None and "privileged" in mb:
            extra["teacher_hidden"] = teacher_fn(params, mb)
        if ref_params is not None:
            extra["ref_logp"] = logprob_fn(ref_params, mb)
        out.append({**mb, **extra})
    return out


# Metrics of one update that add up over a rollout batch's updates; the others are averaged.
_SUMMED = ("exposure",)


def ppo_updates(state, minibatches_, rl_step, lam, use_teacher: bool, *, epochs: int = 1):
    """`epochs` passes over the mini-batches, one optimizer update each (`rl_step`, see
    `steps.make_rl_step`), in order; `state["step"]` moves by one for the whole rollout batch.

    Returns (state, metrics): per-update metrics averaged (exposure summed) as floats, `finite`
    1.0 only if every update was finite, `updates` and `skipped_updates`."""
    collected = []
    total = epochs * len(minibatches_)
    for e in range(epochs):
        for i, mb in enumerate(minibatches_):
            last = e * len(minibatches_) + i == total - 1
            state, m = rl_step(state, mb, lam, use_teacher, np.int32(last))
            collected.append(m)
    collected = jax.device_get(collected)  # after every update is dispatched
    reduce = lambda k: np.sum if k in _SUMMED else np.mean
    metrics = {
        k: float(reduce(k)([m[k] for m in collected])) for k in collected[0] if k != "finite"
    }
    finite = [bool(m["finite"]) for m in collected]
    metrics.update(finite=float(all(finite)), updates=total, skipped_updates=finite.count(False))
    return state, metrics
