"""The jitted pure functions of training: `state, batch -> state, metrics`.

A batch lays every sequence out as a left-padded prompt of fixed width P followed by a
right-padded response of width N, so the response token t sits at P + t for the student and at
Q + t for the teacher (privileged prompt of width Q): alignment is a static slice.

Batch keys (R rows): prompt [R, P], prompt_valid [R, P], response [R, N], response_mask [R, N];
for RL also advantages [R], route [R, N] (jaxtrace.losses.trace routes), and, when the teacher is
used, privileged [R, Q], privileged_valid [R, Q]. For SFT, prompt/response are the supervised
pair and the loss is cross-entropy on the response tokens.

Optional RL keys, computed once per rollout batch before its updates (`make_logprob_fn`,
`make_teacher_hidden_fn`): old_logp [R, N] (the behaviour policy's log-probs; without it the
step is on-policy, old = stop_gradient(current)), ref_logp [R, N] (the frozen reference's, for
the reference KL), teacher_hidden [R, N, D] (the privileged teacher's hidden states; without it
the teacher pass runs inside the step).

Micro-batches: every `make_*` takes `micro_batch_rows` (0 = the whole batch): the step then runs
its batch as micro-batches of that many response rows (whole groups) under one `jax.lax.scan`
and makes one update from the fp32 gradient sums, equal to the full-batch step
(`jaxtrace.microbatch`). Whole-batch denominators (token / sequence / constant norms, metric
means, MoE load counts) are computed from the whole batch before the scan.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtrace import microbatch
from jaxtrace.losses import trace as trace_lib
from jaxtrace.losses._reduce import masked_mean
from jaxtrace.models import causal_mask, grow_cache, init_cache, positions_from_valid
from jaxtrace.models.moe import router_loss_from_stats, router_metrics_from_stats, router_stats
from pallas_kernels import span_kl as span_kl_op


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static (hashable) loss settings, from `config.algo`."""

    mode: str = "trace"  # trace | grpo | opsd | opsd+grpo  (dapo / drgrpo are grpo presets)
    eps_low: float = 0.2
    eps_high: float = 0.28
    norm: str = "token"
    max_len: int | None = None
    ref_kl_coef: float = 0.0
    ref_kl_estimator: str = "k3"
    clip_ratio_c: float = 0.0
    opsd_route: int = trace_lib.ROUTE_FKL
    kl_implementation: str | None = None


def make_optimizer(
    lr, warmup_steps: int, grad_clip: float, weight_decay: float, b1: float, b2: float
):
    schedule = optax.constant_schedule(lr)
    if warmup_steps > 0:  # linear from 0; without warm-up the first step already uses lr
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), schedule], [warmup_steps]
        )
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay),
    )


