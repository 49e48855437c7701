"""The controller's Prometheus metrics (prometheus-client), served at /metrics.

One registry per application, so two apps in one process (tests) never share counts. The site's
shape (generation, machines, ...) is read when /metrics is scraped, from `gauge_source`, not
pushed on every reload.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Counters and histograms would each carry a `_created` series; nothing here reads them.
prometheus_client.disable_created_metrics()

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The gauges gauge_source() reports: name -> help.
SITE_GAUGES = {
    "bastion_site_generation": "Generation of the site being served.",
    "bastion_site_broken": "1 while the last reload failed (the previous site serves).",
    "bastion_site_machines": "Machines declared by the site.",
    "bastion_site_groups": "Groups (matchbox groups and machines) of the site.",
    "bastion_site_profiles": "Profiles of the site.",
}

# The UPS's gauges (bastion.ups.runner.UpsWatch.gauges), present only with site.yaml `ups:`.
UPS_GAUGES = {
    "bastion_ups_up": "1 when upsd answered the last poll about the site's UPS.",
    "bastion_ups_on_battery": "1 while the UPS runs on battery (status OB).",
    "bastion_ups_low_battery": "1 while the UPS reports a low battery (status LB).",
    "bastion_ups_battery_charge_percent": "The UPS's battery charge as upsd reports it.",
    "bastion_ups_power_held": "1 while the power-cut policy refuses power-ons.",
}


# The boot endpoints' group commit (bastion.api.deps.GroupCommit) and the history's bounds
# (bastion.state.events.EventStore.pruned), read from history_source at scrape time: the second
# over the first is how many events a transaction held.
HISTORY_COUNTERS = {
    "bastion_history_commits": "Transactions in which the boot endpoints' group commit wrote their "
                               "events to the history.",
    "bastion_history_committed_events": "Events the boot endpoints' group commit wrote to the "
                                        "history in those transactions.",
    "bastion_history_pruned": "Events deleted by the history's bounds (--history-events, "
                              "--history-size, --history-days) since the controller started.",
}  # fmt: skip


class Metrics:
    """The counters the handlers bump (`metrics.boot_requests.labels(...).inc()`), and
    `render()` for /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._boot_children: dict[tuple[str, int], tuple[Any, Any]] = {}  # boot_answered's
        self._event_children: dict[str, Any] = {}  # event_recorded's
        self.boot_requests = Counter("bastion_boot_requests", "Boot endpoint requests by endpoint and status.",
                                     ["endpoint", "status"], registry=r)  # fmt: skip
        self.boot_seconds = Histogram("bastion_boot_request_seconds", "Time to answer boot endpoint requests.",
                                      ["endpoint"], buckets=_BUCKETS, registry=r)  # fmt: skip
        self.asset_requests = Counter("bastion_asset_requests", "Asset requests by status.", ["status"],
                                      registry=r)  # fmt: skip
        self.callbacks = Counter("bastion_callbacks", "Boot callbacks received from nodes.", registry=r)
        self.heartbeats = Counter("bastion_heartbeats", "Node heartbeats received (POST /heartbeat).",
                                  registry=r)  # fmt: skip
        self.events = Counter("bastion_events", "Events recorded in the history, by kind.", ["kind"],
                              registry=r)  # fmt: skip
        self.site_reloads = Counter("bastion_site_reloads", "Site reloads by result (ok, error).", ["result"],
                                    registry=r)  # fmt: skip
        self.auth_failures = Counter("bastion_api_auth_failures", "Management API requests refused for auth.",
                                     registry=r)  # fmt: skip
        self.bodies_refused = Counter("bastion_request_bodies_refused",
                                      "Requests refused for their body's size (413), before reading it.",
                                      registry=r)  # fmt: skip
        self.listener_refusals = Counter("bastion_listener_refusals",
                                         "Requests on the boot listener for a path it does not serve "
                                         "(the management API, dashboard, metrics, docs).",
                                         registry=r)  # fmt: skip
        self.connections_closed = Counter(
            "bastion_http_connections_closed",
            "HTTP connections the controller closed by its bounds, by reason (header-timeout, "
            "body-timeout, head-too-large, send-timeout, evicted, refused).", ["reason"], registry=r)  # fmt: skip
        # bastion.logship: per site.yaml logs target
        self.logship_sent = Counter("bastion_logship_sent", "Records sent to a log target (syslog: written "
                                    "to the connection; loki: accepted).", ["target"], registry=r)  # fmt: skip
        self.logship_dropped = Counter(
            "bastion_logship_dropped",
            "Records a log target lost, by reason: bound (its on-disk queue was full: the oldest "
            "went), inbox (the in-memory hand-off was full), rejected (Loki refused them for good).",
            ["target", "reason"], registry=r)  # fmt: skip
        self.logship_cut = Counter(
            "bastion_logship_cut", "Records sent cut to fit a log target's bound (syslog: max_message; loki: "
            "a line's or a push's bytes), counted as sent counts them.", ["target"], registry=r)  # fmt: skip
        self.logship_queued = Gauge("bastion_logship_queued", "Records waiting in a log target's on-disk queue.",
                                    ["target"], registry=r)  # fmt: skip
        self.logship_up = Gauge("bastion_logship_up", "1 while a log target's collector takes records.",
                                ["target"], registry=r)  # fmt: skip
        self.journal_entries = Counter("bastion_journal_entries", "Journal entries nodes uploaded "
                                       "(POST /journal/upload), by result: shipped, malformed.", ["result"],
                                       registry=r)  # fmt: skip
        self.journal_fields_cut = Counter(
            "bastion_journal_fields_cut",
            "Fields of nodes' journal entries left out because they would take their entry past "
            "the controller's 1 MiB bound (bastion.logship.journal); the entries were shipped without them.",
            registry=r)  # fmt: skip
        self.gauge_source: Callable[[], dict[str, float]] | None = None
        self.ups_source: Callable[[], dict[str, float]] | None = None  # bastion.ups
        self.history_source: Callable[[], dict[str, float]] | None = None  # HISTORY_COUNTERS
        r.register(_SiteGauges(self))
        r.register(_HistoryCounters(self))

    def boot_answered(self, endpoint: str, status: int, seconds: float) -> None:
        """A boot endpoint answered: its request counted and timed. The labelled children are
        kept (prometheus-client looks them up under a lock on every labels() call, which was
        3% of a boot request)."""
        key = (endpoint, status)
        pair = self._boot_children.get(key)
        if pair is None:
            pair = (self.boot_requests.labels(endpoint=endpoint, status=str(status)),
                    self.boot_seconds.labels(endpoint=endpoint))  # fmt: skip
            self._boot_children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def event_recorded(self, kind: str) -> None:
        child = self._event_children.get(kind)
        if child is None:
            child = self._event_children[kind] = self.events.labels(kind=kind)
        child.inc()

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


class _SiteGauges:
    """A collector: the site's gauges, read from gauge_source at scrape time."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self) -> Iterator[GaugeMetricFamily]:
        for name, help_text in {**SITE_GAUGES, **UPS_GAUGES}.items():
            yield GaugeMetricFamily(name, help_text)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        source = self._metrics.gauge_source
        values = source() if source is not None else {}
        ups = self._metrics.ups_source
        values = {**values, **(ups() if ups is not None else {})}
        for name, help_text in {**SITE_GAUGES, **UPS_GAUGES}.items():
            if name in values:
                yield GaugeMetricFamily(name, help_text, value=values[name])


class _HistoryCounters:
    """A collector: the history's counters, read from history_source at scrape time (the group
    commit and the store count them anyway; a Counter bumped per commit would cost the loop a
    lock)."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self) -> Iterator[CounterMetricFamily]:
        for name, help_text in HISTORY_COUNTERS.items():
            yield CounterMetricFamily(name, help_text)

    def collect(self) -> Iterator[CounterMetricFamily]:
        source = self._metrics.history_source
        values = source() if source is not None else {}
        for name, help_text in HISTORY_COUNTERS.items():
            if name in values:
                yield CounterMetricFamily(name, help_text, value=values[name])
