"""Convert between jaxtrace (Orbax) checkpoints and Hugging Face folders.

    # Orbax checkpoint -> HF folder (safetensors + config.json [+ tokenizer files]):
    python -m jaxtrace.export --ckpt=runs/tiny/ckpt --out=hf_out [--step=N] [--dtype=bfloat16]
    # HF folder -> a run folder DIR (DIR/ckpt + DIR/config.json), usable as
    # --config.init_from=ckpt:DIR and as --ckpt=DIR of this tool and of jaxtrace.eval:
    python -m jaxtrace.export --from_hf=Qwen3-1.7B --out=DIR

The model config is read from the run's `config.json` (beside `ckpt/`) or from `--run_config`.
Flags are defined only when this module runs as a program (`define_flags`), so importing its
functions (jaxtrace.eval does) defines none.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from absl import app, flags

from jaxtrace import cli, paths
from jaxtrace.errors import InputError, reading

_F = SimpleNamespace()  # the flags, once define_flags() has run (only when run as a program)


def define_flags() -> None:
    _F.ckpt = flags.DEFINE_string(
        "ckpt", None, "Orbax checkpoint directory (runs/x/ckpt), or a run folder holding ckpt/."
    )
    _F.from_hf = flags.DEFINE_string("from_hf", None, "Hugging Face folder to convert to Orbax.")
    _F.out = flags.DEFINE_string("out", None, "Output directory.", required=True)
    _F.step = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    _F.run_config = flags.DEFINE_string(
        "run_config", None, "The run's config.json (default: ../config.json beside --ckpt)."
    )
    _F.dtype = flags.DEFINE_string(
        "dtype", None, "Weight dtype of the HF export (default: params')."
    )
    _F.tokenizer = flags.DEFINE_string(
        "tokenizer_dir", None, "Copy tokenizer files from here into the HF export."
    )


def resolve_run(path: str) -> tuple[str, str]:
    """(checkpoint directory, run config.json) of `path`: a run folder (`ckpt/` and
    `config.json` inside, as training and `--from_hf` write it) or its `ckpt/` directory."""
    path = paths.absolute(path.rstrip("/") or path)
    if paths.exists(paths.join(path, "config.json")) and paths.exists(paths.join(path, "ckpt")):
        return paths.join(path, "ckpt"), paths.join(path, "config.json")
    parent = path.rsplit("/", 1)[0] if paths.is_remote(path) else os.path.dirname(path)
    return path, paths.join(parent, "config.json")


def read_run_config(path: str) -> dict:
    """A run's config.json as a dict (InputError naming the file if it is not one)."""
    if not paths.exists(path):
        raise FileNotFoundError(f"no run config at {path!r}; pass --run_config")
    with reading(path, "run config"), paths.open_path(path, "rb") as f:
        run = json.loads(f.read().decode("utf-8"))
    if not isinstance(run, dict) or not isinstance(run.get("model"), dict):
        raise InputError(f"run config {path!r} has no 'model' section")
    return run


def model_config_of_run(ckpt_dir: str, run_config: str | None):
    """The ModelConfig of the run that wrote `ckpt_dir` (a run folder or its ckpt/)."""
    from jaxtrace.models.config import ModelConfig  # noqa: PLC0415

    path = run_config or resolve_run(ckpt_dir)[1]
    model = dict(read_run_config(path)["model"])
    for key in ("mlp_only_layers", "hybrid_layers"):
        model[key] = tuple(model.get(key) or ())
    try:
        return ModelConfig(**model)
    except (TypeError, ValueError) as e:
        raise InputError(f"run config {path!r}: bad 'model' section: {e}") from None


def orbax_to_hf(ckpt_dir, out_dir, step=None, run_config=None, dtype=None, tokenizer_dir=None):
    from jaxtrace import checkpoint  # noqa: PLC0415
    from jaxtrace.models import abstract_model, hf  # noqa: PLC0415

    cfg = model_config_of_run(ckpt_dir, run_config)
    _, abstract = abstract_model(cfg)
    params, step = checkpoint.restore_params(resolve_run(ckpt_dir)[0], abstract, step)
    hf.save_hf(cfg, params, out_dir, tokenizer_dir=tokenizer_dir, dtype=dtype)
    return step


def load_hf_checked(hf_dir, load=None, **kwargs):
    """`hf.load_hf(hf_dir)` (or `load(...)`), with a folder that is not a readable Qwen3 HF
    export (config.json missing a key or not JSON; safetensors truncated, header-only or not
    safetensors at all, e.g. a pickle) raised as an InputError naming the folder and the cause."""
    from jaxtrace.models import hf  # noqa: PLC0415

    load = load or hf.load_hf
    if not os.path.isdir(hf_dir):
        raise InputError(f"HF folder {hf_dir!r} is not a directory")
    try:
        with reading(hf_dir, "HF folder"):
            return load(hf_dir, **kwargs)
    except (InputError, FileNotFoundError):
        raise
    except ValueError as e:  # a shape / tensor mismatch: hf.py's message names the tensor
        raise InputError(f"HF folder {hf_dir!r}: {e}") from None
    except KeyError as e:
        raise InputError(f"HF folder {hf_dir!r}: config.json has no key {e}") from None
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError)
        if type(e).__name__ in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall") or (
            "safetensor" in type(e).__module__.lower()
        ):
            raise InputError(
                f"HF folder {hf_dir!r}: a weight file is not valid safetensors ({e})"
            ) from None
        if isinstance(e, TypeError | AttributeError):
            raise InputError(
                f"HF folder {hf_dir!r}: config.json is not a Qwen3 config ({e})"
            ) from None
        raise


def hf_to_orbax(hf_dir, out_dir):
    import jax.numpy as jnp  # noqa: PLC0415

    from jaxtrace import checkpoint  # noqa: PLC0415
    from jaxtrace.config import base  # noqa: PLC0415

    cfg, _, params = load_hf_checked(hf_dir)
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
    cli.setup_logging()
    if bool(_F.ckpt.value) == bool(_F.from_hf.value):
        cli.fail("give exactly one of --ckpt (Orbax -> HF) and --from_hf (HF -> Orbax)")
    if _F.ckpt.value:
        step = cli.run_guarded(
            orbax_to_hf,
            _F.ckpt.value,
            _F.out.value,
            _F.step.value,
            _F.run_config.value,
            _F.dtype.value,
            _F.tokenizer.value,
        )
        print(f"wrote HF folder {_F.out.value} from step {step} of {_F.ckpt.value}")
    else:
        path = cli.run_guarded(hf_to_orbax, _F.from_hf.value, _F.out.value)
        print(f"wrote Orbax checkpoint {path}; use --config.init_from=ckpt:{_F.out.value}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
