"""Timestamps as ``status.rollout`` stores them: UTC, whole seconds, ``2026-11-24T08:48:07Z``.

The decision and auto-tune code works in epoch seconds (floats); only the status holds strings.
"""

from __future__ import annotations

import calendar
import time
from typing import Any

_FORMAT = "%Y-%m-%dT%H:%M:%S"


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime(_FORMAT + "Z", time.gmtime(t))


def from_iso(s: Any) -> float | None:
    """Epoch seconds of a stored timestamp; None for anything that is not one (absent, or garbled)."""
    if not isinstance(s, str) or not s:
        return None
    try:
        return float(calendar.timegm(time.strptime(s[:19], _FORMAT)))
    except ValueError:
        return None
