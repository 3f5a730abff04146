"""How a run ends other than by finishing, and the one place that turns a user's mistake
into one line and exit status 2.

`UserError` means "the user asked for something we cannot do": entry points print its
message alone (no traceback) and exit with status 2 (`exit_on_user_error`). Anything
else escaping is a bug in cifar_ddp and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

EXIT_USER_ERROR = 2
# EX_TEMPFAIL, "try again later": stopped by a signal or train.stop_after_steps after
# writing a checkpoint; a scheduler can requeue the job with --resume.
EXIT_RESUMABLE = 75


class UserError(Exception):
    """A problem with the user's config, data, checkpoint or command line."""


class ConfigError(UserError):
    """A config key is unknown, mistyped or holds an impossible value."""


class NonFiniteLoss(UserError):
    """The loss or gradients became NaN/Inf (and train.on_nonfinite=stop)."""


class Preempted(Exception):
    """The run stopped early after writing a checkpoint: SIGTERM/SIGINT/SIGUSR1 reached a
    rank, or train.stop_after_steps was reached. Exit status 75; resume continues it."""


def one_line(exc: BaseException) -> str:
    """`TypeName: first line of the message`, for errors raised by a user's own code."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def report_user_error(exc: UserError, who: str = "") -> int:
    """Print the one line (`who`: e.g. "rank 1: " under a launcher) and return status 2."""
    print(f"error: {who}{exc}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def one_line_warnings() -> None:
    # Warnings (a damaged checkpoint skipped, ...) read as one line, not a source quote.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def reader_left() -> int:
    # Whoever read our output left (`| head`): nothing more to say, and no traceback.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1


def exit_on_user_error(work: Callable[[], int]) -> int:
    """Run a single-process command: a UserError is one line and status 2, a closed
    stdout pipe ends it quietly. (Multi-process runs: launcher._launch, which also keeps
    the other ranks from waiting.)"""
    one_line_warnings()
    try:
        return work()
    except UserError as exc:
        return report_user_error(exc)
    except BrokenPipeError:
        return reader_left()
