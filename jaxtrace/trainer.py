"""The training run: set-up, optional supervised warm start, the RL loop, evaluation.

`run(config)` is the library entry point (`jaxtrace.train` only parses flags), so notebooks call
the same code. Host state that must survive a restart (data position, RNG, counters) is a
function of the step or lives in the checkpoint's JSON, so a resumed run is bitwise identical.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace import algos, checkpoint, evaluation, metrics, microbatch, paths, rl, sharding, steps
from jaxtrace.config import model_config, validate
from jaxtrace.data import tasks
from jaxtrace.data import tokenizer as tok_lib
from jaxtrace.errors import ConfigError
from jaxtrace.models import abstract_model
from jaxtrace.phases import (
    RLPhases,
    kl_lambda,
    loss_config,
    prompt_indices,  # noqa: F401 (the data position; moved to phases)
)
from jaxtrace.rewards import MathVerifier
from jaxtrace.rollout import SamplingConfig, engine, layout
from jaxtrace.workdir_lock import WorkdirLock

log = logging.getLogger("jaxtrace")

# The host state an RL checkpoint must hold to resume (a step without them is skipped).
HOST_KEYS = ("cum_exposure", "consecutive_nonfinite", "skipped_steps", "before")


class NonFiniteError(RuntimeError):
    """Raised after too many consecutive non-finite steps."""


# ---------------------------------------------------------------------------- set-up
def setup_tokenizer(config, train_examples):
    """The configured tokenizer, or a sentencepiece model trained on the task text (kept in the
    workdir, so a resumed run reuses it; copied through a local file for remote workdirs)."""
    if config.data.tokenizer:
        return tok_lib.load(config.data.tokenizer)
    remote = paths.join(config.workdir, "tokenizer.model")
    # Several processes share one workdir: each trains the same model into a private file (the
    # text and trainer are deterministic) and process 0 alone publishes it, atomically.
    private = paths.is_remote(remote) or jax.process_count() > 1
    local = (
        os.path.join(tempfile.mkdtemp(prefix="jaxtrace_tok"), "tokenizer.model")
        if private
        else remote
    )
    if paths.exists(remote):
        if local != remote:
            with paths.open_path(remote, "rb") as src, open(local, "wb") as dst:
                dst.write(src.read())
        return tok_lib.SentencePieceTokenizer(local)
    student, privileged = rl.templates.get(config.data.template)
    texts = [f"{student(e.question)} {e.reference}" for e in train_examples]
    texts += [privileged(e.question, e.reference, True) for e in train_examples[:200]]
    texts += [privileged(e.question, e.reference, False) for e in train_examples[:200]]
    tok = tok_lib.train_sentencepiece(
        texts, local[: -len(".model")], config.data.vocab_size, model_type="bpe"
    )
    if local != remote and jax.process_index() == 0:
        target = remote if paths.is_remote(remote) else remote + ".partial"
        with open(local, "rb") as src, paths.open_path(target, "wb") as dst:
            dst.write(src.read())
        if target != remote:
            os.replace(target, remote)  # a process starting later never reads half a file
    return tok


def check_inputs(config, model_cfg, tokenizer, encoder, train, test):
    """Fails before any compute on inputs that cannot run (each error names the thing)."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer vocab ({tokenizer.vocab_size}) is larger than the model "
            f"vocab (model.vocab_size={model_cfg.vocab_size})"
        )
    if not train:
        raise ValueError("the training set is empty")
    for e in train + test:
        encoder.student([e])
        if config.algo.name in ("trace", "opsd", "opsd+grpo"):
            encoder.privileged([e], [True])
            encoder.privileged([e], [False])
    # Each update's batch is one mini-batch of whole groups (algo.num_minibatches per rollout).
    rows = config.rollout.prompts_per_step * config.rollout.group_size
    rows //= config.algo.num_minibatches
    dp = jax.device_count()
    mesh_dp = 1
    for axis in ("data", "fsdp", "expert"):
        size = config.mesh.get(axis, 1)
        mesh_dp *= dp if size == -1 else size
    if rows % max(mesh_dp, 1):
        raise ValueError(
            f"rollout mini-batch prompts_per_step*group_size/algo.num_minibatches={rows} is "
            f"not divisible by the data-parallel size {mesh_dp}"
        )
    for key in ("train", "sft"):  # each micro-batch is split over the data-parallel devices
        micro = config[key].micro_batch_rows
        if micro > 0 and micro % max(mesh_dp, 1):
            raise ValueError(
                f"{key}.micro_batch_rows={micro} is not divisible by the data-parallel size "
                f"{mesh_dp}"
            )


