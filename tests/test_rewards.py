"""Rewards: answer extraction, plain-number fast path, time-bounded math-verify equivalence."""

import json
import pathlib
import textwrap
import time
from decimal import Decimal

import numpy as np
import pytest

from jaxtrace.rewards import (
    MathVerifier,
    extract_answer,
    extract_boxed,
    gsm8k_gold,
    parse_plain_number,
)
from jaxtrace.rewards import verifier as verifier_mod

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
# A hang would never return; this bound only has to separate "bounded" from "stuck", with room
# for a worker restart on a busy 2-core machine.
HANG_SLACK_S = 30.0


def _jsonl(rel: str) -> list[dict]:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"{path} not found (tests read ../shared/data relative to the repo root)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(timeout_s=5.0, num_workers=1) as v:
        yield v


# -- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are set delimiters, not groups
        ("first \\boxed{1} then \\boxed{ 2 }", "2"),  # last box wins, stripped
        ("\\boxed{7} and a truncated \\boxed{\\frac{3}{", "7"),  # unclosed last box is skipped
        ("\\fbox{x^2}", "x^2"),
        ("\\boxed 5", "5"),
        ("Janet makes 9 * 2 = 18 dollars.\n#### 1,018", "1,018"),
        ("We get 3 apples, then 4.5, finally -12 left", "-12"),
        ("ratio 1,234,567 and 3/4", "3/4"),
        ("no digits here", None),
        ("", None),
        ("\\boxed{}  #### 5", "5"),  # an empty box is no answer; fall through
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_hostile_is_linear():
    # 150k unclosed boxes: a per-box brace scan would be quadratic (~10^11 steps).
    assert extract_boxed("\\boxed{x" * 150_000) is None
    assert extract_boxed("{" * 1_000_000 + "\\boxed{3}") == "3"


def test_extract_answer_rejects_non_str():
    with pytest.raises(ValueError, match="text"):
        extract_answer(None)


@pytest.mark.parametrize(
    "s, expected",
    [
        ("1000", Decimal(1000)),
        ("1,000", Decimal(1000)),
        ("$1,000.", Decimal(1000)),
        ("\\$18", Decimal(18)),
        ("50%", Decimal(50)),
        ("50\\%", Decimal(50)),
        ("-3.5", Decimal("-3.5")),
        (".5", Decimal("0.5")),
        ("3.", Decimal(3)),
        ("1{,}000", Decimal(1000)),
        ("1,2", None),  # a tuple or set in MATH answers, not a thousands separator
        ("1,0000", None),
        ("\\frac{1}{2}", None),
        ("x", None),
        ("", None),
        ("9" * 100, None),
    ],
)
def test_parse_plain_number(s, expected):
    assert parse_plain_number(s) == expected


def test_gsm8k_gold_on_data():
    rows = _jsonl("gsm8k/test.jsonl")
    golds = [gsm8k_gold(r["answer"]) for r in rows]
    assert golds[0] == "18"
    assert all(parse_plain_number(g) is not None for g in golds)
    assert gsm8k_gold("a\n#### 1,000") == "1000"
    with pytest.raises(ValueError, match="answer_field"):
        gsm8k_gold("no final line")


# -- verification -------------------------------------------------------------------------------


def test_gsm8k_gold_self_and_shifted(verifier):
    golds = [gsm8k_gold(r["answer"]) for r in _jsonl("gsm8k/test.jsonl")]
    rewards, stats = verifier.score([f"\\boxed{{{g}}}" for g in golds], golds)
    assert rewards.dtype == np.float32 and rewards.shape == (len(golds),)
    np.testing.assert_array_equal(rewards, 1.0)
    assert stats["fast_path"] == len(golds)
    # GSM8K-style responses and a shifted pairing: reward 1 exactly where the numbers agree.
    shifted = golds[1:] + golds[:1]
    rewards, _ = verifier.score([f"so...\n#### {g}" for g in shifted], golds)
    expected = [Decimal(a) == Decimal(b) for a, b in zip(shifted, golds)]
    np.testing.assert_array_equal(rewards, np.asarray(expected, np.float32))


def test_math500_gold_self(verifier):
    golds = [r["answer"] for r in _jsonl("math_eval/math500.jsonl")]
    responses = [f"Therefore the final answer is $\\boxed{{{g}}}$." for g in golds]
    rewards, stats = verifier.score(responses, golds)
    bad = [g for g, r in zip(golds, rewards) if r != 1.0]
    assert not bad, f"golds not verifying against themselves: {bad[:5]}"
    assert stats["timeout"] == 0 and stats["error"] == 0 and stats["no_answer"] == 0


EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("\\dfrac{3}{4}", "0.75"),
    ("0.5", "1/2"),
    ("1000", "1,000"),
    ("18", "\\$18"),
    ("[1,3)", "[1, 3)"),
    ("(-\\infty, 2]", "(-\\infty,2]"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)"),
    ("p - q", "-q + p"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("x^2+2x+1", "(x+1)^2"),
]
NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "0.51"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("1000", "100"),
    ("[1,3)", "(1,3)"),
    ("[1,3]", "[1,3)"),
    ("\\{1,2\\}", "\\{1,3\\}"),
    ("(3,\\frac{\\pi}{2})", "(3,\\pi)"),
    ("p - q", "q - p"),
    ("x^2", "x^3"),
    ("2\\sqrt{2}", "2\\sqrt{3}"),
]


