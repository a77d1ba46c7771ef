"""A grain pipeline of prompt batches: shuffle, repeat, shard per host, checkpointable.

The pipeline runs over *indices* into a random-access source (a list of `tasks.Example`, or a
tfds data source from `jaxtrace.data.tfds_jsonl` with `to_example`), so its state is one
integer and the examples are looked up last:

    range(n) -> shuffle(seed), reshuffled every epoch -> repeat -> [host::num_hosts]
             -> batch(batch_size) -> PromptBatch(indices [B], examples [B])

Sharding takes every `num_hosts`-th element of the one global shuffled stream, so host h's
batch k holds positions h, h + H, ... of the global batch k of size H * batch_size: the hosts
together see exactly what a single host with the global batch would, and no example twice
within an epoch.

    it = prompt_iterator(train, batch_size=8, seed=0)
    batch = next(it)                  # PromptBatch
    state = it.get_state()            # JSON-able; store it with the checkpoint
    it.set_state(state)               # resumes with the same remaining order
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """One host's batch: `indices` int64 [B] into the source, and the B examples."""

    indices: np.ndarray
    examples: list


def host_shard(shard_index: int | None = None, shard_count: int | None = None):
    """(shard_index, shard_count), defaulting to (jax.process_index(), jax.process_count())."""
    if shard_index is None or shard_count is None:
        import jax  # noqa: PLC0415

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not (isinstance(shard_count, int) and shard_count >= 1):
        raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}")
    if not (isinstance(shard_index, int) and 0 <= shard_index < shard_count):
        raise ValueError(f"shard_index must be an int in [0, {shard_count}), got {shard_index!r}")
    return shard_index, shard_count


def index_dataset(
    num_examples: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
):
    """A `grain.MapDataset` of int source indices: shuffled (a fresh order each epoch, from
    `seed`), repeated `num_epochs` times (None: for ever), and this host's shard of it."""
    import grain  # noqa: PLC0415

    if not (isinstance(num_examples, int) and num_examples >= 1):
        raise ValueError(f"num_examples must be an int >= 1, got {num_examples!r}")
    if num_epochs is not None and not (isinstance(num_epochs, int) and num_epochs >= 1):
        raise ValueError(f"num_epochs must be None or an int >= 1, got {num_epochs!r}")
    shard_index, shard_count = host_shard(shard_index, shard_count)
    ds = grain.MapDataset.range(num_examples)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    # repeat() reseeds the shuffle every epoch, so each epoch has its own order.
    ds = ds.repeat(num_epochs)
    return ds[shard_index::shard_count] if shard_count > 1 else ds


class PromptIterator:
    """Iterator of `PromptBatch` with `get_state` / `set_state` (grain's, plus a fingerprint
    of the pipeline, so a state is never applied to a different source, seed or sharding)."""

    def __init__(self, dataset, fingerprint: dict):
        self._it = iter(dataset)
        self.fingerprint = fingerprint

    def __iter__(self):
        return self

    def __next__(self) -> PromptBatch:
        return next(self._it)

    def get_state(self) -> dict:
        """A JSON-serialisable dict: where the iterator is, and what pipeline it belongs to."""
        return {
            "version": STATE_VERSION,
            "pipeline": dict(self.fingerprint),
            "grain": self._it.get_state(),
        }

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a prompt-pipeline state (version {STATE_VERSION}): {state!r}")
        if state["pipeline"] != self.fingerprint:
            raise ValueError(
                f"state is of a different pipeline: {state['pipeline']} != {self.fingerprint}"
            )
        self._it.set_state(state["grain"])


def prompt_batches(
    source: Sequence,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    to_example: Callable[[Any], Any] | None = None,
):
    """A `grain.IterDataset` of `PromptBatch` of `batch_size` (per host) over `source`.

    `source`: any random-access sequence (`len`, `[i]`): a list of `tasks.Example`, or a tfds
    data source with `to_example=lambda r: tfds_jsonl.record_to_example(r, fmt)`.
    With `num_epochs` set, `drop_remainder=False` keeps the last short batch.
    """
    import grain  # noqa: PLC0415

    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    n = len(source)
    ds = index_dataset(
        n,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
    )
    convert = to_example or (lambda x: x)

    def lookup(indices):
        indices = np.asarray(indices, np.int64)
        return PromptBatch(indices, [convert(source[int(i)]) for i in indices])

    ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(lookup)
    # No prefetch threads: the work per batch is a lookup, and the state stays one index.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def prompt_iterator(
    source: Sequence,
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    to_example: Callable[[Any], Any] | None = None,
) -> PromptIterator:
    """`iter(prompt_batches(...))` as a checkpointable `PromptIterator`."""
    shard_index, shard_count = host_shard(shard_index, shard_count)
    ds = prompt_batches(
        source,
        batch_size,
        seed=seed,
        shuffle=shuffle,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        drop_remainder=drop_remainder,
        to_example=to_example,
    )
    fingerprint = {
        "num_examples": len(source),
        "batch_size": batch_size,
        "seed": seed,
        "shuffle": shuffle,
        "num_epochs": num_epochs,
        "shard_index": shard_index,
        "shard_count": shard_count,
        "drop_remainder": drop_remainder,
    }
    return PromptIterator(ds, fingerprint)