def init_params(config, model_cfg, mesh):
    shardings = sharding.param_shardings(model_cfg, mesh)
    from jaxtrace.export import load_hf_checked, resolve_run  # noqa: PLC0415

    if config.init_from.startswith("hf:"):
        # The run's model config is the truth (dtype, remat, hybrid layers...); the HF weights
        # must fit its shapes, and a mismatch is an error naming the tensor.
        from jaxtrace.models import hf  # noqa: PLC0415

        graphdef, _ = abstract_model(model_cfg)
        load = lambda d: hf.load_params(model_cfg, d, shardings)  # noqa: E731
        return graphdef, load_hf_checked(config.init_from[3:], load)
    if config.init_from.startswith("ckpt:"):
        graphdef, abstract = sharding.abstract_placed(model_cfg, mesh)
        params, _ = checkpoint.restore_params(resolve_run(config.init_from[5:])[0], abstract)
        return graphdef, params
    return sharding.init_sharded(model_cfg, mesh, seed=config.seed)


def make_annotator(config, train_examples, generate_text=None, tokenizer=None):
    from jaxtrace import annotate  # noqa: PLC0415

    kind = config.algo.annotator
    if kind == "oracle":
        from jaxtrace.annotate.oracle import OracleAnnotator  # noqa: PLC0415

        return OracleAnnotator({e.question: e.source for e in train_examples})
    if kind == "file":
        return annotate.FileAnnotator(config.algo.annotation_file)
    if kind == "api":
        return annotate.OpenAIAnnotator(
            config.algo.api_base_url,
            config.algo.api_model,
            config.algo.api_key_env,
            config.algo.api_timeout_s,
        )
    if kind == "self":
        if tokenizer is None:
            return annotate.SelfAnnotator(generate_text)
        return annotate.SelfAnnotator(
            generate_text,
            tokenizer=tokenizer,
            max_prompt_tokens=self_prompt_budget(config.rollout),
        )
    return None  # divergence / none


def sft_batches(examples, encoder, batch_size, privileged_fraction, response_len, seed):
    """Endless supervised batches: prompt -> worked solution. A `privileged_fraction` of the
    batches use the privileged prompt, so the same-weights teacher learns to read its
    privileged context. Widths are fixed (P or Q, and N) so the step compiles twice at most."""
    rng = np.random.default_rng(seed)
    while True:
        chosen = [examples[i] for i in rng.integers(0, len(examples), batch_size)]
        if rng.random() < privileged_fraction:
            prompt, valid = encoder.privileged(chosen, np.ones(batch_size, bool))
        else:
            prompt, valid = encoder.student(chosen)
        response = np.full((batch_size, response_len), encoder.tok.pad_id, np.int32)
        mask = np.zeros((batch_size, response_len), bool)
        for i, e in enumerate(chosen):
            ids = encoder.response_ids(e.reference)
            if len(ids) > response_len:
                raise ValueError(
                    f"reference solution of {len(ids)} tokens is longer than "
                    f"rollout.max_new_tokens={response_len}: {e.reference[:60]!r}"
                )
            response[i, : len(ids)] = ids
            mask[i, : len(ids)] = True
        yield {"prompt": prompt, "prompt_valid": valid, "response": response, "response_mask": mask}


