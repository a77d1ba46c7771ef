"""Tiny random Hugging Face models for parity tests."""

import torch


def tiny_qwen3(
    tmp_path,
    *,
    heads=4,
    kv_heads=2,
    head_dim=16,
    hidden=48,
    layers=2,
    vocab=97,
    tie=False,
    seed=0,
    theta=10_000.0,
    intermediate=80,
):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie,
        rope_theta=theta,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    model = Qwen3ForCausalLM(config).eval().float()
    # Random init of norms too, so that a swapped or skipped norm is caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    path = tmp_path / f"hf_qwen3_{heads}_{kv_heads}_{head_dim}_{tie}"
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


def torch_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=None if attention_mask is None else torch.tensor(attention_mask),
        )
    return out.logits.float().numpy()
