"""Prometheus metrics of one daemon process (prometheus-client).

Counters the hot path already keeps (in the native rings, the lanes, the
server) are read when Prometheus scrapes, by a custom collector: nothing is
added per event. The two latency histograms are observed once per Kafka
produce request and once per acknowledged batch part.

Under ``serve --workers N`` each worker serves these on a private unix socket
and the supervisor merges them, adding a ``worker`` label (supervisor.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from eventbroker.protocol import error_name, reason_name

if TYPE_CHECKING:
    from eventbroker.daemon import Daemon

# Produce requests take a few ms on a healthy cluster, seconds in trouble.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DaemonMetrics:
    def __init__(self, daemon: Daemon) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.produce_seconds = Histogram(
            "eventbroker_kafka_produce_seconds", "Time of one produce request to Kafka, by event type",
            ["type"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ack_seconds = Histogram(
            "eventbroker_ack_seconds",
            "Time from a batch part's arrival to its persisted acknowledgement, by event type",
            ["type"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_DaemonCollector(daemon))

    def attach(self, lanes) -> None:
        """Give each lane its histogram children (looked up once, not per observation)."""
        for name, lane in lanes.items():
            lane.produce_seconds = self.produce_seconds.labels(name)
            lane.ack_seconds = self.ack_seconds.labels(name)
            fwd = getattr(lane, "forwarder", None)
            if fwd is not None:
                fwd.produce_seconds = lane.produce_seconds

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def collect(self):
        d = self.d
        router, server = d.router, d.server
        received = CounterMetricFamily("eventbroker_events_received", "Events accepted into a type's buffer",
                                       labels=["type"])
        received_bytes = CounterMetricFamily("eventbroker_received_bytes",
                                             "Bytes of events accepted (Kafka record form)", labels=["type"])
        persisted = CounterMetricFamily(
            "eventbroker_events_persisted",
            "Events acknowledged persisted (in Kafka, or in the disk spool for ack = spool types)", labels=["type"])
        handed_back = CounterMetricFamily(
            "eventbroker_events_handed_back",
            "Accepted events answered retry-later because the type could not be delivered", labels=["type"])
        rejected = CounterMetricFamily("eventbroker_events_rejected", "Events rejected, by reason",
                                       labels=["type", "reason"])
        retry = CounterMetricFamily("eventbroker_events_retry_later",
                                    "Events answered retry-later on arrival, by reason", labels=["type", "reason"])
        send_failures = CounterMetricFamily("eventbroker_kafka_send_failures", "Failed produce attempts",
                                            labels=["type"])
        ring_used = GaugeMetricFamily("eventbroker_ring_used_bytes", "Bytes held in the type's buffer",
                                      labels=["type"])
        ring_cap = GaugeMetricFamily("eventbroker_ring_capacity_bytes", "Capacity of the type's buffer",
                                     labels=["type"])
        state = GaugeMetricFamily("eventbroker_type_state",
                                  "1 for the type's current state: delivering, shedding or probing",
                                  labels=["type", "state"])
        spool_backlog = GaugeMetricFamily("eventbroker_spool_backlog_bytes", "Spooled bytes not yet in Kafka",
                                          labels=["type"])
        spool_fwd = CounterMetricFamily("eventbroker_spool_events_forwarded", "Events delivered from the spool",
                                        labels=["type"])
        spool_fail = CounterMetricFamily("eventbroker_spool_write_failures", "Failed spool writes", labels=["type"])
        spool_torn = CounterMetricFamily("eventbroker_spool_torn_bytes_truncated",
                                         "Bytes of torn or damaged spool records cut off", labels=["type"])
        if router is not None:
            for name, lane in router.lanes.items():
                ring = lane.ring
                fwd = getattr(lane, "forwarder", None)
                received.add_metric([name], ring.events_in)
                received_bytes.add_metric([name], ring.bytes_in)
                persisted.add_metric([name], lane.stats.events_persisted)
                handed_back.add_metric([name], lane.stats.events_shed)
                send_failures.add_metric([name], lane.stats.send_failures
                                         + (fwd.stats.send_failures if fwd is not None else 0))
                ring_used.add_metric([name], ring.used_bytes)
                ring_cap.add_metric([name], ring.capacity_bytes)
                for st in ("delivering", "shedding", "probing"):
                    state.add_metric([name, st], 1 if lane.state.value == st else 0)
                if fwd is not None:
                    spool_backlog.add_metric([name], fwd.backlog_bytes)
                    spool_fwd.add_metric([name], fwd.stats.events_forwarded)
                    ss = fwd.spool.stats
                    spool_fail.add_metric([name], ss.write_failures)
                    spool_torn.add_metric([name], ss.torn_bytes_truncated + ss.corrupt_bytes_skipped
                                          + fwd.stats.corrupt_bytes_skipped)
            yield from (received, received_bytes, persisted, handed_back, send_failures, ring_used, ring_cap,
                        state, spool_backlog, spool_fwd, spool_fail, spool_torn)
            budget = GaugeMetricFamily("eventbroker_memory_budget_used_bytes", "Bytes held by all buffers")
            budget.add_metric([], router.budget.used_bytes)
            limit = GaugeMetricFamily("eventbroker_memory_budget_limit_bytes", "server.memory_budget_bytes")
            limit.add_metric([], router.budget.limit_bytes)
            yield budget
            yield limit
        if server is not None:
            st = server.stats
            for (tname, reason), n in sorted(st.rejected.items()):
                rejected.add_metric([tname, reason_name(reason)], n)
            for (tname, reason), n in sorted(st.retry_later.items()):
                retry.add_metric([tname, reason_name(reason)], n)
            yield rejected
            yield retry
            conns = GaugeMetricFamily("eventbroker_connections", "Open producer connections")
            conns.add_metric([], st.connections)
            yield conns
            for name, help_, value in (
                ("eventbroker_connections_opened", "Producer connections accepted", st.connections_total),
                ("eventbroker_protocol_errors", "Connections closed with an ERROR frame", st.protocol_errors),
                ("eventbroker_batches", "EVENT_BATCH frames received", st.batches),
            ):
                c = CounterMetricFamily(name, help_)
                c.add_metric([], value)
                yield c
            sec = server.security.stats
            for name, help_, value in (
                ("eventbroker_auth_failures", "Handshakes refused: bad or missing token or certificate",
                 sec.auth_failures),
                ("eventbroker_auth_refused_connections",
                 "Connections refused because their address failed too many handshakes", sec.auth_refused_addresses),
                ("eventbroker_handshake_timeouts", "Connections closed for sending no HELLO in time",
                 sec.handshake_timeouts),
                ("eventbroker_idle_timeouts", "Connections closed for sending nothing in idle_timeout_ms",
                 sec.idle_timeouts),
                ("eventbroker_connections_refused_total_limit", "Connections refused at limits.max_connections",
                 sec.refused_total_limit),
                ("eventbroker_connections_refused_address_limit",
                 "Connections refused at limits.max_connections_per_address", sec.refused_address_limit),
                ("eventbroker_inflight_limit_pauses",
                 "Times a connection stopped being read at limits.max_inflight_bytes_per_connection",
                 sec.inflight_pauses),
            ):
                c = CounterMetricFamily(name, help_)
                c.add_metric([], value)
                yield c
            by_code = CounterMetricFamily("eventbroker_error_frames", "Connections closed with an ERROR frame, by code",
                                          labels=["code"])
            for code, n in sorted(st.errors_by_code.items()):
                by_code.add_metric([error_name(code)], n)
            yield by_code
            draining = GaugeMetricFamily("eventbroker_draining", "1 while the daemon drains (GOAWAY sent)")
            draining.add_metric([], 1 if server.draining else 0)
            yield draining
