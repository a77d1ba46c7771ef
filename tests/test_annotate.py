"""Annotators (file, OpenAI-compatible HTTP, self, divergence) and char span -> token mapping."""

import functools
import http.server
import json
import logging
import math
import socket
import threading
import time

import jax
import numpy as np
import pytest

from jaxtrace.annotate import (
    AnnotationRequest,
    FileAnnotator,
    OpenAIAnnotator,
    SelfAnnotator,
    build_messages,
    char_spans_to_token_mask,
    clean_spans,
    divergence_mask,
    divergence_spans,
    locate_quotes,
    parse_quotes,
    request_key,
    token_mask_to_spans,
)
from jaxtrace.annotate.prompt import ELISION, build_policy_prompt, render_for_policy
from jaxtrace.data import tokenizer as tok_lib

# -- char spans -> token mask ------------------------------------------------------------------

# Byte-level-BPE-like tokens: a token carries its leading space.
TEXT = "x = 5 + 3\nso y = 8"
TOKENS = ["x", " =", " 5", " +", " 3", "\n", "so", " y", " =", " 8"]
OFFSETS = np.array(
    [(sum(map(len, TOKENS[:i])), sum(map(len, TOKENS[: i + 1]))) for i in range(len(TOKENS))]
)


def _reference_mask(spans, offsets, num_tokens, text=None):
    """Per-character set intersection; independent of the max/min overlap formula."""
    chars = set()
    for a, b in spans:
        if text is not None:
            while a < b and text[a].isspace():
                a += 1
            while b > a and text[b - 1].isspace():
                b -= 1
        chars.update(range(a, b))
    mask = np.zeros(num_tokens, bool)
    for i, (s, e) in enumerate(offsets):
        mask[i] = any(c in chars for c in range(s, e))
    return mask


def test_token_offsets_fixture_is_consistent():
    assert "".join(TEXT[s:e] for s, e in OFFSETS) == TEXT == "".join(TOKENS)


@pytest.mark.parametrize(
    "spans, use_text, expected_tokens",
    [
        ([(0, 4)], False, [0, 1, 2]),  # ends mid-token " 5": the whole token is in
        ([(3, 5)], False, [2]),  # starts at a token boundary: the token before is out
        ([(4, 5)], False, [2]),  # "5" alone, inside " 5"
        ([(3, 3)], False, []),  # zero-width
        ([(4, 6)], False, [2, 3]),  # "5 " touches " +" by its leading space ...
        ([(4, 6)], True, [2]),  # ... unless trailing whitespace is trimmed
        ([(9, 10)], False, [5]),  # a lone newline token
        ([(9, 10)], True, []),  # whitespace-only span trims to nothing
        ([(5, 10)], True, [3, 4]),  # " + 3\n" -> "+ 3"
        ([(0, 18)], False, list(range(10))),
        ([(17, 18)], False, [9]),  # last character
        ([(0, 1), (16, 18)], False, [0, 9]),
        ([(0, 2), (1, 4)], False, [0, 1, 2]),  # overlapping spans merge
    ],
)
def test_char_spans_edges(spans, use_text, expected_tokens):
    text = TEXT if use_text else None
    mask = char_spans_to_token_mask(spans, OFFSETS, len(TOKENS), text=text)
    expected = np.zeros(len(TOKENS), bool)
    expected[expected_tokens] = True
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(mask, _reference_mask(spans, OFFSETS, len(TOKENS), text))


def test_char_spans_padding_and_special_tokens():
    # A BOS-like special token with (0, 0) offsets, then the text tokens, then 3 pad positions.
    offsets = np.concatenate([[[0, 0]], OFFSETS])
    mask = char_spans_to_token_mask([(0, 3)], offsets, offsets.shape[0] + 3)
    assert mask.shape == (14,) and mask.dtype == bool
    np.testing.assert_array_equal(np.flatnonzero(mask), [1, 2])
    empty = char_spans_to_token_mask([(0, 3)], np.zeros((0, 2), np.int64), 4)
    np.testing.assert_array_equal(empty, np.zeros(4, bool))


