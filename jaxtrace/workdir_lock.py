"""One run per workdir: a lock file `<workdir>/jaxtrace.lock` naming the process that holds it.

Two runs on one workdir would resume from each other's checkpoints and each one's retention
would delete the other's steps, so the second run stops at once with an error naming the first
(pid, host, start time). The file is JSON: {"pid", "host", "started", "heartbeat", "token"}.

A lock is stale, and taken over with a warning in the log, when
  * its host is this host and its pid is not running (or is a newer process that reused the
    pid: Linux start times tell), or
  * it is unreadable (a writer died mid-write), or
  * its host is another one and its heartbeat, rewritten every `heartbeat_s` by a thread of the
    holder, is older than `stale_after_s` (a preempted VM cannot remove its lock; a relaunch on
    a new VM waits at most that long).
Local workdirs are locked atomically (a complete file hard-linked into place, which fails if one
exists; a stale lock is renamed away first, so two processes taking over race safely). On
remote workdirs (gs://) object stores have no atomic create: the lock is written, read back
after a moment and kept only if it is still ours, which catches all but near-simultaneous starts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from jaxtrace import paths
from jaxtrace.errors import WorkdirLockedError

log = logging.getLogger(__name__)
LOCK_NAME = "jaxtrace.lock"


def _pid_running(pid: int, since: float | None) -> bool:
    """Whether process `pid` of this host is alive and, when `since` (epoch seconds) is given,
    started before it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    except (OverflowError, ValueError):
        return False
    if since is None:
        return True
    try:  # Linux: a pid reused after the holder died belongs to a process started later
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK") <= since + 1.0
    except (OSError, ValueError, IndexError, StopIteration):
        return True


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` holds the workdir for the block (see module doc).

    Raises WorkdirLockedError on entry when another live run holds it."""

    def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 180.0):
        if not (heartbeat_s > 0 and stale_after_s > heartbeat_s):
            raise ValueError(
                f"need 0 < heartbeat_s < stale_after_s, got {heartbeat_s}, {stale_after_s}"
            )
        self.path = paths.join(workdir, LOCK_NAME)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        now = time.time()
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now,
            "heartbeat": now,
            "token": uuid.uuid4().hex,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ---------------------------------------------------------------------------
    def _read(self) -> dict | None:
        """The lock's content; {} if it exists but is unreadable; None if it does not exist."""
        try:
            with paths.open_path(self.path, "rb") as f:
                info = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def stale_reason(self, other: dict) -> str | None:
        """Why the lock `other` may be taken over, or None if its holder may still be running."""
        if not all(isinstance(other.get(k), t) for k, t in (("pid", int), ("host", str))):
            return "the lock file is unreadable"
        started = other.get("started", 0.0)
        if other["host"] == self.info["host"]:
            since = started if isinstance(started, int | float) else None
            if not _pid_running(other["pid"], since):
                return f"pid {other['pid']} is not running on this host"
            return None
        beat = other.get("heartbeat")
        age = time.time() - beat if isinstance(beat, int | float) else float("inf")
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after_s:.0f} s)"
        return None

    def _refuse(self, other: dict):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("started", 0)))
        raise WorkdirLockedError(
            f"workdir {os.path.dirname(self.path) or '.'!r} is in use by pid {other['pid']} on "
            f"host {other['host']} (started {since}); wait for that run or stop it, or use "
            f"another --config.workdir. If that run is gone, delete {self.path}"
        )

    # -- writing ---------------------------------------------------------------------------
    def _payload(self) -> bytes:
        return json.dumps(self.info).encode("utf-8")

    def _create_local(self) -> bool:
        """Atomically creates the lock; False if one exists."""
        tmp = f"{self.path}.{self.info['token']}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._payload())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def acquire(self) -> None:
        remote = paths.is_remote(self.path)
        for _ in range(5):
            if not remote and self._create_local():
                break
            other = self._read()
            if other is None:
                if remote:
                    self._write_remote()
                    break
                continue  # released in between: try to create again
            why = self.stale_reason(other)
            if why is None:
                self._refuse(other)
            log.warning(
                "taking over the stale lock %s of pid %s on host %s: %s",
                self.path,
                other.get("pid"),
                other.get("host"),
                why,
            )
            if remote:
                self._write_remote()
                break
            aside = f"{self.path}.stale-{self.info['token']}"
            try:
                os.rename(self.path, aside)  # only one of several racing processes wins this
            except FileNotFoundError:
                continue
            os.unlink(aside)
        else:
            raise WorkdirLockedError(f"could not take the lock {self.path} (contended)")
        if remote:  # best effort: another starter that wrote after us wins, and we stop
            time.sleep(1.0)
            other = self._read() or {}
            if other.get("token") != self.info["token"]:
                self._refuse(other)
        self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
        self._thread.start()

    def _write_remote(self) -> None:
        with paths.open_path(self.path, "wb") as f:
            f.write(self._payload())

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if (self._read() or {}).get("token") != self.info["token"]:
                log.error("lock %s was taken by another process; heartbeat stops", self.path)
                return
            self.info["heartbeat"] = time.time()
            try:
                if paths.is_remote(self.path):
                    self._write_remote()
                else:
                    tmp = f"{self.path}.{self.info['token']}.tmp"
                    with open(tmp, "wb") as f:
                        f.write(self._payload())
                    os.replace(tmp, self.path)
            except OSError as e:
                log.warning("could not refresh the lock %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if (self._read() or {}).get("token") == self.info["token"]:
            try:
                if paths.is_remote(self.path):
                    paths._fs(self.path).rm(self.path)
                else:
                    os.unlink(self.path)
            except OSError as e:
                log.warning("could not remove the lock %s: %s", self.path, e)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
