"""The annotator interface: requests in, character spans out, with counters.

An annotator sees privileged context (problem, reference solution, verdict) and marks spans of
the response: "key" spans on correct rollouts, "error" spans on wrong ones. Spans are half-open
character ranges [start, end) into `AnnotationRequest.response`; `spans.char_spans_to_token_mask`
turns them into token labels.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Literal

SpanKind = Literal["key", "error"]
# ok: the annotator answered (possibly with no spans); failed: unusable output or HTTP error;
# timeout: no answer in time after all retries; missing: no precomputed entry for the request.
STATUSES = ("ok", "failed", "timeout", "missing")


@dataclasses.dataclass(frozen=True)
class AnnotationRequest:
    """One rollout to annotate. `id` is optional and used by file lookups."""

    problem: str
    reference_solution: str
    response: str
    correct: bool
    id: str | None = None

    def __post_init__(self):
        for name in ("problem", "reference_solution", "response"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        if not isinstance(self.correct, bool):
            raise ValueError(f"correct must be a bool, got {self.correct!r}")

    @property
    def kind(self) -> SpanKind:
        return "key" if self.correct else "error"


@dataclasses.dataclass(frozen=True)
class AnnotationResult:
    """Sorted, non-overlapping, non-empty [start, end) spans into the response, plus status."""

    spans: tuple[tuple[int, int], ...]
    kind: SpanKind
    status: str = "ok"
    dropped_spans: int = 0  # quotes not found in the response, malformed spans
    detail: str = ""  # short reason when status != "ok"; never contains credentials


@dataclasses.dataclass
class AnnotatorStats:
    """Running totals over every `annotate` call of one annotator."""

    requests: int = 0
    spans: int = 0
    dropped_spans: int = 0
    failed: int = 0
    timeouts: int = 0
    missing: int = 0

    def add(self, result: AnnotationResult) -> None:
        self.requests += 1
        self.spans += len(result.spans)
        self.dropped_spans += result.dropped_spans
        self.failed += result.status == "failed"
        self.timeouts += result.status == "timeout"
        self.missing += result.status == "missing"

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class Annotator(abc.ABC):
    """Base class: `annotate(requests) -> results` in order, counters in `self.stats`."""

    def __init__(self):
        self.stats = AnnotatorStats()

    def annotate(self, requests: Sequence[AnnotationRequest]) -> list[AnnotationResult]:
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, AnnotationRequest):
                raise ValueError(f"requests[{i}] must be an AnnotationRequest, got {type(r)}")
        results = self._annotate(requests) if requests else []
        if len(results) != len(requests):  # a bug in a subclass, not bad data
            raise RuntimeError(f"{type(self).__name__} returned {len(results)} results")
        for result in results:
            self.stats.add(result)
        return results

    @abc.abstractmethod
    def _annotate(self, requests: list[AnnotationRequest]) -> list[AnnotationResult]:
        """One result per request, same order."""


def failed_result(request: AnnotationRequest, status: str, detail: str) -> AnnotationResult:
    return AnnotationResult(spans=(), kind=request.kind, status=status, detail=detail[:200])
