"""Held-out accuracy of a checkpoint: pass@1 (greedy) and avg@k / pass@k (sampled).

    python -m jaxtrace.eval --ckpt=runs/x/ckpt --data_dir=../shared/data/math_eval \
        --sets=math500,aime24,aime25,amc2023,minervamath,olympiadbench --k=4 --temperature=0.6
    python -m jaxtrace.eval --ckpt=runs/tiny/ckpt --sets=arithmetic     # the embedded task

Each set is `<data_dir>/<name>.jsonl` in the math_eval format (`problem`, `answer`), a path to
any such jsonl, `gsm8k:<path>` for GSM8K format, or `arithmetic` (the generated held-out set of
the run). The tokenizer and prompt template come from the run unless given.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

_CKPT = flags.DEFINE_string("ckpt", None, "Orbax checkpoint directory of a run.", required=True)
_SETS = flags.DEFINE_list("sets", ["math500"], "Comma-separated eval sets (see module doc).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "Folder of <set>.jsonl files.")
_K = flags.DEFINE_integer("k", 1, "Samples per problem for avg@k / pass@k (with temperature).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy (pass@1).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Evaluate at most this many problems per set.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Default: the run's rollout budget.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Prompts per generate call.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer path (default: the run's).")
_OUT = flags.DEFINE_string("out", None, "Also write the results as JSON here.")


def resolve_set(name: str, data_dir: str, run_config, seed: int):
    from jaxtrace.data import tasks  # noqa: PLC0415

    if name == "arithmetic":
        return tasks.arithmetic_examples(
            run_config["data"]["num_train"], run_config["data"]["num_test"], seed
        )[1]
    if name.startswith("gsm8k:"):
        return tasks.gsm8k_examples(name[6:], _LIMIT.value)
    path = name if name.endswith(".jsonl") else os.path.join(data_dir, f"{name}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"eval set {name!r}: {path!r} does not exist (set --data_dir)")
    return tasks.math_examples(path, _LIMIT.value)


def main(argv):
    del argv
    import jax  # noqa: PLC0415

    from jaxtrace import checkpoint, evaluation, metrics, rl  # noqa: PLC0415
    from jaxtrace.data import tokenizer as tok_lib  # noqa: PLC0415
    from jaxtrace.export import model_config_of_run  # noqa: PLC0415
    from jaxtrace.models import abstract_model  # noqa: PLC0415
    from jaxtrace.rewards import MathVerifier  # noqa: PLC0415

    try:
        run_dir = os.path.dirname(os.path.abspath(_CKPT.value))
        with open(os.path.join(run_dir, "config.json")) as f:
            run_config = json.load(f)
        cfg = model_config_of_run(_CKPT.value, None)
        graphdef, abstract = abstract_model(cfg)
        params, step = checkpoint.restore_params(
            os.path.abspath(_CKPT.value), abstract, _STEP.value
        )
        tok_path = (
            _TOKENIZER.value
            or run_config["data"]["tokenizer"]
            or os.path.join(run_dir, "tokenizer.model")
        )
        tokenizer = tok_lib.load(tok_path)
        r = run_config["rollout"]
        encoder = rl.PromptEncoder(
            tokenizer, run_config["data"]["template"], r["max_prompt_len"], r["max_privileged_len"]
        )
        rows = []
        with MathVerifier() as verifier:
            for name in _SETS.value:
                examples = resolve_set(name, _DATA_DIR.value, run_config, run_config["seed"])
                if _LIMIT.value:
                    examples = examples[: _LIMIT.value]
                res = evaluation.evaluate(
                    graphdef,
                    params,
                    examples,
                    tokenizer=tokenizer,
                    encoder=encoder,
                    verifier=verifier,
                    max_new_tokens=_MAX_NEW.value or r["max_new_tokens"],
                    num_samples=_K.value,
                    temperature=_TEMPERATURE.value,
                    batch_size=_BATCH.value,
                    show_progress=True,
                    desc=name,
                )
                rows.append({"set": name, **res})
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        cols = ["set"] + sorted({k for r in rows for k in r if k != "set"})
        print(f"checkpoint {_CKPT.value} step {step}")
        print(metrics.table(rows, cols))
        if _OUT.value:
            with open(_OUT.value, "w") as f:
                json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