def test_equivalent_and_not(verifier):
    pairs = EQUIVALENT + NOT_EQUIVALENT
    responses = [f"\\boxed{{{pred}}}" for _, pred in pairs]
    golds = [gold for gold, _ in pairs]
    rewards, stats = verifier.score(responses, golds)
    expected = [1.0] * len(EQUIVALENT) + [0.0] * len(NOT_EQUIVALENT)
    wrong = [(p, r) for p, r, e in zip(pairs, rewards, expected) if r != e]
    assert not wrong, f"misjudged (pair, reward): {wrong}"
    assert stats == {"no_answer": 0, "timeout": 0, "error": 0, "fast_path": 3}


def test_boxed_gold_is_unwrapped_and_no_answer_counted(verifier):
    rewards, stats = verifier.score(["\\boxed{0.5}", "I give up", "#### 7"], ["\\boxed{1/2}"] * 3)
    np.testing.assert_array_equal(rewards, [1.0, 0.0, 0.0])
    assert stats["no_answer"] == 1
    empty_rewards, empty_stats = verifier.score([], [])
    assert empty_rewards.shape == (0,) and sum(empty_stats.values()) == 0


HOSTILE = [
    "\\boxed{9^9^9^9^9}",
    "\\boxed{10^{10^{10^{10}}}}",
    "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    "\\boxed{" + "\\frac{1}{" * 2000 + "2" + "}" * 2000 + "}",
    "x = " * 250_000 + "\\boxed{3}",  # 1 MB of text
    "\\boxed{" * 150_000,  # 1 MB of unclosed boxes
]


@pytest.mark.parametrize("idx", range(len(HOSTILE)))
def test_hostile_answers_are_bounded(idx):
    timeout_s = 1.5
    # max_answer_chars is raised so the deep nests really reach sympy in the worker.
    with MathVerifier(timeout_s=timeout_s, max_answer_chars=100_000) as v:
        v.score(["\\boxed{1}"], ["1/1"])  # start the worker outside the timed call
        start = time.monotonic()
        rewards, stats = v.score([HOSTILE[idx], "\\boxed{\\frac{2}{4}}"], ["5", "0.5"])
        elapsed = time.monotonic() - start
        np.testing.assert_array_equal(rewards, [0.0, 1.0])
        assert elapsed < timeout_s + HANG_SLACK_S
        if stats["timeout"]:
            assert v.restarts >= 1  # the stuck worker was replaced and still answered item 2


def test_overlong_answer_skips_sympy():
    with MathVerifier(timeout_s=1.0, max_answer_chars=10) as v:
        rewards, stats = v.score(["\\boxed{x+x+x+x+x+x+x}"], ["7x"])
    assert rewards[0] == 0.0 and stats["error"] == 1


def _fake_worker(tmp_path, body: str) -> str:
    path = tmp_path / "fake_worker.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_hanging_worker_times_out_and_restarts(tmp_path, monkeypatch):
    script = _fake_worker(
        tmp_path,
        """
        import json, sys, time
        print('{"ready": true}', flush=True)
        for line in sys.stdin:
            task = json.loads(line)
            if task["pred"] == "hang":
                time.sleep(3600)
            print(json.dumps({"id": task["id"], "status": "ok", "value": True}), flush=True)
        """,
    )
    monkeypatch.setattr(verifier_mod, "_WORKER_SCRIPT", script)
    with MathVerifier(timeout_s=0.5, num_workers=2) as v:
        responses = ["\\boxed{hang}", "\\boxed{a}", "\\boxed{hang}", "\\boxed{b}"]
        rewards, stats = v.score(responses, ["x", "x", "y", "x"])
        np.testing.assert_array_equal(rewards, [0.0, 1.0, 0.0, 1.0])
        assert stats["timeout"] == 2 and v.restarts == 2


def test_dying_worker_counts_error(tmp_path, monkeypatch):
    script = _fake_worker(
        tmp_path,
        """
        import json, os, sys
        print('{"ready": true}', flush=True)
        for line in sys.stdin:
            task = json.loads(line)
            if task["pred"] == "die":
                os._exit(3)
            print(json.dumps({"id": task["id"], "status": "error", "value": "boom"}), flush=True)
        """,
    )
    monkeypatch.setattr(verifier_mod, "_WORKER_SCRIPT", script)
    with MathVerifier(timeout_s=5.0) as v:
        rewards, stats = v.score(["\\boxed{die}", "\\boxed{y}"], ["x", "x"])
    np.testing.assert_array_equal(rewards, [0.0, 0.0])
    assert stats["error"] == 2 and v.restarts == 1


def test_broken_worker_startup_raises(tmp_path, monkeypatch):
    script = _fake_worker(tmp_path, "import sys; sys.exit(1)")
    monkeypatch.setattr(verifier_mod, "_WORKER_SCRIPT", script)
    with MathVerifier() as v, pytest.raises(RuntimeError, match="startup"):
        v.score(["\\boxed{y}"], ["x"])


def test_closed_verifier_raises():
    v = MathVerifier()
    v.close()
    v.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        v.score(["\\boxed{x}"], ["y"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"num_workers": 0}, "num_workers"),
        ({"max_answer_chars": 0}, "max_answer_chars"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MathVerifier(**kwargs)


def test_bad_score_args(verifier):
    with pytest.raises(ValueError, match="same length"):
        verifier.score(["a"], ["a", "b"])
    with pytest.raises(ValueError, match=r"golds\[1\]"):
        verifier.score(["a", "b"], ["a", 3])
    with pytest.raises(ValueError, match="single str"):
        verifier.score("abc", "abc")


def test_worker_script_runs_standalone():
    # The worker must not import jax or the jaxtrace package (fast restarts, no __main__ re-run).
    src = pathlib.Path(verifier_mod._WORKER_SCRIPT).read_text()
    code = src.split('"""', 2)[2]
    assert "jaxtrace" not in code and "import jax" not in code
