"""Tasks: lists of examples (question, reference solution, gold answer) from a config.

`arithmetic` is generated from the seed (the embedded default); `gsm8k` reads GSM8K jsonl
(`question`, `answer` ending in `#### n`); `jsonl` reads the math_eval format (`problem`,
`answer`, optional `solution`). Paths may be local or gs:// (read through fsspec/gcsfs).
"""

from __future__ import annotations

import dataclasses
import json
import os

from jaxtrace.data import arithmetic
from jaxtrace.errors import InputError, reading
from jaxtrace.paths import open_path


@dataclasses.dataclass(frozen=True)
class Example:
    question: str
    reference: str  # worked solution: the teacher's privileged context
    answer: str  # gold final answer for the verifier
    source: object = None  # task-specific object (e.g. arithmetic.Problem for the oracle)


def read_jsonl(path: str, limit: int = 0) -> list[dict]:
    """The JSON objects of a jsonl file, one per non-blank line (InputError naming the file and
    line for a missing / unreadable / non-UTF-8 file, a line that is not JSON or not an object)."""
    rows = []
    with reading(path, "data file"), open_path(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else raw
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def _text(path: str, i: int, row: dict, key: str, numbers: bool = False) -> str:
    """row[key] as text: a str (or, with `numbers`, an int / float); InputError otherwise."""
    v = row[key]
    if isinstance(v, str) and v.strip():
        return v
    if numbers and isinstance(v, int | float) and not isinstance(v, bool):
        return str(v)
    raise InputError(
        f"{path}: row {i} field {key!r} must be a non-empty string"
        + (" or a number" if numbers else "")
        + f", got {json.dumps(v)[:40]}"
    )


def gsm8k_examples(path: str, limit: int = 0) -> list[Example]:
    out = []
    for i, row in enumerate(read_jsonl(path, limit)):
        if "question" not in row or "answer" not in row:
            raise InputError(f"{path}: row {i} is not GSM8K format (question, answer with ####)")
        question, solution = _text(path, i, row, "question"), _text(path, i, row, "answer")
        if "####" not in solution:
            raise InputError(f"{path}: row {i} is not GSM8K format (question, answer with ####)")
        answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
        if not answer:
            raise InputError(f"{path}: row {i} has nothing after '####'")
        out.append(Example(question, solution, answer))
    return out


def math_examples(path: str, limit: int = 0) -> list[Example]:
    out = []
    for i, row in enumerate(read_jsonl(path, limit)):
        key = "problem" if "problem" in row else "question"
        if key not in row or "answer" not in row:
            raise InputError(f"{path}: row {i} has no problem/question and answer fields")
        question = _text(path, i, row, key)
        answer = _text(path, i, row, "answer", numbers=True)  # null is not the gold "None"
        if row.get("solution") in (None, ""):
            reference = f"The answer is $\\boxed{{{answer}}}$."
        else:
            reference = _text(path, i, row, "solution")
        out.append(Example(question, reference, answer))
    return out


def arithmetic_examples(n_train: int, n_test: int, seed: int):
    train, test = arithmetic.split(n_train, n_test, seed=seed)
    to_ex = lambda p: Example(p.question, p.solution, p.answer, p)
    return [to_ex(p) for p in train], [to_ex(p) for p in test]


def load(data_cfg, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, test) examples for a `config.data` section; InputError (naming the file) for a
    path that is not a file or a training set without examples."""
    if data_cfg.task == "arithmetic":
        return arithmetic_examples(data_cfg.num_train, data_cfg.num_test, seed)
    reader = gsm8k_examples if data_cfg.task == "gsm8k" else math_examples
    for key in ("train_path", "test_path"):
        path = getattr(data_cfg, key)
        if path and "://" not in path:
            if not os.path.exists(path):
                raise FileNotFoundError(f"data.{key}={path!r} does not exist")
            if not os.path.isfile(path):
                raise InputError(f"data.{key}={path!r} is not a file")
    train = reader(data_cfg.train_path, data_cfg.num_train)
    if not train:
        raise InputError(f"data.train_path={data_cfg.train_path!r} holds no examples")
    test = reader(data_cfg.test_path, data_cfg.num_test) if data_cfg.test_path else []
    return train, test
