"""The errors that mean "your input cannot run" (the CLIs turn them into one line and exit 2),
and the one helper that turns a bad file into such an error naming the file.

A reader wraps its file access in `reading(path)`: an unreadable path (missing, a directory, no
permission), bytes that are not UTF-8 or text that is not JSON become an `InputError` that says
which file and why, instead of a traceback that names neither.
"""

from __future__ import annotations

import contextlib
import json


class UsageError(ValueError):
    """Bad usage, configuration or input: the message names the flag, key or file."""


class ConfigError(UsageError):
    """A configuration that cannot run; the message names the offending key."""


class InputError(UsageError):
    """An input file (data, weights, checkpoint, config.json) that cannot be used; the message
    names the file."""


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir (the message names its pid and host)."""


@contextlib.contextmanager
def reading(path: str, what: str = "file"):
    """Turns OS, decoding and JSON errors raised inside the block into `InputError` naming
    `path` (an `InputError` raised inside passes through unchanged)."""
    try:
        yield
    except InputError:
        raise
    except IsADirectoryError:
        raise InputError(f"{what} {path!r} is a directory, not a file") from None
    except FileNotFoundError:
        raise InputError(f"{what} {path!r} does not exist") from None
    except PermissionError:
        raise InputError(f"{what} {path!r} is not readable (permission denied)") from None
    except UnicodeDecodeError as e:
        raise InputError(
            f"{what} {path!r} is not UTF-8 text (byte {e.start}: {e.reason})"
        ) from None
    except json.JSONDecodeError as e:
        raise InputError(
            f"{what} {path!r} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg})"
        ) from None
    except OSError as e:
        raise InputError(f"{what} {path!r} cannot be read: {e.strerror or e}") from None
