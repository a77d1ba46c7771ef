"""Ahead-of-time compilation of a run's programs for a device mesh, from abstract values.

`programs(config, mesh)` builds the jitted functions the trainer runs (the same constructors:
`steps.make_rl_step`, `make_generate`, ...) with the config's real shapes, as
`jax.ShapeDtypeStruct`s carrying the shardings the trainer gives them; nothing is allocated.
`compile_program` lowers and compiles one for the mesh's devices (a TPU topology from libtpu,
see `jaxtrace.tpu_topology`, or local devices) and reads XLA's memory and cost analyses.
`jaxtrace.compile` is the CLI around it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxtrace import evaluation, flops, microbatch, sharding, steps
from jaxtrace.config import model_config
from jaxtrace.models import abstract_model
from jaxtrace.rollout import layout, make_generate
from jaxtrace.rollout import sampler as sampler_lib

# Token ids do not change a program's shapes; compile with stand-ins.
_EOS, _PAD = 1, 0


# Run-time inputs that no program's shape depends on: the compile never reads them, so a config
# may leave them unset (they are given on the training command line).
_NOT_READ = {
    "data.train_path": "<not read by compile>",
    "algo.api_base_url": "http://localhost",
    "algo.api_model": "<not read by compile>",
    "algo.annotation_file": "<not read by compile>",
}


def with_placeholders(config):
    """A copy of `config` with the run-time-only inputs that are unset filled in."""
    config = config.copy_and_resolve_references()
    for dotted, value in _NOT_READ.items():
        section, key = dotted.split(".")
        if not config[section][key]:
            config[section][key] = value
    return config


@dataclasses.dataclass
class Program:
    name: str
    fn: object  # a jax.jit-wrapped function
    args: tuple  # abstract args (ShapeDtypeStruct with sharding) and static values
    what: str  # one line for the table
    resident_bytes: int = 0  # per device, in HBM beside the program (training state, reference)
    model_flops: float = 0.0  # per device, `jaxtrace.flops` (0 = not counted, the samplers)


@dataclasses.dataclass
class Result:
    name: str
    status: str  # "ok" | "does not fit" | "error"
    message: str = ""
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    resident_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    model_flops: float = 0.0
    compile_s: float = 0.0

    @property
    def total_bytes(self) -> int:
        """Peak per-device HBM as XLA counts it: arguments + outputs not aliased to an argument
        (donated buffers are reused) + temporaries, plus what stays resident beside the program
        (the reference KL's frozen params; beside the samplers, the training state)."""
        args_out = self.argument_bytes + self.output_bytes - self.alias_bytes
        return args_out + self.temp_bytes + self.resident_bytes


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_state(model_cfg, optimizer, mesh):
    """{"params", "opt_state", "step"} as the trainer holds it: params in their logical-axis
    shardings, optimizer moments like their params, counters replicated (`place_state`)."""
    _, shapes = abstract_model(model_cfg)
    params = _abstract(shapes, sharding.param_shardings(model_cfg, mesh))
    opt_shapes = jax.eval_shape(optimizer.init, params)
    rep = sharding.replicated(mesh)
    opt_state = optax.tree_map_params(
        optimizer,
        # f(state leaf, params leaf): a moment takes its param's sharding.
        lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding),
        opt_shapes,
        params,
        transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
    )
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return {"params": params, "opt_state": opt_state, "step": step}


def _rows(mesh, shape, dtype, split=True):
    """An [rows, ...] array split over the data axes (as `sharding.shard_batch`), or replicated
    when the rows do not divide (as `sharding.shard_rows`)."""
    divisible = shape[0] % sharding.data_parallel_size(mesh) == 0
    s = (
        sharding.batch_sharding(mesh, len(shape))
        if split and divisible
        else NamedSharding(mesh, PartitionSpec())
    )
    return jax.ShapeDtypeStruct(shape, dtype, sharding=s)