MALFORMED = [
    (5, 3),  # start > end
    (-1, 2),
    (0, 100),  # past the end of TEXT
    (1.5, 3),
    (float("nan"), 2),
    (2, float("nan")),
    ("a", 3),
    (True, 3),
    None,
    (1, 2, 3),
    "ab",
    7,
]


def test_malformed_spans_dropped_and_counted():
    spans = [*MALFORMED, (0, 1), (np.int64(16), np.int32(18))]
    mask, dropped = char_spans_to_token_mask(
        spans, OFFSETS, len(TOKENS), text=TEXT, return_dropped=True
    )
    assert dropped == len(MALFORMED)
    np.testing.assert_array_equal(np.flatnonzero(mask), [0, 9])
    # Without text the end is not checked: (0, 100) is then a valid span over everything.
    mask, dropped = char_spans_to_token_mask(spans, OFFSETS, len(TOKENS), return_dropped=True)
    assert dropped == len(MALFORMED) - 1 and mask.all()
    assert clean_spans(None) == ([], 0)
    assert clean_spans(42) == ([], 1)  # not even iterable


@pytest.mark.parametrize("num_tokens", [1, 7, 33])
def test_char_spans_random_vs_reference(num_tokens):
    rng = np.random.default_rng(num_tokens)
    lengths = rng.integers(0, 4, size=num_tokens)  # zero-length tokens included
    ends = np.cumsum(lengths)
    offsets = np.stack([ends - lengths, ends], axis=1)
    text_len = int(ends[-1]) if num_tokens else 0
    text = "".join(rng.choice(list("ab \n")) for _ in range(text_len))
    for trial in range(20):
        n_spans = rng.integers(0, 4)
        starts = rng.integers(-2, text_len + 3, size=n_spans)
        spans = [(int(a), int(a + rng.integers(-1, 6))) for a in starts]
        for t, pad in ((None, 0), (text, 2)):
            mask, dropped = char_spans_to_token_mask(
                spans, offsets, num_tokens + pad, text=t, return_dropped=True
            )
            valid = [(a, b) for a, b in spans if 0 <= a <= b and (t is None or b <= text_len)]
            assert dropped == len(spans) - len(valid), (trial, spans)
            ref = _reference_mask(valid, offsets, num_tokens + pad, t)
            np.testing.assert_array_equal(mask, ref, err_msg=f"{spans} text={t is not None}")


def test_char_spans_with_real_bpe_offsets():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT, "so x = 3 + 5 and y = 8"] * 10, trainer=trainer)
    enc = tok.encode(TEXT)
    offsets = np.array(enc.offsets)
    assert "".join(TEXT[s:e] for s, e in offsets) == TEXT
    start = TEXT.index("y = 8")
    mask = char_spans_to_token_mask([(start, len(TEXT))], offsets, len(offsets), text=TEXT)
    np.testing.assert_array_equal(mask, _reference_mask([(start, 18)], offsets, len(offsets)))
    covered = "".join(TEXT[s:e] for (s, e), m in zip(offsets, mask) if m)
    assert covered.strip() == "y = 8"  # at most the leading space of the first token extra


@pytest.mark.parametrize(
    "offsets, num_tokens, match",
    [
        (np.zeros((3, 3), int), 3, "offsets_Tx2"),
        (np.zeros((3,), int), 3, "offsets_Tx2"),
        (np.zeros((3, 2), float), 3, "offsets_Tx2"),
        (np.zeros((4, 2), int), 3, "offsets_Tx2"),
        (np.zeros((3, 2), int), -1, "num_tokens"),
        (np.zeros((3, 2), int), 3.0, "num_tokens"),
    ],
)
def test_char_spans_bad_args(offsets, num_tokens, match):
    with pytest.raises(ValueError, match=match):
        char_spans_to_token_mask([(0, 1)], offsets, num_tokens)


def test_clean_spans_merges_and_sorts():
    spans, dropped = clean_spans([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4), (3, 1)], 10)
    assert spans == [(0, 3), (5, 9)] and dropped == 1


