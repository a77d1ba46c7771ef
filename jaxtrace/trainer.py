"""The training run: set-up, optional supervised warm start, the RL loop, evaluation.

`run(config)` is the library entry point (`jaxtrace.train` only parses flags), so notebooks call
the same code. Host state that must survive a restart (data position, RNG, counters) is a
function of the step or lives in the checkpoint's JSON, so a resumed run is bitwise identical.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxtrace import checkpoint, evaluation, metrics, paths, rl, sharding, steps
from jaxtrace.config import model_config, validate
from jaxtrace.data import tasks
from jaxtrace.data import tokenizer as tok_lib
from jaxtrace.losses import trace as trace_lib
from jaxtrace.models import abstract_model
from jaxtrace.rewards import MathVerifier
from jaxtrace.rollout import SamplingConfig, engine

log = logging.getLogger("jaxtrace")


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
    rows = config.rollout.prompts_per_step * config.rollout.group_size
    dp = jax.device_count()
    mesh_dp = 1
    for axis in ("data", "fsdp", "expert"):
        size = config.mesh.get(axis, 1)
        mesh_dp *= dp if size == -1 else size
    if rows % max(mesh_dp, 1):
        raise ValueError(
            f"rollout batch prompts_per_step*group_size={rows} is not divisible by "
            f"the data-parallel size {mesh_dp}"
        )


def init_params(config, model_cfg, mesh):
    shardings = sharding.param_shardings(model_cfg, mesh)
    if config.init_from.startswith("hf:"):
        # The run's model config is the truth (dtype, remat, hybrid layers...); the HF weights
        # must fit its shapes, and a mismatch is an error naming the tensor.
        from jaxtrace.models import hf  # noqa: PLC0415

        graphdef, _ = abstract_model(model_cfg)
        return graphdef, hf.load_params(model_cfg, config.init_from[3:], shardings)
    if config.init_from.startswith("ckpt:"):
        graphdef, abstract = abstract_model(model_cfg)
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        params, _ = checkpoint.restore_params(config.init_from[5:], abstract)
        return graphdef, params
    return sharding.init_sharded(model_cfg, mesh, seed=config.seed)


def make_annotator(config, train_examples, generate_text=None):
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
        return annotate.SelfAnnotator(generate_text)
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
    step_fn = steps.make_sft_step(graphdef, opt)
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


def prompt_indices(step: int, n: int, num_examples: int, seed: int) -> np.ndarray:
    """The examples of RL step `step`: a fresh permutation per epoch, a pure function of step."""
    out = []
    for k in range(step * n, (step + 1) * n):
        epoch, pos = divmod(k, num_examples)
        out.append(np.random.default_rng([seed, epoch]).permutation(num_examples)[pos])
    return np.asarray(out)


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


def run(config) -> dict:
    """Trains as `config` says; returns {"before": eval, "after": eval, "steps": n, ...}."""
    validate(config)
    paths.makedirs(config.workdir)
    is_main = jax.process_index() == 0
    if is_main:
        with paths.open_path(paths.join(config.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    model_cfg = model_config(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    train, test = tasks.load(config.data, seed=config.seed)
    tokenizer = setup_tokenizer(config, train)
    r = config.rollout
    encoder = rl.PromptEncoder(
        tokenizer, config.data.template, r.max_prompt_len, r.max_privileged_len
    )
    check_inputs(config, model_cfg, tokenizer, encoder, train, test)
    writer = metrics.MetricWriter(config.workdir, enabled=is_main)
    graphdef, params = init_params(config, model_cfg, mesh)
    verifier = MathVerifier(
        timeout_s=config.verifier.timeout_s, num_workers=config.verifier.num_workers
    )

    def run_eval(p, tag):
        e = config.eval
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
        host = {
            "cum_exposure": 0.0,
            "consecutive_nonfinite": 0,
            "skipped_steps": 0,
            "before": results["before"],
        }
    else:
        abstract = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}
        state, host = ckpt.restore(None, place_state(abstract, mesh))
        results["before"] = host["before"]
        log.info("resumed from step %d", int(state["step"]))

    mode = {"dapo": "grpo", "drgrpo": "grpo"}.get(a.name, a.name)
    loss_cfg = steps.LossConfig(
        mode=mode,
        eps_low=a.eps_low,
        eps_high=a.eps_high if a.name != "grpo" else a.eps_low,
        norm="constant" if a.name == "drgrpo" else a.norm,
        max_len=r.max_new_tokens,
        ref_kl_coef=a.ref_kl_coef,
        opsd_route=trace_lib.ROUTE_RKL if a.opsd_route == "rkl" else trace_lib.ROUTE_FKL,
        kl_implementation=a.kl_implementation or None,
    )
    rl_step = steps.make_rl_step(graphdef, optimizer, loss_cfg)
    sampling = SamplingConfig(
        max_prompt_len=r.max_prompt_len,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        num_samples=r.group_size,
        stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id,
    )
    generate = engine.select(graphdef, sampling, model_cfg, r.engine, r.decode_slots)
    divergence = steps.make_divergence_fn(graphdef, a.kl_implementation or None)
    annotator = make_annotator(
        config, train, _self_generate(graphdef, lambda: state["params"], tokenizer, r)
    )

    start = int(state["step"])
    bar = metrics.progress(
        config.train.steps, f"rl:{a.name}", enabled=config.train.progress, initial=start
    )
    t_last, step_times = time.perf_counter(), []
    with _Preemption() as preempt:
        for step in range(start, config.train.steps):
            lam = float(
                trace_lib.kl_coef(
                    step,
                    lambda0=a.kl_lambda0,
                    warmup_steps=a.kl_warmup_steps,
                    decay_steps=a.kl_decay_steps,
                    decay=a.kl_decay,
                )
            )
            lam = lam if a.name == "trace" else (a.kl_lambda0 if mode.startswith("opsd") else 0.0)
            idx = prompt_indices(step, r.prompts_per_step, len(train), config.seed)
            chosen = [train[i] for i in idx]
            prompt, valid = encoder.student(chosen)
            rng = jax.random.fold_in(jax.random.key(config.seed), step)
            placed = sharding.shard_rows((prompt, valid), mesh)
            out = sharding.to_host(generate(state["params"], *placed, rng, None))
            examples = [e for e in chosen for _ in range(r.group_size)]
            texts = [
                tokenizer.decode(row[m]) for row, m in zip(out["response"], out["response_mask"])
            ]
            rewards, vstats = rl.score_rewards(verifier, texts, [e.answer for e in examples])
            batch, host_m, use_teacher = rl.build_batch(
                out,
                examples,
                rewards,
                group_size=r.group_size,
                tokenizer=tokenizer,
                encoder=encoder,
                algo=a,
                annotator=annotator,
                lam=lam,
                divergence_fn=functools.partial(_divergence, divergence, state["params"], mesh),
            )
            state, m = rl_step(
                state, sharding.shard_step_batch(batch, mesh), jnp.float32(lam), use_teacher
            )
            m = {k: float(v) for k, v in jax.device_get(m).items()}
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
    if is_main:
        with paths.open_path(paths.join(config.workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    writer.close()
    verifier.close()
    results["state"] = state
    return results


def _divergence(fn, params, mesh, batch):
    return sharding.to_host(fn(params, sharding.shard_step_batch(batch, mesh)))


def _self_generate(graphdef, get_params, tokenizer, r):
    """generate_fn for self-annotation: the current policy, greedy, prompts cut to fit."""
    budget = 4 * r.max_privileged_len
    cfg = SamplingConfig(
        max_prompt_len=budget,
        max_new_tokens=2 * r.max_new_tokens,
        greedy=True,
        stop_tokens=(tokenizer.eos_id,),
        pad_id=tokenizer.pad_id,
    )
    gen = None

    def generate_text(prompts):
        nonlocal gen
        if gen is None:
            model_cfg = engine.model_config_of(graphdef, get_params())
            gen = engine.select(graphdef, cfg, model_cfg, r.engine, r.decode_slots)
        ids = [tokenizer.encode(p)[-budget:] for p in prompts]
        from jaxtrace.rollout import left_pad  # noqa: PLC0415

        out = gen(get_params(), *left_pad(ids, budget, tokenizer.pad_id), jax.random.key(0), None)
        out = jax.tree.map(np.asarray, out)
        return [tokenizer.decode(row[m]) for row, m in zip(out["response"], out["response_mask"])]

    return generate_text
