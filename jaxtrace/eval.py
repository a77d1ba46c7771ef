r"""Held-out accuracy of a checkpoint: pass@1 (greedy) and avg@k / pass@k (sampled).

    python -m jaxtrace.eval --ckpt=runs/x/ckpt --data_dir=../shared/data/math_eval \
        --sets=math500,aime24,aime25,amc2023,minervamath,olympiadbench --k=4 --temperature=0.6
    python -m jaxtrace.eval --ckpt=runs/tiny/ckpt --sets=arithmetic     # the embedded task

Each set is `<data_dir>/<name>.jsonl` in the math_eval format (`problem`, `answer`), a path to
any such jsonl, `gsm8k:<path>` for GSM8K format, or `arithmetic` (the generated held-out set of
the run). The tokenizer and prompt template come from the run unless given.

It decodes as the run's in-training eval does: on the run's mesh (`--mesh` to choose another, for
a host with other devices: `--mesh=data=-1`), params restored onto their shards, sampled from the
run's decode-layout copy (`rollout.decode_layout`, in the compute dtype) by the run's engine with
the decode slots its KV-cache budget allows (`rollout.cache_budget_gib`), each batch split over
the mesh's data axes.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from absl import app, flags

from jaxtrace import cli

_F = SimpleNamespace()  # the flags, once define_flags() has run (only when run as a program)


def define_flags() -> None:
    _F.ckpt = flags.DEFINE_string(
        "ckpt",
        None,
        "Orbax checkpoint directory of a run (runs/x/ckpt) or the run folder.",
        required=True,
    )
    _F.sets = flags.DEFINE_list("sets", ["math500"], "Comma-separated eval sets (see module doc).")
    _F.data_dir = flags.DEFINE_string("data_dir", "", "Folder of <set>.jsonl files.")
    _F.k = flags.DEFINE_integer(
        "k", 1, "Samples per problem for avg@k / pass@k (with temperature).", lower_bound=1
    )
    _F.temperature = flags.DEFINE_float("temperature", 0.0, "0 = greedy (pass@1).", lower_bound=0)
    _F.limit = flags.DEFINE_integer(
        "limit", 0, "Evaluate at most this many problems per set.", lower_bound=0
    )
    _F.max_new = flags.DEFINE_integer(
        "max_new_tokens", None, "Default: the run's rollout budget.", lower_bound=1
    )
    _F.batch = flags.DEFINE_integer("batch_size", 64, "Prompts per generate call.", lower_bound=1)
    _F.step = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    _F.tokenizer = flags.DEFINE_string("tokenizer", None, "Tokenizer path (default: the run's).")
    _F.out = flags.DEFINE_string("out", None, "Also write the results as JSON here.")
    _F.mesh = flags.DEFINE_string(
        "mesh",
        "",
        "Mesh axes to decode on, e.g. 'data=-1' or 'data=2,tensor=4' (one -1 fills the devices). "
        "Default: the run's mesh.",
    )


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,tensor=4' -> {"data": 2, "tensor": 4}; a malformed spec is a ValueError naming it."""
    axes = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, size = part.partition("=")
        if not eq or not size.strip().removeprefix("-").isdigit():
            raise ValueError(f"--mesh={spec!r}: want axis=size pairs, e.g. 'data=-1,tensor=2'")
        axes[name.strip()] = int(size)
    if not axes:
        raise ValueError(f"--mesh={spec!r}: no axes")
    return axes


def run_mesh(run_config, spec: str = ""):
    """The mesh eval decodes on: `spec` (--mesh), or the run's own; a mesh that does not fit this
    host's devices is a ValueError that says to pass --mesh."""
    import jax  # noqa: PLC0415

    from jaxtrace import sharding  # noqa: PLC0415

    axes = parse_mesh(spec) if spec else dict(run_config.get("mesh") or {"data": -1})
    try:
        return sharding.make_mesh(axes)
    except ValueError as e:
        where = "--mesh" if spec else "the run's mesh (pass --mesh=data=-1 to use every device)"
        raise ValueError(f"{where}: {e} (this host has {jax.device_count()})") from None