@pytest.mark.parametrize("T", [0, 1, 6, 31])
def test_token_mask_to_spans(T):
    mask = np.random.default_rng(T).random(T) < 0.5
    spans = token_mask_to_spans(mask)
    rebuilt = np.zeros(T, bool)
    for a, b in spans:
        assert a < b and mask[a:b].all()
        assert (a == 0 or not mask[a - 1]) and (b == T or not mask[b])
        rebuilt[a:b] = True
    np.testing.assert_array_equal(rebuilt, mask)


# -- parsing and locating quotes ---------------------------------------------------------------

RESPONSE = "Let x = 5.\nThen $2x = 10$, so y = 10 - 3 = 7.\nCheck: y = 7.\nThe answer is 7."


@pytest.mark.parametrize(
    "output, quotes",
    [
        ('{"spans": ["x = 5", "y = 7"]}', ["x = 5", "y = 7"]),
        ('```json\n{"spans": ["a"]}\n```', ["a"]),
        ('Sure! Here you go: {"Quotes": ["a", "b"]} Hope it helps {x}', ["a", "b"]),
        ('<think>maybe {"spans": ["wrong"]}</think>\n{"spans": ["right"]}', ["right"]),
        ('["a", "b"]', ["a", "b"]),
        ('{"spans": [{"text": "a"}, {"quote": "b"}]}', ["a", "b"]),
        ('{"error": "a"}', ["a"]),
        ('{"spans": []}', []),
        ('{"note": 1} then {"spans": ["a"]}', ["a"]),
        ('{"spans": ["a",', None),
        ("The key step is the second line.", None),
        ("", None),
        ("{" * 50_000, None),
        ("[" * 100_000 + "]" * 100_000, None),
    ],
)
def test_parse_quotes(output, quotes):
    parsed = parse_quotes(output)
    assert (parsed if parsed is None else parsed[0]) == quotes


def test_parse_quotes_counts_malformed_items():
    assert parse_quotes('{"spans": ["a", 3, null, "", {"x": 1}]}') == (["a"], 4)
    assert parse_quotes(None) is None and parse_quotes(b'["a"]') is None


def test_locate_quotes():
    quotes = [
        "x = 5",  # exact
        "$2x=10$",  # whitespace differs
        "2x = 10",  # `$` dropped by the model; same place again, merged
        "y = 7",
        "so y = 10 ... = 7.",  # elision
        "  The answer is 7.  ",  # surrounding whitespace
        "z = 9",  # not in the response
        "   ",
        3,
    ]
    spans, dropped = locate_quotes(RESPONSE, quotes)
    assert dropped == 3
    texts = [RESPONSE[a:b] for a, b in spans]
    assert texts == ["x = 5", "2x = 10", "so y = 10 - 3 = 7.", "y = 7", "The answer is 7."]
    assert spans[3][0] == RESPONSE.index("Check: y = 7") + len("Check: ")


def test_locate_quotes_prefers_occurrence_after_previous_quote():
    text = "a = 1. b = 2. a = 1."
    assert locate_quotes(text, ["a = 1"]) == ([(0, 5)], 0)
    assert locate_quotes(text, ["b = 2", "a = 1"]) == ([(7, 12), (14, 19)], 0)
    assert locate_quotes(text, ["b = 2", "b = 2"]) == ([(7, 12)], 0)  # falls back, merges


# -- FileAnnotator -----------------------------------------------------------------------------


def _req(response=RESPONSE, correct=True, id=None, problem="Find y."):
    return AnnotationRequest(
        problem=problem, reference_solution="y = 7", response=response, correct=correct, id=id
    )


