"""Model configuration: one frozen dataclass for the Qwen3 family, presets, config.json mapping."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxtrace.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Activation checkpointing of each decoder layer in training passes (`qwen3.REMAT_POLICIES`):
# "none" keeps every activation, "full" recomputes the layer in the backward pass, "dots" keeps
# the outputs of the weight matmuls (no batch dims: projections and MLP, not attention scores).
REMAT = ("none", "full", "dots")


def period(kinds) -> int:
    """The smallest p dividing len(kinds) with kinds[i] == kinds[i % p] for every i."""
    n = len(kinds)
    return next(
        p for p in range(1, n + 1) if n % p == 0 and all(kinds[i] == kinds[i % p] for i in range(n))
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Qwen3-family decoder.

    `family` selects the block type: "qwen3" (dense), "qwen3_moe" (routed experts) or "qwen3_hybrid"
    (linear / hybrid attention in `hybrid_layers`).
    """

    vocab_size: int = 151_936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40_960
    dtype: str = "float32"  # compute dtype of activations
    param_dtype: str = "float32"  # storage dtype of parameters
    family: str = "qwen3"
    # Mixture of experts (family == "qwen3_moe").
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    moe_implementation: str = ""  # moe_dispatch.IMPLEMENTATIONS; "" = best available
    moe_capacity_factor: float = 0.0  # 0 = dropless; else per-expert capacity factor
    moe_global_lbl: bool = False  # balance each layer over the global batch (models.moe)
    # Linear / hybrid attention (family == "qwen3_hybrid").
    hybrid_layers: tuple[int, ...] = ()
    hybrid_window: int = 64
    hybrid_chunk: int = 64
    hybrid_feature_map: str = "softmax_dim"  # name in linear_attention.feature_maps
    hybrid_gate: str = "key"  # "key": per-head decay from the key projection (Liger) | "none"
    hybrid_gate_normalizer: float = 16.0  # log_g = logsigmoid(mean_d k_normed) / normalizer
    hybrid_alpha: float = 1.0  # weight of the window softmax (1: dense-exact when T <= window)
    hybrid_beta: float = 0.5  # weight of the linear attention beyond the window
    hybrid_implementation: str = "xla"  # linear_attention.IMPLEMENTATIONS
    # Activation checkpointing of each decoder layer in training: one of REMAT (True = "full",
    # False = "none", for older configs).
    remat: str = "none"
    # Run the layers under `jax.lax.scan` over stacked params (compile time independent of depth);
    # False runs the same stacked params in an unrolled Python loop (debugging, reference).
    scan_layers: bool = True
    # Softmax attention (jaxtrace.models.attention): "" = per platform (TPU splash, else the
    # chunked online softmax; dense for decode steps and shapes within one block), or one of
    # attention.IMPLEMENTATIONS.
    attention_impl: str = ""
    attention_block: int = 512  # query / key block of the chunked path

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(
                    f"ModelConfig.{name}={getattr(self, name)!r}; use one of {list(_DTYPES)}"
                )
        if self.family not in ("qwen3", "qwen3_moe", "qwen3_hybrid"):
            raise ValueError(f"ModelConfig.family={self.family!r} is not a known model family")
        if self.family == "qwen3_moe" and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ValueError(
                f"ModelConfig: num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"[1, num_experts={self.num_experts}] for qwen3_moe"
            )
        if isinstance(self.remat, bool):  # configs from before the policy names
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if self.remat not in REMAT:
            raise ValueError(f"ModelConfig.remat={self.remat!r}; use one of {REMAT}")
        if self.attention_impl and self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r}; use one of "
                f"{list(ATTENTION_IMPLEMENTATIONS)} or '' (per platform)"
            )
        if not isinstance(self.attention_block, int) or self.attention_block <= 0:
            raise ValueError(
                f"ModelConfig.attention_block must be a positive int, got {self.attention_block!r}"
            )
        if self.moe_capacity_factor < 0:
            raise ValueError(
                f"ModelConfig.moe_capacity_factor={self.moe_capacity_factor} must be >= 0 "
                "(0 = dropless)"
            )

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.family == "qwen3_moe"
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def is_hybrid_layer(self, i: int) -> bool:
        return self.family == "qwen3_hybrid" and i in self.hybrid_layers

    @property
    def param_period(self) -> int:
        """Layer i's params sit at index i // p of stack i % p (`params["layers"][i % p]`,
        leading axis num_layers / p), p the period of the MoE / dense pattern. Hybrid layers
        have the dense layers' params, so a dense checkpoint loads into a linearised config."""
        return period([self.is_moe_layer(i) for i in range(self.num_layers)])

    @property
    def scan_period(self) -> int:
        """Layers per scanned block: the period of the (MoE, hybrid) pattern, a multiple of
        `param_period`. num_layers when the pattern does not repeat (then one block, unrolled)."""
        kinds = [(self.is_moe_layer(i), self.is_hybrid_layer(i)) for i in range(self.num_layers)]
        return period(kinds)

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        d, f, h, k, dh = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * dh * (h + 2 * k) + h * dh * d + 2 * dh
        total = 0
        for i in range(self.num_layers):
            if self.is_moe_layer(i):
                mlp = self.num_experts * 3 * d * self.moe_intermediate_size + d * self.num_experts
            else:
                mlp = 3 * d * f
            total += attn + mlp + 2 * d
        emb = self.vocab_size * d
        return total + emb * (1 if self.tie_word_embeddings else 2) + d


