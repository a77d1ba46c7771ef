"""Child-process side of `MathVerifier`: math-verify equivalence, one pair per JSON line.

Runs as a plain script (`python _worker.py [memory_limit_mb [float_rounding]]`), not through
multiprocessing, so the child never re-imports the trainer's `__main__` or jax and starts in
about a second; the parent can then kill it when sympy hangs in C code (huge powers, deep
recursion) where no signal reaches.

Protocol on stdin/stdout, one JSON object per line:
  child -> parent once at start: {"ready": true}
  parent -> child: {"id": int, "gold": str, "pred": str}
  child -> parent: {"id": int, "status": "ok" | "error", "value": bool | str}
An empty line or EOF stops the child.
"""

import json
import logging
import os
import sys


def _load_math_verify(float_rounding: int = 12):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # The parent bounds time by killing this process; math-verify's own signal timeouts are off
    # so a slow case is reported as a timeout by the parent, not silently as "not equal".
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    def _parse(answer: str):
        # Wrapping in \boxed{} makes math-verify take the whole answer, not a fragment of it.
        return parse(
            "\\boxed{" + answer + "}",
            extraction_config=config,
            parsing_timeout=None,
            raise_on_error=True,
        )

    def equivalent(gold: str, pred: str) -> bool:
        gold_parsed = _parse(gold)
        pred_parsed = _parse(pred)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(
            verify(
                gold_parsed,
                pred_parsed,
                float_rounding=float_rounding,
                timeout_seconds=None,
                raise_on_error=True,
            )
        )

    return equivalent


def _limit_self(memory_limit_mb: int) -> None:
    """Best-effort guards for a child running hostile input (Linux; no-ops elsewhere)."""
    try:  # die with the parent, even while stuck in C code, instead of lingering as an orphan
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if memory_limit_mb > 0:
        try:  # a huge power then fails with MemoryError instead of eating the machine
            import resource

            limit = memory_limit_mb << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass


def main() -> None:
    _limit_self(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    if os.getppid() == 1:  # the parent died before the death signal was armed
        return
    # Keep a private handle on the real stdout, then point fd 1 at stderr so stray prints from
    # sympy or C extensions cannot corrupt the protocol stream.
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    equivalent = _load_math_verify(int(sys.argv[2]) if len(sys.argv) > 2 else 12)
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            return
        task = json.loads(line)
        try:
            reply = {
                "id": task["id"],
                "status": "ok",
                "value": equivalent(task["gold"], task["pred"]),
            }
        except Exception as e:  # RecursionError, MemoryError, sympy internals: all score 0
            reply = {"id": task["id"], "status": "error", "value": f"{type(e).__name__}: {e}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
