"""Precomputed spans from a JSONL file (e.g. produced offline by a strong model)."""

from __future__ import annotations

import hashlib
import json
import os

from jaxtrace.annotate.base import AnnotationRequest, AnnotationResult, Annotator, failed_result
from jaxtrace.annotate.prompt import locate_quotes
from jaxtrace.annotate.spans import clean_spans


def request_key(problem: str, response: str) -> str:
    """Stable lookup key of a rollout: sha256 of problem and response, hex."""
    return hashlib.sha256(f"{problem}\x00{response}".encode("utf-8", "surrogatepass")).hexdigest()


class FileAnnotator(Annotator):
    """Spans looked up in a JSONL file, one record per rollout.

    Each line is a JSON object with
      * a key: `"id"` (matched against `AnnotationRequest.id`), and/or `"key"`
        (= `request_key(problem, response)`), and/or `"problem"` + `"response"` (hashed here);
      * spans: `"spans": [[start, end], ...]` character ranges into the response, and/or
        `"quotes": ["verbatim text", ...]` located in the response.
    A request is matched by id first, then by (problem, response). Unmatched requests get
    status 'missing'; malformed spans and unlocatable quotes are dropped and counted.
    A malformed line raises ValueError with its line number at construction.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = os.fspath(path)
        self._by_id: dict[str, dict] = {}
        self._by_key: dict[str, dict] = {}
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{self.path}:{lineno}: invalid JSON ({e.msg})") from None
                self._add(record, lineno)

    def _add(self, record, lineno: int) -> None:
        where = f"{self.path}:{lineno}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: each line must be a JSON object")
        if "spans" not in record and "quotes" not in record:
            raise ValueError(f"{where}: record has neither 'spans' nor 'quotes'")
        keys = []
        if "key" in record:
            keys.append(str(record["key"]))
        if isinstance(record.get("problem"), str) and isinstance(record.get("response"), str):
            keys.append(request_key(record["problem"], record["response"]))
        if "id" in record:
            self._by_id[str(record["id"])] = record
        elif not keys:
            raise ValueError(f"{where}: record needs 'id', 'key', or 'problem' and 'response'")
        for key in keys:
            self._by_key[key] = record

    def __len__(self) -> int:
        return len({id(r) for r in (*self._by_id.values(), *self._by_key.values())})

    def _annotate(self, requests: list[AnnotationRequest]) -> list[AnnotationResult]:
        return [self._one(r) for r in requests]

    def _one(self, request: AnnotationRequest) -> AnnotationResult:
        record = None
        if request.id is not None:
            record = self._by_id.get(str(request.id))
        if record is None:
            record = self._by_key.get(request_key(request.problem, request.response))
        if record is None:
            return failed_result(request, "missing", "no record for this request")
        raw = record.get("spans", [])
        spans, dropped = clean_spans(raw if isinstance(raw, list) else [raw], len(request.response))
        quotes = record.get("quotes", [])
        if not isinstance(quotes, list):
            quotes = [quotes]
        if quotes:
            located, not_found = locate_quotes(request.response, quotes)
            spans, bad = clean_spans(spans + located, len(request.response))
            dropped += not_found + bad
        return AnnotationResult(spans=tuple(spans), kind=request.kind, dropped_spans=dropped)
