"""Micro-batches: one update's batch run as M smaller batches in sequence, one optimizer update.

The steps (`jaxtrace.steps`) split a batch with `split` and `jax.lax.scan` over the pieces inside
the jitted step (`accumulate`), so the program does not grow with M, summing the loss, the fp32
gradients and the metrics. The sums are the full-batch values exactly (up to float32 rounding)
because every whole-batch denominator is computed from the whole batch's masks before the scan
and handed to each micro-batch's loss (`jaxtrace.losses._reduce.Totals`,
`jaxtrace.losses.trace.trace_totals`, `jaxtrace.models.moe.router_stats`).

Layout. A batch has G prompt rows and R = G * k rows per response (k = 1 when prompts are not
shared); every leaf's leading axis is G or a multiple of it (one row per response, or per prompt).
Micro-batch i takes the whole groups i, i + M, i + 2M, ... (interleaved, not contiguous): a batch
split over D data-parallel devices (contiguous rows per device) then gives every micro-batch
G / (M * D) groups of each device's shard when D divides G / M, so the split is a local reshape
and each micro-batch still runs on every device. Under a mesh (`jax.set_mesh`, as the trainer
and the AOT tool run) each micro-batch's rows are also constrained to the data-parallel axes, so
a micro-batch too small for that locality is resharded (its token ids, cheaply) rather than left
on a few devices.
`merge` puts per-row outputs back in the batch's order.

Sizes. `micro_batch_rows` counts response rows per micro-batch: 0 = the whole batch; otherwise
it must divide the batch's rows and be a multiple of k (whole groups). `rows_for_budget` derives
it from an activation-memory budget (`train.micro_batch_rows=-1`, `train.activation_budget_gib`).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxtrace import sharding
from pallas_kernels._mesh import context_mesh

log = logging.getLogger("jaxtrace")


def count(batch, micro_batch_rows: int, key: str = "micro_batch_rows") -> int:
    """The number of micro-batches M of `batch` (static shapes) for `micro_batch_rows`; 1 when it
    is 0 or at least the batch's rows. ValueError naming `key` when it does not split the batch
    into whole groups."""
    rows, groups = batch["response"].shape[0], batch["prompt"].shape[0]
    if micro_batch_rows <= 0 or micro_batch_rows >= rows:
        return 1
    k = rows // groups
    if rows % micro_batch_rows:
        raise ValueError(f"{key}={micro_batch_rows} does not divide the batch's {rows} rows")
    if micro_batch_rows % k:
        raise ValueError(
            f"{key}={micro_batch_rows} is not a multiple of the group size {k}: a micro-batch "
            "takes whole groups (a prompt row with its responses)"
        )
    return rows // micro_batch_rows


def _check_rows(batch, groups: int, m: int):
    for name, x in batch.items():
        if x.shape[0] % groups:
            raise ValueError(f"batch[{name!r}] has {x.shape[0]} rows, not a multiple of {groups}")
    if groups % m:
        raise ValueError(f"{m} micro-batches do not split {groups} groups evenly")


def _data_axes(rows: int):
    """The context mesh's data-parallel axes (`sharding.DEFAULT_RULES`' "batch") when they
    divide `rows`, else None (no mesh, one device, or rows that do not split evenly)."""
    mesh = context_mesh()
    if mesh is None:
        return None
    target = dict(sharding.DEFAULT_RULES)["batch"]
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    return axes if axes and rows % size == 0 else None


def split(batch, m: int):
    """{key: [n, ...]} -> {key: [M, n / M, ...]}: micro-batch i holds groups i, i + M, ...
    (G = batch["prompt"] rows; each leaf has a multiple of G rows, grouped contiguously)."""
    groups = batch["prompt"].shape[0]
    _check_rows(batch, groups, m)

    def one(x):
        per_group = x.shape[0] // groups
        x = x.reshape(groups // m, m, per_group, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1).reshape(m, (groups // m) * per_group, *x.shape[3:])
        axes = _data_axes(x.shape[1])
        if axes is not None:
            x = jax.lax.with_sharding_constraint(x, PartitionSpec(None, axes))
        return x

    return {name: one(x) for name, x in batch.items()}


def merge(x_MxBx, groups: int):
    """Inverse of `split` for one array [M, n / M, ...] -> [n, ...] (n a multiple of groups)."""
    m, b = x_MxBx.shape[:2]
    per_group = b * m // groups
    x = x_MxBx.reshape(m, groups // m, per_group, *x_MxBx.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape(m * b, *x_MxBx.shape[2:])


def forward(fn, batch, m: int):
    """`fn(micro_batch) -> [rows, ...]` (or a pytree of them) over `m` micro-batches of `batch`
    (`jax.lax.map`, one at a time), outputs back in the batch's row order."""
    if m == 1:
        return fn(batch)
    out = jax.lax.map(fn, split(batch, m))
    return jax.tree.map(lambda y: merge(y, batch["prompt"].shape[0]), out)