# ---------------------------------------------------------------------------- presets
def tiny(vocab_size: int = 512) -> ModelConfig:
    """A few-hundred-k-parameter Qwen3 for CPU tests and the embedded default."""
    return ModelConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rope_theta=10_000.0,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )


def qwen3_0p6b() -> ModelConfig:
    return ModelConfig(
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )


def qwen3_1p7b() -> ModelConfig:
    return ModelConfig(
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )


def qwen3_4b() -> ModelConfig:
    return ModelConfig(
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )


def qwen3_8b() -> ModelConfig:
    return ModelConfig(
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    )


def qwen3_30b_a3b() -> ModelConfig:
    return ModelConfig(
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        tie_word_embeddings=False,
        family="qwen3_moe",
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
    )


PRESETS = {
    "tiny": tiny,
    "qwen3_0p6b": qwen3_0p6b,
    "qwen3_1p7b": qwen3_1p7b,
    "qwen3_4b": qwen3_4b,
    "qwen3_8b": qwen3_8b,
    "qwen3_30b_a3b": qwen3_30b_a3b,
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]().replace(**overrides)


# ---------------------------------------------------------------------------- HF config.json
_ARCH = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def from_hf_dict(hf: dict[str, Any], **overrides) -> ModelConfig:
    """Builds a ModelConfig from a Hugging Face `config.json` dict (Qwen3 or Qwen3-MoE)."""
    model_type = hf.get("model_type", "qwen3")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise ValueError(f"config.json model_type={model_type!r}: jaxtrace reads qwen3 / qwen3_moe")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"config.json rope_type={rope.get('rope_type')!r} is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    if hf.get("use_sliding_window"):
        raise ValueError("config.json use_sliding_window=true is not supported")
    heads = hf["num_attention_heads"]
    kw = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 40_960),
        family=model_type,
    )
    if model_type == "qwen3_moe":
        kw.update(
            # transformers >= 5 writes num_local_experts; older configs num_experts.
            num_experts=hf.get("num_experts", hf.get("num_local_experts")),
            num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["moe_intermediate_size"],
            norm_topk_prob=hf.get("norm_topk_prob", False),  # Qwen3MoeConfig's default
            decoder_sparse_step=hf.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(hf.get("mlp_only_layers") or ()),
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        )
    kw.update(overrides)
    return ModelConfig(**kw)


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` dict that `transformers` loads for this model."""
    if cfg.family == "qwen3_hybrid":
        # Hybrid layers reuse the dense attention weights unchanged: export as plain Qwen3
        # (transformers then runs full softmax attention in every layer).
        cfg = cfg.replace(family="qwen3", hybrid_layers=())
    if cfg.family not in _ARCH:
        raise ValueError(f"family {cfg.family!r} has no Hugging Face architecture to export to")
    hf = {
        "architectures": [_ARCH[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "torch_dtype": cfg.param_dtype,
        "dtype": cfg.param_dtype,
    }
    if cfg.family == "qwen3_moe":
        hf.update(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=list(cfg.mlp_only_layers),
            router_aux_loss_coef=cfg.router_aux_loss_coef,
        )
    return hf
