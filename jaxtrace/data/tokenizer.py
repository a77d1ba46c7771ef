"""Tokenizers behind one small interface, with character offsets for span annotation.

`SentencePieceTokenizer` wraps a `.model` file (and can train one from text: the embedded
default does so at first run); `HFTokenizer` wraps a Hugging Face `tokenizer.json`.
`offsets(ids)` maps generated ids to (start, end) character ranges of `decode(ids)`, exactly,
by decoding prefixes, so annotated character spans land on the right tokens.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence


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

    def offsets(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """(start, end) of each token in `decode(ids)`; special tokens get empty ranges."""
        out, prev = [], 0
        for k in range(len(ids)):
            end = len(self.decode(ids[: k + 1]))
            end = max(end, prev)
            out.append((prev, end))
            prev = end
        return out


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_path: str):
        import sentencepiece as spm  # noqa: PLC0415

        if not os.path.exists(model_path):
            raise FileNotFoundError(f"sentencepiece model {model_path!r} does not exist")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
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
        self.tok = _Tok.from_file(file)
        self.vocab_size = self.tok.get_vocab_size()
        self.eos_id = self.tok.token_to_id(eos_token)
        self.pad_id = self.tok.token_to_id(pad_token)
        if self.eos_id is None:
            raise ValueError(f"eos token {eos_token!r} is not in {file!r}")
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self.bos_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load(path: str) -> Tokenizer:
    """A tokenizer from a `.model` (sentencepiece) file or an HF folder / tokenizer.json."""
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)
