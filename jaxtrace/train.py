r"""Train with TRACE (or a baseline):

    python -m jaxtrace.train --config=configs/tiny.py
    python -m jaxtrace.train --config=configs/tiny.py --config.algo.name=grpo \
        --config.workdir=runs/tiny_grpo

Every `--config.<key>=<value>` overrides the config file; an unknown key is an error naming it.
Exit codes: 0 done (or preempted and saved), 2 bad configuration or input (one line naming the
key or file), 3 the workdir is in use by another run (jaxtrace.workdir_lock).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

from absl import app, flags
from ml_collections import config_flags

from jaxtrace import cli

_F = SimpleNamespace()  # the flags, once define_flags() has run (only when run as a program)


def define_flags() -> None:
    _F.config = config_flags.DEFINE_config_file(
        "config",
        None,
        "Path to a config file (configs/*.py), e.g. configs/tiny.py.",
        lock_config=True,
    )
    flags.mark_flags_as_required(["config"])
    _F.distributed = flags.DEFINE_bool(
        "distributed",
        None,
        "Call jax.distributed.initialize() (default: only when more than one "
        "host is detected from the environment, e.g. on a multi-host TPU pod).",
    )


def maybe_initialize_distributed(force: bool | None) -> None:
    import os  # noqa: PLC0415

    import jax  # noqa: PLC0415

    multi_host = (
        any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS"))
        or int(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",")) > 0
    )
    if force or (force is None and multi_host):
        jax.distributed.initialize()


def summary(results: dict) -> str:
    from jaxtrace.metrics import table  # noqa: PLC0415

    rows = []
    for tag in ("before", "after"):
        if tag in results:
            rows.append({"when": f"{tag} RL", **results[tag]})
    cols = ["when"] + sorted({k for r in rows for k in r if k != "when"})
    return table(rows, cols)


def main(argv):
    del argv
    cli.setup_logging()
    maybe_initialize_distributed(_F.distributed.value)
    import jax  # noqa: PLC0415

    jax.config.update("jax_threefry_partitionable", True)
    from jaxtrace import trainer  # noqa: PLC0415

    results = cli.run_guarded(trainer.run, _F.config.value)
    results.pop("state", None)
    if jax.process_index() == 0:
        print(summary(results))
        print(json.dumps({k: v for k, v in results.items() if k not in ("before", "after")}))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