def response_hidden(model, prompt, prompt_valid, response, response_mask, return_aux=False):
    """Hidden states [R, N, D] at the positions that predict each response token (with
    `return_aux`: also the per-layer MoE router aux and the matching token mask).

    `prompt` may have fewer rows than `response`: G prompts for R = G * k responses, response
    row r answering prompt r // k (the sampler's group layout). The prompt then runs once per
    group and its keys/values are shared by the group's k responses, the same function as
    repeating the prompt k times for 1/k of the prompt's work (hybrid models, whose linear
    layers keep no per-token cache, repeat it).
    """
    g, r = prompt.shape[0], response.shape[0]
    if r % g:
        raise ValueError(f"{r} response rows are not a whole number of groups of {g} prompts")
    if g != r and model.cfg.family == "qwen3_hybrid":
        prompt, prompt_valid = (jnp.repeat(x, r // g, axis=0) for x in (prompt, prompt_valid))
    elif g != r:
        return _shared_prompt_hidden(
            model, prompt, prompt_valid, response, response_mask, return_aux
        )
    p, n = prompt.shape[1], response.shape[1]
    tokens = jnp.concatenate([prompt, response], axis=1)
    valid = jnp.concatenate([prompt_valid, response_mask], axis=1)
    out = model(tokens, positions_from_valid(valid), causal_mask(valid), return_aux=return_aux)
    hidden = out[0][:, p - 1 : p - 1 + n]
    return (hidden, out[2], valid) if return_aux else hidden


def _shared_prompt_hidden(model, prompt, prompt_valid, response, response_mask, return_aux):
    """`response_hidden` for G < R: one prompt pass fills a KV cache, which is repeated over each
    group and extended by one response pass. Gradients reach the prompt through the cache."""
    (g, p), (r, n) = prompt.shape, response.shape
    k = r // g
    hidden_p, cache_p, aux_p = model(
        prompt,
        positions_from_valid(prompt_valid),
        causal_mask(prompt_valid),
        init_cache(model.cfg, g, p),
        0,
        return_aux=True,
    )
    cache = grow_cache(cache_p, k, n)
    valid = jnp.concatenate([jnp.repeat(prompt_valid, k, axis=0), response_mask], axis=1)
    hidden_r, _, aux_r = model(
        response,
        positions_from_valid(valid)[:, p:],
        causal_mask(valid).queries_from(p),
        cache,
        p,
        return_aux=True,
    )
    hidden = jnp.concatenate([jnp.repeat(hidden_p[:, -1:], k, axis=0), hidden_r[:, :-1]], axis=1)
    if not return_aux:
        return hidden
    # MoE statistics over the distinct tokens: each prompt token counts once, not k times.
    tokens_valid = jnp.concatenate([prompt_valid.reshape(1, -1), response_mask.reshape(1, -1)], 1)
    aux = [None if a is None else _join_aux(a, b) for a, b in zip(aux_p, aux_r)]
    return hidden, aux, tokens_valid


def _join_aux(a, b):
    def join(x, y):
        if x.ndim == 1:  # per-expert totals
            return x + y
        flat = lambda z: z.reshape(1, -1, z.shape[-1])
        return jnp.concatenate([flat(x), flat(y)], axis=1)

    return jax.tree.map(join, a, b)


# ---------------------------------------------------------------------------- MoE balancing
def student_hidden(model, batch):
    """`response_hidden` of the student, plus the MoE router load-balancing term
    (`router_aux_loss_coef` * loss, 0 for dense models) and its `moe/*` metrics."""
    h, moe_loss, stats = _student_pass(model, batch)
    return h, moe_loss, {} if stats is None else router_metrics_from_stats(model.cfg, stats)


def _student_pass(model, batch, router_totals=None):
    """(hidden [R, N, D], `router_aux_loss_coef` * balancing loss, `router_stats` or None).

    `router_totals` ({"counts_LxE", "tokens"} of the whole batch, `_router_totals`) when `batch`
    is a micro-batch: the loss is then this micro-batch's share of the whole batch's (f_i from
    the whole batch's counts, stop-gradient as in Switch; p_i's sum from this micro-batch)."""
    args = (batch["prompt"], batch["prompt_valid"], batch["response"], batch["response_mask"])
    if model.cfg.family != "qwen3_moe":
        return response_hidden(model, *args), jnp.float32(0.0), None
    h, aux, valid = response_hidden(model, *args, return_aux=True)
    stats = router_stats(aux, valid)
    if stats is None:
        return h, jnp.float32(0.0), None
    lbl = router_loss_from_stats(model.cfg, {**stats, **(router_totals or {})})
    return h, model.cfg.router_aux_loss_coef * lbl, stats


def _uses_router_loss(model_cfg) -> bool:
    return model_cfg.family == "qwen3_moe" and model_cfg.router_aux_loss_coef > 0


def _router_totals(graphdef, params, micro_batches):
    """The whole batch's MoE router counts {"counts_LxE", "tokens"}: a forward-only pre-pass of
    the student over the micro-batches ([M, ...] leaves), no gradient and nothing kept for a
    backward pass. A micro-batch's balancing loss needs them (f_i is over the whole batch), so a
    micro-batched MoE step with `router_aux_loss_coef` > 0 runs the student's decoder one extra
    time forward: about +1/3 of the student pass's FLOPs (+1/4 with remat), no extra memory
    beyond one micro-batch's forward."""
    params = jax.lax.stop_gradient(params)

    def one(mb):
        _, _, stats = _student_pass(nnx.merge(graphdef, params), mb)
        return {"counts_LxE": stats["counts_LxE"], "tokens": stats["tokens"]}

    return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.lax.map(one, micro_batches))


def _router_sums(stats):
    """The summable part of `router_stats` (no static layer list), gradient-free."""
    return {k: jax.lax.stop_gradient(v) for k, v in stats.items() if k != "layers"}


def _moe_layers(model_cfg):
    return tuple(i for i in range(model_cfg.num_layers) if model_cfg.is_moe_layer(i))


def _token_logprobs(model, h_RxNxD, response, impl):
    r, n, d = h_RxNxD.shape
    logp, entropy = span_kl_op.token_logprobs(
        h_RxNxD.reshape(r * n, d),
        model.lm_head_weight().astype(h_RxNxD.dtype),
        response.reshape(r * n),
        implementation=impl,
    )
    return logp.reshape(r, n), jax.lax.stop_gradient(entropy).reshape(r, n)


def _apply_if_finite(optimizer, state, grads, loss, advance=1):
    """One optimizer update, or none at all when the loss or any gradient is not finite."""
    finite = jnp.isfinite(loss) & jnp.all(
        jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    )
    updates, new_opt = optimizer.update(grads, state["opt_state"], state["params"])
    new_params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {
        "params": keep(new_params, state["params"]),
        "opt_state": keep(new_opt, state["opt_state"]),
        "step": state["step"] + jnp.asarray(advance, state["step"].dtype),
    }  # counts iterations (RL: rollout batches), skipped ones included
    return new_state, finite


def sft_loss(graphdef, params, batch, tokens=None, router_totals=None):
    """Mean cross-entropy of the response tokens (+ the MoE balancing term). `tokens` and
    `router_totals`: the whole batch's when `batch` is a micro-batch (its share of the loss)."""
    model = nnx.merge(graphdef, params)
    h, moe_loss, _ = _student_pass(model, batch, router_totals)
    logp, _ = _token_logprobs(model, h, batch["response"], None)
    return -masked_mean(logp, batch["response_mask"], tokens) + moe_loss


def _cast_like(grads, params):
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def make_sft_step(graphdef, optimizer, micro_batch_rows: int = 0):
    """`step(state, batch) -> (state, metrics)`; `micro_batch_rows` as the module says
    (`sft.micro_batch_rows`)."""

    @jax.jit
    def step(state, batch):
        params = state["params"]
        m = microbatch.count(batch, micro_batch_rows, "sft.micro_batch_rows")
        if m == 1:
            loss, grads = jax.value_and_grad(lambda p: sft_loss(graphdef, p, batch))(params)
        else:
            mbs = microbatch.split(batch, m)
            tokens = jnp.sum(batch["response_mask"].astype(jnp.float32))
            model_cfg = nnx.merge(graphdef, params).cfg
            router = _router_totals(graphdef, params, mbs) if _uses_router_loss(model_cfg) else None
            loss_fn = lambda p, mb: (sft_loss(graphdef, p, mb, tokens, router), ({}, {}))  # noqa: E731
            loss, _, _, grads = microbatch.accumulate(loss_fn, params, mbs)
            grads = _cast_like(grads, params)
        state, finite = _apply_if_finite(optimizer, state, grads, loss)
        return state, {"loss": loss, "grad_norm": optax.global_norm(grads), "finite": finite}

    return step


def teacher_hidden(graphdef, params, batch):
    """The privileged teacher's hidden states [R, N, D] on the student's response tokens (same
    weights, stop-gradient, prompt = privileged [R or G, Q])."""
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(params))
    return jax.lax.stop_gradient(
        response_hidden(
            teacher,
            batch["privileged"],
            batch["privileged_valid"],
            batch["response"],
            batch["response_mask"],
        )
    )


