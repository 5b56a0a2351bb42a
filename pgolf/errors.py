"""Errors that end a stage with one clear message (no traceback): bad input, or a run that went wrong."""
from __future__ import annotations


class StageError(Exception):
    """Ends a stage: run_stage prints the message alone and exits with status 2."""


class InputError(StageError):
    """Bad input (a file, a param); the message names the file or key at fault."""


class TrainingDiverged(StageError):
    """The loss stopped being finite; the message names the last good checkpoint."""

