"""Convert between jaxtrace (Orbax) checkpoints and Hugging Face folders.

    # Orbax checkpoint -> HF folder (safetensors + config.json [+ tokenizer files]):
    python -m jaxtrace.export --ckpt=runs/tiny/ckpt --out=hf_out [--step=N] [--dtype=bfloat16]
    # HF folder -> Orbax checkpoint (usable as --config.init_from=ckpt:DIR):
    python -m jaxtrace.export --from_hf=Qwen3-1.7B --out=ckpt_dir

The model config is read from the run's `config.json` (next to `ckpt/`) or from `--run_config`.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_CKPT = flags.DEFINE_string("ckpt", None, "Orbax checkpoint directory (e.g. runs/x/ckpt).")
_FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face folder to convert to Orbax.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_RUN_CONFIG = flags.DEFINE_string(
    "run_config", None, "The run's config.json (default: ../config.json beside --ckpt)."
)
_DTYPE = flags.DEFINE_string("dtype", None, "Weight dtype of the HF export (default: params').")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer_dir", None, "Copy tokenizer files from here into the HF export."
)


def model_config_of_run(ckpt_dir: str, run_config: str | None):
    from jaxtrace.models.config import ModelConfig  # noqa: PLC0415

    path = run_config or os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no run config at {path!r}; pass --run_config")
    with open(path) as f:
        model = json.load(f)["model"]
    for key in ("mlp_only_layers", "hybrid_layers"):
        model[key] = tuple(model.get(key) or ())
    return ModelConfig(**model)


def orbax_to_hf(ckpt_dir, out_dir, step=None, run_config=None, dtype=None, tokenizer_dir=None):
    from jaxtrace import checkpoint  # noqa: PLC0415
    from jaxtrace.models import abstract_model, hf  # noqa: PLC0415

    cfg = model_config_of_run(ckpt_dir, run_config)
    _, abstract = abstract_model(cfg)
    params, step = checkpoint.restore_params(os.path.abspath(ckpt_dir), abstract, step)
    hf.save_hf(cfg, params, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
    return step


def hf_to_orbax(hf_dir, out_dir):
    import jax.numpy as jnp  # noqa: PLC0415

    from jaxtrace import checkpoint  # noqa: PLC0415
    from jaxtrace.config import base  # noqa: PLC0415
    from jaxtrace.models import hf  # noqa: PLC0415

    cfg, _, params = hf.load_hf(hf_dir)
    ckpt = checkpoint.Checkpointer(
        os.path.join(os.path.abspath(out_dir), "ckpt"), keep=1, async_save=False
    )
    ckpt.save(0, {"params": params, "step": jnp.int32(0)}, {"source": hf_dir}, force=True)
    ckpt.close()
    run = base()
    run.model.update({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(run.to_json_best_effort(indent=2))
    return os.path.join(out_dir, "ckpt")


def main(argv):
    del argv
    if bool(_CKPT.value) == bool(_FROM_HF.value):
        print(
            "error: give exactly one of --ckpt (Orbax -> HF) and --from_hf (HF -> Orbax)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        if _CKPT.value:
            step = orbax_to_hf(
                _CKPT.value,
                _OUT.value,
                _STEP.value,
                _RUN_CONFIG.value,
                _DTYPE.value,
                _TOKENIZER.value,
            )
            print(f"wrote HF folder {_OUT.value} from step {step} of {_CKPT.value}")
        else:
            path = hf_to_orbax(_FROM_HF.value, _OUT.value)
            print(f"wrote Orbax checkpoint {path}; use --config.init_from=ckpt:{path}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
