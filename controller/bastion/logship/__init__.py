"""Logs off-site: every event the controller records, and the nodes' journals, shipped to the
collectors site.yaml `logs:` names (syslog RFC 5424 over TCP or TLS, the Loki push API), through
a bounded on-disk queue per target (docs/logs.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def longest(make: Callable[[int], T], most: int, fits: Callable[[T], bool]) -> T:
    """make(n) for the largest n in 0..most whose result `fits` (make(0) when none does): the
    cut of a long event to a syslog message's or a Loki line's bound. Found by halving, since
    JSON escaping, SD escaping and UTF-8 make bytes outgrow characters."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(make(mid)):
            lo = mid
        else:
            hi = mid - 1
    return make(lo)