# ---------------------------------------------------------------------------- phases
def warm_start(config, graphdef, params, encoder, train, mesh, writer):
    """Supervised warm start; its result is checkpointed in workdir/sft and reused."""
    ckpt = checkpoint.Checkpointer(paths.join(config.workdir, "sft"), keep=1, async_save=False)
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(None, {"params": params})
        ckpt.close()
        return state["params"]
    s = config.sft
    opt = steps.make_optimizer(
        s.lr, s.warmup_steps, config.optim.grad_clip, 0.0, config.optim.b1, config.optim.b2
    )
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0)}
    state = place_state(state, mesh)
    micro = microbatch.resolve_rows(config, "sft", sharding.data_parallel_size(mesh))
    step_fn = steps.make_sft_step(graphdef, opt, micro)
    batches = sft_batches(
        train,
        encoder,
        s.batch_size,
        s.privileged_fraction,
        config.rollout.max_new_tokens,
        config.seed,
    )
    bar = metrics.progress(s.steps, "sft", enabled=config.train.progress)
    for i in range(s.steps):
        state, m = step_fn(state, sharding.shard_batch(next(batches), mesh))
        if (i + 1) % 25 == 0 or i + 1 == s.steps:
            loss = float(m["loss"])
            writer.write(i + 1, {"loss": loss}, prefix="sft/")
            bar.set_postfix(loss=f"{loss:.3f}")
        bar.update(1)
    bar.close()
    ckpt.save(s.steps, {"params": state["params"]}, {"sft_steps": s.steps}, force=True)
    ckpt.close()
    return state["params"]


def place_state(state, mesh):
    """Replicates on the mesh every leaf not already placed there (optimizer counters, the step),
    so jit sees one device set."""
    rep = sharding.replicated(mesh)

    def put(x):
        if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding):
            return x
        return jax.device_put(x, rep)

    return jax.tree.map(put, state)


class _Preemption:
    """SIGTERM -> finish the current step, save, exit cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker)
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def teacher_phases(config) -> tuple[bool, ...]:
    """The `use_teacher` values the RL step compiles for over the run (`rl.build_batch` asks
    for the teacher in OPSD modes, and in TRACE while the KL coefficient is above 0)."""
    algo = algos.resolve(config.algo)
    if algo.mode in ("opsd", "opsd+grpo"):
        return (True,)
    if algo.mode != "trace":
        return (False,)
    steps_ = range(max(config.train.steps, 1))
    return tuple(sorted({kl_lambda(config.algo, algo, s) > 0 for s in steps_}, reverse=True))


def rollout_sampling(config, stop_tokens, pad_id) -> SamplingConfig:
    """The RL rollout's sampler settings."""
    r = config.rollout
    return SamplingConfig(
        max_prompt_len=r.max_prompt_len,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        num_samples=r.group_size,
        stop_tokens=tuple(stop_tokens),
        pad_id=pad_id,
    )


def check_paths(config) -> None:
    """The workdir and `init_from` paths, before anything is created (errors name the key)."""
    workdir = config.workdir
    if paths.exists(workdir) and not paths.isdir(workdir):
        raise ConfigError(f"workdir={workdir!r} is a file, not a directory")
    kind, _, where = config.init_from.partition(":")
    if config.init_from and not paths.is_remote(where):
        if not os.path.isdir(where):
            raise ConfigError(f"init_from={config.init_from!r}: {where!r} is not a directory")
        if kind == "hf" and not os.path.exists(os.path.join(where, "config.json")):
            raise ConfigError(f"init_from={config.init_from!r}: no config.json in {where!r}")


# What a checkpoint is a checkpoint *of*: resuming it under other values of these would restore
# the wrong shapes or silently continue another algorithm's run.
RUN_IDENTITY = (
    *(
        f"model.{k}"
        for k in (
            "family",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "tie_word_embeddings",
            "num_experts",
            "moe_intermediate_size",
            "mlp_only_layers",
            "hybrid_layers",
        )
    ),
    "algo.name",
    "algo.fkl_on_key_spans",
    "algo.rkl_on_error_spans",
    "data.task",
)


