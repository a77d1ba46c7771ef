"""The verifier against hostile answers (issue 18): bombs, nesting, size, invisible unicode, LaTeX
and code injection, wrong types. With the default settings every case is answered within 2 s (a
bound the verifier promises: timeout_s=1 per check, plus a worker restart after a time-out),
none takes the worker pool down, and none executes anything (payloads that would create a file
in a marker folder are checked for, and a final ordinary check must still work).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from jaxtrace.rewards import MathVerifier
from jaxtrace.rewards.screen import normalize, reject_reason

BOUND_S = 2.0
M = "{marker}"  # replaced by a path inside the marker folder

# (response, gold, expected reward)
CASES = [
    # -- bombs: power towers, huge powers and factorials
    ("\\boxed{9^9^9^9}", "1", 0.0),
    ("\\boxed{9^{9^{9^{9}}}}", "1", 0.0),
    ("\\boxed{10^{10^{10^{10}}}}", "2", 0.0),
    ("\\boxed{2**2**2**2**2**2}", "4", 0.0),
    ("\\boxed{9^{999999999}}", "9", 0.0),
    ("\\boxed{(10^{6})!}", "1", 0.0),
    ("\\boxed{99999999!}", "1", 0.0),
    ("\\boxed{{{9}^{9}}^{{9}^{9}}}", "1", 0.0),
    ("\\boxed{x^{9^{9^{9}}}}", "x", 0.0),
    ("\\boxed{\\left(9^{9}\\right)^{9^{9}}}", "3", 0.0),
    ("\\boxed{e^{e^{e^{e^{e}}}}}", "1", 0.0),
    ("\\boxed{2^{100}}", "1267650600228229401496703205376", 1.0),  # big but sane
    # -- nesting
    ("\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}", "1", 0.0),
    ("\\boxed{" + "\\frac{1}{" * 2000 + "2" + "}" * 2000 + "}", "1", 0.0),
    ("\\boxed{" + "\\sqrt{" * 3000 + "4" + "}" * 3000 + "}", "2", 0.0),
    ("\\boxed{" + "{" * 10000 + "1" + "}" * 10000 + "}", "1", 0.0),
    ("\\boxed{" + "\\left(" * 800 + "1" + "\\right)" * 800 + "}", "1", 0.0),
    ("\\boxed{" * 50 + "7" + "}" * 50, "7", 1.0),
    ("\\boxed{" + "[" * 3000 + "1" + "]" * 3000 + "}", "1", 0.0),
    ("\\boxed{" + "-" * 1500 + "1}", "1", 0.0),
    # -- size
    ("x = " * 250_000 + "\\boxed{3}", "3", 1.0),  # 1 MB of text before the answer
    ("\\boxed{" * 150_000, "1", 0.0),  # 1 MB of unclosed boxes
    ("\\boxed{3}", "3" * 1_000_000, 0.0),  # 1 MB gold
    ("\\boxed{x}", "x+" * 500_000 + "1", 0.0),  # 1 MB symbolic gold
    ("\\boxed{" + "1" * 10_000 + "}", "1" * 10_000, 0.0),  # over max_answer_chars
    ("\\boxed{" + "x+" * 50_000 + "x}", "x", 0.0),
    ("\\boxed{" + "a" * 900 + "}", "b", 0.0),  # just under the cap: sympy sees it
    ("", "1", 0.0),
    # -- unicode
    ("\\boxed{1\u200b2}", "12", 1.0),  # zero-width space
    ("\\boxed{\ufeff42}", "42", 1.0),  # BOM
    ("\\boxed{4\u200d2}", "42", 1.0),  # zero-width joiner
    ("\\boxed{\u00ad7}", "7", 1.0),  # soft hyphen
    ("\\boxed{\uff11\uff12}", "12", 1.0),  # fullwidth digits
    ("\\boxed{\u22125}", "-5", 1.0),  # unicode minus
    ("\\boxed{x\u2062+\u20621}", "x+1", 1.0),  # invisible times
    ("\\boxed{\u202e21}", "12", 0.0),  # RTL override: what is left reads 21
    ("\\boxed{1\u0301}", "1", 0.0),  # combining accent is not invisible
    ("\\boxed{\U0001f600}", "1", 0.0),
    ("\\boxed{\x00\x01\x02}", "1", 0.0),
    ("\\boxed{\ud800}", "1", 0.0),  # lone surrogate
    ("\\boxed{x\u00b2}", "x^2", 0.0),  # no NFKC: x² is not silently x2
    # -- LaTeX injection
    ("\\boxed{\\input{/etc/passwd}}", "1", 0.0),
    ("\\boxed{\\write18{touch " + M + "}}", "1", 0.0),
    ("\\boxed{\\immediate\\write18{touch " + M + "}}", "1", 0.0),
    ("\\boxed{\\def\\x{\\x}\\x}", "1", 0.0),
    ("\\boxed{\\newcommand{\\a}{\\a\\a}\\a}", "1", 0.0),
    ("\\boxed{\\catcode`\\{=12}", "1", 0.0),
    ("\\boxed{\\csname relax\\endcsname}", "1", 0.0),
    ("\\boxed{\\text{" + "a" * 1000 + "}}", "1", 0.0),
    ("\\boxed{\\begin{pmatrix}" + "1&" * 500 + "1\\end{pmatrix}}", "1", 0.0),
    # -- code injection
    ("\\boxed{__import__('os').system('touch " + M + "')}", "0", 0.0),
    ("__import__('os').system('touch " + M + "')", "0", 0.0),
    ("\\boxed{exec(\"open('" + M + "','w')\")}", "x", 0.0),
    ("\\boxed{eval(\"open('" + M + "','w')\")}", "x", 0.0),
    ("\\boxed{open('" + M + "','w')}", "x", 0.0),
    ("\\boxed{(lambda: __import__('os').system('touch " + M + "'))()}", "x", 0.0),
    ("\\boxed{().__class__.__bases__[0].__subclasses__()}", "x", 0.0),
    ("\\boxed{getattr(__builtins__, 'open')('" + M + "', 'w')}", "x", 0.0),
    ("\\boxed{$(touch " + M + ")}", "x", 0.0),
    ("\\boxed{`touch " + M + "`}", "x", 0.0),
    ("\\boxed{Symbol('x').__class__}", "x", 0.0),
    ('\\boxed{"}; import os; os.system("touch ' + M + '"); {"}', "x", 0.0),
    # -- numeric precision (float_rounding=12 by default)
    ("\\boxed{0.3333333}", "\\frac{1}{3}", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.3333333", 0.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{8}}", "0.125", 1.0),
    ("\\boxed{3.14159}", "\\pi", 0.0),
    # -- controls
    ("\\boxed{x+1}", "1+x", 1.0),
    ("The answer is \\boxed{\\frac{2}{4}}", "0.5", 1.0),
]


@pytest.fixture(scope="module")
def marker_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("markers")


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier() as v:  # the defaults are what is tested
        v.score(["\\boxed{x}"], ["x"])  # start the worker outside the timed calls
        yield v


def test_default_call_budget_leaves_room_for_legitimate_checks():
    """The default budget scales with the batch: 200 ordinary symbolic checks all score."""
    with MathVerifier() as v:
        rewards, stats = v.score(
            [f"\\boxed{{x+{k}}}" for k in range(200)], [f"{k}+x" for k in range(200)]
        )
    assert rewards.sum() == 200 and stats["timeout"] == 0


def test_case_count():
    assert len(CASES) >= 50


@pytest.mark.parametrize("idx", range(len(CASES)))
def test_hostile_case_is_answered_in_time(idx, verifier, marker_dir):
    response, gold, expected = CASES[idx]
    marker = str(marker_dir / f"pwned_{idx}")
    response, gold = response.replace(M, marker), gold.replace(M, marker)
    start = time.monotonic()
    rewards, stats = verifier.score([response], [gold])
    elapsed = time.monotonic() - start
    assert rewards.tolist() == [expected], stats
    assert elapsed < BOUND_S, f"{elapsed:.2f} s ({stats})"
    assert not os.path.exists(marker)


def test_nothing_was_executed_and_the_pool_still_works(verifier, marker_dir):
    assert os.listdir(marker_dir) == []
    rewards, _ = verifier.score(["\\boxed{x^2}", "\\boxed{7}"], ["x^2", "7"])
    np.testing.assert_array_equal(rewards, [1.0, 1.0])


@pytest.mark.parametrize(
    "responses, golds",
    [
        ([None], ["1"]),
        (["\\boxed{1}"], [None]),
        ([1], ["1"]),
        ([b"\\boxed{1}"], ["1"]),
        ([["\\boxed{1}"]], ["1"]),
        ("\\boxed{1}", "1"),
        (["\\boxed{1}"], ["1", "2"]),
    ],
    ids=["none-response", "none-gold", "int", "bytes", "nested-list", "bare-str", "lengths"],
)
def test_wrong_types_are_a_clear_error_and_the_pool_survives(verifier, responses, golds):
    with pytest.raises(ValueError, match=r"responses|golds"):
        verifier.score(responses, golds)
    assert verifier.score(["\\boxed{x+x}"], ["2x"])[0].tolist() == [1.0]


def test_a_batch_of_distinct_towers_is_bounded_by_the_call_budget():
    """12 distinct power towers that pass the screen (sympy must try them): with a 1 s per-check
    limit and a 3 s budget for the call, the call ends near 3 s, not 12 x 1 s. (The issue's
    batch took 67 s: 12 x 5 s, plus restarts.)"""
    towers = [f"\\boxed{{(10^{{{6 + k}}})!}}" for k in range(12)]
    with MathVerifier(timeout_s=1.0, call_budget_s=3.0, call_budget_per_check_s=0.0) as v:
        v.score(["\\boxed{x}"], ["x"])
        start = time.monotonic()
        rewards, stats = v.score(towers, ["1"] * 12)
        elapsed = time.monotonic() - start
    assert rewards.sum() == 0 and stats["timeout"] == 12
    assert elapsed < 3.0 + BOUND_S


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1\u200b2", "12"),
        ("\ufeff\u2060x", "x"),
        ("\uff11\uff0b\uff12", "1+2"),
        ("a\u00a0b\u3000c", "a b c"),
        ("\u22123", "-3"),
        ("x\u00b2", "x\u00b2"),
        ("plain ascii", "plain ascii"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize(
    "answer, rejected",
    [
        ("9^9^9", True),
        ("2^{3^{4}}", True),
        ("10^{100000000}", True),
        ("2^{10}", False),
        ("x^2 + y^2", False),
        ("e^{x^2}", False),
        ("e^{e^{e^{e}}}", True),
        ("\\left(9^{9}\\right)^{9}", True),
        ("30000!", True),
        ("5!", False),
        ("__import__('os')", True),
        ("\\lambda + 1", False),
        ("\\frac{a}{b}", False),
    ],
)
def test_reject_reason(answer, rejected):
    assert (reject_reason(answer) is not None) == rejected


# -- the defects of issue 18, one test each
def test_default_precision_does_not_credit_0_3333333_for_one_third(verifier):
    rewards, _ = verifier.score(["\\boxed{0.3333333}", "\\boxed{0.333333333333333}"], ["1/3"] * 2)
    assert rewards.tolist() == [0.0, 1.0]  # 7 digits are not 1/3; 15 agree to 12 places
    with MathVerifier(float_rounding=6) as loose:  # math-verify's own rounding, as an option
        assert loose.score(["\\boxed{0.3333333}"], ["1/3"])[0].tolist() == [1.0]


def test_zero_width_space_does_not_defeat_the_match(verifier):
    rewards, stats = verifier.score(["\\boxed{1\u200b2}", "#### 4\u200b2"], ["12", "42"])
    assert rewards.tolist() == [1.0, 1.0] and stats["fast_path"] == 2


def test_one_megabyte_gold_is_capped(verifier):
    start = time.monotonic()
    rewards, stats = verifier.score(["\\boxed{x}"], ["x+" * 500_000 + "1"])
    assert rewards.tolist() == [0.0] and stats["error"] == 1 and stats["timeout"] == 0
    assert time.monotonic() - start < BOUND_S
