"""The one exception type for bad input: its message names the file or key at fault."""
from __future__ import annotations

import sys
from typing import Callable


class InputError(Exception):
    """Bad input (a file, a param). Stages print the message alone and exit non-zero."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main; bad input ends it with the one message and exit status 2, no traceback."""
    try:
        main()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
