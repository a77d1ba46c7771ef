"""Model FLOPs of the training programs, the numerator of MFU.

The usual convention (PaLM appendix B; MaxText's `calculate_tflops_training_per_device`):
matmul FLOPs of the model as written, 2 per multiply-add, a backward pass costing twice its
forward, activation recomputation (remat) NOT counted, embedding lookups, norms, softmax and the
optimizer not counted. Per forward token:

    2 * (matmul params of its layers)                     q/k/v/o, MLP (MoE: the k active experts
                                                          and the router), per layer
  + 2 * 2 * heads * head_dim * (keys it attends to)       scores and values, per layer
  + 2 * D * V                                             the LM head, where logits are taken

Attention counts the keys a causal row really sees (t + 1 for the t-th token of a sequence, the
whole prompt plus its own prefix for a response token of the shared-prompt layout), not the
padded rectangle; a hybrid layer sees at most its window, plus its linear state
(2 * 2 * heads * Dk * head_dim per token). Every position of the padded shapes is counted:
that is what the program computes.

The RL step (`steps.rl_loss`): the student forward + backward over G prompts of width P shared by
R = G * k responses of width N, the LM head on the response; with the teacher, a forward over the
privileged prompts (width Q) and the same responses (skipped when the batch carries
`teacher_hidden`), and the teacher's LM head for the KL.
"""

from __future__ import annotations

from jaxtrace.models.config import ModelConfig


def _layer_matmul_params(cfg: ModelConfig, layer: int) -> int:
    d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = d * dh * (h + 2 * k) + h * dh * d
    if cfg.is_moe_layer(layer):
        mlp = cfg.num_experts_per_tok * 3 * d * cfg.moe_intermediate_size + d * cfg.num_experts
    else:
        mlp = 3 * d * cfg.intermediate_size
    return attn + mlp


def _seen_keys(prefix: int, length: int, window: int | None) -> float:
    """Sum over the `length` tokens of a causal run that follows `prefix` visible keys of the
    keys each sees (itself included), capped at `window` when given."""
    # token t sees prefix + t + 1 keys: the sum of x over x in [prefix + 1, prefix + length]
    lo, hi = prefix + 1, prefix + length
    if window is None or hi <= window:
        return (lo + hi) * length / 2
    below = max(0, window - lo + 1)  # tokens that see fewer than `window` keys
    return (lo + lo + below - 1) * below / 2 + (length - below) * window


def forward_flops(cfg: ModelConfig, rows: int, prefix: int, length: int, head_tokens: int) -> float:
    """Forward FLOPs of `rows` sequences of `length` new tokens, each after `prefix` cached
    keys (0 for a plain causal pass), with the LM head on `head_tokens` tokens in all."""
    tokens = rows * length
    total = 2.0 * cfg.hidden_size * cfg.vocab_size * head_tokens
    for layer in range(cfg.num_layers):
        total += 2.0 * _layer_matmul_params(cfg, layer) * tokens
        window = cfg.hybrid_window if cfg.is_hybrid_layer(layer) else None
        keys = rows * _seen_keys(prefix, length, window)
        total += 4.0 * cfg.num_heads * cfg.head_dim * keys
        if window is not None:  # the linear state: read and update, per head and token
            total += 4.0 * cfg.num_heads * cfg.head_dim * cfg.head_dim * tokens
    return total


def response_pass_flops(cfg: ModelConfig, prompts: int, p: int, rows: int, n: int) -> float:
    """Forward FLOPs of `steps.response_hidden` + the LM head on the response: the prompts once
    (shared by their groups unless the model is hybrid, which repeats them), then the
    responses after them."""
    if prompts != rows and cfg.family == "qwen3_hybrid":
        prompts = rows
    if prompts == rows:  # one causal pass over [prompt | response]
        return forward_flops(cfg, rows, 0, p + n, rows * n)
    return forward_flops(cfg, prompts, 0, p, 0) + forward_flops(cfg, rows, p, n, rows * n)


def rl_step_flops(cfg: ModelConfig, batch_shapes: dict) -> float:
    """Model FLOPs of one `steps.rl_loss` update (forward + backward) on a batch with these
    shapes ({key: shape}, as `jax.eval_shape` gives them)."""
    (g, p), (r, n) = batch_shapes["prompt"], batch_shapes["response"]
    total = 3.0 * response_pass_flops(cfg, g, p, r, n)  # student: forward + backward
    if "privileged" in batch_shapes:
        head = 2.0 * cfg.hidden_size * cfg.vocab_size * r * n
        if "teacher_hidden" in batch_shapes:
            total += head  # the teacher's logits from its precomputed hidden states
        else:
            gq, q = batch_shapes["privileged"]
            total += response_pass_flops(cfg, gq, q, r, n)
    return total


def logprob_flops(cfg: ModelConfig, batch_shapes: dict) -> float:
    """`steps.make_logprob_fn`: one forward with the LM head on the response."""
    (g, p), (r, n) = batch_shapes["prompt"], batch_shapes["response"]
    return response_pass_flops(cfg, g, p, r, n)


def teacher_hidden_flops(cfg: ModelConfig, batch_shapes: dict) -> float:
    """`steps.make_teacher_hidden_fn`: the privileged forward, no LM head."""
    (g, q), (r, n) = batch_shapes["privileged"], batch_shapes["response"]
    head = 2.0 * cfg.hidden_size * cfg.vocab_size * r * n
    return response_pass_flops(cfg, g, q, r, n) - head


def sft_step_flops(cfg: ModelConfig, batch_shapes: dict) -> float:
    """`steps.sft_loss`: forward + backward with the LM head on the response."""
    (g, p), (r, n) = batch_shapes["prompt"], batch_shapes["response"]
    return 3.0 * response_pass_flops(cfg, g, p, r, n)
