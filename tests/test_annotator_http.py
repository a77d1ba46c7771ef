"""The annotator's HTTP client against hostile servers (issue 18), on 127.0.0.1 only.

Each server loop is bounded (a fixed number of bytes or requests), so a regression makes a test
fail, not hang. Durations asserted here are deadlines the client promises (timeout_s,
max_retry_after_s), with generous slack, not speed measurements.
"""

from __future__ import annotations

import http.server
import json
import socket
import struct
import threading
import time

import numpy as np
import pytest

from jaxtrace import rl
from jaxtrace.annotate import AnnotationRequest, OpenAIAnnotator
from jaxtrace.annotate.base import AnnotationResult
from jaxtrace.annotate.http_api import _content, _Fatal, json_depth

RESPONSE = "Let x = 5.\nThen y = x + 2 = 7.\nThe answer is 7."


def _req():
    return AnnotationRequest("q?", "reference", RESPONSE, True)


def _ok_reply(spans=("Let x = 5.",)) -> bytes:
    content = json.dumps({"spans": list(spans)})
    return json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": content}}]}
    ).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Scripted per server: `server.script` is a list of callables (handler) -> None, one per
    request (the last one repeats)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        server = self.server
        with server.lock:
            server.seen.append((time.monotonic(), dict(self.headers)))
            action = server.script.pop(0) if len(server.script) > 1 else server.script[0]
        try:
            action(self)
        except OSError:  # the client gave up
            pass

    do_GET = do_POST

    def send(self, code, payload=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def servers():
    made = []

    def make(*script):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.lock = threading.Lock()
        server.seen, server.script = [], list(script)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        made.append(server)
        return server

    yield make
    for s in made:
        s.shutdown()
        s.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def _api(server, **kw):
    kw = {"timeout_s": 5.0, "max_retries": 0, "backoff_s": 0.01, "api_key_env": "JT_KEY", **kw}
    return OpenAIAnnotator(f"http://127.0.0.1:{server.server_port}/v1", "m", **kw)


def _drip_body(h):
    """A 200 with a 400-byte body sent one byte every 0.1 s (40 s in all, if nobody stops it)."""
    h.send_response(200)
    h.send_header("Content-Length", "400")
    h.end_headers()
    for _ in range(400):
        h.wfile.write(b" ")
        h.wfile.flush()
        time.sleep(0.1)


def _drip_headers(h):
    """The status line, then one header byte every 0.1 s."""
    h.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(400):
        h.wfile.write(b"X")
        h.wfile.flush()
        time.sleep(0.1)


@pytest.mark.parametrize("drip", [_drip_body, _drip_headers], ids=["body", "headers"])
def test_dripping_server_does_not_hold_the_annotator_past_timeout_s(servers, drip):
    server = servers(drip)
    ann = _api(server, timeout_s=1.0)
    t0 = time.monotonic()
    (res,) = ann.annotate([_req()])
    elapsed = time.monotonic() - t0
    assert res.status == "timeout" and res.spans == ()
    assert elapsed < 3.0, elapsed  # deadline 1 s; the old client waited for the whole body


def test_redirect_does_not_carry_the_api_key(servers, monkeypatch):
    monkeypatch.setenv("JT_KEY", "sk-secret-123")
    thief = servers(lambda h: h.send(200, _ok_reply()))
    location = f"http://127.0.0.1:{thief.server_port}/steal"
    for code in (301, 302, 303, 307, 308):
        origin = servers(lambda h, c=code: h.send(c, b"", [("Location", location)]))
        (res,) = _api(origin, max_retries=1).annotate([_req()])
        assert res.status == "failed" and "redirect" in res.detail
        assert len(origin.seen) == 1  # a refused redirect is not retried
        assert origin.seen[0][1]["Authorization"] == "Bearer sk-secret-123"
    assert thief.seen == []  # nothing, and so no key, ever reached the other server


def test_deeply_nested_reply_is_a_failed_annotation_not_a_crash(servers):
    deep = b"[" * 200_000 + b"]" * 200_000
    server = servers(lambda h: h.send(200, deep))
    (res,) = _api(server).annotate([_req()])
    assert res.status == "failed" and "nested" in res.detail
    # Nesting inside a string is not nesting; a normal reply still parses.
    server = servers(lambda h: h.send(200, _ok_reply(["[[[[" * 100])))
    (res,) = _api(server).annotate([_req()])
    assert res.status == "ok" and res.dropped_spans == 1


def test_json_depth_vs_reference():
    rng = np.random.default_rng(0)
    for _ in range(50):
        depth, text, ref = 0, [], 0
        for _ in range(rng.integers(1, 60)):
            r = rng.random()
            if r < 0.4:
                text.append("[")
                depth += 1
            elif r < 0.6 and depth:
                text.append("]")
                depth -= 1
            else:
                text.append(json.dumps(rng.choice(["a[b", 'c"{', "\\]", "x"])) + ",")
            ref = max(ref, depth)
        assert json_depth("".join(text).encode()) == ref
    with pytest.raises(_Fatal, match="nested"):
        _content(b"[" * 65 + b"]" * 65, max_depth=64)


def test_retry_after_is_honoured(servers):
    server = servers(
        lambda h: h.send(429, b"{}", [("Retry-After", "1")]),
        lambda h: h.send(200, _ok_reply()),
    )
    (res,) = _api(server, max_retries=1, backoff_s=0.01).annotate([_req()])
    assert res.status == "ok"
    (t1, _), (t2, _) = server.seen
    assert t2 - t1 >= 0.9  # backoff alone would be 0.01 s


def test_retry_after_is_bounded(servers):
    server = servers(
        lambda h: h.send(503, b"{}", [("Retry-After", "3600")]),
        lambda h: h.send(200, _ok_reply()),
    )
    ann = _api(server, max_retries=1, backoff_s=0.01, max_retry_after_s=0.3)
    t0 = time.monotonic()
    (res,) = ann.annotate([_req()])
    assert res.status == "ok" and time.monotonic() - t0 < 3.0
    (t1, _), (t2, _) = server.seen
    assert t2 - t1 >= 0.25


def test_connection_reset_is_retried_then_failed(servers):
    def reset(h):
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()

    server = servers(reset)
    (res,) = _api(server, max_retries=1).annotate([_req()])
    assert res.status in ("failed", "timeout") and len(server.seen) == 2


def test_annotator_dropped_spans_counts_quotes_not_in_the_response():
    """Quote-based annotators drop unfound quotes before there are spans; the metric counts them
    (it stayed 0 when no quote was found)."""

    class Quotes:
        def annotate(self, requests):
            return [AnnotationResult(spans=(), kind=r.kind, dropped_spans=2) for r in requests]

    class Tok:
        vocab_size, pad_id, eos_id, bos_id = 200, 0, 1, None

        def offsets(self, ids):
            return [(k, k + 1) for k in range(len(ids))]

    ex = [type("E", (), {"question": "q", "reference": "r"})() for _ in range(3)]
    key, err, counts = rl.annotate_masks(
        Quotes(), Tok(), ex, [[3, 4]] * 3, ["ab"] * 3, [True, False, True], 4
    )
    assert counts["dropped_spans"] == 6 and not key.any() and not err.any()


# ------------------------------------------------------------------ proxies
def test_http_api_goes_through_http_proxy_in_absolute_form(servers, monkeypatch):
    # The "proxy" answers itself; what matters is that the request reached it, for the API's
    # absolute URL, with the proxy's credentials.
    proxy = servers(lambda h: (h.server.paths.append(h.path), h.send(200, _ok_reply()))[-1])
    proxy.paths = []
    monkeypatch.setenv("http_proxy", f"http://user:pw@127.0.0.1:{proxy.server_port}")
    monkeypatch.setenv("no_proxy", "")
    api = OpenAIAnnotator("http://api.example.invalid/v1", "m", timeout_s=5.0, max_retries=0)
    (res,) = api.annotate([_req()])
    assert res.status == "ok", res.detail
    assert proxy.paths == ["http://api.example.invalid/v1/chat/completions"]
    assert proxy.seen[0][1]["Proxy-Authorization"] == "Basic dXNlcjpwdw=="  # user:pw


def test_no_proxy_host_is_reached_directly(servers, monkeypatch):
    direct = servers(lambda h: h.send(200, _ok_reply()))
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    (res,) = _api(direct).annotate([_req()])
    assert res.status == "ok" and len(direct.seen) == 1


def test_https_api_tunnels_through_the_proxy_without_showing_it_the_key(monkeypatch):
    # A proxy that records the CONNECT request and refuses it: the tunnel was asked for the
    # API's host, and nothing the proxy saw carries the API key.
    monkeypatch.setenv("JT_KEY", "sk-secret-123")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen = []

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            seen.append(data)
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("no_proxy", "")
    api = OpenAIAnnotator(
        "https://api.example.invalid/v1", "m", timeout_s=5.0, max_retries=0, api_key_env="JT_KEY"
    )
    (res,) = api.annotate([_req()])
    listener.close()
    assert res.status == "failed"
    assert seen and seen[0].startswith(b"CONNECT api.example.invalid:443 HTTP/")
    assert b"sk-secret-123" not in seen[0]
