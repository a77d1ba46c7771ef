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
from jaxtrace.paths import open_path


@dataclasses.dataclass(frozen=True)
class Example:
    question: str
    reference: str  # worked solution: the teacher's privileged context
    answer: str  # gold final answer for the verifier
    source: object = None  # task-specific object (e.g. arithmetic.Problem for the oracle)


def read_jsonl(path: str, limit: int = 0) -> list[dict]:
    rows = []
    with open_path(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if limit and len(rows) >= limit:
                break
    return rows


def gsm8k_examples(path: str, limit: int = 0) -> list[Example]:
    out = []
    for i, row in enumerate(read_jsonl(path, limit)):
        if "question" not in row or "answer" not in row or "####" not in row["answer"]:
            raise ValueError(f"{path}: row {i} is not GSM8K format (question, answer with ####)")
        answer = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        out.append(Example(row["question"], row["answer"], answer))
    return out


def math_examples(path: str, limit: int = 0) -> list[Example]:
    out = []
    for i, row in enumerate(read_jsonl(path, limit)):
        question = row.get("problem", row.get("question"))
        if question is None or "answer" not in row:
            raise ValueError(f"{path}: row {i} has no problem/question and answer fields")
        answer = str(row["answer"])
        reference = row.get("solution") or f"The answer is $\\boxed{{{answer}}}$."
        out.append(Example(question, reference, answer))
    return out


def arithmetic_examples(n_train: int, n_test: int, seed: int):
    train, test = arithmetic.split(n_train, n_test, seed=seed)
    to_ex = lambda p: Example(p.question, p.solution, p.answer, p)
    return [to_ex(p) for p in train], [to_ex(p) for p in test]


def load(data_cfg, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, test) examples for a `config.data` section."""
    if data_cfg.task == "arithmetic":
        return arithmetic_examples(data_cfg.num_train, data_cfg.num_test, seed)
    reader = gsm8k_examples if data_cfg.task == "gsm8k" else math_examples
    for key in ("train_path", "test_path"):
        path = getattr(data_cfg, key)
        if path and "://" not in path and not os.path.exists(path):
            raise FileNotFoundError(f"data.{key}={path!r} does not exist")
    train = reader(data_cfg.train_path, data_cfg.num_train)
    test = reader(data_cfg.test_path, data_cfg.num_test) if data_cfg.test_path else []
    return train, test
