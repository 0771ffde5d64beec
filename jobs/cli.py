"""What the jobs' command lines share: argument types (bad values → argparse usage
errors) and the one rule for errors: misuse (``UsageError``) prints one line and exits 2,
anything else is a bug and keeps its traceback (non-zero exit)."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_job(prog: str, work: Callable[[], int]) -> int:
    """``work()``'s exit code; a ``UsageError`` becomes ``prog: error: <first line>`` and 2."""
    from pipeline.contract import UsageError

    try:
        return work()
    except UsageError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 2
