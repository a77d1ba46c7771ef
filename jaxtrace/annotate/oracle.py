"""An annotator for generated tasks whose checker knows every step (the embedded default).

It plays the role of the paper's strong API annotator at zero cost: with privileged access to
the worked solution it marks the step results of correct rollouts (key spans) and the first
wrong step of incorrect ones (error spans).
"""

from __future__ import annotations

from jaxtrace.annotate.base import AnnotationRequest, AnnotationResult, Annotator
from jaxtrace.annotate.spans import clean_spans
from jaxtrace.data import arithmetic


class OracleAnnotator(Annotator):
    def __init__(self, problems: dict[str, arithmetic.Problem]):
        """`problems`: question text -> the generated problem (with its steps)."""
        super().__init__()
        self.problems = problems

    def _annotate(self, requests: list[AnnotationRequest]) -> list[AnnotationResult]:
        out = []
        for r in requests:
            problem = self.problems.get(r.problem)
            if problem is None:
                out.append(AnnotationResult((), r.kind, "missing", detail="unknown problem"))
                continue
            spans, dropped = clean_spans(
                arithmetic.critical_spans(r.response, problem, r.correct), len(r.response)
            )
            out.append(AnnotationResult(tuple(spans), r.kind, "ok", dropped))
        return out
