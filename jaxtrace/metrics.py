"""Run logging: TensorBoard scalars, a JSONL history, console lines and progress bars."""

from __future__ import annotations

import json
import sys

import numpy as np

from jaxtrace import paths


class MetricWriter:
    """Writes scalars to TensorBoard (`workdir/tb`) and `workdir/metrics.jsonl` (process 0)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        self.history = None
        if enabled:
            paths.makedirs(workdir)
            from tensorboardX import SummaryWriter  # noqa: PLC0415

            # tensorboardX writes gs:// itself (google-cloud-storage, in the [tpu] extra).
            self.tb = SummaryWriter(paths.join(workdir, "tb"))
            self.history = paths.open_path(paths.join(workdir, "metrics.jsonl"), "a")

    def write(self, step: int, scalars: dict, prefix: str = ""):
        if not self.enabled:
            return
        clean = {}
        for k, v in scalars.items():
            v = float(np.asarray(v))
            clean[prefix + k] = v
            self.tb.add_scalar(prefix + k, v, step)
        self.history.write(json.dumps({"step": step, **clean}) + "\n")
        self.history.flush()

    def close(self):
        if self.enabled:
            self.tb.close()
            self.history.close()


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar on stderr (a no-op object when disabled or not a terminal in CI)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table (for accuracy summaries and benchmarks)."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
