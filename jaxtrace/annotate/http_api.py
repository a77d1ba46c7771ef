"""Annotation by a strong model behind an OpenAI-compatible chat-completions API (stdlib only).

The API key is read from an environment variable at request time and only ever placed in the
Authorization header: it is not stored on the object, logged, or put in any error message.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from jaxtrace.annotate.base import AnnotationRequest, AnnotationResult, Annotator, failed_result
from jaxtrace.annotate.prompt import build_messages, result_from_output

log = logging.getLogger(__name__)
_MAX_BODY_BYTES = 8 << 20


class _Timeout(Exception):
    pass


class _Retryable(Exception):
    pass


class _Fatal(Exception):
    pass


class OpenAIAnnotator(Annotator):
    """Asks a chat model to quote the key/erroneous steps, then locates the quotes.

    Args:
      base_url: API root, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1";
        requests go to `{base_url}/chat/completions`.
      model: model name sent in the request body.
      api_key_env: environment variable holding the key; if unset, no Authorization header
        is sent (local servers such as vLLM need none).
      timeout_s: limit for one HTTP attempt (each socket wait, and the whole body read).
      max_retries: extra attempts after a timeout, connection error, 429 or 5xx (other 4xx
        and unusable replies are not retried). Backoff: `backoff_s * 2**attempt` with jitter.
      max_concurrency: requests in flight at once (threads).
      max_spans: most quotes the prompt asks for.
      extra_body: merged into the request JSON (e.g. {"response_format": {...}}).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_retries: int = 3,
        *,
        backoff_s: float = 1.0,
        max_concurrency: int = 8,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        max_spans: int = 4,
        extra_body: dict | None = None,
    ):
        super().__init__()
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s!r}")
        if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
            raise ValueError(f"max_concurrency must be an int >= 1, got {max_concurrency!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = max_retries
        self.backoff_s = float(backoff_s)
        self.max_concurrency = max_concurrency
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.max_spans = max_spans
        self.extra_body = dict(extra_body or {})

    def __repr__(self) -> str:
        return f"OpenAIAnnotator(url={self.url!r}, model={self.model!r})"

    def _annotate(self, requests: list[AnnotationRequest]) -> list[AnnotationResult]:
        if len(requests) == 1 or self.max_concurrency == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))

    def _one(self, request: AnnotationRequest) -> AnnotationResult:
        try:
            content = self._chat(build_messages(request, self.max_spans))
        except _Timeout as e:
            return failed_result(request, "timeout", str(e))
        except (_Fatal, _Retryable) as e:
            return failed_result(request, "failed", str(e))
        return result_from_output(request, content)

    def _chat(self, messages: list[dict[str, str]]) -> str:
        """The assistant message content; retries transient failures."""
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        data = json.dumps(body).encode("utf-8")
        last: Exception = _Fatal("no attempt made")
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (1.0 + 0.25 * random.random()))
            try:
                return _content(self._post(data))
            except (_Timeout, _Retryable) as e:
                last = e
                log.warning(
                    "annotator %s attempt %d/%d: %s", self.url, attempt + 1, self.max_retries + 1, e
                )
        raise last

    def _post(self, data: bytes) -> bytes:
        """One attempt: the raw 200 body, or _Timeout / _Retryable / _Fatal."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        deadline = time.monotonic() + self.timeout_s
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                chunks, size = [], 0
                # urlopen's timeout bounds each socket read; this bounds the whole body, so a
                # server trickling bytes cannot hold the trainer.
                while chunk := resp.read(1 << 16):
                    size += len(chunk)
                    if size > _MAX_BODY_BYTES:
                        raise _Fatal(f"response body over {_MAX_BODY_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise _Timeout(f"no complete reply within timeout_s={self.timeout_s}")
                    chunks.append(chunk)
                return b"".join(chunks)
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}") from None
            raise _Fatal(f"HTTP {e.code}") from None
        except TimeoutError:
            raise _Timeout(f"no reply within timeout_s={self.timeout_s}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError | socket.timeout):
                raise _Timeout(f"no reply within timeout_s={self.timeout_s}") from None
            raise _Retryable(f"connection error: {type(e.reason).__name__}") from None
        except (OSError, http.client.HTTPException) as e:  # reset mid-body, bad status line
            raise _Retryable(f"connection error: {type(e).__name__}") from None


def _content(body: bytes) -> str:
    """choices[0].message.content of a chat-completions reply, else _Fatal."""
    try:
        reply = json.loads(body)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Fatal("reply is not a chat-completions JSON object") from None
    if not isinstance(content, str):
        raise _Fatal("reply content is not a string")
    return content
