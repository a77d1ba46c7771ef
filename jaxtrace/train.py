"""Train with TRACE (or a baseline):

    python -m jaxtrace.train --config=configs/tiny.py
    python -m jaxtrace.train --config=configs/tiny.py --config.algo.name=grpo \
        --config.workdir=runs/tiny_grpo

Every `--config.<key>=<value>` overrides the config file; an unknown key is an error naming it.
Exit codes: 0 done (or preempted and saved), 2 bad configuration or input.
"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxtrace.config import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py), e.g. configs/tiny.py.", lock_config=True
)
flags.mark_flags_as_required(["config"])
_DISTRIBUTED = flags.DEFINE_bool(
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    maybe_initialize_distributed(_DISTRIBUTED.value)
    import jax  # noqa: PLC0415

    jax.config.update("jax_threefry_partitionable", True)
    from jaxtrace import trainer  # noqa: PLC0415

    try:
        results = trainer.run(_CONFIG.value)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    results.pop("state", None)
    if jax.process_index() == 0:
        print(summary(results))
        print(json.dumps({k: v for k, v in results.items() if k not in ("before", "after")}))


def parse_flags(argv):
    """absl flag parsing, but a bad flag or config override is one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 (flags and config_flags raise many types)
        msg = str(e).strip()
        while len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":  # KeyError quotes twice
            msg = msg[1:-1]
        msg = msg or type(e).__name__
        if isinstance(e, AttributeError | KeyError):
            bad = [a.split("=")[0] for a in argv if a.startswith("--config.") and msg in a]
            msg = f"unknown config key {bad[0][len('--config.') :]!r}" if bad else msg
        print(f"error: bad flag or config override: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