def teacher_kl(graphdef, model, params, batch, h_student, route_kl, impl):
    """Routed KL [R, N] between the student and the privileged teacher on the student's own
    response tokens. The teacher's hidden states are `batch["teacher_hidden"]` when the batch
    carries them (computed once per rollout batch by the behaviour weights), else a teacher
    pass of `params` (stop-gradient). Both sides use the current unembedding: the KL op shares
    one W, so after a batch's first update the teacher is the behaviour weights' hidden states
    read through the current W (exact when there is one update per rollout batch)."""
    if "teacher_hidden" in batch:
        h_t = jax.lax.stop_gradient(batch["teacher_hidden"])
    else:
        h_t = teacher_hidden(graphdef, params, batch)
    r, n, d = h_student.shape
    kl = span_kl_op.span_kl(
        h_student.reshape(r * n, d),
        model.lm_head_weight().astype(h_student.dtype),
        route_kl.reshape(r * n),
        h_teacher_TxD=h_t.reshape(r * n, d).astype(h_student.dtype),
        implementation=impl,
    )
    return kl.reshape(r, n)


def rl_totals(batch, lam, cfg: LossConfig):
    """The whole batch's denominators of `rl_loss` (for each of its micro-batches)."""
    return {
        "trace": trace_lib.trace_totals(
            batch["route"], lam, mode=cfg.mode, opsd_route=cfg.opsd_route
        ),
        "response_mask": jnp.sum(batch["response_mask"].astype(jnp.float32)),
    }