def check_resume_matches(config) -> None:
    """If the workdir holds checkpoints, the run that wrote them (its config.json) must agree
    with `config` on RUN_IDENTITY; ConfigError naming the keys otherwise (before config.json is
    overwritten)."""
    ckpt_dir, saved_path = (
        paths.join(config.workdir, "ckpt"),
        paths.join(config.workdir, "config.json"),
    )
    if paths.is_remote(ckpt_dir) or not os.path.isdir(ckpt_dir) or not os.path.exists(saved_path):
        return
    if not any(name.isdigit() for name in os.listdir(ckpt_dir)):
        return
    try:
        with open(saved_path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return  # unreadable: the restore itself will say what is wrong

    def get(tree, key):
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return list(tree) if isinstance(tree, tuple | list) else tree

    new = json.loads(config.to_json_best_effort())
    diff = [(k, get(saved, k), get(new, k)) for k in RUN_IDENTITY]
    diff = [(k, a, b) for k, a, b in diff if a is not None and a != b]  # older files lack keys
    if diff:
        what = ", ".join(f"{k}: {a!r} there, {b!r} here" for k, a, b in diff)
        raise ConfigError(
            f"workdir={config.workdir!r} holds checkpoints of another run ({what}); use another "
            "--config.workdir (or move its ckpt/ away to start over)"
        )


def reference_params(config, graphdef, params, encoder, train, mesh, writer):
    """The frozen reference of the reference KL: the params RL starts from (the saved warm start
    when there is one, so a resumed run gets the same), copied, since the train step donates
    the state's buffers."""
    if config.sft.steps > 0 and not config.init_from:
        params = warm_start(config, graphdef, params, encoder, train, mesh, writer)
    return jax.tree.map(jnp.copy, params)


def run(config) -> dict:
    """Trains as `config` says; returns {"before": eval, "after": eval, "steps": n, ...}.

    Checks the config and paths before any compute, then holds the workdir's lock (process 0;
    see jaxtrace.workdir_lock) for the whole run."""
    validate(config)
    check_paths(config)
    paths.makedirs(config.workdir)
    mesh = sharding.make_mesh(dict(config.mesh))
    with sharding.mesh_context(mesh):  # Pallas ops find the mesh here, to run under shard_map
        if jax.process_index() != 0:
            return _run(config, mesh)
        with WorkdirLock(config.workdir):
            return _run(config, mesh)


def _run(config, mesh) -> dict:
    is_main = jax.process_index() == 0
    check_resume_matches(config)
    if is_main:
        with paths.open_path(paths.join(config.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    model_cfg = model_config(config)
    train, test = tasks.load(config.data, seed=config.seed)
    tokenizer = setup_tokenizer(config, train)
    r = config.rollout
    encoder = rl.PromptEncoder(
        tokenizer, config.data.template, r.max_prompt_len, r.max_privileged_len
    )
    check_inputs(config, model_cfg, tokenizer, encoder, train, test)
    writer = metrics.MetricWriter(config.workdir, enabled=is_main)
    graphdef, params = init_params(config, model_cfg, mesh)
    # The samplers' weights: a decode-layout copy per RL step, freed before the update.
    decode = layout.DecodeWeights.from_config(r, model_cfg, mesh)
    if decode.reshard is not None:
        dtype = layout.decode_dtype(model_cfg, r.decode_in_compute_dtype) or model_cfg.weight_dtype
        log.info(
            "samplers decode on a per-step copy of the weights: layout %s, %s",
            r.decode_layout,
            jnp.dtype(dtype).name,
        )
    dp = sharding.data_parallel_size(mesh)
    vcfg = config.verifier
    verifier = MathVerifier(
        timeout_s=vcfg.timeout_s,
        num_workers=vcfg.num_workers,
        call_budget_s=vcfg.call_budget_s,
        call_budget_per_check_s=vcfg.call_budget_per_check_s,
        float_rounding=vcfg.float_rounding,
    )

    def run_eval(p, tag):
        e = config.eval
        try:
            return _evaluate(decode(p), tag, e)
        finally:
            decode.release()

    def _evaluate(p, tag, e):
        return evaluation.evaluate(
            graphdef,
            p,
            test,
            tokenizer=tokenizer,
            encoder=encoder,
            verifier=verifier,
            max_new_tokens=r.max_new_tokens,
            num_samples=e.num_samples,
            temperature=e.temperature,
            batch_size=e.batch_size,
            seed=config.seed,
            show_progress=config.train.progress,
            desc=f"eval {tag}",
            mesh=mesh,
            engine_name=r.engine,
            decode_slots=r.decode_slots,
            cache_budget_gib=r.cache_budget_gib,
        )

    ckpt = checkpoint.Checkpointer(paths.join(config.workdir, "ckpt"), keep=config.train.keep_ckpts)
    a, o = config.algo, config.optim
    optimizer = steps.make_optimizer(o.lr, o.warmup_steps, o.grad_clip, o.weight_decay, o.b1, o.b2)
    results: dict = {}
    if ckpt.latest_step() is None:
        if config.sft.steps > 0 and not config.init_from:
            params = warm_start(config, graphdef, params, encoder, train, mesh, writer)
        results["before"] = run_eval(params, "before RL")
        log.info("held-out accuracy before RL: %s", results["before"])
        state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
        state = place_state(state, mesh)
        host = {  # HOST_KEYS
            "cum_exposure": 0.0,
            "consecutive_nonfinite": 0,
            "skipped_steps": 0,
            "before": results["before"],
        }
    else:
        abstract = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
        state, host = ckpt.restore(None, place_state(abstract, mesh), host_keys=HOST_KEYS)
        _quarantine_skipped(ckpt)
        results["before"] = host["before"]
        log.info("resumed from step %d", int(state["step"]))

    algo = algos.resolve(a)
    log.info("algorithm %s: %s", a.name, algo)
    micro = microbatch.resolve_rows(config, "train", sharding.data_parallel_size(mesh))
    rl_step = steps.make_rl_step(graphdef, optimizer, loss_config(config, algo), micro)
    sampling = rollout_sampling(config, (tokenizer.eos_id,), tokenizer.pad_id)
    heads = layout.kv_head_shards(model_cfg, mesh, r.decode_layout)  # the slot cache's head split
    generate = layout.in_decode_layout(
        engine.select(
            graphdef, sampling, model_cfg, r.engine, r.decode_slots, r.cache_budget_gib, dp, heads
        ),
        decode,
    )
    # Self-annotation decodes with the same copy as the step's rollouts (made once per step).
    get_decode = lambda: decode(state["params"])  # noqa: E731
    self_generate = _self_generate(graphdef, get_decode, tokenizer, r, dp, heads)
    annotator = make_annotator(config, train, self_generate, tokenizer)
    phases = RLPhases(
        config, algo, graphdef, train, encoder, generate, verifier, annotator, mesh, rl_step, micro
    )
    ref_params = None
    if a.ref_kl_coef > 0:  # a frozen copy of the params RL starts from (the same on resume)
        ref_params = reference_params(config, graphdef, params, encoder, train, mesh, writer)

    start = int(state["step"])
    bar = metrics.progress(
        config.train.steps, f"rl:{a.name}", enabled=config.train.progress, initial=start
    )
    t_last, step_times = time.perf_counter(), []
    with _Preemption() as preempt:
        for step in range(start, config.train.steps):
            lam = kl_lambda(a, algo, step)
            sample, vstats, sample_m = phases.rollout_and_score(state["params"], step)
            batch, host_m, use_teacher = phases.build_batch(sample, lam, state["params"])
            decode.release()  # sampling is over: the update runs without the decode copy
            state, m = phases.update(state, batch, sample, lam, use_teacher, ref_params)
            host_m.update(sample_m)
            if not m.pop("finite"):
                host["consecutive_nonfinite"] += 1
                host["skipped_steps"] += 1
                if host["consecutive_nonfinite"] >= config.train.max_consecutive_nonfinite:
                    ckpt.close()  # an in-flight async save commits before the run ends
                    verifier.close()
                    raise NonFiniteError(
                        f"{host['consecutive_nonfinite']} consecutive steps with a non-finite "
                        f"loss or gradient (last at step {step}); params were left unchanged"
                    )
            else:
                host["consecutive_nonfinite"] = 0
                host["cum_exposure"] += m.get("exposure", 0.0)
            now = time.perf_counter()
            step_times.append(now - t_last)
            t_last = now
            m.update(
                host_m,
                cum_exposure=host["cum_exposure"],
                skipped_steps=host["skipped_steps"],
                step_time_s=step_times[-1],
                verifier_timeouts=vstats.get("timeout", 0),
                verifier_errors=vstats.get("error", 0),
            )
            done = step + 1
            if done % config.train.log_every == 0 or done == config.train.steps:
                writer.write(done, m, prefix="train/")
                bar.set_postfix(
                    acc=f"{m['accuracy']:.2f}", lam=f"{lam:.2f}", fkl=f"{m.get('frac_fkl', 0):.2f}"
                )
            last = done == config.train.steps  # the "after RL" eval below covers it
            if config.train.eval_every and done % config.train.eval_every == 0 and not last:
                writer.write(done, run_eval(state["params"], f"step {done}"), prefix="eval/")
            if (
                done % config.train.ckpt_every == 0
                or done == config.train.steps
                or preempt.requested
            ):
                ckpt.save(done, state, host, force=True)
            bar.update(1)
            if preempt.requested:
                log.warning("SIGTERM: saved step %d, exiting", done)
                break
    bar.close()
    ckpt.close()
    results["steps"] = int(state["step"])
    results["preempted"] = preempt.requested
    if not preempt.requested:
        results["after"] = run_eval(state["params"], "after RL")
        writer.write(results["steps"], results["after"], prefix="eval/")
    results["step_time_s"] = float(np.median(step_times[1:])) if len(step_times) > 1 else None
    results["cum_exposure"] = host["cum_exposure"]
    results["decode_copies"] = decode.copies  # weight reshards for the samplers (this process)
    if is_main:
        with paths.open_path(paths.join(config.workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    writer.close()
    verifier.close()
    results["state"] = state
    return results


def _quarantine_skipped(ckpt) -> None:
    """Moves the newer steps that did not restore aside (process 0), so that retention keeps
    counting only good steps and the run can save those step numbers again."""
    bad = [s for s, _ in ckpt.skipped]
    if not bad:
        return
    if jax.process_index() == 0:
        ckpt.quarantine(bad)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("jaxtrace_quarantine")
        ckpt.manager.reload()


def self_prompt_budget(r) -> int:
    """Tokens of a self-annotation prompt (instructions, problem, reference, response)."""
    return 4 * r.max_privileged_len


def self_annotation_sampling(r, eos_id, pad_id) -> SamplingConfig:
    """Self-annotation: the current policy, greedy, on prompts of up to `self_prompt_budget`
    tokens, answering in up to twice the rollout budget."""
    return SamplingConfig(
        max_prompt_len=self_prompt_budget(r),
        max_new_tokens=2 * r.max_new_tokens,
        greedy=True,
        stop_tokens=(eos_id,),
        pad_id=pad_id,
    )


def _self_generate(graphdef, get_params, tokenizer, r, batch_shards=1, head_shards=1):
    """generate_fn for self-annotation: the current policy (`get_params()`: its decode copy),
    greedy, at most the cache budget's rows at once. The annotator builds prompts
    that fit the budget (shortening the response's middle); one that does not is an error,
    never cut from the left, which would drop the instructions and the problem."""
    cfg = self_annotation_sampling(r, tokenizer.eos_id, tokenizer.pad_id)
    budget = cfg.max_prompt_len
    gen = None

    def generate_text(prompts):
        nonlocal gen
        if gen is None:
            model_cfg = engine.model_config_of(graphdef, get_params())
            gen = engine.select(
                graphdef,
                cfg,
                model_cfg,
                r.engine,
                r.decode_slots,
                r.cache_budget_gib,
                batch_shards,
                head_shards,
            )
        ids = [tokenizer.encode(p) for p in prompts]
        if max(map(len, ids), default=0) > budget:
            raise ValueError(f"a self-annotation prompt exceeds its {budget}-token budget")
        from jaxtrace.rollout import left_pad  # noqa: PLC0415

        out = gen(get_params(), *left_pad(ids, budget, tokenizer.pad_id), jax.random.key(0), None)
        out = jax.tree.map(np.asarray, out)
        return [tokenizer.decode(row[m]) for row, m in zip(out["response"], out["response_mask"])]

    return generate_text
