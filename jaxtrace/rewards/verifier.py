"""Binary math reward: extract the final answer, check it against the gold with math-verify.

Every math-verify call runs in a worker subprocess with a hard wall-clock limit: sympy can hang
in C code (`9^9^9^9`) where math-verify's signal timeout cannot reach, and that timeout does not
work off the main thread anyway. An overrunning worker is killed and restarted; the answer
scores 0 and is counted. Plain numbers on both sides skip the subprocess entirely. A whole
`score` call has a budget too, `call_budget_s + call_budget_per_check_s * checks / num_workers`
(far above what legitimate checks take): checks still pending when it runs out score 0 and
count as time-outs, so a batch of hostile answers costs seconds, not minutes.

Before any of that, answers are cleaned and screened on the host (`jaxtrace.rewards.screen`):
invisible characters removed, answers or golds over `max_answer_chars` and obvious bombs (power
towers, astronomically large powers and factorials, code) scored 0 without reaching sympy.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence

import numpy as np

from jaxtrace.rewards.extract import extract_answer, extract_boxed, parse_plain_number
from jaxtrace.rewards.screen import normalize, reject_reason

_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_worker.py")
STAT_KEYS = ("no_answer", "timeout", "error", "fast_path")


class _Worker:
    """One verifier subprocess plus a line buffer for its stdout."""

    def __init__(self, memory_limit_mb: int, float_rounding: int = 12):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", _WORKER_SCRIPT, str(memory_limit_mb), str(float_rounding)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,  # tracebacks from the child stay visible
            close_fds=True,
        )
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.task: tuple[int, str] | None = None  # (task id, dedupe key)
        self.deadline = float("inf")

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def read_lines(self) -> list[dict] | None:
        """Complete JSON lines available now; None once the child has exited (EOF)."""
        try:
            chunk = os.read(self.fileno(), 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def send(self, task_id: int, key: str, gold: str, pred: str, timeout_s: float) -> bool:
        msg = json.dumps({"id": task_id, "gold": gold, "pred": pred}) + "\n"
        try:
            self.proc.stdin.write(msg.encode("ascii"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        self.task = (task_id, key)
        self.deadline = time.monotonic() + timeout_s
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def stop(self, grace_s: float = 2.0) -> None:
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=grace_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.kill()
    workers.clear()


class MathVerifier:
    """Scores responses 1.0 / 0.0 against gold answers, each check bounded by `timeout_s`.

    Workers are started lazily on the first check that needs math-verify and reused across
    `score` calls. Thread-safe (calls are serialised). Use as a context manager or call
    `close()`; workers are also killed when the parent process exits.

    Args:
      timeout_s: wall-clock limit for one math-verify check (parse both sides + compare).
      num_workers: verifier subprocesses run in parallel.
      call_budget_s, call_budget_per_check_s: wall-clock limit for the math-verify part of one
        `score` call, `call_budget_s + call_budget_per_check_s * n / num_workers` for n checks
        that reach math-verify; checks not done by then score 0 and count as 'timeout' (the
        plain-number fast path is not limited). Legitimate checks take milliseconds to tenths
        of a second; the budget is what a batch of hanging ones may cost.
      float_rounding: decimal places two numbers must agree on (math-verify rounds both sides
        to this many). math-verify's own default, 6, credits 0.3333333 for 1/3; 12 does not,
        and still equates 0.5 with 1/2 or 0.125 with 1/8.
      max_answer_chars: extracted answers (and golds) longer than this score 0 (counted as
        'error') without reaching sympy.
      startup_timeout_s: limit for a fresh worker to import math-verify.
      memory_limit_mb: address-space limit of each worker (Linux), so a hostile answer fails
        with MemoryError instead of exhausting the machine; 0 disables it.
    """

    def __init__(
        self,
        timeout_s: float = 1.0,
        num_workers: int = 1,
        *,
        call_budget_s: float = 10.0,
        call_budget_per_check_s: float = 0.5,
        float_rounding: int = 12,
        max_answer_chars: int = 1000,
        startup_timeout_s: float = 120.0,
        memory_limit_mb: int = 4096,
    ):
        if not (isinstance(timeout_s, int | float) and timeout_s > 0 and np.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
        if not (isinstance(num_workers, int) and num_workers >= 1):
            raise ValueError(f"num_workers must be an int >= 1, got {num_workers!r}")
        if not (isinstance(max_answer_chars, int) and max_answer_chars >= 1):
            raise ValueError(f"max_answer_chars must be an int >= 1, got {max_answer_chars!r}")
        if not (isinstance(memory_limit_mb, int) and memory_limit_mb >= 0):
            raise ValueError(f"memory_limit_mb must be an int >= 0, got {memory_limit_mb!r}")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s!r}")
        if not (isinstance(call_budget_s, int | float) and call_budget_s >= timeout_s):
            raise ValueError(f"call_budget_s must be >= timeout_s, got {call_budget_s!r}")
        if not (isinstance(call_budget_per_check_s, int | float) and call_budget_per_check_s >= 0):
            raise ValueError(
                f"call_budget_per_check_s must be >= 0, got {call_budget_per_check_s!r}"
            )
        if not (isinstance(float_rounding, int) and 1 <= float_rounding <= 15):
            raise ValueError(f"float_rounding must be an int in [1, 15], got {float_rounding!r}")
        self.timeout_s = float(timeout_s)
        self.call_budget_s = float(call_budget_s)
        self.call_budget_per_check_s = float(call_budget_per_check_s)
        self.float_rounding = float_rounding
        self.num_workers = num_workers
        self.max_answer_chars = max_answer_chars
        self.startup_timeout_s = float(startup_timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self.restarts = 0  # workers killed after a timeout or found dead
        self._workers: list[_Worker] = []
        # Kills the workers when this object is collected or at interpreter exit, without
        # keeping `self` alive (the finalizer holds only the list).
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        self._next_id = 0
        self._lock = threading.Lock()
        self._closed = False

    # -- public -----------------------------------------------------------------------------

    def score(
        self, responses: Sequence[str], golds: Sequence[str]
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Rewards float32[N] in {0, 1} and counts {'no_answer', 'timeout', 'error', 'fast_path'}.

        `golds[i]` is the gold answer string (e.g. `gsm8k_gold(...)` or a MATH `answer` field;
        a `\\boxed{}` gold is unwrapped). A response with no extractable answer, a check that
        raises, and a check that overruns `timeout_s` all score 0 and are counted.
        """
        if isinstance(responses, str) or isinstance(golds, str):
            raise ValueError("responses and golds must be sequences of str, not a single str")
        if len(responses) != len(golds):
            raise ValueError(
                f"responses and golds must have the same length, got {len(responses)} "
                f"and {len(golds)}"
            )
        for name, seq in (("responses", responses), ("golds", golds)):
            for i, s in enumerate(seq):
                if not isinstance(s, str):
                    raise ValueError(f"{name}[{i}] must be a str, got {type(s).__name__}")
        rewards = np.zeros(len(responses), dtype=np.float32)
        stats = dict.fromkeys(STAT_KEYS, 0)
        slow: dict[str, tuple[str, str]] = {}  # dedupe key -> (gold, pred)
        slow_index: list[tuple[int, str]] = []
        for i, (response, gold) in enumerate(zip(responses, golds)):
            pred = extract_answer(normalize(response))
            if pred is None:
                stats["no_answer"] += 1
                continue
            gold = normalize(gold)
            gold = extract_boxed(gold) or gold.strip()
            gold_num, pred_num = parse_plain_number(gold), parse_plain_number(pred)
            if gold_num is not None and pred_num is not None:
                rewards[i] = float(gold_num == pred_num)
                stats["fast_path"] += 1
                continue
            if max(len(pred), len(gold)) > self.max_answer_chars or (
                reject_reason(pred) or reject_reason(gold)
            ):
                stats["error"] += 1
                continue
            key = json.dumps([gold, pred])
            slow[key] = (gold, pred)
            slow_index.append((i, key))
        if slow:
            with self._lock:
                if self._closed:
                    raise RuntimeError("MathVerifier is closed")
                outcomes = self._run(slow)
            for i, key in slow_index:
                status, value = outcomes[key]
                if status == "ok":
                    rewards[i] = float(value is True)
                else:
                    stats[status] += 1
        return rewards, stats

    def close(self) -> None:
        """Stops all workers. Idempotent."""
        with self._lock:
            self._closed = True
            for w in self._workers:
                w.stop()
            self._workers.clear()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- scheduling -------------------------------------------------------------------------

    def _new_worker(self) -> _Worker:
        return _Worker(self.memory_limit_mb, self.float_rounding)

    def _replace(self, idx: int) -> None:
        self._workers[idx].kill()
        self._workers[idx] = self._new_worker()
        self.restarts += 1

    def _run(self, tasks: dict[str, tuple[str, str]]) -> dict[str, tuple[str, object]]:
        """Runs each (gold, pred) check on the pool; returns key -> (status, value)."""
        while len(self._workers) < self.num_workers:
            self._workers.append(self._new_worker())
        queue = deque(tasks.items())
        outcomes: dict[str, tuple[str, object]] = {}
        budget = self.call_budget_s + self.call_budget_per_check_s * len(tasks) / self.num_workers
        call_deadline = time.monotonic() + budget
        while queue or any(w.task is not None for w in self._workers):
            if time.monotonic() > call_deadline:  # the budget is spent: the rest score 0
                for key, _ in queue:
                    outcomes[key] = ("timeout", None)
                queue.clear()
                for idx, w in enumerate(self._workers):
                    if w.task is not None:
                        outcomes[w.task[1]] = ("timeout", None)
                        self._replace(idx)
                break
            for w in self._workers:
                while w.ready and w.task is None and queue:
                    key, (gold, pred) = queue.popleft()
                    self._next_id += 1
                    limit = min(self.timeout_s, max(0.0, call_deadline - time.monotonic()))
                    if not w.send(self._next_id, key, gold, pred, limit):
                        queue.appendleft((key, (gold, pred)))  # dead: replaced below on EOF
                        break
            self._wait(call_deadline)
            now = time.monotonic()
            for idx, w in enumerate(self._workers):
                lines = w.read_lines()
                if lines is None:  # the child exited (crash, OOM kill, C stack overflow)
                    if not w.ready:
                        raise RuntimeError(
                            f"math-verify worker exited during startup (code {w.proc.wait()});"
                            f" is math-verify installed for {sys.executable}?"
                        )
                    if w.task is not None:
                        outcomes[w.task[1]] = ("error", "worker died")
                    self._replace(idx)
                    continue
                for msg in lines:
                    if msg.get("ready"):
                        w.ready = True
                    elif w.task is not None and msg.get("id") == w.task[0]:
                        outcomes[w.task[1]] = (msg["status"], msg["value"])
                        w.task, w.deadline = None, float("inf")
                if w.task is not None and now > w.deadline:
                    outcomes[w.task[1]] = ("timeout", None)
                    self._replace(idx)
                elif not w.ready and now - w.started > self.startup_timeout_s:
                    raise RuntimeError(
                        f"math-verify worker did not start within startup_timeout_s="
                        f"{self.startup_timeout_s}"
                    )
        return outcomes

    def _wait(self, until: float = float("inf")) -> None:
        """Blocks until a busy or starting worker has output, or the nearest deadline passes."""
        now = time.monotonic()
        deadline = min(now + self.startup_timeout_s, until)
        with selectors.DefaultSelector() as sel:
            for w in self._workers:
                if w.task is not None:
                    deadline = min(deadline, w.deadline)
                elif not w.ready:
                    deadline = min(deadline, w.started + self.startup_timeout_s)
                else:
                    continue
                sel.register(w.fileno(), selectors.EVENT_READ)
            if sel.get_map():
                sel.select(timeout=max(0.0, deadline - now) + 1e-3)