def test_file_annotator(tmp_path):
    path = tmp_path / "spans.jsonl"
    records = [
        {"id": "r1", "spans": [[4, 9], [9, 4], [0, 999], "bad"]},
        {"problem": "Find y.", "response": RESPONSE, "quotes": ["y = 10 - 3", "nope"]},
        {"key": request_key("P", "abc"), "spans": [[0, 1]], "quotes": ["bc"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    ann = FileAnnotator(path)
    results = ann.annotate(
        [
            _req(id="r1"),
            _req(correct=False),  # matched by (problem, response)
            _req(response="abc", problem="P"),
            _req(response="unseen"),
        ]
    )
    assert results[0].spans == ((4, 9),) and results[0].dropped_spans == 3
    assert results[0].kind == "key" and results[1].kind == "error"
    a, b = results[1].spans[0]
    assert RESPONSE[a:b] == "y = 10 - 3" and results[1].dropped_spans == 1
    assert results[2].spans == ((0, 3),)
    assert results[3].status == "missing" and results[3].spans == ()
    assert ann.stats.as_dict() == {
        "requests": 4,
        "spans": 3,
        "dropped_spans": 4,
        "failed": 0,
        "timeouts": 0,
        "missing": 1,
    }


@pytest.mark.parametrize(
    "line, match",
    [
        ("{not json", r":2: invalid JSON"),
        ('["a"]', r":2: each line must be a JSON object"),
        ('{"id": "x"}', r":2: record has neither"),
        ('{"spans": []}', r":2: record needs"),
    ],
)
def test_file_annotator_bad_file(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "ok", "spans": []}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        FileAnnotator(path)


def test_annotation_request_validation():
    with pytest.raises(ValueError, match="correct"):
        AnnotationRequest("p", "r", "y", correct=1)
    with pytest.raises(ValueError, match="response"):
        AnnotationRequest("p", "r", None, correct=True)
    with pytest.raises(ValueError, match=r"requests\[0\]"):
        SelfAnnotator(lambda p: p).annotate(["not a request"])


# -- OpenAIAnnotator against a fake server -----------------------------------------------------


class _FakeAPI(http.server.BaseHTTPRequestHandler):
    """Chat-completions stub; the request's `model` field picks a scripted behaviour."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:
            server.seen.append((self.path, dict(self.headers), body))
            script = server.scripts.get(body["model"], [])
            action = script.pop(0) if len(script) > 1 else (script or [("echo",)])[0]
        kind = action[0]
        if kind == "sleep":
            time.sleep(action[1])
            return self._send(200, b"{}")
        if kind == "status":
            return self._send(action[1], b'{"error": "scripted"}')
        if kind == "raw":
            return self._send(200, action[1])
        if kind == "content":
            content = action[1]
        else:  # echo: quote the first line of the student response found in the prompt
            user = body["messages"][-1]["content"]
            response = user.split("<<<\n", 1)[1].split("\n>>>", 1)[0]
            content = json.dumps({"spans": [response.splitlines()[0]]})
        reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        self._send(200, json.dumps(reply).encode())

    def _send(self, code, payload):
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (timeout test)
            pass


@pytest.fixture
def fake_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeAPI)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.seen, server.scripts = [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def _api(server, **kw):
    kw = {"timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01, "api_key_env": "JT_TEST_KEY", **kw}
    return OpenAIAnnotator(f"http://127.0.0.1:{server.server_port}/v1", **kw)


def _model_calls(server, model):
    return sum(1 for _, _, body in server.seen if body["model"] == model)


def test_openai_annotator_batch_in_order(fake_api, monkeypatch, caplog):
    secret = "sk-test-do-not-log-123"
    monkeypatch.setenv("JT_TEST_KEY", secret)
    responses = [f"step {i}: y = {i}\nso the answer is {i}" for i in range(5)]
    requests = [_req(response=r, correct=i % 2 == 0) for i, r in enumerate(responses)]
    ann = _api(fake_api, model="echo", max_concurrency=3)
    with caplog.at_level(logging.DEBUG):
        results = ann.annotate(requests)
    for r, res in zip(responses, results):
        assert res.status == "ok" and len(res.spans) == 1
        a, b = res.spans[0]
        assert r[a:b] == r.splitlines()[0]
    assert [r.kind for r in results] == ["key", "error", "key", "error", "key"]
    path, headers, _ = fake_api.seen[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == f"Bearer {secret}"
    sent = sorted(json.dumps(body["messages"]) for _, _, body in fake_api.seen)
    assert sent == sorted(json.dumps(build_messages(r, 4)) for r in requests)
    assert secret not in caplog.text and secret not in repr(ann)
    assert ann.stats.spans == 5 and ann.stats.failed == 0


def test_openai_annotator_retries_5xx_then_ok(fake_api, monkeypatch, caplog):
    monkeypatch.delenv("JT_TEST_KEY", raising=False)
    fake_api.scripts["flaky"] = [("status", 500), ("status", 429), ("echo",)]
    ann = _api(fake_api, model="flaky")
    (res,) = ann.annotate([_req()])
    assert res.status == "ok" and RESPONSE[slice(*res.spans[0])] == "Let x = 5."
    assert _model_calls(fake_api, "flaky") == 3
    assert all("Authorization" not in h for _, h, _ in fake_api.seen)  # no key, no header


def test_openai_annotator_timeout(fake_api):
    fake_api.scripts["slow"] = [("sleep", 1.0)]
    ann = _api(fake_api, model="slow", timeout_s=0.2, max_retries=1)
    (res,) = ann.annotate([_req()])
    assert res.status == "timeout" and res.spans == ()
    assert ann.stats.timeouts == 1 and _model_calls(fake_api, "slow") == 2


@pytest.mark.parametrize(
    "script, calls",
    [
        ([("content", "The key step is where x is set to 5.")], 1),  # prose, no JSON
        ([("content", '{"verdict": "fine"}')], 1),  # JSON without quotes
        ([("raw", b"<html>Bad Gateway</html>")], 1),  # not a chat-completions reply
        ([("raw", b'{"choices": []}')], 1),
        ([("raw", b'{"choices": [{"message": {"content": null}}]}')], 1),
        ([("status", 400)], 1),  # client error: no retry
        ([("status", 503)], 3),  # server error every time: retried, then failed
    ],
)
def test_openai_annotator_garbage(fake_api, script, calls):
    fake_api.scripts["bad"] = script
    ann = _api(fake_api, model="bad")
    (res,) = ann.annotate([_req()])
    assert res.status == "failed" and res.spans == () and res.detail
    assert ann.stats.failed == 1 and _model_calls(fake_api, "bad") == calls


def test_openai_annotator_quotes_not_found_are_counted(fake_api):
    fake_api.scripts["halluc"] = [("content", '{"spans": ["x = 5", "z = 42"]}')]
    (res,) = _api(fake_api, model="halluc").annotate([_req()])
    assert res.status == "ok" and res.dropped_spans == 1 and len(res.spans) == 1


def test_openai_annotator_connection_refused():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ann = OpenAIAnnotator(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff_s=0.01)
    (res,) = ann.annotate([_req()])
    assert res.status == "failed" and "connection" in res.detail


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"base_url": "127.0.0.1:8000"}, "base_url"),
        ({"model": ""}, "model"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_openai_annotator_bad_args(kwargs, match):
    args = {"base_url": "http://127.0.0.1:1/v1", "model": "m", **kwargs}
    with pytest.raises(ValueError, match=match):
        OpenAIAnnotator(**args)


# -- SelfAnnotator -----------------------------------------------------------------------------


def test_self_annotator():
    seen = []
    replies = [
        '{"spans": ["so y = 10 - 3 = 7."]}',
        '<think>The error... {hmm}</think>```json\n{"spans": ["Let x = 5."]}\n```',
        "I am not sure what you mean.",
        None,
    ]

    def generate_fn(prompts):
        seen.extend(prompts)
        return replies

    ann = SelfAnnotator(generate_fn)
    results = ann.annotate([_req(), _req(correct=False), _req(), _req(correct=False)])
    assert [r.status for r in results] == ["ok", "ok", "failed", "failed"]
    assert RESPONSE[slice(*results[0].spans[0])] == "so y = 10 - 3 = 7."
    assert RESPONSE[slice(*results[1].spans[0])] == "Let x = 5."
    assert "CORRECT" in seen[0] and "WRONG" in seen[1]
    assert all(RESPONSE in p and "Find y." in p and "y = 7" in p for p in seen)
    assert ann.stats.failed == 2 and ann.stats.spans == 2


@pytest.mark.parametrize(
    "generate_fn",
    [
        lambda prompts: 1 / 0,
        lambda prompts: ['{"spans": []}'],  # wrong count
        lambda prompts: None,
    ],
)
def test_self_annotator_broken_generate_fn(generate_fn):
    ann = SelfAnnotator(generate_fn)
    results = ann.annotate([_req(), _req()])
    assert all(r.status == "failed" and r.spans == () for r in results)
    assert ann.stats.failed == 2
    assert ann.annotate([]) == []


class ChatCharTokenizer(tok_lib.Tokenizer):
    """A fake chat policy's tokenizer: one token per character, and a ChatML chat template."""

    vocab_size, pad_id, eos_id, bos_id = 256, 0, 1, None
    chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def encode(self, text):
        return [2 + ord(c) % 250 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids if i >= 2)


def test_fake_chat_policy_receives_its_template():
    seen = []
    ann = SelfAnnotator(
        lambda prompts: seen.extend(prompts) or ['{"spans": ["Let x = 5."]}'] * len(prompts),
        tokenizer=ChatCharTokenizer(),
        max_prompt_tokens=10_000,
    )
    (result,) = ann.annotate([_req()])
    (prompt,) = seen
    assert prompt.startswith("<|im_start|>system\nYou are a meticulous math teacher")
    assert "<|im_end|>\n<|im_start|>user\nProblem:\nFind y." in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n") and RESPONSE in prompt
    assert result.status == "ok" and RESPONSE[slice(*result.spans[0])] == "Let x = 5."
    # Without a chat template the policy gets the plain text prompt.
    plain = type("Plain", (ChatCharTokenizer,), {"chat_template": None})()
    seen.clear()
    SelfAnnotator(
        lambda p: seen.extend(p) or ["{}"] * len(p), tokenizer=plain, max_prompt_tokens=10_000
    ).annotate([_req()])
    assert seen[0].startswith("You are a meticulous math teacher") and "<|im_start|>" not in seen[0]


def test_self_annotation_prompt_shortens_the_middle_of_the_response():
    tok = ChatCharTokenizer()
    head, middle, tail = "Let x = 5. ", "Then y = x + 1 = 6. " * 200, "The answer is 6."
    request = _req(response=head + middle + tail, problem="Find y, a long way round.")
    budget = len(tok.encode(build_policy_prompt(_req(response=""), tok, 10**6))) + 300
    prompt = build_policy_prompt(request, tok, budget)
    assert len(tok.encode(prompt)) <= budget < len(tok.encode(render_for_policy(request, tok)))
    # The instructions, the problem, the reference and both ends of the response survive.
    for kept in ("meticulous math teacher", "Find y, a long way round.", "y = 7", "verbatim"):
        assert kept in prompt, kept
    assert head in prompt and tail in prompt and ELISION in prompt
    assert prompt.count("Then y = x + 1 = 6.") < 200
    # Quotes from the kept head are still found in the whole response.
    seen = []
    ann = SelfAnnotator(
        lambda p: seen.extend(p) or ['{"spans": ["Let x = 5."]}'],
        tokenizer=tok,
        max_prompt_tokens=budget,
    )
    (result,) = ann.annotate([request])
    assert result.spans == ((0, 10),) and len(tok.encode(seen[0])) <= budget
    # A budget too small for the instructions alone fails that request; nothing is cut.
    tiny = SelfAnnotator(lambda p: 1 / 0 if p else [], tokenizer=tok, max_prompt_tokens=50)
    (failed,) = tiny.annotate([request])
    assert failed.status == "failed" and "budget" in failed.detail


def test_parse_failures_are_counted():
    from types import SimpleNamespace

    from jaxtrace import rl

    ann = SelfAnnotator(lambda p: ['{"spans": ["Let x = 5."]}', "no json here"])
    tok = ChatCharTokenizer()
    examples = [SimpleNamespace(question="Find y.", reference="y = 7")] * 2
    ids = [tok.encode(RESPONSE)] * 2
    _, _, counts = rl.annotate_masks(
        ann, tok, examples, ids, [RESPONSE] * 2, np.array([True, True]), 100
    )
    assert counts["parse_failed"] == 1 and counts["failed"] == 1


# -- divergence spans --------------------------------------------------------------------------


def _reference_divergence(kl, mask, top_k, top_frac, merge_gap):
    out = np.zeros(kl.shape, bool)
    for row in np.ndindex(kl.shape[:-1]):
        k_row, m_row = kl[row], mask[row]
        valid = [t for t in range(len(k_row)) if m_row[t] and not math.isnan(k_row[t])]
        if top_k is not None:
            k = min(top_k, len(valid))
        else:
            k = max(0, math.ceil(top_frac * len(valid) - 1e-4))
        picked = sorted(valid, key=lambda t: (-k_row[t], t))[:k]
        sel = np.zeros(len(k_row), bool)
        sel[picked] = True
        filled = sel.copy()
        idx = sorted(picked)
        for p, q in zip(idx, idx[1:]):
            if q - p - 1 <= merge_gap:
                filled[p:q] |= m_row[p:q]
        out[row] = filled
    return out


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 37), (2, 1)])
@pytest.mark.parametrize(
    "top_k, top_frac, merge_gap",
    [(1, None, 0), (3, None, 2), (100, None, 1), (0, None, 3), (None, 0.25, 1), (None, 1.0, 0)],
)
def test_divergence_mask_vs_reference(shape, top_k, top_frac, merge_gap):
    rng = np.random.default_rng(sum(shape) + merge_gap)
    kl = np.round(rng.random(shape), 1).astype(np.float32)  # rounding makes ties
    kl[rng.random(shape) < 0.1] = np.nan
    mask = rng.random(shape) < 0.8
    mask[..., -1] = False  # padding at the end
    got = divergence_mask(kl, mask, top_k=top_k, top_frac=top_frac, merge_gap=merge_gap)
    ref = _reference_divergence(kl, mask, top_k, top_frac, merge_gap)
    np.testing.assert_array_equal(np.asarray(got), ref)
    if len(shape) == 1:  # one jit check per selection mode is enough (compiles are slow on CPU)
        return
    jitted = jax.jit(
        functools.partial(divergence_mask, top_k=top_k, top_frac=top_frac, merge_gap=merge_gap)
    )
    np.testing.assert_array_equal(np.asarray(jitted(kl, mask)), ref)


