"""The embedded default task: multi-step arithmetic word problems with worked solutions.

Small enough for a tiny model to learn on a CPU in minutes, hard enough that it does not learn it
perfectly from a short supervised warm start: two or three chained +, -, x steps on small numbers.
Every problem has a worked reference solution (the teacher's privileged context) whose steps
are `a op b = c.` and which ends in GSM8K style: `#### c`.
"""

from __future__ import annotations

import dataclasses
import random
import re

NAMES = (
    "Ann",
    "Ben",
    "Cal",
    "Dee",
    "Eli",
    "Fay",
    "Gus",
    "Hal",
    "Ivy",
    "Jo",
    "Kim",
    "Lu",
    "Max",
    "Ned",
    "Oli",
    "Pam",
)
THINGS = ("apples", "pens", "cards", "coins", "books", "eggs", "shells", "stamps", "cups", "rocks")


@dataclasses.dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # worked steps, ending in "#### <answer>"
    answer: str
    steps: tuple[tuple[int, str, int, int], ...]  # (a, op, b, result)


def _step_text(rng: random.Random, name: str, op: str, b: int) -> str:
    if op == "+":
        return rng.choice([f"{name} gets {b} more.", f"{name} finds {b} more."])
    if op == "-":
        return rng.choice([f"{name} gives away {b}.", f"{name} loses {b}."])
    return f"{name} {'doubles' if b == 2 else 'triples'} them."


def make_problem(
    rng: random.Random, max_steps: int = 2, max_value: int = 60, max_operand: int = 9
) -> Problem:
    """One problem; all intermediate values stay in [0, max_value]."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {thing}."]
    steps = []
    for _ in range(rng.randint(2, max_steps)):
        ops = (["+"] if value < max_value else []) + (["-"] if value > 0 else [])
        ops += ["*"] if 0 < value <= max_value // 2 else []
        op = rng.choice(ops)
        if op == "+":
            b = rng.randint(1, min(max_operand, max_value - value))
            result = value + b
        elif op == "-":
            b = rng.randint(1, min(max_operand, value))
            result = value - b
        else:
            b = rng.randint(2, min(3, max_value // value))
            result = value * b
        sentences.append(_step_text(rng, name, op, b))
        steps.append((value, op, b, result))
        value = result
    sentences.append(f"How many {thing} now?")
    work = " ".join(f"{a}{op}{b}={c}." for a, op, b, c in steps)
    return Problem(" ".join(sentences), f"{work} #### {value}", str(value), tuple(steps))


def make_dataset(n: int, seed: int, **kw) -> list[Problem]:
    """`n` distinct problems from a fixed seed (train and test use disjoint seeds and are
    de-duplicated against each other by the caller via `split`)."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        p = make_problem(rng, **kw)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def split(n_train: int, n_test: int, seed: int = 0, **kw) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out test problems with no question in common."""
    test = make_dataset(n_test, seed=10_000 + seed, **kw)
    held = {p.question for p in test}
    train = [p for p in make_dataset(n_train + n_test, seed=seed, **kw) if p.question not in held]
    return train[:n_train], test


_STEP = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)\.")


def critical_spans(response: str, problem: Problem, correct: bool) -> list[tuple[int, int]]:
    """An oracle annotator with privileged access to the worked solution.

    Correct rollouts -> key spans: the result of every step and the final answer (the decisive
    tokens). Wrong rollouts -> the error span: the first step whose arithmetic is wrong or that
    departs from the reference, from its first operand to its full stop.
    """
    if correct:
        spans = [(m.start(4), m.end(4)) for m in _STEP.finditer(response)]
        final = response.rfind("####")
        if final >= 0:
            spans.append((final, len(response.rstrip())))
        return spans
    ref = list(problem.steps)
    for k, m in enumerate(_STEP.finditer(response)):
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        true = {"+": a + b, "-": a - b, "*": a * b}[op]
        if c != true or k >= len(ref) or (a, op, b) != ref[k][:3]:
            return [(m.start(), m.end())]
    final = response.rfind("####")
    return [(final, len(response.rstrip()))] if final >= 0 else []
