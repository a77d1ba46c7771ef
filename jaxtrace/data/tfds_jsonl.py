"""TFDS builders for local (or gs://) jsonl math data, and the `gsm8k` catalogue entry.

Two formats, the same two `jaxtrace.data.tasks` reads:
  - "gsm8k": rows {"question", "answer"} with the answer ending in `#### <number>`;
  - "math":  the math_eval format, rows {"problem" (or "question"), "answer", optional
    "solution"}.

The builders write ArrayRecord files, so `tfds.data_source` style random access (and hence a
grain pipeline, `jaxtrace.data.pipeline`) works without TensorFlow: `tensorflow-datasets` alone
(no `tensorflow`) is enough. Records keep the jsonl row order (shuffling happens in the
pipeline, with its own seed), so record i of a split is row i of its file.

    sources = data_sources({"train": "../shared/data/gsm8k/train.jsonl"}, "gsm8k",
                           data_dir="/tmp/tfds")
    example = record_to_example(sources["train"][0], "gsm8k")      # a tasks.Example

The prepared files are a cache keyed by the content of the jsonl files (a hash in the config
name), so an edited file is re-prepared rather than silently served stale. `data_dir` must be
local: the jsonl inputs may be gs:// (read through `jaxtrace.paths`, credentials from the
environment), the ArrayRecord reader is not. tfds is imported lazily: the package never
requires it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Mapping

from jaxtrace import paths
from jaxtrace.data import tasks

log = logging.getLogger("jaxtrace")

FORMATS = ("gsm8k", "math")
# Text fields of a record, per format (every field is a tfds Text feature).
FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "answer", "solution")}
BUILDER_VERSION = "1.0.0"


def _tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            "jaxtrace.data.tfds_jsonl needs `tensorflow-datasets` "
            "(pip install tensorflow-datasets; TensorFlow itself is not needed)"
        ) from e
    return tfds


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}; choose from {FORMATS}")


def row_to_record(row: dict, fmt: str, where: str = "") -> dict[str, str]:
    """A jsonl row -> the record stored by the builder (validated; every value a str)."""
    _check_format(fmt)
    if fmt == "gsm8k":
        if not isinstance(row.get("question"), str) or "####" not in str(row.get("answer", "")):
            raise ValueError(
                f"{where}: not GSM8K format (question, answer with ####): keys {sorted(row)}"
            )
        return {"question": row["question"], "answer": str(row["answer"])}
    problem = row.get("problem", row.get("question"))
    if problem is None or "answer" not in row:
        raise ValueError(f"{where}: has no problem/question and answer fields: keys {sorted(row)}")
    return {
        "problem": str(problem),
        "answer": str(row["answer"]),
        "solution": str(row.get("solution") or ""),
    }


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def record_to_example(record: Mapping, fmt: str) -> tasks.Example:
    """A tfds record (bytes or str values) -> `tasks.Example`, exactly as `tasks` would build it
    from the jsonl row (so the trainer cannot tell the two paths apart)."""
    _check_format(fmt)
    r = {k: _text(v) for k, v in record.items()}
    if fmt == "gsm8k":
        answer = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        return tasks.Example(r["question"], r["answer"], answer)
    problem = r.get("problem", r.get("question"))
    reference = r.get("solution") or f"The answer is $\\boxed{{{r['answer']}}}$."
    return tasks.Example(problem, reference, r["answer"])


def _fingerprint(split_paths: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for split in sorted(split_paths):
        h.update(split.encode() + b"\0")
        with paths.open_path(split_paths[split], "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:12]


def _config_name(name: str | None, split_paths: Mapping[str, str]) -> str:
    stem = name or os.path.splitext(os.path.basename(next(iter(split_paths.values()))))[0]
    stem = re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_") or "data"
    return f"{stem}_{_fingerprint(split_paths)}"


@functools.cache
def _builder_class(fmt: str):
    """The builder class of a format (defined on first use, so tfds is imported lazily)."""
    tfds = _tfds()

    class JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(BUILDER_VERSION)
        RELEASE_NOTES = {BUILDER_VERSION: "jsonl rows in file order."}
        # No checksums file next to the code (nothing is downloaded); also keeps tfds from
        # resolving this module as a package resource (needs `importlib_resources`).
        code_path = None

        def __init__(self, *, split_paths: Mapping[str, str], **kwargs):
            self._split_paths = dict(split_paths)
            super().__init__(**kwargs)

        def _info(self):
            features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in FIELDS[fmt]})
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"jsonl ({fmt} format): {self._split_paths}",
                # Record i of a split is row i of its file; the grain pipeline shuffles.
                features=features,
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # local or gs:// files, read through jaxtrace.paths
            return {
                split: self._generate_examples(path) for split, path in self._split_paths.items()
            }

        def _generate_examples(self, path):
            for i, row in enumerate(tasks.read_jsonl(path)):
                yield i, row_to_record(row, fmt, f"{path}: row {i}")

    JsonlBuilder.name = f"jaxtrace_{fmt}_jsonl"
    JsonlBuilder.__name__ = JsonlBuilder.__qualname__ = f"Jsonl{fmt.capitalize()}Builder"
    return JsonlBuilder


def builder(split_paths: Mapping[str, str], fmt: str, *, data_dir: str, name: str | None = None):
    """A tfds builder over jsonl files: `split_paths` maps split names ("train", "test", ...)
    to jsonl paths (local or gs://). Not prepared yet: call `download_and_prepare()`."""
    _check_format(fmt)
    if not split_paths:
        raise ValueError("split_paths is empty: give at least one {split: jsonl path}")
    for split, path in split_paths.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", split):
            raise ValueError(f"split name {split!r} must be letters, digits and underscores")
        if not paths.exists(path):
            raise FileNotFoundError(f"split_paths[{split!r}]={path!r} does not exist")
    if paths.is_remote(data_dir):
        raise ValueError(
            f"data_dir={data_dir!r} must be local (a cache of ArrayRecord files); "
            "the jsonl inputs may be remote"
        )
    tfds = _tfds()
    config = tfds.core.BuilderConfig(name=_config_name(name, split_paths), version=BUILDER_VERSION)
    return _builder_class(fmt)(
        split_paths=split_paths, config=config, data_dir=data_dir, file_format="array_record"
    )


def data_sources(
    split_paths: Mapping[str, str], fmt: str, *, data_dir: str, name: str | None = None
) -> dict:
    """Prepares (once; a no-op when the cache is current) and returns {split: data source}:
    random-access sequences of records (dicts of bytes) that grain reads directly."""
    b = builder(split_paths, fmt, data_dir=data_dir, name=name)
    b.download_and_prepare()
    return {split: b.as_data_source(split=split) for split in split_paths}


def examples(
    split_paths: Mapping[str, str], fmt: str, *, data_dir: str, name: str | None = None
) -> dict[str, list[tasks.Example]]:
    """{split: [tasks.Example]} through the tfds cache (what `tasks.load` gives from jsonl)."""
    return {
        split: [record_to_example(source[i], fmt) for i in range(len(source))]
        for split, source in data_sources(split_paths, fmt, data_dir=data_dir, name=name).items()
    }


def gsm8k_source(
    split: str = "train",
    *,
    data_dir: str | None = None,
    local_path: str | None = None,
    catalogue_name: str = "gsm8k",
    download: bool = False,
):
    """GSM8K from the tfds catalogue when it is there, else from a local jsonl.

    Tries `tfds.builder(catalogue_name)` (e.g. "gsm8k", or "huggingface:gsm8k/main"); uses it
    when it is already prepared in `data_dir` (or, with `download=True`, after preparing it as
    ArrayRecord). Otherwise falls back to `local_path` through the jsonl builder (cached in
    `data_dir`, default ~/tensorflow_datasets). Returns a data source whose records
    `record_to_example(record, "gsm8k")` reads. Raises FileNotFoundError naming both when
    neither is available.
    """
    tfds = _tfds()
    try:
        b = tfds.builder(catalogue_name, data_dir=data_dir, file_format="array_record")
        if not b.is_prepared():
            if not download:
                raise FileNotFoundError(
                    f"{catalogue_name!r} is in the catalogue but not "
                    f"prepared in data_dir={data_dir!r} (download=False)"
                )
            b.download_and_prepare()
        return b.as_data_source(split=split)
    except Exception as e:  # noqa: BLE001 - tfds raises many types; each one means "fall back"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not local_path:
        raise FileNotFoundError(
            f"tfds catalogue dataset {catalogue_name!r} is not available "
            f"({reason}) and no local GSM8K jsonl was given (local_path=)"
        )
    log.warning("tfds %r unavailable (%s); reading %s", catalogue_name, reason, local_path)
    cache = data_dir or os.path.expanduser("~/tensorflow_datasets")
    return data_sources({split: local_path}, "gsm8k", data_dir=cache, name="gsm8k")[split]
