"""Moved: the command code lives in evaluator.commands (this module re-exports it while callers move)."""

from evaluator.commands.common import PROGRESS_ENV, Progress, iso, parse_time, print_table, progress_stream
from evaluator.commands.rules import check, evaluate_at, replay

__all__ = ["PROGRESS_ENV", "Progress", "check", "evaluate_at", "iso", "parse_time", "print_table",
           "progress_stream", "replay"]
