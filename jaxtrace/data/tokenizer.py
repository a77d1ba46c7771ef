"""Tokenizers behind one small interface, with character offsets for span annotation.

`SentencePieceTokenizer` wraps a `.model` file (and can train one from text: the embedded
default does so at first run); `HFTokenizer` wraps a Hugging Face `tokenizer.json`.
`offsets(ids)` maps generated ids to (start, end) character ranges of `decode(ids)`, the ranges
that decoding every prefix gives (`prefix_offsets`, quadratic), in time linear in the length:
each token decodes only a short window, so annotated character spans land on the right tokens.
`apply_chat_template(messages)` renders a chat with the model's own template (HF tokenizers with
a `chat_template` in tokenizer_config.json), for prompting the policy itself.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Sequence

from jaxtrace.errors import InputError, reading

# Linear offsets: each token's end is read off a decode of at most _LAG + _WINDOW ids that
# starts _LAG ids before an anchor whose end is known; the anchor moves every _WINDOW tokens.
_LAG, _WINDOW = 4, 8


def prefix_offsets(tok, ids: Sequence[int]) -> list[tuple[int, int]]:
    """The reference: (start, end) of each token from decoding every prefix, O(len(ids)^2)."""
    out, prev = [], 0
    for k in range(len(ids)):
        end = max(len(tok.decode(ids[: k + 1])), prev)
        out.append((prev, end))
        prev = end
    return out


def windowed_offsets(tok, ids: Sequence[int]) -> list[tuple[int, int]]:
    """`Tokenizer.offsets` without its final check: each end from a short window's decode."""
    out, prev = [], 0
    anchor, anchor_end, start, base = 0, 0, 0, 0
    for k in range(len(ids)):
        raw = anchor_end + len(tok.decode(ids[start : k + 1])) - base
        end = max(raw, prev)
        out.append((prev, end))
        prev = end
        if k + 1 - anchor >= _WINDOW:
            anchor, anchor_end = k + 1, raw
            start = max(anchor - _LAG, 0)
            base = len(tok.decode(ids[start:anchor]))
    return out


class Tokenizer(abc.ABC):
    """Interface: ids <-> text, special ids, and offsets into decoded text."""

    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    chat_template: str | None = None  # a Jinja chat template, when the model has one

    def offsets(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """(start, end) of each token in `decode(ids)`; special tokens get empty ranges.

        Equal to `prefix_offsets` in O(len(ids)) decodes of short windows: the end of token k
        is len(decode(ids[:r])) + len(decode(ids[s:k+1])) - len(decode(ids[s:r])) for an anchor
        r <= k and s = r - _LAG, which holds whenever decoding is a concatenation away from the
        window's start (what a start-of-text artefact, such as sentencepiece dropping the first
        piece's space, or a split multi-byte character, does cancels in the difference). The
        ends are checked against len(decode(ids)) and fall back to the reference if they miss.
        """
        ids = list(ids)
        out = windowed_offsets(self, ids)
        if out and out[-1][1] != len(self.decode(ids)):
            return prefix_offsets(self, ids)
        return out

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """`messages` rendered with the model's chat template, ending with the assistant's turn
        opened (add_generation_prompt). Raises ValueError when the tokenizer has none."""
        if not self.chat_template:
            raise ValueError(f"{type(self).__name__} has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=True, **self.special_tokens_map
        )

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {}


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: str):
        import sentencepiece as spm  # noqa: PLC0415

        if not os.path.exists(model_path):
            raise FileNotFoundError(f"sentencepiece model {model_path!r} does not exist")
        self.path = model_path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as e:  # sentencepiece's "Internal: ... ParseFromArray"
            raise InputError(f"sentencepiece model {model_path!r} cannot be loaded: {e}") from None
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        # Ids past the tokenizer's vocab (a model vocab padded for sharding) decode to nothing.
        specials = {self.pad_id, self.eos_id, self.bos_id}
        return self.sp.decode(
            [int(i) for i in ids if int(i) not in specials and 0 <= int(i) < self.vocab_size]
        )


def train_sentencepiece(
    texts: Iterable[str], model_prefix: str, vocab_size: int = 256, model_type: str = "unigram"
) -> SentencePieceTokenizer:
    """Trains a small sentencepiece model (digits split, so numbers are spelled digit by digit)."""
    import sentencepiece as spm  # noqa: PLC0415

    from jaxtrace.errors import InputError  # noqa: PLC0415

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError("no text to train the tokenizer on (is the training set empty?)")
    os.makedirs(os.path.dirname(model_prefix) or ".", exist_ok=True)
    try:
        _train(spm, texts, model_prefix, vocab_size, model_type)
    except RuntimeError as e:  # sentencepiece's C++ errors, e.g. a vocab below the character set
        msg = " ".join(str(e).split())[:300]
        raise InputError(
            f"could not train a sentencepiece tokenizer of vocab_size={vocab_size} "
            f"(data.vocab_size): {msg}"
        ) from None
    return SentencePieceTokenizer(model_prefix + ".model")


def _train(spm, texts, model_prefix, vocab_size, model_type):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        split_digits=True,
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        user_defined_symbols=["####"],
    )


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (fast tokenizer) via the `tokenizers` package."""

    def __init__(self, path: str, eos_token: str = "<|im_end|>", pad_token: str = "<|endoftext|>"):
        from tokenizers import Tokenizer as _Tok  # noqa: PLC0415

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no tokenizer.json at {path!r}")
        try:
            self.tok = _Tok.from_file(file)
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception)
            raise InputError(f"tokenizer {file!r} cannot be loaded: {e}") from None
        self.vocab_size = self.tok.get_vocab_size()
        self.eos_id = self.tok.token_to_id(eos_token)
        self.pad_id = self.tok.token_to_id(pad_token)
        if self.eos_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in {file!r}")
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self.bos_id = None
        self.eos_token = eos_token
        config = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        if os.path.exists(config):
            with reading(config, "tokenizer config"), open(config) as f:
                template = json.load(f)
            template = template.get("chat_template") if isinstance(template, dict) else None
            # Some models ship a list of named templates; the default one is the chat template.
            if isinstance(template, list):
                named = {t.get("name"): t.get("template") for t in template}
                template = named.get("default")
            self.chat_template = template if isinstance(template, str) else None

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {"eos_token": self.eos_token}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load(path: str) -> Tokenizer:
    """A tokenizer from a `.model` (sentencepiece) file or an HF folder / tokenizer.json."""
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)
