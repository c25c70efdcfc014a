"""Times as people type them (command-line arguments, test files) -> unix seconds."""

from __future__ import annotations

import re
from datetime import UTC, datetime


def parse_time(text: str, now: float | None = None) -> float:
    """ISO-8601 (a missing zone means UTC), unix seconds, or `now` -> unix seconds. Raises ValueError."""
    if text.strip() == "now" and now is not None:
        return now
    if re.fullmatch(r"\d+(\.\d+)?", text.strip()):
        return float(text)
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad time {text!r}: use ISO-8601 like 2026-11-20T06:00:00Z, unix seconds or now") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