def resolve_set(name: str, data_dir: str, run_config, seed: int, limit: int = 0):
    from jaxtrace.data import tasks  # noqa: PLC0415

    if name == "arithmetic":
        return tasks.arithmetic_examples(
            run_config["data"]["num_train"], run_config["data"]["num_test"], seed
        )[1]
    if name.startswith("gsm8k:"):
        return tasks.gsm8k_examples(name[6:], limit)
    path = name if name.endswith(".jsonl") else os.path.join(data_dir, f"{name}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"eval set {name!r}: {path!r} does not exist (set --data_dir)")
    return tasks.math_examples(path, limit)


def evaluate_run(
    ckpt: str,
    sets: list[str],
    *,
    data_dir: str = "",
    k: int = 1,
    temperature: float = 0.0,
    limit: int = 0,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    step: int | None = None,
    tokenizer: str | None = None,
    mesh: str = "",
):
    """(rows, step): one row of metrics per eval set for checkpoint `ckpt` (a run's ckpt/
    directory or the run folder), decoded on `mesh` (a --mesh spec; "" = the run's)."""

    from jaxtrace import checkpoint, evaluation, rl, sharding  # noqa: PLC0415
    from jaxtrace.config import base  # noqa: PLC0415
    from jaxtrace.data import tokenizer as tok_lib  # noqa: PLC0415
    from jaxtrace.errors import InputError  # noqa: PLC0415
    from jaxtrace.export import model_config_of_run, read_run_config, resolve_run  # noqa: PLC0415
    from jaxtrace.rewards import MathVerifier  # noqa: PLC0415
    from jaxtrace.rollout import layout  # noqa: PLC0415

    ckpt_dir, config_path = resolve_run(ckpt)
    run_dir = os.path.dirname(config_path)
    run_config = read_run_config(config_path)
    cfg = model_config_of_run(ckpt, None)
    device_mesh = run_mesh(run_config, mesh)
    graphdef, abstract = sharding.abstract_placed(cfg, device_mesh)
    try:
        data, r, seed = run_config["data"], run_config["rollout"], run_config["seed"]
        # A run saved before a rollout key existed decodes with that key's default.
        r = SimpleNamespace(**{**base().rollout.to_dict(), **r})
        tok_path = tokenizer or data["tokenizer"] or os.path.join(run_dir, "tokenizer.model")
        template, p_len, q_len = data["template"], r.max_prompt_len, r.max_privileged_len
        max_new_tokens = max_new_tokens or r.max_new_tokens
    except (KeyError, TypeError) as e:
        raise InputError(f"run config {config_path!r} has no key {e}") from None
    params, step = checkpoint.restore_params(ckpt_dir, abstract, step)
    decode = layout.DecodeWeights.from_config(r, cfg, device_mesh)
    tok = tok_lib.load(tok_path)
    encoder = rl.PromptEncoder(tok, template, p_len, q_len)
    rows = []
    v = run_config.get("verifier") or {}
    with (
        MathVerifier(
            timeout_s=v.get("timeout_s", 5.0),
            call_budget_s=max(v.get("call_budget_s", 10.0), v.get("timeout_s", 5.0)),
            call_budget_per_check_s=v.get("call_budget_per_check_s", 0.5),
            float_rounding=v.get("float_rounding", 12),
        ) as verifier,
        sharding.mesh_context(device_mesh),
    ):
        weights = decode(params)
        for name in sets:
            examples = resolve_set(name, data_dir, run_config, seed, limit)
            if limit:
                examples = examples[:limit]
            res = evaluation.evaluate(
                graphdef,
                weights,
                examples,
                tokenizer=tok,
                encoder=encoder,
                verifier=verifier,
                max_new_tokens=max_new_tokens,
                num_samples=k,
                temperature=temperature,
                batch_size=batch_size,
                show_progress=True,
                desc=name,
                mesh=device_mesh,
                engine_name=r.engine,
                decode_slots=r.decode_slots,
                cache_budget_gib=r.cache_budget_gib,
            )
            rows.append({"set": name, **res})
    return rows, step


def main(argv):
    del argv
    cli.setup_logging()
    import jax  # noqa: PLC0415

    from jaxtrace import metrics  # noqa: PLC0415

    rows, step = cli.run_guarded(
        evaluate_run,
        _F.ckpt.value,
        _F.sets.value,
        data_dir=_F.data_dir.value,
        k=_F.k.value,
        temperature=_F.temperature.value,
        limit=_F.limit.value,
        max_new_tokens=_F.max_new.value,
        batch_size=_F.batch.value,
        step=_F.step.value,
        tokenizer=_F.tokenizer.value,
        mesh=_F.mesh.value,
    )
    if jax.process_index() == 0:
        cols = ["set"] + sorted({k for r in rows for k in r if k != "set"})
        print(f"checkpoint {_F.ckpt.value} step {step}")
        print(metrics.table(rows, cols))
        if _F.out.value:
            with open(_F.out.value, "w") as f:
                json.dump(rows, f, indent=2)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
