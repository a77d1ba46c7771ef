"""Online self-annotation: the policy being trained marks its own rollouts (TRACE-online)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxtrace.annotate.base import AnnotationRequest, AnnotationResult, Annotator, failed_result
from jaxtrace.annotate.prompt import build_prompt_text, result_from_output


class SelfAnnotator(Annotator):
    """Prompts `generate_fn` with the annotation prompt and parses its replies.

    Args:
      generate_fn: `list[str] prompts -> list[str] completions`, one per prompt; the trainer
        passes a function that samples from the current policy (greedy or low temperature).
      prompt_fn: request -> prompt string; default `build_prompt_text` (apply a chat template
        here, or inside `generate_fn`).
      max_spans: most quotes the default prompt asks for.

    A reply that does not parse gives no spans and status 'failed'; `generate_fn` raising or
    returning the wrong number of strings fails the whole batch (counted), never the trainer.
    """

    def __init__(
        self,
        generate_fn: Callable[[list[str]], Sequence[str]],
        *,
        prompt_fn: Callable[[AnnotationRequest], str] | None = None,
        max_spans: int = 4,
    ):
        super().__init__()
        if not callable(generate_fn):
            raise ValueError(f"generate_fn must be callable, got {type(generate_fn).__name__}")
        self.generate_fn = generate_fn
        self.prompt_fn = prompt_fn or (lambda r: build_prompt_text(r, max_spans))

    def _annotate(self, requests: list[AnnotationRequest]) -> list[AnnotationResult]:
        prompts = [self.prompt_fn(r) for r in requests]
        try:
            outputs = list(self.generate_fn(prompts))
        except Exception as e:  # a sampling failure costs this step its spans, not the run
            return [
                failed_result(r, "failed", f"generate_fn raised {type(e).__name__}: {e}")
                for r in requests
            ]
        if len(outputs) != len(requests):
            detail = f"generate_fn returned {len(outputs)} outputs for {len(requests)} prompts"
            return [failed_result(r, "failed", detail) for r in requests]
        return [result_from_output(r, out) for r, out in zip(requests, outputs)]