def rl_loss(graphdef, params, batch, lam, cfg: LossConfig, use_teacher: bool):
    """(loss, metrics) of one RL update on `batch` (see `trace_lib.trace_loss`)."""
    loss, metrics, stats = _rl_loss(graphdef, params, batch, lam, cfg, use_teacher)
    if stats is not None:
        metrics.update(router_metrics_from_stats(nnx.merge(graphdef, params).cfg, stats))
    return loss, metrics


def _rl_loss(graphdef, params, batch, lam, cfg, use_teacher, totals=None, router_totals=None):
    """(loss, metrics without moe/*, `router_stats` or None); `totals` (`rl_totals`) and
    `router_totals` (`_router_totals`) of the whole batch when `batch` is a micro-batch: the
    loss and every metric but `lambda` are then its share, summing to the whole batch's."""
    totals = rl_totals(batch, lam, cfg) if totals is None else totals
    model = nnx.merge(graphdef, params)
    h, moe_loss, moe_stats = _student_pass(model, batch, router_totals)
    logp, entropy = _token_logprobs(model, h, batch["response"], cfg.kl_implementation)
    route = trace_lib.routes_for_mode(batch["route"], cfg.mode, opsd_route=cfg.opsd_route)
    if use_teacher:
        route_kl = jnp.where(route > 0, route, 0)  # the op's 0 / FKL / RKL codes
        kl = teacher_kl(graphdef, model, params, batch, h, route_kl, cfg.kl_implementation)
    else:
        kl = jnp.zeros_like(logp)
    # Without the behaviour log-probs the step is on-policy: ratio 1, the PG gradient -A grad logp.
    old_logp = batch.get("old_logp", jax.lax.stop_gradient(logp))
    if cfg.ref_kl_coef and "ref_logp" not in batch:
        raise ValueError(f"ref_kl_coef={cfg.ref_kl_coef} needs batch['ref_logp']")
    loss, metrics = trace_lib.trace_loss(
        logp,
        old_logp,
        batch["advantages"],
        batch["route"],
        kl,
        lam,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        ref_logp_BxT=batch.get("ref_logp") if cfg.ref_kl_coef else None,
        ref_kl_coef=cfg.ref_kl_coef,
        ref_kl_estimator=cfg.ref_kl_estimator,
        clip_ratio_c=cfg.clip_ratio_c,
        norm=cfg.norm,
        max_len=cfg.max_len,
        mode=cfg.mode,
        opsd_route=cfg.opsd_route,
        totals=totals["trace"],
    )
    metrics["entropy"] = masked_mean(entropy, batch["response_mask"], totals["response_mask"])
    return loss + moe_loss, metrics, moe_stats


