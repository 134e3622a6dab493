"""How every command ends: exit 0, or one line per problem and an exit code, never a bare
traceback on the terminal.

Exit codes: 2 for bad input (config, data, checkpoint, usage; one line per problem, at most
``MAX_LINES`` of them), 1 for a runtime failure (one line that says what to do; the traceback in
the run's error.log, or above the line when there is no run directory), 130 for Ctrl-C.
"""

from __future__ import annotations

import sys
import traceback
from typing import Callable, Iterable

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError
from ..runtime.failures import RunFailure, explain

MAX_LINES = 20
"""Problems printed before the rest are counted: a 50 MB config must not print 241,014 lines."""


def error_lines(problems: Iterable[str], limit: int = MAX_LINES) -> list[str]:
    problems = list(problems)
    lines = [f"error: {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"error: ... and {len(problems) - limit} more problem(s)")
    return lines


def guarded(func: Callable[..., int], *args) -> int:
    try:
        return func(*args)
    except ConfigError as exc:
        print("\n".join(error_lines(exc.problems)), file=sys.stderr)
        return 2
    except (DataError, CheckpointError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"error: {explain(exc)}", file=sys.stderr)
        return 130
    except Exception as exc:
        log = getattr(exc, "error_log", None)
        if log is None and not isinstance(exc, RunFailure):  # no run directory to keep it in: it stays here
            traceback.print_exc()
        print(f"error: {explain(exc)}" + (f" (traceback: {log})" if log else ""), file=sys.stderr)
        return 1