def rl_batch(config, mesh, teacher: bool, minibatches: int = 1):
    """One update's batch (`rl.minibatches` of `rl.build_batch`, after
    `sharding.shard_step_batch`): G prompts, R = G * k responses of width N, the privileged
    prompts (width Q, one per response); G is the rollout's prompts / `minibatches`."""
    r = config.rollout
    g, k = r.prompts_per_step // minibatches, r.group_size
    rows, p, n, q = g * k, r.max_prompt_len, r.max_new_tokens, r.max_privileged_len
    batch = {
        "prompt": _rows(mesh, (g, p), jnp.int32),
        "prompt_valid": _rows(mesh, (g, p), jnp.bool_),
        "response": _rows(mesh, (rows, n), jnp.int32),
        "response_mask": _rows(mesh, (rows, n), jnp.bool_),
        "advantages": _rows(mesh, (rows,), jnp.float32),
        "route": _rows(mesh, (rows, n), jnp.int32),
    }
    if teacher:
        batch["privileged"] = _rows(mesh, (rows, q), jnp.int32)
        batch["privileged_valid"] = _rows(mesh, (rows, q), jnp.bool_)
    return batch


def sft_batch(config, mesh):
    """A supervised batch (`trainer.sft_batches`); the privileged width Q, the larger prompt."""
    b, q, n = (
        config.sft.batch_size,
        config.rollout.max_privileged_len,
        config.rollout.max_new_tokens,
    )
    return {
        "prompt": _rows(mesh, (b, q), jnp.int32),
        "prompt_valid": _rows(mesh, (b, q), jnp.bool_),
        "response": _rows(mesh, (b, n), jnp.int32),
        "response_mask": _rows(mesh, (b, n), jnp.bool_),
    }


def _shapes(batch) -> dict:
    return {key: x.shape for key, x in batch.items()}


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of an abstract tree (each leaf's shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _with_rows(mesh, tree):
    """Abstract outputs of a per-row function (old / reference log-probs, teacher hidden
    states) as the step receives them: split over the data axes like the batch."""
    return jax.tree.map(lambda x: _rows(mesh, x.shape, x.dtype), tree)


def _cache_with_rows(mesh, cache, model_cfg, heads=None, token_major=False):
    """An abstract KV cache as the engine places it (`engine.cache_sharding`): every leaf is
    [layers, rows, ...] (`init_cache`), split over the data axes on its row axis, the attention
    layers' KV heads over `heads` (`engine.kv_head_axes`: the decode layout's split); replicated
    when the rows do not divide (the engine then leaves the placement to XLA). token_major: the
    engine's stored slot cache (`engine.slots_token_major`), not the model's order."""
    from jaxtrace.models.qwen3 import CACHE_ROW_AXIS  # noqa: PLC0415
    from jaxtrace.rollout import engine as engine_lib  # noqa: PLC0415

    rows = jax.tree.leaves(cache)[0].shape[CACHE_ROW_AXIS]
    if rows % sharding.data_parallel_size(mesh):
        whole = NamedSharding(mesh, PartitionSpec())
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), cache)
    placed = engine_lib.cache_sharding(mesh, model_cfg, heads, token_major)
    return [
        jax.tree.map(lambda x, s=s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), entry)
        for entry, s in zip(cache, placed)
    ]


def _rng(mesh):
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def _sampler(graphdef, cfg, mesh, params, rows):
    prompts = _rows(mesh, (rows, cfg.max_prompt_len), jnp.int32)
    valid = _rows(mesh, (rows, cfg.max_prompt_len), jnp.bool_)
    return make_generate(graphdef, cfg), (params, prompts, valid, _rng(mesh))