def test_divergence_spans():
    kl = np.array([0.0, 5.0, 0.1, 4.0, 0.0, 0.0, 0.0, 3.0, 0.2, 0.0], np.float32)
    assert divergence_spans(kl, top_k=3) == [(1, 2), (3, 4), (7, 8)]
    assert divergence_spans(kl, top_k=3, merge_gap=1) == [(1, 4), (7, 8)]
    assert divergence_spans(kl, top_k=3, merge_gap=3) == [(1, 8)]
    assert divergence_spans(kl, top_k=3, merge_gap=1, min_span_tokens=2) == [(1, 4)]
    assert divergence_spans(kl, top_frac=0.1) == [(1, 2)]
    mask = np.ones(10, bool)
    mask[2] = False  # a masked token inside a gap is not filled
    assert divergence_spans(kl, mask, top_k=2, merge_gap=1) == [(1, 2), (3, 4)]
    assert divergence_spans(np.zeros(0, np.float32), top_k=2) == []


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"top_k": 2, "top_frac": 0.5}, "exactly one"),
        ({"top_k": -1}, "top_k"),
        ({"top_frac": 1.5}, "top_frac"),
        ({"top_k": 1, "merge_gap": -1}, "merge_gap"),
        ({"top_k": 1, "mask_BxT": np.ones(3, bool)}, "mask_BxT"),
    ],
)
def test_divergence_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        divergence_mask(np.zeros(4, np.float32), **kwargs)
