"""Prometheus metrics, shared by the intake process and the worker processes.

With several processes, prometheus-client's multiprocess mode is used: `relay serve` sets
PROMETHEUS_MULTIPROC_DIR before this module is first imported, every process writes its own files, and
the HTTP listener sums them. Label values come from small fixed sets (never an address).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

messages_received = Counter("relay_messages_received_total", "Messages accepted (250) and queued")
messages_refused = Counter(
    "relay_messages_refused_total", "Messages or recipients refused at intake", ["reason"]
)
recipients_delivered = Counter("relay_recipients_delivered_total", "Recipients accepted by upstream (2xx)")
recipients_failed = Counter("relay_recipients_failed_total", "Recipients failed for good", ["reason"])
recipients_deferred = Counter("relay_recipients_deferred_total", "Delivery attempts deferred for a retry")
recipients_suppressed = Counter("relay_recipients_suppressed_total", "Recipients not sent: suppressed")
recipients_requeued = Counter(
    "relay_recipients_requeued_total", "Claims that expired (worker crashed or stalled) and went back"
)
transform_seconds = Histogram(
    "relay_transform_seconds", "Time to transform one message for one recipient", buckets=LATENCY_BUCKETS
)
transform_failures = Counter("relay_transform_failures_total", "Transforms that failed open", ["reason"])
transform_actions = Counter("relay_transform_total", "Transform results", ["action"])
delivery_seconds = Histogram(
    "relay_delivery_seconds", "Time of one upstream delivery attempt", buckets=LATENCY_BUCKETS
)
intake_seconds = Histogram(
    "relay_intake_seconds", "End of DATA to the 250 reply (store commit)", buckets=LATENCY_BUCKETS
)
unsubscribes = Counter("relay_unsubscribes_total", "Unsubscriptions recorded through /unsubscribe")
reload_failures = Counter(
    "relay_reload_failures_total",
    "Edits of skins/ or rules/ refused (the last good version keeps serving)",
    ["kind"],
)
crosssell_injected = Counter("relay_crosssell_injected_total", "Cross-sell blocks injected", ["block"])
smtp_sessions = Gauge("relay_smtp_sessions", "Open inbound SMTP sessions", multiprocess_mode="livesum")
upstream_connections = Gauge(
    "relay_upstream_connections", "Open upstream connections", multiprocess_mode="livesum"
)


class QueueCollector:
    """relay_queue_depth, read from the store at scrape time (the store is the truth, not a counter)."""

    def __init__(self, depth_fn):
        self.depth_fn = depth_fn

    def collect(self):
        g = GaugeMetricFamily("relay_queue_depth", "Recipients waiting in the queue", labels=["state"])
        try:
            for state, n in self.depth_fn().items():
                g.add_metric([state], n)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the store is down; /healthz says it
            pass
        yield g


def exposition(depth_fn) -> bytes:
    registry = CollectorRegistry()
    if MULTIPROC:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        for collector in list(REGISTRY._collector_to_names):  # the process's own metrics
            registry.register(collector)
    registry.register(QueueCollector(depth_fn))
    return generate_latest(registry)


def mark_process_dead(pid: int) -> None:
    if MULTIPROC:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
