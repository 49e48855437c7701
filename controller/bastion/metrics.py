"""Prometheus metrics in the text exposition format (version 0.0.4), kept by hand: a few
counters, gauges and one histogram do not need a client library."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_DEFS = {
    "bastion_boot_requests_total": ("counter", "Boot endpoint requests by endpoint and status."),
    "bastion_boot_request_seconds": ("histogram", "Time to answer boot endpoint requests."),
    "bastion_asset_requests_total": ("counter", "Asset requests by status."),
    "bastion_callbacks_total": ("counter", "Boot callbacks received from nodes."),
    "bastion_heartbeats_total": ("counter", "Node heartbeats received (POST /heartbeat)."),
    "bastion_events_total": ("counter", "Events recorded in the history, by kind."),
    "bastion_site_reloads_total": ("counter", "Site reloads by result (ok, error)."),
    "bastion_api_auth_failures_total": ("counter", "Management API requests refused for auth."),
    "bastion_site_generation": ("gauge", "Generation of the site being served."),
    "bastion_site_broken": ("gauge", "1 while the last reload failed (the previous site serves)."),
    "bastion_site_machines": ("gauge", "Machines declared by the site."),
    "bastion_site_groups": ("gauge", "Groups (matchbox groups and machines) of the site."),
    "bastion_site_profiles": ("gauge", "Profiles of the site."),
}
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(labels: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((labels or {}).items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fmt_labels(labels: tuple[tuple[str, str], ...], extra: str = "") -> str:
    parts = [f'{k}="{_escape(str(v))}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {name: {} for name in _DEFS}
        self._hist: dict[tuple, list[float]] = {}  # (name, labels) -> bucket counts + [sum, count]
        self.gauge_source: Callable[[], dict[str, float]] | None = None

    def inc(self, name: str, labels: dict[str, str] | None = None, by: float = 1) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0) + by

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self._values[name][_labels(labels)] = value

    def observe(self, name: str, seconds: float, labels: dict[str, str] | None = None) -> None:
        key = (name, _labels(labels))
        with self._lock:
            h = self._hist.get(key)
            if h is None:
                h = self._hist[key] = [0.0] * (len(_BUCKETS) + 2)
            h[bisect.bisect_left(_BUCKETS, seconds)] += 1  # bucket index; last slot is +Inf
            h[-2] += seconds
            h[-1] += 1

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self._values[name].get(_labels(labels), 0)

    def render(self) -> str:
        if self.gauge_source is not None:
            for name, value in self.gauge_source().items():
                self.set(name, value)
        out: list[str] = []
        with self._lock:
            for name, (kind, help_text) in _DEFS.items():
                out.append(f"# HELP {name} {help_text}")
                out.append(f"# TYPE {name} {kind}")
                if kind == "histogram":
                    for (hname, labels), h in sorted(self._hist.items()):
                        if hname != name:
                            continue
                        running = 0.0
                        for i, bound in enumerate(_BUCKETS):
                            running += h[i]
                            le = _fmt_labels(labels, 'le="%s"' % bound)
                            out.append(f"{name}_bucket{le} {_num(running)}")
                        le = _fmt_labels(labels, 'le="+Inf"')
                        out.append(f"{name}_bucket{le} {_num(h[-1])}")
                        out.append(f"{name}_sum{_fmt_labels(labels)} {repr(h[-2])}")
                        out.append(f"{name}_count{_fmt_labels(labels)} {_num(h[-1])}")
                    continue
                for labels, value in sorted(self._values[name].items()):
                    out.append(f"{name}{_fmt_labels(labels)} {_num(value)}")
        return "\n".join(out) + "\n"
