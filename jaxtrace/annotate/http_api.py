"""Annotation by a strong model behind an OpenAI-compatible chat-completions API (stdlib only).

The API key is read from an environment variable at request time and only ever placed in the
Authorization header of a request to `base_url`'s host: it is not stored on the object, logged,
or put in any error message. The client speaks HTTP itself (http.client) so that:
  * a request has one total deadline, `timeout_s`, for connect + send + headers + body: a
    watchdog shuts the socket down when it passes, so a server dripping bytes cannot hold it;
  * redirects are refused (a 3xx is a failed annotation), so the key never goes to another host;
  * a reply nested deeper than `max_json_depth` is a failed annotation, not a RecursionError;
  * a 429 / 503 `Retry-After` (seconds or an HTTP date) is waited for, up to `max_retry_after_s`;
  * the usual proxy variables are honoured (`https_proxy` / `http_proxy` / `no_proxy`, as urllib
    reads them): an https API goes through a CONNECT tunnel, so TLS runs end to end and the proxy
    never sees the Authorization header; an http API is sent to the proxy in absolute form.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from jaxtrace.annotate.base import AnnotationRequest, AnnotationResult, Annotator, failed_result
from jaxtrace.annotate.prompt import build_messages, result_from_output

log = logging.getLogger(__name__)
_MAX_BODY_BYTES = 8 << 20


class _Timeout(Exception):
    pass


class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: float | None = None):
        super().__init__(msg)
        self.retry_after = retry_after


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
      timeout_s: total limit for one HTTP attempt: connect, send, status line, headers, body.
      max_retries: extra attempts after a timeout, connection error, 429 or 5xx (other 4xx,
        3xx redirects and unusable replies are not retried). Backoff: `backoff_s * 2**attempt`
        with jitter, or the server's Retry-After when that is longer.
      max_retry_after_s: the longest Retry-After honoured (a longer one is cut to this).
      max_json_depth: replies nested deeper than this are failed annotations.
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
        max_retry_after_s: float = 30.0,
        max_json_depth: int = 64,
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
        if not max_retry_after_s >= 0:
            raise ValueError(f"max_retry_after_s must be >= 0, got {max_retry_after_s!r}")
        if not (isinstance(max_json_depth, int) and max_json_depth >= 1):
            raise ValueError(f"max_json_depth must be an int >= 1, got {max_json_depth!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        parts = urllib.parse.urlsplit(self.url)
        if not parts.hostname:
            raise ValueError(f"base_url has no host: {base_url!r}")
        self._parts = parts
        self.max_retry_after_s = float(max_retry_after_s)
        self.max_json_depth = max_json_depth
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
        wait = 0.0
        for attempt in range(self.max_retries + 1):
            if attempt:
                backoff = self.backoff_s * 2 ** (attempt - 1) * (1.0 + 0.25 * random.random())
                time.sleep(max(backoff, wait))
            try:
                return _content(self._post(data), self.max_json_depth)
            except (_Timeout, _Retryable) as e:
                last = e
                retry_after = getattr(e, "retry_after", None)
                wait = min(retry_after, self.max_retry_after_s) if retry_after else 0.0
                log.warning(
                    "annotator %s attempt %d/%d: %s", self.url, attempt + 1, self.max_retries + 1, e
                )
        raise last

    def _connection(self) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
        """A connection for one request (direct, or through the environment's proxy), the
        request target to send on it and the headers the proxy needs on the request."""
        p = self._parts
        path = p.path + (f"?{p.query}" if p.query else "")
        proxy = _proxy_for(p)
        if p.scheme == "https":
            host, port = (proxy.hostname, proxy.port or 8080) if proxy else (p.hostname, p.port)
            conn = http.client.HTTPSConnection(
                host, port, timeout=self.timeout_s, context=ssl.create_default_context()
            )
            if proxy:
                conn.set_tunnel(p.hostname, p.port or 443, headers=_proxy_auth(proxy))
            return conn, path, {}
        if proxy:  # plain http: the proxy forwards a request for the absolute URL
            conn = http.client.HTTPConnection(
                proxy.hostname, proxy.port or 8080, timeout=self.timeout_s
            )
            target = urllib.parse.urlunsplit((p.scheme, p.netloc, p.path, p.query, ""))
            return conn, target, _proxy_auth(proxy)
        return http.client.HTTPConnection(p.hostname, p.port, timeout=self.timeout_s), path, {}

    def _post(self, data: bytes) -> bytes:
        """One attempt: the raw 200 body, or _Timeout / _Retryable / _Fatal."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        deadline = time.monotonic() + self.timeout_s
        conn, path, proxy_headers = self._connection()
        headers.update(proxy_headers)
        watchdog = threading.Timer(self.timeout_s, _shut_down, (conn,))
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            _check_deadline(deadline, self.timeout_s)  # the watchdog may have fired mid-connect
            conn.request("POST", path, body=data, headers=headers)
            resp = conn.getresponse()
            status = resp.status
            if 300 <= status < 400:
                raise _Fatal(f"HTTP {status} redirect refused (the request is not sent elsewhere)")
            if status == 429 or status >= 500:
                raise _Retryable(f"HTTP {status}", _retry_after(resp.getheader("Retry-After")))
            if status != 200:
                raise _Fatal(f"HTTP {status}")
            chunks, size = [], 0
            while True:
                _check_deadline(deadline, self.timeout_s)
                chunk = resp.read1(1 << 16)  # what has arrived, not a full buffer
                if not chunk:
                    break
                size += len(chunk)
                if size > _MAX_BODY_BYTES:
                    raise _Fatal(f"response body over {_MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            _check_deadline(deadline, self.timeout_s)
            return b"".join(chunks)
        except (_Fatal, _Retryable, _Timeout):
            raise
        except (OSError, http.client.HTTPException, ValueError) as e:
            if isinstance(e, TimeoutError | socket.timeout) or time.monotonic() >= deadline:
                raise _Timeout(f"no complete reply within timeout_s={self.timeout_s}") from None
            raise _Retryable(f"connection error: {type(e).__name__}") from None
        finally:
            watchdog.cancel()
            conn.close()


def _proxy_for(parts: urllib.parse.SplitResult) -> urllib.parse.SplitResult | None:
    """The proxy the environment names for this URL (None: direct, or the host is in
    no_proxy)."""
    url = urllib.request.getproxies().get(parts.scheme)
    if not url or urllib.request.proxy_bypass(parts.hostname):
        return None
    proxy = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    return proxy if proxy.hostname else None


def _proxy_auth(proxy: urllib.parse.SplitResult | None) -> dict[str, str]:
    """Proxy-Authorization for a proxy URL with user:password@ (else none)."""
    if proxy is None or proxy.username is None:
        return {}
    user = urllib.parse.unquote(proxy.username)
    password = urllib.parse.unquote(proxy.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Proxy-Authorization": f"Basic {token}"}


def _shut_down(conn: http.client.HTTPConnection) -> None:
    """Unblocks whatever the request thread waits for on `conn`'s socket (the deadline passed)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _check_deadline(deadline: float, timeout_s: float) -> None:
    if time.monotonic() >= deadline:
        raise _Timeout(f"no complete reply within timeout_s={timeout_s}")


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def json_depth(body: bytes) -> int:
    """The deepest nesting of [ and { in a JSON text (string contents ignored); C-speed work."""
    arr = np.frombuffer(_JSON_STRING.sub(b'""', body), np.uint8)
    if arr.size == 0:
        return 0
    step = np.isin(arr, (ord("["), ord("{"))).astype(np.int64)
    step -= np.isin(arr, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _content(body: bytes, max_depth: int = 64) -> str:
    """choices[0].message.content of a chat-completions reply, else _Fatal."""
    if json_depth(body) > max_depth:
        raise _Fatal(f"reply JSON is nested deeper than {max_depth}")
    try:
        reply = json.loads(body)
        content = reply["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        raise _Fatal("reply is not a chat-completions JSON object") from None
    if not isinstance(content, str):
        raise _Fatal("reply content is not a string")
    return content
