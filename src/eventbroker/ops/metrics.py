"""Prometheus metrics of one daemon process (prometheus-client).

Counters the hot path already keeps (in the native rings, the lanes, the
server) are read when Prometheus scrapes, by a custom collector: nothing is
added per event. The two latency histograms are observed once per Kafka
produce request and once per acknowledged batch part.

Under ``serve --workers N`` each worker serves these on a private unix socket
and the supervisor merges them, adding a ``worker`` label (supervisor.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from eventbroker.gateway.lane import Lane, LaneState
from eventbroker.gateway.router import Router
from eventbroker.gateway.server import IngestServer
from eventbroker.privacy import KeyCache
from eventbroker.protocol import error_name, reason_name
from eventbroker.schema import SchemaRegistry

# () -> the daemon's router and listener (None before they start)
Sources = Callable[[], tuple[Router | None, IngestServer | None]]

# Produce requests take a few ms on a healthy cluster, seconds in trouble.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class DaemonMetrics:
    def __init__(self, sources: Sources, keys: Callable[[], KeyCache | None] = lambda: None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.produce_seconds = Histogram(
            "eventbroker_kafka_produce_seconds", "Time of one produce request to Kafka, by event type",
            ["type"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.ack_seconds = Histogram(
            "eventbroker_ack_seconds",
            "Time from a batch part's arrival to its persisted acknowledgement, by event type",
            ["type"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_DaemonCollector(sources, keys))

    def attach(self, lanes: Mapping[str, Lane]) -> None:
        """Give each lane its histogram children (looked up once, not per observation)."""
        for name, lane in lanes.items():
            lane.set_histograms(self.produce_seconds.labels(name), self.ack_seconds.labels(name))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DaemonCollector(Collector):
    def __init__(self, sources: Sources, keys: Callable[[], KeyCache | None]) -> None:
        self._sources = sources
        self._keys = keys

    def collect(self):
        router, server = self._sources()
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
        kafka_bytes = CounterMetricFamily(
            "eventbroker_kafka_batch_bytes",
            "Bytes of Kafka record batches built: form=records before compression, form=sent as sent",
            labels=["type", "form"])
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
                snap = lane.snapshot()
                received.add_metric([name], snap.events_received)
                received_bytes.add_metric([name], snap.bytes_received)
                persisted.add_metric([name], snap.events_persisted)
                handed_back.add_metric([name], snap.events_handed_back)
                send_failures.add_metric([name], snap.send_failures)
                kafka_bytes.add_metric([name, "records"], snap.batch_bytes)
                kafka_bytes.add_metric([name, "sent"], snap.compressed_bytes)
                ring_used.add_metric([name], snap.ring_used_bytes)
                ring_cap.add_metric([name], snap.ring_capacity_bytes)
                for st in LaneState:
                    state.add_metric([name, st.value], 1 if snap.state is st else 0)
                sp = snap.spool
                if sp is not None:
                    spool_backlog.add_metric([name], sp.backlog_bytes)
                    spool_fwd.add_metric([name], sp.events_forwarded)
                    spool_fail.add_metric([name], sp.write_failures)
                    spool_torn.add_metric([name], sp.damaged_bytes_skipped)
            yield from (received, received_bytes, persisted, handed_back, send_failures, kafka_bytes, ring_used, ring_cap,
                        state, spool_backlog, spool_fwd, spool_fail, spool_torn)
            budget = GaugeMetricFamily("eventbroker_memory_budget_used_bytes", "Bytes held by all buffers")
            budget.add_metric([], router.budget_used_bytes)
            limit = GaugeMetricFamily("eventbroker_memory_budget_limit_bytes", "server.memory_budget_bytes")
            limit.add_metric([], router.budget_limit_bytes)
            yield budget
            yield limit
            for (tname, reason), n in sorted(router.stats.rejected.items()):
                rejected.add_metric([tname, reason_name(reason)], n)
            for (tname, reason), n in sorted(router.stats.retry_later.items()):
                retry.add_metric([tname, reason_name(reason)], n)
            yield rejected
            yield retry
            if router.schemas is not None:
                yield from _schema_metrics(router.schemas)
        cache = self._keys()
        if cache is not None:
            yield from _privacy_metrics(cache)
        if server is not None:
            st = server.stats
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
                ("eventbroker_connections_refused_handshake_budget",
                 "Partial HELLOs refused at limits.max_handshake_bytes", sec.refused_handshake_budget),
                ("eventbroker_inflight_limit_pauses",
                 "Times a connection stopped being read at limits.max_inflight_bytes_per_connection",
                 sec.inflight_pauses),
            ):
                c = CounterMetricFamily(name, help_)
                c.add_metric([], value)
                yield c
            tls = CounterMetricFamily("eventbroker_tls_handshakes_refused",
                                      "TLS handshakes that failed, by reason (an old protocol, a bad certificate, ...)",
                                      labels=["reason"])
            for reason, n in sorted(sec.tls_refused.items()):
                tls.add_metric([reason], n)
            yield tls
            by_code = CounterMetricFamily("eventbroker_error_frames", "Connections closed with an ERROR frame, by code",
                                          labels=["code"])
            for code, n in sorted(st.errors_by_code.items()):
                by_code.add_metric([error_name(code)], n)
            yield by_code
            draining = GaugeMetricFamily("eventbroker_draining", "1 while the daemon drains (GOAWAY sent)")
            draining.add_metric([], 1 if server.draining else 0)
            yield draining
            open_auth = GaugeMetricFamily(
                "eventbroker_auth_open_despite_producers",
                "1 when [auth.producers] names producers but auth.required = false lets anonymous ones send")
            open_auth.add_metric([], 1 if server.security.auth.open_despite_producers else 0)
            yield open_auth


def _schema_metrics(registry: SchemaRegistry):
    validated = CounterMetricFamily("eventbroker_schema_events_validated",
                                    "Events that passed their type's schema, by version", labels=["type", "version"])
    invalid = CounterMetricFamily("eventbroker_schema_events_invalid",
                                  "Events their type's schema refused (rejected or dead-lettered), by version and "
                                  "rule", labels=["type", "version", "rule"])
    for (tname, version), st in sorted(registry.stats.items()):
        validated.add_metric([tname, str(version)], st.validated)
        for rule, n in sorted(st.invalid.items()):
            invalid.add_metric([tname, str(version), rule], n)
    yield validated
    yield invalid


def _privacy_metrics(cache: KeyCache):
    """The key cache: users held, key-store loads, forgets applied (no user ids: they are personal)."""
    st, native = cache.stats, cache.native
    for name, help_, value, kind in (
        ("eventbroker_privacy_cached_users", "Users whose data key (or forgotten mark) this gateway holds",
         cache.cached_users, GaugeMetricFamily),
        ("eventbroker_privacy_values_sealed", "Personal values sealed under their user's key", native.encrypted,
         CounterMetricFamily),
        ("eventbroker_privacy_values_shredded", "Personal values of forgotten users written as the forgotten "
         "marker", native.shredded, CounterMetricFamily),
        ("eventbroker_privacy_parts_waiting_for_keys", "Batch parts answered retry-later key_unavailable",
         native.parts_waiting, CounterMetricFamily),
        ("eventbroker_privacy_key_loads", "Calls to the key store for users not cached", st.loads,
         CounterMetricFamily),
        ("eventbroker_privacy_users_loaded", "Users loaded from the key store", st.users_loaded, CounterMetricFamily),
        ("eventbroker_privacy_key_load_seconds", "Time spent in key-store loads", st.load_seconds,
         CounterMetricFamily),
        ("eventbroker_privacy_key_load_errors", "Key-store loads that failed", st.load_errors, CounterMetricFamily),
        ("eventbroker_privacy_evicted_users", "Users dropped from the cache to keep it within cache_users",
         st.evicted, CounterMetricFamily),
        ("eventbroker_privacy_forgets_applied", "Forgotten users whose key this gateway dropped",
         st.forgets_applied, CounterMetricFamily),
        ("eventbroker_privacy_forget_poll_timestamp_seconds", "When this gateway last asked the key store who "
         "was forgotten (unix time)", st.last_forget_poll, GaugeMetricFamily),
    ):
        m = kind(name, help_)
        m.add_metric([], value)
        yield m
