"""Host-side RL mechanics: verdicts apart from shaped rewards, DAPO dynamic sampling, and the
one table of algorithm presets."""

from types import SimpleNamespace

import numpy as np
import pytest

from jaxtrace import algos, rl, trainer
from jaxtrace import phases as phases_lib
from jaxtrace.config import base
from jaxtrace.losses import trace as trace_lib
from tests.test_reliability import CharTokenizer


def _algo(**kw):
    a = base().algo.to_dict()
    a.update(kw)
    return SimpleNamespace(**a)


class SpanEverything:
    """Marks the first 3 characters of every response (key or error by its verdict)."""

    def annotate(self, requests):
        return [SimpleNamespace(spans=((0, 3),), kind=r.kind, status="ok") for r in requests]


def test_correct_answer_in_the_penalty_zone_still_routes_fkl():
    # max_new_tokens 8, soft zone the last 4 tokens: a correct 7-token answer is shaped to
    # 1 - 3/4 = 0.25 (< 0.5), and must still count as correct and route FKL on its key span.
    n, lengths, verdicts = 8, [7, 2, 3, 2], [1.0, 0.0, 1.0, 0.0]
    mask = np.arange(n)[None, :] < np.asarray(lengths)[:, None]
    rollout = {
        "prompt": np.full((4, 3), 5, np.int32),
        "prompt_valid": np.ones((4, 3), bool),
        "response": np.where(mask, 40, 0).astype(np.int32),
        "response_mask": mask,
        "stopped": np.ones(4, bool),
    }
    tok = CharTokenizer()
    examples = [SimpleNamespace(question=f"q{i // 2}", reference="r", answer="1") for i in range(4)]
    batch, m, _ = rl.build_batch(
        rollout,
        examples,
        np.asarray(verdicts, np.float32),
        group_size=2,
        tokenizer=tok,
        encoder=rl.PromptEncoder(tok, "plain", 40, 80),
        algo=_algo(annotator="file", overlong_cache_len=4),
        annotator=SpanEverything(),
        lam=1.0,
    )
    shaped = rl.shaped_rewards(verdicts, mask, _algo(overlong_cache_len=4))
    np.testing.assert_allclose(shaped, [0.25, 0.0, 1.0, 0.0])
    assert (batch["route"][0, :3] == trace_lib.ROUTE_FKL).all()  # correct, in the zone
    assert (batch["route"][0, 3:7] == trace_lib.ROUTE_GRPO).all()
    assert m["accuracy"] == 0.5 and m["reward"] == pytest.approx(np.mean(shaped))
    assert batch["advantages"][0] > 0  # shaping moved the advantage, still above its group
    assert (batch["privileged"][0] != batch["privileged"][1]).any()  # "correct" teacher prompt


# ---------------------------------------------------------------------------- dynamic sampling
K = 4  # group size


class FakePolicy:
    """A sampler whose verdicts depend on the prompt: questions 'mixed-*' get rows alternating
    right / wrong (a group with signal), the others all wrong (zero variance)."""

    def __init__(self, encoder):
        self.encoder, self.calls = encoder, []

    def __call__(self, params, prompt, valid, rng, max_new):
        self.calls.append(np.asarray(prompt).copy())
        rows = len(prompt) * K
        return {
            "prompt": np.repeat(prompt, K, 0),
            "prompt_valid": np.repeat(valid, K, 0),
            "response": np.full((rows, 3), 40, np.int32),
            "response_mask": np.ones((rows, 3), bool),
            "logprobs": np.zeros((rows, 3), np.float32),
            "stopped": np.ones(rows, bool),
        }


class FakeVerifier:
    def score(self, texts, golds):
        return [float(g == "mixed" and i % 2 == 0) for i, g in enumerate(golds)], {"timeout": 0}


def _phases(examples, tries, dynamic=True):
    c = base()
    c.rollout.update(prompts_per_step=4, group_size=K)
    c.algo.update(name="dapo", dynamic_sampling=dynamic, max_sampling_tries=tries)
    tok = CharTokenizer()
    encoder = rl.PromptEncoder(tok, "plain", 40, 80)
    policy = FakePolicy(encoder)
    phases = phases_lib.RLPhases(
        c, algos.resolve(c.algo), None, examples, encoder, policy, FakeVerifier(), None, None, None
    )
    return phases, policy