def sampler_programs(
    name, graphdef, cfg, mesh, params, prompts, what, config, resident: int = 0
) -> list[Program]:
    """The programs of the rollout engine the run uses (`rollout.select`, with the cache
    budget's row count): the static sampler is one program (one row chunk of it); the continuous
    engine is a host loop of jitted pieces, of which the prefill and the largest decode segment
    (every slot, the cache at P + N) bound its memory. `params`: as the sampler gets them (the
    decode copy); `resident`: bytes per device held beside them (the training state)."""
    from jaxtrace.rollout import engine as engine_lib  # noqa: PLC0415

    model_cfg = model_config(config)
    r = config.rollout
    dp = sharding.data_parallel_size(mesh)
    head_axes = engine_lib.kv_head_axes(params, model_cfg)  # the decode layout's KV-head split
    heads = sharding.axes_size(mesh, head_axes)
    gen = engine_lib.select(
        graphdef, cfg, model_cfg, r.engine, r.decode_slots, r.cache_budget_gib, dp, heads
    )
    if not isinstance(gen, engine_lib.Engine):
        max_rows = getattr(gen, "max_rows", 0)
        chunk = prompts
        if max_rows:
            chunk = min(prompts, sampler_lib.chunk_prompts(max_rows, cfg.num_samples, dp))
            what += f", in chunks of {chunk} prompts"
        fn, args = _sampler(graphdef, cfg, mesh, params, chunk)
        return [Program(name, fn, args, what + " (static)", resident)]
    chunk = gen.prompt_chunk(prompts)  # one pass of the engine (the prefix cache budget)
    if chunk < prompts:
        what += f", in passes of {chunk} prompts"
    prompts, rows = chunk, chunk * cfg.num_samples
    slots = gen.slot_cap(rows)
    length = cfg.max_prompt_len + cfg.max_new_tokens
    prompt = _rows(mesh, (prompts, cfg.max_prompt_len), jnp.int32)
    valid = _rows(mesh, (prompts, cfg.max_prompt_len), jnp.bool_)
    budget = _rows(mesh, (rows,), jnp.int32)
    prefill_args = (params, prompt, valid, _rng(mesh), budget)
    with sharding.mesh_context(mesh):  # the slot cache's stored order is the target's
        # As the engine's first pass places it (`engine.prompt_runs`): the prefix split like
        # the slots, so that each chip's slots copy their prompts from its own part.
        _, prefix_sharding = engine_lib.prompt_runs(params, model_cfg, prompts, slots)
        prefill = jax.jit(  # `_prefill_jit`
            functools.partial(engine_lib._prefill, graphdef, cfg, prefix_sharding=prefix_sharding)
        )
        prefix, token0, keys, outputs, _ = jax.eval_shape(prefill, *prefill_args)
        empty = jax.eval_shape(lambda: engine_lib._empty_slots(model_cfg, slots, length))
        token_major = engine_lib.slots_token_major()
    empty = {
        **_with_rows(mesh, empty),
        "cache": _cache_with_rows(mesh, empty["cache"], model_cfg, head_axes, token_major),
    }
    seg_args = (
        params,
        empty,
        _with_rows(mesh, outputs),
        _cache_with_rows(mesh, prefix, model_cfg, head_axes, token_major),
        valid,
        _with_rows(mesh, token0),
        _with_rows(mesh, keys),
        budget,
        _rows(mesh, (slots,), jnp.int32),
        _rows(mesh, (slots,), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)),
    )
    # The engine's `_segment_jit` at its largest shape (slots and outputs donated, as there).
    segment = jax.jit(
        functools.partial(
            engine_lib._segment, graphdef, cfg, length=length, prefix_sharding=prefix_sharding
        ),
        donate_argnums=(1, 2),
    )
    return [
        Program(f"{name}_prefill", prefill, prefill_args, what + " (engine prefill)", resident),
        Program(
            f"{name}_decode",
            segment,
            seg_args,
            f"{slots} slots, cache {length} (engine's largest decode segment)",
            resident,
        ),
    ]