def accumulate(loss_fn, params, micro_batches):
    """Sums of `loss_fn(params, mb) -> (loss, (summed, last))` and of its gradient over the
    micro-batches ([M, ...] leaves, e.g. `split`), in one `jax.lax.scan`.

    Returns (loss, summed, last, grads): loss and the `summed` pytree added up in float32,
    `last` (values that are the same in every micro-batch) from the last one, and the gradient
    sums in float32 (cast them to the params' dtypes for the update).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    (_, (summed_shape, _)), _ = jax.eval_shape(grad_fn, params, first)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)  # noqa: E731
    add = lambda acc, x: jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, x)  # noqa: E731

    def body(carry, mb):
        loss_sum, summed_sum, grad_sum = carry
        (loss, (summed, last)), grads = grad_fn(params, mb)
        carry = (loss_sum + loss.astype(jnp.float32), add(summed_sum, summed), add(grad_sum, grads))
        return carry, last

    init = (jnp.float32(0.0), zeros(summed_shape), zeros(params))
    (loss, summed, grads), lasts = jax.lax.scan(body, init, micro_batches)
    return loss, summed, jax.tree.map(lambda x: x[-1], lasts), grads


# ---------------------------------------------------------------------------- memory budget
def activation_bytes_per_row(model_cfg, prompt_len: int, response_len: int) -> int:
    """Estimated activation bytes one response row adds to a training step (the part of the
    step's memory that micro-batching divides; params, gradients and optimizer state are not in
    it). With T = prompt_len + response_len tokens, b = bytes of the compute dtype:

      one layer   T * (4D + (2H + 2Hkv) * hd + 3F) * b   (norms / residuals, q, k, v, attention
                  output, MLP gate / up / activation; F = K * moe width for MoE layers)
                  + 2 * H * T^2 * 4 when the attention is dense (float32 scores and
                  probabilities); the chunked path instead adds 3 * H * block^2 * 4 once (its
                  backward's float32 blocks); splash keeps its blocks in VMEM
      remat:      L * T * 2D * b (each layer's saved input) + 2 * one layer (the layer being
                  recomputed and its gradients, one layer at a time)
      no remat:   (L + 1) * one layer (every layer's internals kept for the backward pass)

    Not counted: the log-prob / KL ops' logits (`pallas_kernels.span_kl` works in token x vocab
    chunks, a size that does not grow with rows); the teacher's forward-only pass (one layer at
    a time); a prompt shared by k responses counts once per response (P (k - 1) / k tokens of
    overestimate per row).

    Calibration (`benchmarks/microbatch_memory.py`: the slope of XLA's temporaries between
    micro-batches of 8 and 16 rows, 4 layers d=256 H=4, P=64, CPU host): estimate / measured =
    1.02 / 1.09 / 0.80 with remat at N = 192 / 512 / 1984; without remat 0.76 / 0.63 at
    N = 192 / 512 (XLA:CPU keeps more of each layer than counted here). On TPU check a chosen
    size with the AOT tool (`python -m jaxtrace.compile --config.train.micro_batch_rows=R`).
    """
    from jaxtrace.models.attention import default_implementation  # noqa: PLC0415

    c = model_cfg
    b = jnp.dtype(c.compute_dtype).itemsize
    t = prompt_len + response_len
    width = c.intermediate_size
    if c.family == "qwen3_moe":
        width = max(width, c.num_experts_per_tok * c.moe_intermediate_size)
    qkvo = (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    layer = t * (4 * c.hidden_size + qkvo + 3 * width) * b
    impl = c.attention_impl or default_implementation(t, t, c.attention_block)
    working = 0  # the chunked backward's float32 blocks (scores, p, dp, ds), one layer at a time
    if impl == "dense":
        layer += 2 * c.num_heads * t * t * 4
    elif impl == "chunked":
        block = min(c.attention_block, t)
        working = 3 * c.num_heads * block * block * 4
    if c.remat != "none":
        return int(c.num_layers * t * 2 * c.hidden_size * b + 2 * layer + working)
    return int((c.num_layers + 1) * layer + working)


def rows_for_budget(rows: int, group: int, bytes_per_row: int, budget_bytes: float, dp: int = 1):
    """The largest micro-batch (response rows) that divides `rows`, takes whole groups of
    `group`, splits over `dp` data-parallel devices and keeps rows / dp * bytes_per_row within
    `budget_bytes` (per device); the smallest such micro-batch when none fits (the caller's
    estimate then exceeds the budget: `resolve_rows` says so)."""
    step = group * dp // math.gcd(group, dp)
    options = [r for r in range(step, rows + 1, step) if rows % r == 0] or [rows]
    fits = [r for r in options if r // dp * bytes_per_row <= budget_bytes]
    return max(fits) if fits else min(options)


def resolve_rows(config, which: str = "train", dp: int = 1) -> int:
    """The run's micro-batch rows for `which` ("train": RL updates and their passes, "sft"):
    the config's `<which>.micro_batch_rows`, or for -1 the `rows_for_budget` of
    `train.activation_budget_gib` with `activation_bytes_per_row` (logged) on `dp`
    data-parallel devices (`sharding.data_parallel_size(mesh)`)."""
    from jaxtrace.config import model_config  # noqa: PLC0415

    value = config[which].micro_batch_rows
    if value != -1:
        return value
    r = config.rollout
    if which == "train":
        rows, group = r.prompts_per_step * r.group_size // config.algo.num_minibatches, r.group_size
        prompt_len = r.max_prompt_len  # the student's (the teacher's pass keeps no activations)
    else:
        rows, group = config.sft.batch_size, 1
        prompt_len = max(r.max_prompt_len, r.max_privileged_len)  # SFT uses both prompts
    per_row = activation_bytes_per_row(model_config(config), prompt_len, r.max_new_tokens)
    budget = config.train.activation_budget_gib * 2**30
    chosen = rows_for_budget(rows, group, per_row, budget, dp)
    need = chosen // dp * per_row / 2**30
    log.info(
        "%s.micro_batch_rows=-1: %d rows (estimate %.2f GiB per device of %.2f)",
        which,
        chosen,
        need,
        config.train.activation_budget_gib,
    )
    if need > config.train.activation_budget_gib:
        log.warning(
            "%s.micro_batch_rows: even %d rows (one group per device) need an estimated %.2f GiB "
            "per device, over train.activation_budget_gib=%.2f",
            which,
            chosen,
            need,
            config.train.activation_budget_gib,
        )
    return chosen