def _examples(num, mixed_every=None):
    """Examples p0..; every `mixed_every`-th one has a group with signal (None: none has)."""
    mixed = lambda i: mixed_every is not None and i % mixed_every == 0
    return [
        SimpleNamespace(question=f"p{i}", reference="r", answer="mixed" if mixed(i) else "x")
        for i in range(num)
    ]


def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_signal():
    phases, policy = _phases(_examples(40, mixed_every=3), tries=20)
    (rollout, examples, verdicts), vstats, m = phases.rollout_and_score(None, step=5)
    assert len(rollout["response"]) == 4 * K and len(examples) == 4 * K
    assert rl.groups_with_signal(verdicts, K).all()
    assert all(e.answer == "mixed" for e in examples)
    assert m["sampling_groups_short"] == 0 and m["sampling_tries"] == len(policy.calls) > 1
    drawn = [phases_lib.sampling_indices(5, t, 4, 40, 0) for t in range(m["sampling_tries"])]
    zero_variance = sum(phases.train[i].answer != "mixed" for idx in drawn for i in idx)
    assert m["sampling_groups_dropped"] == zero_variance > 0
    # The same (seed, step) draws the same prompts: what an exact resume needs.
    again, _ = _phases(_examples(40, mixed_every=3), tries=20)
    (rollout2, _, _), _, m2 = again.rollout_and_score(None, step=5)
    np.testing.assert_array_equal(rollout2["prompt"], rollout["prompt"])
    assert m2 == m


def test_dynamic_sampling_stops_at_its_bound_and_fills_with_zero_variance_groups():
    phases, policy = _phases(_examples(40), tries=3)
    (rollout, _, verdicts), _, m = phases.rollout_and_score(None, step=0)
    assert len(policy.calls) == 3 == m["sampling_tries"]
    assert m["sampling_groups_short"] == 4 and m["sampling_groups_dropped"] == 3 * 4 - 4
    assert len(rollout["response"]) == 4 * K  # the shapes the train step compiled for
    assert not rl.groups_with_signal(verdicts, K).any()


def test_without_dynamic_sampling_one_draw_of_the_epoch_permutation():
    phases, policy = _phases(_examples(40), tries=5, dynamic=False)
    _, _, m = phases.rollout_and_score(None, step=2)
    assert len(policy.calls) == 1 and m == {}
    np.testing.assert_array_equal(
        phases_lib.sampling_indices(2, 0, 4, 40, 0), trainer.prompt_indices(2, 4, 40, 0)
    )
    assert not np.array_equal(
        phases_lib.sampling_indices(2, 1, 4, 40, 0), phases_lib.sampling_indices(2, 2, 4, 40, 0)
    )


# ---------------------------------------------------------------------------- presets
def test_presets_are_what_the_trainer_runs():
    c = base()
    for name, want in algos.PRESETS.items():
        c.algo.name = name
        assert algos.resolve(c.algo) == want
        assert phases_lib.loss_config(c, want).norm == want.norm
    grpo, dapo, dr = algos.PRESETS["grpo"], algos.PRESETS["dapo"], algos.PRESETS["drgrpo"]
    assert (grpo.eps_low, grpo.eps_high, grpo.norm, grpo.adv_std_ddof) == (0.2, 0.2, "sequence", 1)
    assert (dapo.eps_high, dapo.norm, dapo.overlong_filter, dapo.dynamic_sampling) == (
        0.28,
        "token",
        True,
        True,
    )
    assert (dr.adv_scale, dr.norm, dr.eps_high) == ("none", "constant", 0.2)
    c.algo.name, c.algo.norm, c.algo.dynamic_sampling = "dapo", "sequence", False
    got = algos.resolve(c.algo)  # explicit fields win, the rest stay the preset's
    assert (got.norm, got.dynamic_sampling, got.eps_high) == ("sequence", False, 0.28)
