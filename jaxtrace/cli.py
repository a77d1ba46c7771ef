"""What the three command-line tools (train, eval, export) share: flag parsing, logging, exit codes.

Flags are defined only by a tool's `define_flags()`, called under `if __name__ == "__main__"`,
never when a module is imported: eval imports export's functions, tests import all three, and
absl refuses a flag defined twice.

Exit codes: 0 done; 2 bad usage, configuration or input file (the one line on stderr names the
flag, key or file; rerunning cannot help); 3 the workdir is in use by another run.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging

from jaxtrace.errors import UsageError, WorkdirLockedError

EXIT_USAGE = 2
EXIT_LOCKED = 3
_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")

# Errors that are the user's input, not a bug: printed as one line, exit 2. UnicodeDecodeError and
# json errors are ValueErrors; the readers wrap them (jaxtrace.errors.InputError) to name the file.
USAGE_ERRORS = (UsageError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing for `app.run(flags_parser=...)`: `--help` prints the flags and exits 0
    (absl exits 1); a bad flag or config override is one line on stderr and exit 2."""
    if any(a in _HELP_FLAGS for a in argv[1:]):
        full = "--helpfull" in argv[1:]
        app.usage(shorthelp=not full, writeto_stdout=True)
        sys.exit(0)
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
        sys.exit(EXIT_USAGE)


def setup_logging() -> None:
    """jaxtrace's INFO lines on stderr through absl's handler (absl owns the root logger once
    `app.run` starts, so `logging.basicConfig` would do nothing); other libraries (Orbax logs
    every save at INFO) stay at WARNING."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jaxtrace").setLevel(logging.INFO)


def fail(message: str, code: int = EXIT_USAGE):
    """One line on stderr, then exit `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def run_guarded(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, with bad input / configuration turned into one line and exit 2, and
    a locked workdir into exit 3. Anything else is a bug and keeps its traceback."""
    try:
        return fn(*args, **kwargs)
    except WorkdirLockedError as e:
        fail(str(e), EXIT_LOCKED)
    except USAGE_ERRORS as e:
        msg = str(e)
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg} ({e.filename})"
        fail(msg or type(e).__name__)
