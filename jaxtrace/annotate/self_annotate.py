"""Online self-annotation: the policy being trained marks its own rollouts (TRACE-online)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxtrace.annotate.base import AnnotationRequest, AnnotationResult, Annotator, failed_result
from jaxtrace.annotate.prompt import build_policy_prompt, build_prompt_text, result_from_output


class SelfAnnotator(Annotator):
    """Prompts `generate_fn` with the annotation prompt and parses its replies.

    Args:
      generate_fn: `list[str] prompts -> list[str] completions`, one per prompt; the trainer
        passes a function that samples from the current policy (greedy or low temperature).
      prompt_fn: request -> prompt string, or None when it cannot be built; default: with a
        `tokenizer`, `build_policy_prompt` (the policy's chat template when it has one, the
        response shortened in its middle to fit `max_prompt_tokens`), else `build_prompt_text`.
      max_spans: most quotes the default prompt asks for.
      tokenizer, max_prompt_tokens: the policy's tokenizer and its prompt budget.

    A reply that does not parse gives no spans and status 'failed' (detail PARSE_FAILURE); a
    request whose prompt cannot fit fails alone; `generate_fn` raising or returning the wrong
    number of strings fails the whole batch (counted), never the trainer.
    """

    def __init__(
        self,
        generate_fn: Callable[[list[str]], Sequence[str]],
        *,
        prompt_fn: Callable[[AnnotationRequest], str | None] | None = None,
        max_spans: int = 4,
        tokenizer=None,
        max_prompt_tokens: int | None = None,
    ):
        super().__init__()
        if not callable(generate_fn):
            raise ValueError(f"generate_fn must be callable, got {type(generate_fn).__name__}")
        if tokenizer is not None and not (max_prompt_tokens and max_prompt_tokens > 0):
            raise ValueError(f"max_prompt_tokens must be > 0, got {max_prompt_tokens!r}")
        self.generate_fn = generate_fn
        if prompt_fn is None and tokenizer is not None:
            prompt_fn = lambda r: build_policy_prompt(r, tokenizer, max_prompt_tokens, max_spans)
        self.prompt_fn = prompt_fn or (lambda r: build_prompt_text(r, max_spans))

    def _annotate(self, requests: list[AnnotationRequest]) -> list[AnnotationResult]:
        prompts = [self.prompt_fn(r) for r in requests]
        todo = [i for i, p in enumerate(prompts) if p is not None]
        results = [
            failed_result(r, "failed", "the annotation prompt does not fit its token budget")
            for r in requests
        ]
        if not todo:
            return results
        try:
            outputs = list(self.generate_fn([prompts[i] for i in todo]))
        except Exception as e:  # a sampling failure costs this step its spans, not the run
            return [
                failed_result(r, "failed", f"generate_fn raised {type(e).__name__}: {e}")
                for r in requests
            ]
        if len(outputs) != len(todo):
            detail = f"generate_fn returned {len(outputs)} outputs for {len(todo)} prompts"
            return [failed_result(r, "failed", detail) for r in requests]
        for i, out in zip(todo, outputs):
            results[i] = result_from_output(requests[i], out)
        return results