def programs(config, mesh) -> list[Program]:
    """Every program a run of `config` executes, with abstract arguments on `mesh`."""
    from jaxtrace import algos, phases, trainer  # noqa: PLC0415 (the run-time pieces)

    model_cfg = model_config(config)
    graphdef, _ = abstract_model(model_cfg)
    a, o, r = config.algo, config.optim, config.rollout
    optimizer = steps.make_optimizer(o.lr, o.warmup_steps, o.grad_clip, o.weight_decay, o.b1, o.b2)
    state = abstract_state(model_cfg, optimizer, mesh)
    lam = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    loss = phases.loss_config(config, algos.resolve(a))
    dp = sharding.data_parallel_size(mesh)
    micro = microbatch.resolve_rows(config, "train", dp)  # train.micro_batch_rows
    rl_step = steps.make_rl_step(graphdef, optimizer, loss, micro)
    g, k, m = r.prompts_per_step, r.group_size, a.num_minibatches
    multi = a.num_minibatches * a.ppo_epochs > 1  # old log-probs (and teacher) once per batch
    full = f"{g}x{k} rows, P={r.max_prompt_len} N={r.max_new_tokens}"
    shape = (
        full if m == 1 else f"{g // m}x{k} rows (1 of {m} mini-batches)" + full[full.index(",") :]
    )
    if 0 < micro < g * k // m:
        shape += f", micro-batches of {micro} rows"
    # The reference KL's frozen params stay in HBM beside every program of the RL step.
    reference = _per_device_bytes(state["params"]) if a.ref_kl_coef > 0 else 0
    # Model FLOPs per device of a program on `batch` (`jaxtrace.flops`), for the MFU estimate.
    per_device = lambda count, batch: count(model_cfg, _shapes(batch)) / mesh.size  # noqa: E731
    out = []
    if config.sft.steps > 0 and not config.init_from:
        sft_opt = steps.make_optimizer(
            config.sft.lr, config.sft.warmup_steps, o.grad_clip, 0.0, o.b1, o.b2
        )
        sft_state = abstract_state(model_cfg, sft_opt, mesh)
        batch = sft_batch(config, mesh)
        out.append(
            Program(
                "sft_step",
                steps.make_sft_step(graphdef, sft_opt, microbatch.resolve_rows(config, "sft", dp)),
                (sft_state, batch),
                f"{config.sft.batch_size} rows, Q={r.max_privileged_len} N={r.max_new_tokens}",
                model_flops=per_device(flops.sft_step_flops, batch),
            )
        )
    logprob_fn = steps.make_logprob_fn(graphdef, a.kl_implementation or None, micro)
    teacher_fn = steps.make_teacher_hidden_fn(graphdef, micro)
    if multi or reference:  # once per rollout batch: the behaviour's and the reference's
        args = (state["params"], rl_batch(config, mesh, False, m))
        count = per_device(flops.logprob_flops, args[1])
        what = shape + " (old / reference)"
        out.append(Program("logprobs", logprob_fn, args, what, reference, count))
        logp = _with_rows(mesh, jax.eval_shape(logprob_fn, *args))
    for teacher in trainer.teacher_phases(config):
        batch = rl_batch(config, mesh, teacher, m)
        what = shape + (f" Q={r.max_privileged_len}" if teacher else "")
        if multi:
            batch = {**batch, "old_logp": logp}
        if reference:
            batch = {**batch, "ref_logp": logp}
        if multi and teacher:
            count = per_device(flops.teacher_hidden_flops, batch)
            args = (state["params"], batch)
            out.append(Program("teacher_hidden", teacher_fn, args, what, reference, count))
            hidden = jax.eval_shape(teacher_fn, state["params"], batch)
            batch = {**batch, "teacher_hidden": _with_rows(mesh, hidden)}
        name = "rl_step+teacher" if teacher else "rl_step"
        count = per_device(flops.rl_step_flops, batch)
        out.append(Program(name, rl_step, (state, batch, lam, teacher), what, reference, count))
    if a.name == "trace" and a.annotator == "divergence":
        fn = steps.make_divergence_fn(graphdef, a.kl_implementation or None, micro)
        out.append(
            Program(
                "divergence",
                fn,
                (state["params"], rl_batch(config, mesh, True)),
                full + f" Q={r.max_privileged_len}",
            )
        )
    # The samplers run on the decode copy of the params (`rollout.layout`), made by one reshard
    # program; the training state (and a frozen reference) stays in HBM beside them.
    params = layout.abstract_decode_params(
        state["params"], model_cfg, mesh, r.decode_layout, r.decode_in_compute_dtype
    )
    copied = params is not state["params"]
    held = _per_device_bytes(state) + reference
    resident = held if copied else held - _per_device_bytes(state["params"])
    if copied:
        reshard = layout.make_reshard(model_cfg, mesh, r.decode_layout, r.decode_in_compute_dtype)
        rest = held - _per_device_bytes(state["params"])  # beside the reshard: all but params
        what = f"params -> {r.decode_layout} layout, {jax.tree.leaves(params)[0].dtype}"
        out.append(Program("decode_reshard", reshard, (state["params"],), what, rest))
    sampling = trainer.rollout_sampling(config, (_EOS,), _PAD)
    what = f"{g} prompts x {k}, P={r.max_prompt_len} N={r.max_new_tokens}"
    out += sampler_programs("sampler", graphdef, sampling, mesh, params, g, what, config, resident)
    e = config.eval
    eval_cfg = evaluation.sampling_config(
        r.max_prompt_len, r.max_new_tokens, e.num_samples, e.temperature, _EOS, _PAD
    )
    rows = evaluation.batch_rows(e.batch_size, None, mesh)
    what = f"{rows} prompts x {eval_cfg.num_samples}, N={r.max_new_tokens}"
    out += sampler_programs(
        "eval_sampler", graphdef, eval_cfg, mesh, params, rows, what, config, resident
    )
    if a.annotator == "self":
        cfg = trainer.self_annotation_sampling(r, _EOS, _PAD)
        what = f"{g * k} prompts, P={cfg.max_prompt_len} N={cfg.max_new_tokens}"
        out += sampler_programs(
            "self_annotate", graphdef, cfg, mesh, params, g * k, what, config, resident
        )
    return out