def _rl_grads_micro(graphdef, params, batch, lam, cfg, use_teacher, m):
    """(loss, metrics, fp32-summed grads cast to the params' dtypes) of `rl_loss` on `batch`
    run as `m` micro-batches."""
    model_cfg = nnx.merge(graphdef, params).cfg
    totals = rl_totals(batch, lam, cfg)
    mbs = microbatch.split(batch, m)
    router = _router_totals(graphdef, params, mbs) if _uses_router_loss(model_cfg) else None

    def loss_fn(p, mb):
        loss, metrics, stats = _rl_loss(graphdef, p, mb, lam, cfg, use_teacher, totals, router)
        last = {"lambda": metrics.pop("lambda")}
        return loss, ((metrics, None if stats is None else _router_sums(stats)), last)

    loss, (metrics, stats), last, grads = microbatch.accumulate(loss_fn, params, mbs)
    metrics.update(last)
    if stats is not None:  # loads and the balancing loss's value from the whole batch's sums
        stats = {**stats, "layers": _moe_layers(model_cfg)}
        metrics.update(router_metrics_from_stats(model_cfg, stats))
    return loss, metrics, _cast_like(grads, params)


def make_rl_step(graphdef, optimizer, cfg: LossConfig, micro_batch_rows: int = 0):
    """`step(state, batch, lam, use_teacher, advance=1) -> (state, metrics)`: one optimizer
    update on `batch` (a rollout batch, or a mini-batch of one). `state["step"]` counts rollout
    batches, so it moves by `advance` (traced: 1 on a batch's last update, 0 on the others).
    `micro_batch_rows` (`train.micro_batch_rows`): see the module docstring.
    Compiles at most twice (with / without teacher)."""

    def step(state, batch, lam, use_teacher, advance=1):
        m = microbatch.count(batch, micro_batch_rows, "train.micro_batch_rows")
        if m == 1:
            grad_fn = jax.value_and_grad(
                lambda p: rl_loss(graphdef, p, batch, lam, cfg, use_teacher), has_aux=True
            )
            (loss, metrics), grads = grad_fn(state["params"])
        else:
            loss, metrics, grads = _rl_grads_micro(
                graphdef, state["params"], batch, lam, cfg, use_teacher, m
            )
        state, finite = _apply_if_finite(optimizer, state, grads, loss, advance)
        metrics.update(grad_norm=optax.global_norm(grads), finite=finite)
        return state, metrics

    return jax.jit(step, static_argnums=3, donate_argnums=0)


def _micro_batched(fn, micro_batch_rows):
    """jit of `fn(params, batch) -> [R, ...]` run over micro-batches of `micro_batch_rows` rows
    (`train.micro_batch_rows`; forward only, one micro-batch's activations live at a time)."""

    @jax.jit
    def run(params, batch):
        m = microbatch.count(batch, micro_batch_rows, "train.micro_batch_rows")
        return microbatch.forward(functools.partial(fn, params), batch, m)

    return run


def make_logprob_fn(graphdef, impl=None, micro_batch_rows: int = 0):
    """`fn(params, batch) -> logp [R, N]`: log-probs of the response tokens under `params`
    (0 on padding). The behaviour policy's before a rollout batch's updates (old_logp), or the
    frozen reference's (ref_logp); no gradient, so nothing is kept for a backward pass."""

    def fn(params, batch):
        model = nnx.merge(graphdef, params)
        args = (batch["prompt"], batch["prompt_valid"], batch["response"], batch["response_mask"])
        logp, _ = _token_logprobs(model, response_hidden(model, *args), batch["response"], impl)
        return jnp.where(batch["response_mask"], logp, 0.0)

    return _micro_batched(fn, micro_batch_rows)


def make_teacher_hidden_fn(graphdef, micro_batch_rows: int = 0):
    """`fn(params, batch) -> teacher_hidden [R, N, D]` (see `teacher_hidden`), once per rollout
    batch, so its mini-batch updates reuse one teacher pass."""
    return _micro_batched(functools.partial(teacher_hidden, graphdef), micro_batch_rows)


def make_divergence_fn(graphdef, impl=None, micro_batch_rows: int = 0):
    """`fn(params, batch) -> kl [R, N]`: forward KL(teacher || student) on every response token,
    for the automatic (divergence) annotator."""

    def fn(params, batch):
        model = nnx.merge(graphdef, params)
        h = response_hidden(
            model, batch["prompt"], batch["prompt_valid"], batch["response"], batch["response_mask"]
        )
        route = batch["response_mask"].astype(jnp.int32)  # 1 = FKL on every response token
        return teacher_kl(graphdef, model, params, batch, h, route, impl)

    return _micro_batched(fn, micro_batch_rows)
