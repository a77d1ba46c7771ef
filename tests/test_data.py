"""Data: tokenizers (offsets), prompt templates, jsonl readers on ../shared/data, the tfds
builders and the grain prompt pipeline."""

import json
import re
from decimal import Decimal

import numpy as np
import pytest

from jaxtrace.data import pipeline, tasks, templates
from jaxtrace.data import tokenizer as tok_lib

# Sizes from ../shared/data/README.md.
GSM8K_SIZES = {"train": 7473, "test": 1319}
MATH_SIZES = {
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc2023": 40,
    "minervamath": 272,
    "olympiadbench": 674,
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _raw_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def gsm8k_texts(shared_data):
    rows = _raw_rows(shared_data / "gsm8k" / "train.jsonl")[:400]
    return [r["question"] + " " + r["answer"] for r in rows]


@pytest.fixture(scope="session")
def probe_texts(shared_data):
    """Held-out texts (GSM8K test) that the trained tokenizers have not seen."""
    rows = _raw_rows(shared_data / "gsm8k" / "test.jsonl")[:40]
    return [r["question"] for r in rows] + [r["answer"] for r in rows[:20]]


# ---------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="session", params=["bpe", "unigram"])
def sp_tok(request, gsm8k_texts, tmp_path_factory):
    prefix = tmp_path_factory.mktemp(f"sp_{request.param}") / "tok"
    return tok_lib.train_sentencepiece(
        gsm8k_texts, str(prefix), vocab_size=300, model_type=request.param
    )


@pytest.fixture(scope="session")
def hf_tok_dir(gsm8k_texts, tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(gsm8k_texts, trainer)
    folder = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _check_offset_invariants(tok, ids):
    """Offsets tile decode(ids): contiguous, non-decreasing, from 0 to len(text)."""
    text = tok.decode(ids)
    offsets = tok.offsets(ids)
    assert len(offsets) == len(ids)
    prev = 0
    for start, end in offsets:
        assert start == prev and end >= start
        prev = end
    assert prev == len(text)
    return text, offsets


def _sp_proto(sp, text):
    """sentencepiece's SentencePieceText (pieces with surface begin/end), across 0.2.x."""
    try:
        return sp.encode(text, out_type="proto")
    except ValueError:  # 0.2.0 names it immutable_proto
        return sp.encode(text, out_type="immutable_proto")


def test_sentencepiece_offsets_match_sentencepiece_surface_offsets(sp_tok, probe_texts):
    """Our prefix-decoding offsets equal sentencepiece's own (begin, end) surface offsets on every
    held-out text that round-trips exactly (sentencepiece owns the leading space of a piece)."""
    checked = 0
    for text in probe_texts:
        ids = sp_tok.encode(text)
        if sp_tok.decode(ids) != text:
            continue  # NFKC / whitespace normalisation changed the text: no exact reference
        proto = _sp_proto(sp_tok.sp, text)
        raw = text.encode("utf-8")  # sentencepiece's offsets count UTF-8 bytes
        expected = [
            (len(raw[: p.begin].decode()), len(raw[: p.end].decode())) for p in proto.pieces
        ]
        assert [p.id for p in proto.pieces] == ids
        _, offsets = _check_offset_invariants(sp_tok, ids)
        assert offsets == expected, text
        checked += 1
    assert checked >= 20  # answers with newlines do not round-trip; most questions do


def test_hf_tokenizer_offsets_match_tokenizers_offsets(hf_tok_dir, probe_texts):
    tok = tok_lib.HFTokenizer(str(hf_tok_dir))
    checked = 0
    for text in probe_texts:
        if not text.isascii():
            continue  # a multi-byte char split over tokens has no per-token character range
        enc = tok.tok.encode(text, add_special_tokens=False)
        assert tok.encode(text) == enc.ids
        decoded, offsets = _check_offset_invariants(tok, enc.ids)
        assert decoded == text
        assert offsets == [tuple(o) for o in enc.offsets], text
        checked += 1
    assert checked >= len(probe_texts) // 2


def test_offsets_of_non_ascii_text_still_tile_the_decoded_text(hf_tok_dir, sp_tok):
    for tok in (tok_lib.HFTokenizer(str(hf_tok_dir)), sp_tok):
        _check_offset_invariants(tok, tok.encode("Janet’s ducks — 16 eggs, é ü 5×3=15."))


@pytest.mark.parametrize("n", [0, 1, 5])
def test_special_tokens_get_empty_ranges(sp_tok, hf_tok_dir, n):
    hf = tok_lib.HFTokenizer(str(hf_tok_dir))
    for tok in (sp_tok, hf):
        ids = tok.encode("12 + 3 = 15. #### 15")[:n] + [tok.eos_id, tok.pad_id]
        text, offsets = _check_offset_invariants(tok, ids)
        assert offsets[-2] == offsets[-1] == (len(text), len(text))
        assert tok.decode(ids) == tok.decode(ids[:-2])


NON_ASCII = "Janet’s ducks — 16 eggs, é ü 5×3=15. Ça coûte 3€; 日本 2 + 2 = 4."


def test_offsets_equal_the_prefix_decoding_reference(sp_tok, hf_tok_dir, probe_texts):
    """The windowed (linear) offsets are exactly the quadratic prefix-decoding ones, also where
    the window starts mid-word, on special tokens and on multi-byte characters split by BPE."""
    hf = tok_lib.HFTokenizer(str(hf_tok_dir))
    for tok in (sp_tok, hf):
        for text in probe_texts[:30] + [NON_ASCII, " ".join(probe_texts[:3])]:
            ids = tok.encode(text)
            want = tok_lib.prefix_offsets(tok, ids)
            assert tok_lib.windowed_offsets(tok, ids) == want, text  # no fallback taken
            assert tok.offsets(ids) == want
        ids = tok.encode(probe_texts[0])
        ids = ids[:9] + [tok.eos_id] + ids[9:20] + [tok.pad_id] * 3  # specials inside
        assert tok_lib.windowed_offsets(tok, ids) == tok_lib.prefix_offsets(tok, ids)


class _CountingTokenizer(tok_lib.HFTokenizer):
    decoded = 0

    def decode(self, ids):
        self.decoded += len(ids)
        return super().decode(ids)


def test_offsets_are_linear_in_the_response_length(hf_tok_dir, probe_texts):
    tok = _CountingTokenizer(str(hf_tok_dir))
    short = tok.encode(" ".join(probe_texts))
    long_ids = (short * (1 + 8000 // len(short)))[:8000]  # an 8k-token response
    tok.decoded = 0
    offsets = tok.offsets(long_ids)
    # Each token decodes at most _LAG + _WINDOW ids, plus the final whole-text check.
    assert tok.decoded <= (tok_lib._LAG + tok_lib._WINDOW + 1) * len(long_ids) + len(long_ids)
    assert offsets[-1][1] == len(tok.decode(long_ids))
    head = long_ids[:400]  # the quadratic reference is affordable on a prefix
    assert tok_lib.windowed_offsets(tok, head) == tok_lib.prefix_offsets(tok, head)


def test_hf_chat_template(hf_tok_dir, tmp_path):
    import shutil

    shutil.copy(hf_tok_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    assert tok_lib.HFTokenizer(str(tmp_path)).chat_template is None
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = tok_lib.HFTokenizer(str(tmp_path))
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode(text)[0] == tok.tok.token_to_id("<|im_start|>")


def test_sentencepiece_interface(sp_tok, tmp_path):
    assert sp_tok.vocab_size >= 200  # hard_vocab_limit=False may give fewer than asked
    assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 2, 3)
    ids = sp_tok.encode("Ann has 123 apples. #### 123")
    # split_digits: every digit is its own piece; "####" is one user-defined piece.
    pieces = [sp_tok.sp.id_to_piece(i) for i in ids]
    assert "####" in pieces and {"1", "2", "3"} <= {p.lstrip("▁") for p in pieces}
    assert sp_tok.decode(ids) == "Ann has 123 apples. #### 123"
    # Ids past the tokenizer's vocab (a padded model vocab) decode to nothing.
    assert sp_tok.decode(ids + [sp_tok.vocab_size, sp_tok.vocab_size + 7]) == sp_tok.decode(ids)
    loaded = tok_lib.load(sp_tok.path)
    assert isinstance(loaded, tok_lib.SentencePieceTokenizer) and loaded.encode(
        "7"
    ) == sp_tok.encode("7")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tok_lib.load(str(tmp_path / "nope.model"))


def test_hf_tokenizer_interface(hf_tok_dir, tmp_path):
    tok = tok_lib.load(str(hf_tok_dir))
    assert isinstance(tok, tok_lib.HFTokenizer)
    assert tok.eos_id == tok.tok.token_to_id("<|im_end|>")
    assert tok.pad_id == tok.tok.token_to_id("<|endoftext|>") and tok.bos_id is None
    assert tok_lib.load(str(hf_tok_dir / "tokenizer.json")).vocab_size == tok.vocab_size
    # Special tokens in text encode to their ids, and decode skips them.
    ids = tok.encode("<|im_start|>user\n2+2?<|im_end|>")
    assert ids[0] == tok.tok.token_to_id("<|im_start|>") and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "user\n2+2?"
    with pytest.raises(ValueError, match="eos token"):
        tok_lib.HFTokenizer(str(hf_tok_dir), eos_token="<|not_there|>")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tok_lib.HFTokenizer(str(tmp_path))


def test_hf_tokenizer_pad_falls_back_to_eos(hf_tok_dir):
    tok = tok_lib.HFTokenizer(str(hf_tok_dir), pad_token="<|no_pad|>")
    assert tok.pad_id == tok.eos_id


# ---------------------------------------------------------------------------- templates
def test_plain_templates():
    student, privileged = templates.get("plain")
    assert student("What is 2+3?") == "Q: What is 2+3?\nA:"
    assert (
        privileged("What is 2+3?", "2+3=5. #### 5", None)
        == "Q: What is 2+3?\nReference: 2+3=5. #### 5\nA:"
    )
    for correct in (True, False):
        text = privileged("q", "ref", correct)
        assert templates.DIAGNOSIS[correct] in text and text.endswith("\nA:")
        assert templates.DIAGNOSIS[not correct] not in text


def test_qwen_chat_templates():
    student, privileged = templates.get("qwen_chat")
    assert student("2+3?") == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"
    with_sys = templates.chat_prompt("2+3?", system="Be brief.")
    assert with_sys.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    text = privileged("2+3?", "2+3=5", False)
    # One user turn holding problem, reference and diagnosis, then the assistant turn opens.
    assert text.count("<|im_start|>user") == 1 and text.endswith("<|im_start|>assistant\n")
    user = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    assert user.startswith("2+3?") and "2+3=5" in user
    assert templates.DIAGNOSIS[False] in user
    assert templates.DIAGNOSIS[True] not in privileged("2+3?", "2+3=5", None)


def test_unknown_template_is_an_error():
    with pytest.raises(ValueError, match="'chatml'"):
        templates.get("chatml")


# ---------------------------------------------------------------------------- jsonl readers
@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_reader_on_shared_data(shared_data, split):
    path = shared_data / "gsm8k" / f"{split}.jsonl"
    examples = tasks.gsm8k_examples(str(path))
    rows = _raw_rows(path)
    assert len(examples) == len(rows) == GSM8K_SIZES[split]
    for e, row in zip(examples, rows):
        assert e.question == row["question"] and e.reference == row["answer"]
        gold = re.search(r"####\s*(.+?)\s*$", row["answer"]).group(1).replace(",", "")
        assert e.answer == gold
        Decimal(e.answer)  # every GSM8K gold answer is a plain number
    assert len(tasks.gsm8k_examples(str(path), limit=5)) == 5


@pytest.mark.parametrize("name", sorted(MATH_SIZES))
def test_math_reader_on_shared_data(shared_data, name):
    path = shared_data / "math_eval" / f"{name}.jsonl"
    examples = tasks.math_examples(str(path))
    assert len(examples) == MATH_SIZES[name]
    for e, row in zip(examples, _raw_rows(path)):
        assert e.question == row["problem"] and e.answer == str(row["answer"])
        assert e.reference == f"The answer is $\\boxed{{{row['answer']}}}$."


def test_math_reader_uses_solution_and_question_fields(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": 2, "solution": "1+1=2"}) + "\n\n")
    (e,) = tasks.math_examples(str(path))
    assert (e.question, e.reference, e.answer) == ("1+1?", "1+1=2", "2")


def test_jsonl_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        tasks.read_jsonl(str(bad))
    not_gsm = tmp_path / "m.jsonl"
    not_gsm.write_text(json.dumps({"question": "a", "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="row 0 is not GSM8K format"):
        tasks.gsm8k_examples(str(not_gsm))
    with pytest.raises(ValueError, match="row 0 has no problem"):
        tasks.math_examples(_write(tmp_path / "x.jsonl", {"answer": "1"}))


def _write(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_tasks_load_reads_shared_gsm8k(shared_data):
    from jaxtrace.config import base

    c = base()
    c.data.update(
        task="gsm8k",
        train_path=str(shared_data / "gsm8k" / "train.jsonl"),
        test_path=str(shared_data / "gsm8k" / "test.jsonl"),
        num_train=10,
        num_test=3,
    )
    train, test = tasks.load(c.data)
    assert len(train) == 10 and len(test) == 3
    assert train[0] == tasks.gsm8k_examples(c.data.train_path, 1)[0]
    c.data.train_path = str(shared_data / "gsm8k" / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="data.train_path"):
        tasks.load(c.data)


# ---------------------------------------------------------------------------- tfds builders
@pytest.fixture(scope="module")
def tfds_jsonl():
    pytest.importorskip("tensorflow_datasets")
    from jaxtrace.data import tfds_jsonl

    return tfds_jsonl


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_tfds_gsm8k_builder_matches_jsonl_reader(tfds_jsonl, tfds_dir, shared_data):
    path = str(shared_data / "gsm8k" / "test.jsonl")
    sources = tfds_jsonl.data_sources({"test": path}, "gsm8k", data_dir=tfds_dir)
    source = sources["test"]
    rows = _raw_rows(path)
    assert len(source) == len(rows)
    for i in (0, 1, 700, len(rows) - 1):  # random access, in file order
        assert source[i] == {k: rows[i][k].encode() for k in ("question", "answer")}
    got = tfds_jsonl.examples({"test": path}, "gsm8k", data_dir=tfds_dir)["test"]
    assert got == tasks.gsm8k_examples(path)


def test_tfds_math_builder_matches_jsonl_reader(tfds_jsonl, tfds_dir, shared_data):
    split_paths = {
        "aime24": str(shared_data / "math_eval" / "aime24.jsonl"),
        "amc2023": str(shared_data / "math_eval" / "amc2023.jsonl"),
    }
    got = tfds_jsonl.examples(split_paths, "math", data_dir=tfds_dir, name="math_eval")
    assert set(got) == set(split_paths)
    for split, path in split_paths.items():
        assert got[split] == tasks.math_examples(path)


def test_tfds_cache_follows_file_content(tfds_jsonl, tmp_path):
    path = tmp_path / "tiny.jsonl"
    _write(path, {"problem": "1+1?", "answer": "2"})
    first = tfds_jsonl.examples({"train": str(path)}, "math", data_dir=str(tmp_path / "d"))
    _write(
        path,
        {"problem": "1+1?", "answer": "2"},
        {"problem": "2+2?", "answer": "4", "solution": "2+2=4"},
    )
    second = tfds_jsonl.examples({"train": str(path)}, "math", data_dir=str(tmp_path / "d"))
    assert len(first["train"]) == 1 and len(second["train"]) == 2
    assert second["train"][1] == tasks.Example("2+2?", "2+2=4", "4")


def test_tfds_builder_reads_remote_jsonl(tfds_jsonl, tmp_path):
    """Inputs go through jaxtrace.paths: an fsspec memory:// file stands in for gs://."""
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://tfds_{tmp_path.name}/train.jsonl"
    with fsspec.open(url, "w") as f:
        f.write(
            json.dumps({"question": "Ann has 2. She gets 3. How many?", "answer": "2+3=5. #### 5"})
            + "\n"
        )
    got = tfds_jsonl.examples({"train": url}, "gsm8k", data_dir=str(tmp_path))
    assert got["train"] == [tasks.Example("Ann has 2. She gets 3. How many?", "2+3=5. #### 5", "5")]


def test_tfds_builder_errors(tfds_jsonl, tmp_path):
    good = _write(tmp_path / "g.jsonl", {"question": "q", "answer": "#### 1"})
    with pytest.raises(ValueError, match="fmt='csv'"):
        tfds_jsonl.builder({"train": good}, "csv", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="split_paths is empty"):
        tfds_jsonl.builder({}, "gsm8k", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="split name 'tr ain'"):
        tfds_jsonl.builder({"tr ain": good}, "gsm8k", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tfds_jsonl.builder(
            {"train": str(tmp_path / "missing.jsonl")}, "gsm8k", data_dir=str(tmp_path)
        )
    with pytest.raises(ValueError, match="data_dir='gs://b/tfds' must be local"):
        tfds_jsonl.builder({"train": good}, "gsm8k", data_dir="gs://b/tfds")
    bad = _write(
        tmp_path / "b.jsonl",
        {"question": "q", "answer": "#### 1"},
        {"question": "q2", "answer": "no marker"},
    )
    with pytest.raises(ValueError, match="row 1: not GSM8K format"):
        tfds_jsonl.data_sources({"train": bad}, "gsm8k", data_dir=str(tmp_path / "d"))


def test_gsm8k_catalogue_missing_without_fallback_is_a_clear_error(tfds_jsonl, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'gsm8k' is not available .*local_path="):
        tfds_jsonl.gsm8k_source("test", data_dir=str(tmp_path))


def test_gsm8k_catalogue_falls_back_to_local_jsonl(tfds_jsonl, tmp_path, shared_data):
    path = str(shared_data / "gsm8k" / "test.jsonl")
    source = tfds_jsonl.gsm8k_source("test", data_dir=str(tmp_path), local_path=path)
    got = [tfds_jsonl.record_to_example(source[i], "gsm8k") for i in range(len(source))]
    assert got == tasks.gsm8k_examples(path)


def test_gsm8k_catalogue_used_when_prepared(tfds_jsonl, tmp_path, monkeypatch):
    """A prepared catalogue builder wins over the local file (a local builder stands in for it,
    since the catalogue cannot be downloaded here)."""
    import tensorflow_datasets as tfds

    catalogue = _write(tmp_path / "cat.jsonl", {"question": "from catalogue", "answer": "#### 1"})
    local = _write(tmp_path / "loc.jsonl", {"question": "from local", "answer": "#### 2"})
    prepared = tfds_jsonl.builder({"train": catalogue}, "gsm8k", data_dir=str(tmp_path / "c"))
    prepared.download_and_prepare()
    calls = []

    def fake_builder(name, **kwargs):
        calls.append((name, kwargs))
        return prepared

    monkeypatch.setattr(tfds, "builder", fake_builder)
    source = tfds_jsonl.gsm8k_source("train", data_dir=str(tmp_path / "c"), local_path=local)
    assert calls and calls[0][0] == "gsm8k"
    assert tfds_jsonl.record_to_example(source[0], "gsm8k").question == "from catalogue"

    unprepared = tfds_jsonl.builder({"train": catalogue}, "gsm8k", data_dir=str(tmp_path / "u"))
    monkeypatch.setattr(tfds, "builder", lambda name, **kw: unprepared)
    source = tfds_jsonl.gsm8k_source("train", data_dir=str(tmp_path / "u2"), local_path=local)
    assert tfds_jsonl.record_to_example(source[0], "gsm8k").question == "from local"


# ---------------------------------------------------------------------------- grain pipeline
def _indices(it, n_batches):
    return [next(it).indices.tolist() for _ in range(n_batches)]


@pytest.mark.parametrize("n,batch", [(1, 1), (7, 3), (13, 4)])
def test_pipeline_epochs_are_fresh_permutations(n, batch):
    source = [f"ex{i}" for i in range(n)]
    it = pipeline.prompt_iterator(
        source, batch, seed=3, num_epochs=3, drop_remainder=False, shard_index=0, shard_count=1
    )
    batches = list(it)
    flat = [i for b in batches for i in b.indices.tolist()]
    assert [len(b.indices) for b in batches[:-1]] == [batch] * (len(batches) - 1)
    assert len(flat) == 3 * n
    epochs = [flat[k * n : (k + 1) * n] for k in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(n))
    if n > 3:
        assert epochs[0] != epochs[1] != epochs[2]
    for b in batches:  # examples are looked up from the source
        assert b.examples == [source[i] for i in b.indices]


def test_pipeline_seed_and_shuffle():
    src = list(range(20))
    a = _indices(pipeline.prompt_iterator(src, 5, seed=1, shard_index=0, shard_count=1), 4)
    b = _indices(pipeline.prompt_iterator(src, 5, seed=1, shard_index=0, shard_count=1), 4)
    c = _indices(pipeline.prompt_iterator(src, 5, seed=2, shard_index=0, shard_count=1), 4)
    assert a == b and a != c
    plain = pipeline.prompt_iterator(src, 5, shuffle=False, shard_index=0, shard_count=1)
    assert _indices(plain, 5) == [list(range(k, k + 5)) for k in (0, 5, 10, 15, 0)]


@pytest.mark.parametrize("hosts", [2, 3])
def test_pipeline_host_shards_partition_the_global_batch(hosts):
    """Host h's batch k is positions h, h+H, ... of the single-host global batch k."""
    n, per_host, steps = 11, 2, 9  # crosses several epoch boundaries
    single = _indices(
        pipeline.prompt_iterator(
            list(range(n)), hosts * per_host, seed=5, shard_index=0, shard_count=1
        ),
        steps,
    )
    shards = [
        _indices(
            pipeline.prompt_iterator(
                list(range(n)), per_host, seed=5, shard_index=h, shard_count=hosts
            ),
            steps,
        )
        for h in range(hosts)
    ]
    for k in range(steps):
        for h in range(hosts):
            assert shards[h][k] == single[k][h::hosts]
    # Within one epoch no example reaches two hosts.
    first_epoch = pipeline.index_dataset(n, seed=5, num_epochs=1, shard_index=0, shard_count=1)
    parts = [
        set(pipeline.index_dataset(n, seed=5, num_epochs=1, shard_index=h, shard_count=hosts))
        for h in range(hosts)
    ]
    assert set.union(*parts) == set(first_epoch) == set(range(n))
    assert sum(len(p) for p in parts) == n


@pytest.mark.parametrize("consumed", [0, 1, 7])
@pytest.mark.parametrize("hosts", [1, 2])
def test_pipeline_state_restores_the_remaining_order(consumed, hosts):
    src = [f"ex{i}" for i in range(13)]

    def make():
        return pipeline.prompt_iterator(src, 3, seed=11, shard_index=hosts - 1, shard_count=hosts)

    it = make()
    _indices(it, consumed)
    state = json.loads(json.dumps(it.get_state()))  # survives the checkpoint's JSON
    expected = [next(it) for _ in range(6)]
    restored = make()
    restored.set_state(state)
    got = [next(restored) for _ in range(6)]
    assert [g.indices.tolist() for g in got] == [e.indices.tolist() for e in expected]
    assert [g.examples for g in got] == [e.examples for e in expected]
    # An iterator that never saw the prefix reaches the same state by skipping it.
    skipped = make()
    _indices(skipped, consumed)
    assert skipped.get_state() == state


def test_pipeline_state_of_another_pipeline_is_rejected():
    a = pipeline.prompt_iterator(list(range(10)), 2, seed=0, shard_index=0, shard_count=1)
    b = pipeline.prompt_iterator(list(range(11)), 2, seed=0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="different pipeline"):
        b.set_state(a.get_state())
    with pytest.raises(ValueError, match="not a prompt-pipeline state"):
        b.set_state({"next_index": 3})


def test_pipeline_bad_arguments():
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        pipeline.prompt_batches([1, 2], 0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="num_examples must be an int >= 1, got 0"):
        pipeline.prompt_iterator([], 1, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match=r"shard_index must be an int in \[0, 2\), got 2"):
        pipeline.prompt_iterator([1, 2], 1, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="shard_count must be an int >= 1, got 0"):
        pipeline.host_shard(0, 0)
    with pytest.raises(ValueError, match="num_epochs must be None or an int >= 1, got 0"):
        pipeline.index_dataset(3, num_epochs=0, shard_index=0, shard_count=1)


def test_pipeline_defaults_to_jax_process_shard():
    import jax

    assert pipeline.host_shard() == (jax.process_index(), jax.process_count())
    it = pipeline.prompt_iterator(list(range(5)), 5, seed=0)
    assert sorted(next(it).indices.tolist()) == list(range(5))


def test_pipeline_over_tfds_source(tfds_jsonl, tfds_dir, shared_data):
    path = str(shared_data / "math_eval" / "aime25.jsonl")
    source = tfds_jsonl.data_sources({"test": path}, "math", data_dir=tfds_dir)["test"]
    reference = tasks.math_examples(path)
    it = pipeline.prompt_iterator(
        source,
        4,
        seed=0,
        shard_index=0,
        shard_count=1,
        to_example=lambda r: tfds_jsonl.record_to_example(r, "math"),
    )
    for _ in range(10):  # past the first epoch (30 examples)
        b = next(it)
        assert isinstance(b.indices, np.ndarray) and b.indices.dtype == np.int64
        assert b.examples == [reference[i] for i in b.indices]