# XLA:TPU's words for "does not fit" (a verdict, not a compile error) and Mosaic's for VMEM.
_HBM = (
    re.compile(r"required for [\w ]+ \(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)"),
    re.compile(r"Used ([\d.]+\w?) of ([\d.]+\w?) hbm", re.I),
)
_VMEM = re.compile(r"Used ([\d.]+\w?) of ([\d.]+\w?) vmem", re.I)


def compile_program(prog: Program, mesh) -> Result:
    """Lower and compile `prog` for `mesh`'s devices (with the mesh set, so Pallas ops run under
    shard_map); a failure is a Result, never an exception."""
    t0 = time.perf_counter()
    try:
        with sharding.mesh_context(mesh):
            compiled = prog.fn.lower(*prog.args).compile()
    except Exception as e:  # noqa: BLE001 (XLA raises many types; all are reported)
        text = str(e)
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
        status = "error"
        hbm = next((m for m in (p.search(text) for p in _HBM) if m), None)
        vmem = _VMEM.search(text)
        if hbm:
            status, first = "does not fit", f"needs {hbm.group(1)} of {hbm.group(2)} HBM (XLA)"
        elif vmem:
            first = f"VMEM overflow, used {vmem.group(1)} of {vmem.group(2)}: {first[:200]}"
        seconds = time.perf_counter() - t0
        return Result(
            prog.name,
            status,
            first[:300],
            compile_s=seconds,
            resident_bytes=prog.resident_bytes,
            model_flops=prog.model_flops,
        )
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else (cost or {})
    return Result(
        prog.name,
        "ok",
        argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(mem, "output_size_in_bytes", 0)),
        alias_bytes=int(getattr(mem, "alias_size_in_bytes", 0)),
        temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0)),
        resident_bytes=prog.resident_bytes,
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        model_flops=prog.model_flops,
        compile_s=seconds,
    )
