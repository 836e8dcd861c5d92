"""``eventbroker bench``: the gateway against producing to Kafka directly.

Every process runs separately (broker, daemon, load generator, direct
producer) and its CPU is read from /proc for the window in which load flows,
so the figures that travel between machines, CPU per event, can be given for
each. Scenarios (see benchmarks/README.md):

  ceiling    daemon with the null sink: receive, decode, route, ack
  e2e        into the broker, acks=all, verified by an independent consumer
  direct     the same events straight into the broker (librdkafka, aiokafka)
  spool      e2e with the types acknowledged from the disk spool (ack = "spool")
  compression  e2e with JSON events for each Kafka codec: bytes per event, ratio, daemon CPU
  sdk        the producer SDK (produce(), await send()) vs confluent-kafka, keys and id headers
  fanin      500 connections sending small batches, vs 500 librdkafka producers
  isolation  one type's topic unwritable while the others flow
  latency    fixed offered load at 25/50/75% of the e2e maximum

``--quick`` (under a minute) prints one JSON line with the key figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_TYPES = "play,search,client_log"
# A topic name Kafka refuses (UNKNOWN_TOPIC_OR_PARTITION / invalid name): the
# type can never be written, like a topic that is missing and not creatable.
UNWRITABLE_TOPIC = ".."


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        sys.exit(f"eventbroker bench needs {module}: pip install -e '.[bench]'")


class Proc:
    """CPU seconds and peak RSS of one process, read from /proc via psutil."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.p = psutil.Process(pid)
        self.rss_peak = 0

    def cpu(self) -> float:
        t = self.p.cpu_times()
        return t.user + t.system

    def sample_rss(self) -> None:
        with contextlib.suppress(Exception):
            self.rss_peak = max(self.rss_peak, self.p.memory_info().rss)


class _NoProc:
    """Stands in for a daemon whose pid was not given: no CPU figures."""

    rss_peak = 0

    def cpu(self) -> float:
        return float("nan")

    def sample_rss(self) -> None:
        pass


def _wait_ready(path: Path, proc: subprocess.Popen, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready: {err[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s}s")
        time.sleep(0.005)


def _merge_loadgen(outs: list[dict]) -> dict:
    """Combine the generators' reports; latency percentiles are the worst process's."""
    if len(outs) == 1:
        return outs[0]
    acked_by_type: dict[str, int] = {}
    for o in outs:
        for t, n in o["acked_by_type"].items():
            acked_by_type[t] = acked_by_type.get(t, 0) + n
    seconds = max(o["seconds"] for o in outs)
    acked = sum(o["events_acked"] for o in outs)
    checksums = [o["payload_checksum"] for o in outs]
    lat = {k: max((o["ack_latency_ms"][k] or 0) for o in outs) or None for k in ("p50", "p99", "p999")}
    return {
        "events_acked": acked,
        "acked_by_type": acked_by_type,
        "payload_checksum": None if None in checksums else sum(checksums),
        "events_rejected": sum(o["events_rejected"] for o in outs),
        "retry_later_batches": sum(o["retry_later_batches"] for o in outs),
        "seconds": seconds,
        "events_per_s": round(acked / seconds),
        "loadgen_cpu_s": sum(o["loadgen_cpu_s"] for o in outs),
        "ack_latency_ms": lat,
        "processes": len(outs),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="eb-bench-"))
        self.broker = None
        self.broker_proc: Proc | None = None
        self.bootstrap = args.kafka
        self.run_id = f"b{os.getpid()}"
        self.counter = 0
        self.types: list[str] = args.types.split(",")
        self.tags: set[int] = set()  # event id prefixes of this run's load generators

    # infrastructure

    def start_broker(self) -> None:
        if self.bootstrap:
            return
        from eventbroker.kafka.embedded import EmbeddedKafka

        self.broker = EmbeddedKafka(log_path=str(self.tmp / "tansu.log")).start()
        self.bootstrap = self.broker.bootstrap
        self.broker_proc = Proc(self.broker.proc.pid)

    def stop(self) -> None:
        if self.broker is not None:
            self.broker.stop()

    def topics(self, prefix: str) -> dict[str, str]:
        """Each type's topic for one run: fresh ones, or the running daemon's (events.<type>)."""
        if self.args.server:
            return {t: f"events.{t}" for t in self.types}
        return {t: f"{prefix}.{t}" for t in self.types}

    def prefix(self) -> str:
        self.counter += 1
        return f"{self.run_id}n{self.counter}"

    @contextlib.contextmanager
    def daemon(self, sink: str, topics: dict[str, str], create_topics: bool = True,
               ack: str = "kafka", schema: bool | str = False, compression: str | None = None,
               admin_port: int | None = None, extra: str = "") -> Iterator[tuple[str, Proc]]:
        if self.args.server:  # a running daemon: its config decides sink and topics
            yield self.args.server, Proc(self.args.server_pid) if self.args.server_pid else _NoProc()
            return
        from eventbroker.kafka.embedded import free_port, wait_for_port

        port = free_port()
        conf = self.tmp / f"daemon-{port}.toml"
        admin = f"127.0.0.1:{admin_port}" if admin_port else ""
        compression = compression or self.args.compression
        lines = [f'[server]\nadmin_listen = "{admin}"\n', f'[kafka]\nsink = "{sink}"\nbootstrap_servers = "{self.bootstrap}"\n',
                 f'create_topics = {str(create_topics).lower()}\ntopic_partitions = 4\n']
        if self.args.linger_ms is not None:
            lines.append(f"linger_ms = {self.args.linger_ms}\n")
        if ack == "spool":
            lines.append(f'[spool]\ndir = "{self.tmp / f"spool-{port}"}"\n')
        if schema:  # every type validated against a schema of benchmarks/schemas (default: the 10-field one)
            lines.append(f'[schemas]\ndir = "{HERE / "schemas"}"\n')
        lines.append(extra)
        schema_name = schema if isinstance(schema, str) else "bench"
        for t, topic in topics.items():
            lines.append(f'[types.{t}]\ntopic = "{topic}"\npartitioning = "spread"\nack = "{ack}"\n'
                         f'compression = "{compression}"\n' + (f'schema = "{schema_name}"\n' if schema else ""))
        conf.write_text("".join(lines))
        log = open(self.tmp / f"daemon-{port}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "eventbroker.cli", "serve", "--single-process", "--config", str(conf),
             "--listen", f"127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port("127.0.0.1", port, 60, proc)
            yield f"127.0.0.1:{port}", Proc(proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()

    def loadgen(self, server: str, daemon: Proc, procs: int | None = None, **kw) -> dict:
        """Run the load generator (``procs`` processes sharing the connections and
        events); CPU of daemon, broker and generators over the sending window."""
        procs = max(1, min(procs or self.args.procs, kw.get("connections", 1)))
        gens = []
        for i in range(procs):
            ready = self.tmp / f"ready-{time.monotonic_ns()}-{i}"
            part = dict(kw)
            part["connections"] = kw.get("connections", 1) // procs + (1 if i < kw.get("connections", 1) % procs else 0)
            if part.get("events"):
                part["events"] = kw["events"] // procs
            if part.get("rate"):
                part["rate"] = kw["rate"] / procs
            part.setdefault("types", ",".join(self.types))
            tag = random.getrandbits(31)
            self.tags.add(tag)
            part["tag"] = tag
            cmd = [sys.executable, str(HERE / "loadgen.py"), "--server", server, "--ready-file", str(ready)]
            for k, v in part.items():
                if v is not None:
                    cmd += [f"--{k.replace('_', '-')}", str(v)]
            gens.append((ready, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
        for ready, gen in gens:
            _wait_ready(ready, gen, "load generator")
        d0 = daemon.cpu()
        b0 = self.broker_proc.cpu() if self.broker_proc else 0.0
        while any(g.poll() is None for _, g in gens):
            daemon.sample_rss()
            time.sleep(0.02)
        d1 = daemon.cpu()
        b1 = self.broker_proc.cpu() if self.broker_proc else 0.0
        outs = []
        for _, gen in gens:
            out, err = gen.communicate()
            if gen.returncode:
                raise RuntimeError(f"load generator failed: {err.decode()[-2000:]}")
            outs.append(orjson.loads(out))
            self.tags.update(outs[-1].get("id_tags", ()))  # ids the SDK generated
        res = _merge_loadgen(outs)
        res["daemon_cpu_s"] = d1 - d0
        res["broker_cpu_s"] = b1 - b0
        res["daemon_peak_rss_mb"] = round(daemon.rss_peak / 1e6, 1)
        return res

    def direct(self, client: str, topic: str, events: int, **kw) -> dict:
        ready = self.tmp / f"ready-{time.monotonic_ns()}"
        cmd = [sys.executable, str(HERE / "direct.py"), client, "--bootstrap", self.bootstrap, "--topic", topic,
               "--events", str(events), "--event-bytes", str(self.args.event_bytes), "--ready-file", str(ready)]
        for k, v in kw.items():
            cmd += [f"--{f}" for f in v] if k == "flags" else [f"--{k.replace('_', '-')}", str(v)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait_ready(ready, proc, f"direct {client} producer")
        b0 = self.broker_proc.cpu() if self.broker_proc else 0.0
        out, err = proc.communicate()
        b1 = self.broker_proc.cpu() if self.broker_proc else 0.0
        if proc.returncode:
            raise RuntimeError(f"direct {client} failed: {err.decode()[-2000:]}")
        res = orjson.loads(out)
        n = res["events"]
        return {
            "scenario": f"direct-{res['client']}",
            "events": n,
            "events_failed": res["failed"],
            "seconds": round(res["seconds"], 4),
            "events_per_s": round(n / res["seconds"]),
            "mb_per_s": round(n * self.args.event_bytes / res["seconds"] / 1e6, 1),
            "client_cpu_s": round(res["cpu_s"], 3),
            "client_us_per_event": round(res["cpu_s"] / n * 1e6, 3),
            "client_events_per_cpu_s": round(n / res["cpu_s"]),
            "broker_us_per_event": round((b1 - b0) / n * 1e6, 3) if self.broker_proc else None,
        }

    def verify(self, topics: dict[str, int], expected_events: int, expected_checksum: int | None) -> dict:
        """Read every topic back with librdkafka: distinct event ids and a payload checksum."""
        from confluent_kafka import Consumer, TopicPartition

        from eventbroker import _fastpath as fp

        ids: set[bytes] = set()
        checksum = 0
        records = 0
        for topic, topic_expected in topics.items():
            start_ids = len(ids)
            c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"verify-{self.prefix()}",
                          "enable.auto.commit": False, "auto.offset.reset": "earliest"})
            md = c.list_topics(topic, timeout=10)
            c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
            idle_since = time.monotonic()
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                msgs = c.consume(num_messages=50_000, timeout=0.2)
                if not msgs:
                    have = len(ids) - start_ids
                    if time.monotonic() - idle_since > (1.0 if have >= topic_expected else 10.0):
                        break
                    continue
                idle_since = time.monotonic()
                for m in msgs:
                    if m.error():
                        continue
                    eid = dict(m.headers() or ()).get("eb.id", b"")
                    if int.from_bytes(eid[:4], "big") not in self.tags:
                        continue  # not this run's (a shared topic)
                    records += 1
                    if eid not in ids:
                        ids.add(eid)
                        checksum += fp.crc32c(m.value())
            c.close()
        out = {"records_read": records, "events_verified": len(ids), "duplicates": records - len(ids),
               "events_lost": max(0, expected_events - len(ids))}
        if expected_checksum is not None:
            out["checksum_ok"] = checksum == expected_checksum
        return out

    # scenarios

    def _gateway_figures(self, scenario: str, res: dict) -> dict:
        n = res["events_acked"]
        a = self.args
        d = res["daemon_cpu_s"]
        return {
            "scenario": scenario,
            "events": n,
            "seconds": res["seconds"],
            "events_per_s": res["events_per_s"],
            "mb_per_s": round(n * a.event_bytes / res["seconds"] / 1e6, 1),
            "daemon_cpu_s": round(d, 3) if d == d else None,
            "daemon_us_per_event": round(d / n * 1e6, 3) if n and d == d else None,
            "daemon_events_per_cpu_s": round(n / d) if d and d == d else None,
            "broker_us_per_event": round(res["broker_cpu_s"] / n * 1e6, 3) if self.broker_proc and n else None,
            "loadgen_us_per_event": round(res["loadgen_cpu_s"] / n * 1e6, 3) if n else None,
            "daemon_peak_rss_mb": res["daemon_peak_rss_mb"],
            "ack_latency_ms": res["ack_latency_ms"],
            "retry_later_batches": res["retry_later_batches"],
        }

    def ceiling(self, events: int) -> dict:
        pre = self.prefix()
        with self.daemon("null", self.topics(pre)) as (server, dp):
            res = self.loadgen(server, dp, events=events, connections=self.args.connections,
                               batch_events=self.args.batch_events, event_bytes=self.args.event_bytes)
        return self._gateway_figures("ceiling", res)

    def e2e(self, events: int, verify: bool = True, ack: str = "kafka") -> dict:
        """Raw-protocol load into the daemon, every event verified in Kafka after.
        With ``ack="spool"`` the types are acknowledged from the disk spool
        (fsync "interval"); the daemon's CPU then includes the spool's threads."""
        pre = self.prefix()
        topics = self.topics(pre)
        with self.daemon("kafka", topics, ack=ack) as (server, dp):
            res = self.loadgen(server, dp, events=events, connections=self.args.connections,
                               batch_events=self.args.batch_events, event_bytes=self.args.event_bytes)
        out = self._gateway_figures("e2e" if ack == "kafka" else "e2e-spool", res)
        if verify:
            expected = {topics[t]: res["acked_by_type"].get(t, 0) for t in self.types}
            out.update(self.verify(expected, res["events_acked"], res["payload_checksum"]))
            out["events_lost"] = max(0, res["events_acked"] - out["events_verified"])
        return out

    def schema(self, events: int) -> list[dict]:
        """e2e with 10-field JSON events, every type validated against
        benchmarks/schemas/bench/1.json, beside the same run unvalidated."""
        out = []
        for validated in (False, True):
            pre = self.prefix()
            topics = self.topics(pre)
            with self.daemon("kafka", topics, schema=validated) as (server, dp):
                res = self.loadgen(server, dp, events=events, connections=self.args.connections,
                                   batch_events=self.args.batch_events, payload="json10")
            run = self._gateway_figures("e2e-schema" if validated else "e2e-json10", res)
            expected = {topics[t]: res["acked_by_type"].get(t, 0) for t in self.types}
            run.update(self.verify(expected, res["events_acked"], res["payload_checksum"]))
            run["events_lost"] = max(0, res["events_acked"] - run["events_verified"])
            run["events_rejected"] = res["events_rejected"]
            out.append(run)
        plain, checked = out
        if plain["daemon_us_per_event"] and checked["daemon_us_per_event"]:
            checked["validation_us_per_event"] = round(checked["daemon_us_per_event"] - plain["daemon_us_per_event"], 3)
        return out

    def privacy(self, events: int) -> list[dict]:
        """e2e with events of 100,000 users carrying two personal fields
        (benchmarks/schemas/private), beside the same events against a schema
        that marks nothing personal (plain), in one run. The personal runs
        share one SQLite key store: cold (a new store: every key made on first
        sight), warm (the same gateway again: every key cached), and
        cold-existing (a new gateway on that store: every key read and
        unwrapped). Then one user is forgotten and the time until the gateway
        dropped the key is measured."""
        from eventbroker.kafka.embedded import free_port

        a = self.args
        out = []

        def load(server: str, dp: Proc) -> dict:
            return self.loadgen(server, dp, events=events, connections=a.connections, batch_events=a.batch_events,
                                payload="json10p")

        def finish(name: str, res: dict, topics: dict[str, str], before: dict, after: dict,
                   earlier: dict | None = None) -> dict:
            """The run's figures; its events read back (with ``earlier``'s: the same topics)."""
            run = self._gateway_figures(name, res)
            acked = {t: res["acked_by_type"].get(t, 0) + (earlier or {}).get(t, 0) for t in self.types}
            run.update(self.verify({topics[t]: acked[t] for t in self.types}, sum(acked.values()), None))
            run["events_lost"] = max(0, sum(acked.values()) - run["events_verified"])
            d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            if "eventbroker_privacy_values_sealed_total" in after:
                run["values_sealed"] = d["eventbroker_privacy_values_sealed_total"]
                run["users_loaded"] = d["eventbroker_privacy_users_loaded_total"]
                run["parts_waiting_for_keys"] = d["eventbroker_privacy_parts_waiting_for_keys_total"]
                secs = d["eventbroker_privacy_key_load_seconds_total"]
                run["key_store_users_per_s"] = round(run["users_loaded"] / secs) if secs else None
                run["cached_users"] = after["eventbroker_privacy_cached_users"]
            return run

        pre = self.prefix()
        topics = self.topics(pre)
        with self.daemon("kafka", topics, schema="plain") as (server, dp):
            out.append(finish("e2e-privacy-none", load(server, dp), topics, {}, {}))
        store = self.tmp / f"keys-{pre}"
        extra = (f'[privacy]\nkey_store = "sqlite:///{store}/keys.db"\nkek_file = "{store}/kek"\n'
                 'forget_poll_ms = 1000\n')
        for name in ("e2e-privacy-cold", "e2e-privacy-cold-existing"):
            topics = self.topics(self.prefix())
            admin = free_port()
            with self.daemon("kafka", topics, schema="private", extra=extra, admin_port=admin) as (server, dp):
                m0 = _metric_totals(f"127.0.0.1:{admin}")
                res = load(server, dp)
                m1 = _metric_totals(f"127.0.0.1:{admin}")
                if name != "e2e-privacy-cold":
                    out.append(finish(name, res, topics, m0, m1))
                    continue
                warm = load(server, dp)  # the same gateway again: every key cached
                m2 = _metric_totals(f"127.0.0.1:{admin}")
                forget_ms = _forget_ms(f"127.0.0.1:{admin}", store, "u000042")
            out.append(finish(name, res, topics, m0, m1))
            out.append(finish("e2e-privacy-warm", warm, topics, m1, m2, earlier=res["acked_by_type"]))
            out[-1]["forget_propagation_ms"] = forget_ms
        base = out[0]["daemon_us_per_event"]
        for run in out[1:]:
            if base is not None and run["daemon_us_per_event"] is not None:
                run["daemon_us_per_event_over_none"] = round(run["daemon_us_per_event"] - base, 3)
        out.append({"scenario": "privacy-cache-memory", **_cached_user_bytes()})
        return out

    def compression(self, events: int, codecs=("none", "zstd", "lz4", "snappy", "gzip")) -> list[dict]:
        """e2e with 10-field JSON events, every type's record batches
        compressed with each codec in turn (default level); the bytes come
        from the daemon's eventbroker_kafka_batch_bytes counters, and every
        run is read back (librdkafka decompresses it)."""
        from eventbroker.kafka.embedded import free_port

        out = []
        for codec in codecs:
            pre = self.prefix()
            topics = self.topics(pre)
            admin_port = free_port()
            with self.daemon("kafka", topics, compression=codec, admin_port=admin_port) as (server, dp):
                res = self.loadgen(server, dp, events=events, connections=self.args.connections,
                                   batch_events=self.args.batch_events, payload="json10")
                sizes = _batch_bytes(f"127.0.0.1:{admin_port}")
            run = self._gateway_figures(f"compression-{codec}", res)
            n = res["events_acked"]
            run["codec"] = codec
            run["record_bytes_per_event"] = round(sizes["records"] / n, 1)
            run["kafka_bytes_per_event"] = round(sizes["sent"] / n, 1)
            run["compression_ratio"] = round(sizes["records"] / sizes["sent"], 2) if sizes["sent"] else None
            expected = {topics[t]: res["acked_by_type"].get(t, 0) for t in self.types}
            run.update(self.verify(expected, n, res["payload_checksum"]))
            run["events_lost"] = max(0, n - run["events_verified"])
            out.append(run)
        base = out[0]["daemon_us_per_event"]
        for run in out[1:]:
            if base is not None and run["daemon_us_per_event"] is not None:
                run["daemon_us_per_event_over_none"] = round(run["daemon_us_per_event"] - base, 3)
        return out

    def sdk(self, events: int) -> list[dict]:
        """What a Python service pays per event: the producer SDK (``produce()``
        and ``await send()``) into the gateway, against confluent-kafka
        producing the same events (a key each, the 16-byte id header) straight
        into the same broker, in one run."""
        out = []
        for client in ("sdk", "sdk-send"):
            pre = self.prefix()
            topics = self.topics(pre)
            with self.daemon("kafka", topics) as (server, dp):
                res = self.loadgen(server, dp, events=events, connections=self.args.connections,
                                   batch_events=self.args.batch_events, event_bytes=self.args.event_bytes,
                                   client=client)
            run = self._gateway_figures("e2e-sdk" if client == "sdk" else "e2e-sdk-send", res)
            run["client_us_per_event"] = run.pop("loadgen_us_per_event")
            expected = {topics[t]: res["acked_by_type"].get(t, 0) for t in self.types}
            run.update(self.verify(expected, res["events_acked"], None))
            run["events_lost"] = max(0, res["events_acked"] - run["events_verified"])
            if run["client_us_per_event"] is not None and run["daemon_us_per_event"] is not None:
                run["client_plus_gateway_us_per_event"] = round(run["client_us_per_event"]
                                                                + run["daemon_us_per_event"], 3)
            out.append(run)
        # Ack latency through the SDK at fractions (default: half) of the rate the produce() run sustained.
        for f in self.args.sdk_latency_fractions:
            rate = out[0]["events_per_s"] * f
            pre = self.prefix()
            with self.daemon("kafka", self.topics(pre)) as (server, dp):
                res = self.loadgen(server, dp, events=int(rate * self.args.seconds), rate=rate, client="sdk",
                                   connections=self.args.connections, batch_events=self.args.batch_events,
                                   event_bytes=self.args.event_bytes)
            lat = self._gateway_figures(f"sdk-latency-{round(f * 100)}%", res)
            lat["offered_events_per_s"] = round(rate)
            lat["client_us_per_event"] = lat.pop("loadgen_us_per_event")
            out.append(lat)
        direct = self.direct("librdkafka", f"{self.prefix()}.direct", events, flags=("headers", "keys"))
        direct["scenario"] = "direct-librdkafka-keys-headers"
        out.append(direct)
        for run in out[:2]:
            if run.get("client_us_per_event") and direct["client_us_per_event"]:
                run["client_vs_librdkafka"] = round(run["client_us_per_event"] / direct["client_us_per_event"], 3)
        return out

    def fanin(self, events: int, connections: int, batch_events: int) -> list[dict]:
        pre = self.prefix()
        topics = self.topics(pre)
        with self.daemon("kafka", topics) as (server, dp):
            res = self.loadgen(server, dp, events=events, connections=connections, batch_events=batch_events,
                               event_bytes=self.args.event_bytes, window=1)
        gw = self._gateway_figures("fanin-gateway", res)
        gw["connections"] = connections
        gw["batch_events"] = batch_events
        direct = self.direct("librdkafka", f"{pre}.direct", events, producers=connections, batch_events=batch_events)
        direct["scenario"] = "fanin-direct-librdkafka"
        direct["producers"] = connections
        direct["batch_events"] = batch_events
        return [gw, direct]

    def isolation(self, seconds: float) -> dict:
        """The last of --types is made unwritable in the second phase."""
        blocked = self.types[-1]
        rates = {}
        for phase, broken in (("normal", False), ("one_type_blocked", True)):
            pre = self.prefix()
            topics = self.topics(pre)
            if broken:
                topics[blocked] = UNWRITABLE_TOPIC
            # No topic creation: the broker's auto-creation refuses the bad name.
            with self.daemon("kafka", topics, create_topics=not broken) as (server, dp):
                res = self.loadgen(server, dp, duration=seconds, connections=self.args.connections,
                                   batch_events=self.args.batch_events, event_bytes=self.args.event_bytes,
                                   events=200_000, drain_timeout=2)
            others = sum(n for t, n in res["acked_by_type"].items() if t != blocked)
            rates[phase] = {"others_events_per_s": round(others / res["seconds"]),
                            "blocked_type_events": res["acked_by_type"].get(blocked, 0),
                            "retry_later_batches": res["retry_later_batches"]}
        ratio = rates["one_type_blocked"]["others_events_per_s"] / max(1, rates["normal"]["others_events_per_s"])
        return {"scenario": "isolation", "seconds": seconds, "blocked_type": blocked, **rates,
                "others_ratio": round(ratio, 3)}

    def latency(self, seconds: float, fractions=(0.25, 0.5, 0.75)) -> list[dict]:
        """Ack latency at fixed fractions of the sustained maximum, measured first on the same daemon."""
        out = []
        pre = self.prefix()
        with self.daemon("kafka", self.topics(pre)) as (server, dp):
            peak = self.loadgen(server, dp, duration=seconds, connections=self.args.connections,
                                batch_events=self.args.batch_events, event_bytes=self.args.event_bytes,
                                events=200_000, drain_timeout=5)
            max_rate = peak["events_per_s"]
            sustained = self._gateway_figures("sustained-max", peak)
            out.append(sustained)
            for f in fractions:
                rate = max_rate * f
                batch = max(10, min(self.args.batch_events, int(rate / 1000)))  # about a batch per ms
                res = self.loadgen(server, dp, duration=seconds, rate=rate, connections=self.args.connections,
                                   batch_events=batch, event_bytes=self.args.event_bytes, window=64,
                                   events=max(batch * self.args.connections * 50, 100_000))
                fig = self._gateway_figures(f"latency-{int(f * 100)}%", res)
                fig["offered_events_per_s"] = round(rate)
                fig["batch_events"] = batch
                out.append(fig)
        return out


def _metric_totals(admin: str) -> dict[str, float]:
    """Every sample of the daemon's /metrics, summed over labels, by sample name."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def _forget_ms(admin: str, store: Path, user: str) -> float:
    """Forget ``user`` in the key store (the Python API); ms until the gateway reports it dropped the key."""
    from eventbroker.config import Config, PrivacyConfig
    from eventbroker.privacy import forget

    cfg = Config(privacy=PrivacyConfig(key_store=f"sqlite:///{store}/keys.db", kek_file=str(store / "kek")))
    before = _metric_totals(admin).get("eventbroker_privacy_forgets_applied_total", 0)
    t0 = time.monotonic()
    forget(cfg, user)
    while _metric_totals(admin).get("eventbroker_privacy_forgets_applied_total", 0) <= before:
        if time.monotonic() - t0 > 30:
            raise RuntimeError("the gateway did not apply a forget within 30 s")
        time.sleep(0.01)
    return round((time.monotonic() - t0) * 1000, 1)


def _cached_user_bytes(n: int = 100_000) -> dict:
    """Memory a gateway's key cache holds per user (tracemalloc): the user id as the
    payload names it (7 bytes here) and the 32-byte key, in UserKeys' dict."""
    import tracemalloc

    from eventbroker import _fastpath as fp

    uk = fp.UserKeys()
    tracemalloc.start()
    t0 = tracemalloc.get_traced_memory()[0]
    uk.keys.update((b"u%06d" % i, os.urandom(32)) for i in range(n))
    used = tracemalloc.get_traced_memory()[0] - t0
    tracemalloc.stop()
    return {"users": n, "bytes_per_cached_user": round(used / n, 1)}


def _batch_bytes(admin: str) -> dict[str, float]:
    """The daemon's eventbroker_kafka_batch_bytes, summed over types, by form."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"records": 0.0, "sent": 0.0}
    for fam in text_string_to_metric_families(text):
        if fam.name == "eventbroker_kafka_batch_bytes":
            for sample in fam.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["form"]] += sample.value
    return out


def machine_info() -> dict:
    import subprocess as sp

    try:
        commit = sp.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
        if sp.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                  text=True).stdout.strip():
            commit += "+changes"  # figures of a tree that differs from the commit
    except OSError:
        commit = ""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return contextlib.nullcontext(None)
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def run_quick(b: Bench) -> dict:
    a = b.args
    n = a.events or 300_000
    # The null sink is fast: give it enough events for /proc's 10 ms CPU ticks.
    ceiling = (b.ceiling(max(n, 2_000_000)) if not a.server
               else {"daemon_events_per_cpu_s": None, "daemon_us_per_event": None})
    e2e = b.e2e(n)
    direct = b.direct("librdkafka", f"{b.prefix()}.direct", n)
    lat = b.latency(3.0, fractions=(0.5,))[1]
    return {
        "e2e_daemon_events_per_cpu_s": e2e["daemon_events_per_cpu_s"],
        "e2e_daemon_us_per_event": e2e["daemon_us_per_event"],
        "ceiling_daemon_events_per_cpu_s": ceiling["daemon_events_per_cpu_s"],
        "ceiling_daemon_us_per_event": ceiling["daemon_us_per_event"],
        "direct_librdkafka_events_per_cpu_s": direct["client_events_per_cpu_s"],
        "direct_librdkafka_us_per_event": direct["client_us_per_event"],
        "ratio_e2e_daemon_vs_direct_client_cpu_per_event": round(
            e2e["daemon_us_per_event"] / direct["client_us_per_event"], 3) if e2e["daemon_us_per_event"] else None,
        "e2e_events_per_s": e2e["events_per_s"],
        "direct_librdkafka_events_per_s": direct["events_per_s"],
        "p99_ack_latency_ms_at_50pct": lat["ack_latency_ms"]["p99"],
        "events_lost": e2e["events_lost"],
        "events": n,
    }


def run_full(b: Bench) -> dict:
    a = b.args
    n = a.events or 1_000_000
    runs: list[dict] = []
    steps = sum(1 for x in ("ceiling", "spool", "schema", "privacy", "sdk", "compression", "fanin", "isolation",
                            "latency")
                if x in a.scenarios) + 3 * a.rounds
    with _progress(steps, "bench") as bar:
        def tick(what: str) -> None:
            if bar is not None:
                bar.set_postfix_str(what)
                bar.update(1)

        if "ceiling" in a.scenarios:
            runs.append(b.ceiling(n))
            tick("ceiling")
        for r in range(a.rounds):  # alternate, so a noisy machine hits all alike
            if "e2e" in a.scenarios:
                runs.append({**b.e2e(n), "round": r})
                tick(f"e2e {r}")
            if "direct" in a.scenarios:
                runs.append({**b.direct("librdkafka", f"{b.prefix()}.direct", n), "round": r})
                tick(f"direct librdkafka {r}")
                runs.append({**b.direct("aiokafka", f"{b.prefix()}.direct", n), "round": r})
                tick(f"direct aiokafka {r}")
        if "spool" in a.scenarios:
            runs.append(b.e2e(n, ack="spool"))
            tick("spool")
        if "schema" in a.scenarios:
            runs.extend(b.schema(n))
            tick("schema")
        if "privacy" in a.scenarios:
            for r in range(a.privacy_rounds):  # the summary takes the median of the rounds
                runs.extend({**run, "round": r} for run in b.privacy(n))
            tick("privacy")
        if "sdk" in a.scenarios:
            runs.extend(b.sdk(n))
            tick("sdk")
        if "compression" in a.scenarios:
            runs.extend(b.compression(n))
            tick("compression")
        if "fanin" in a.scenarios:
            runs.extend(b.fanin(min(n, 500_000), a.fanin_connections, a.fanin_batch_events))
            tick("fanin")
        if "isolation" in a.scenarios:
            runs.append(b.isolation(a.seconds))
            tick("isolation")
        if "latency" in a.scenarios:
            runs.extend(b.latency(a.seconds))
            tick("latency")
    return {"machine": machine_info(), "settings": {"events": n, "event_bytes": a.event_bytes,
            "connections": a.connections, "batch_events": a.batch_events, "rounds": a.rounds},
            "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict]) -> dict:
    def med(scenario: str, key: str):
        vals = [r[key] for r in runs if r.get("scenario") == scenario and r.get(key) is not None]
        return statistics.median(vals) if vals else None

    s = {
        "e2e_daemon_us_per_event": med("e2e", "daemon_us_per_event"),
        "ceiling_daemon_us_per_event": med("ceiling", "daemon_us_per_event"),
        "direct_librdkafka_client_us_per_event": med("direct-librdkafka", "client_us_per_event"),
        "direct_aiokafka_client_us_per_event": med("direct-aiokafka-batch", "client_us_per_event"),
        "e2e_events_per_s": med("e2e", "events_per_s"),
        "direct_librdkafka_events_per_s": med("direct-librdkafka", "events_per_s"),
        "direct_aiokafka_events_per_s": med("direct-aiokafka-batch", "events_per_s"),
        "e2e_spool_daemon_us_per_event": med("e2e-spool", "daemon_us_per_event"),
        "e2e_spool_events_per_s": med("e2e-spool", "events_per_s"),
        "sdk_produce_client_us_per_event": med("e2e-sdk", "client_us_per_event"),
        "sdk_send_client_us_per_event": med("e2e-sdk-send", "client_us_per_event"),
        "sdk_produce_client_plus_gateway_us_per_event": med("e2e-sdk", "client_plus_gateway_us_per_event"),
        "direct_librdkafka_keys_headers_client_us_per_event": med("direct-librdkafka-keys-headers",
                                                                  "client_us_per_event"),
        "privacy_none_daemon_us_per_event": med("e2e-privacy-none", "daemon_us_per_event"),
        "privacy_warm_daemon_us_per_event": med("e2e-privacy-warm", "daemon_us_per_event"),
        "privacy_warm_daemon_us_per_event_over_none": med("e2e-privacy-warm", "daemon_us_per_event_over_none"),
        "privacy_cold_daemon_us_per_event_over_none": med("e2e-privacy-cold", "daemon_us_per_event_over_none"),
        "privacy_cold_seconds": med("e2e-privacy-cold", "seconds"),
        "privacy_cold_existing_seconds": med("e2e-privacy-cold-existing", "seconds"),
        "privacy_forget_propagation_ms": med("e2e-privacy-warm", "forget_propagation_ms"),
        "events_lost": sum(r.get("events_lost", 0) for r in runs),
    }
    if s["e2e_daemon_us_per_event"] and s["direct_librdkafka_client_us_per_event"]:
        s["ratio_e2e_daemon_vs_librdkafka_cpu"] = round(
            s["e2e_daemon_us_per_event"] / s["direct_librdkafka_client_us_per_event"], 3)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eventbroker bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="under a minute: one JSON line of key figures")
    ap.add_argument("--scenarios",
                    default="ceiling,e2e,direct,spool,schema,privacy,sdk,compression,fanin,isolation,latency")
    ap.add_argument("--events", type=int, help="events per run (default 1,000,000; --quick 300,000)")
    ap.add_argument("--event-bytes", type=int, default=200)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--batch-events", type=int, default=2000)
    ap.add_argument("--procs", type=int, default=1, help="load generator processes (they share the connections)")
    ap.add_argument("--rounds", type=int, default=3, help="e2e/direct alternations")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of timed runs (isolation, latency)")
    ap.add_argument("--fanin-connections", type=int, default=500)
    ap.add_argument("--fanin-batch-events", type=int, default=20)
    ap.add_argument("--kafka", help="use this Kafka cluster instead of starting Tansu")
    ap.add_argument("--server", help="use this running daemon (HOST:PORT) instead of starting one; its config "
                    "decides topics (events.<type> assumed for verification) and sink")
    ap.add_argument("--server-pid", type=int, help="pid of the --server daemon, for its CPU figures")
    ap.add_argument("--types", default=DEFAULT_TYPES, help="event types, comma separated (sent round-robin)")
    ap.add_argument("--privacy-rounds", type=int, default=3, help="privacy scenario: times to run it")
    ap.add_argument("--linger-ms", type=int, help="the daemon's [kafka] linger_ms (default: its default)")
    ap.add_argument("--sdk-latency-fractions", default="0.5",
                    help="sdk scenario: ack latency at these fractions of the produce() rate (comma separated)")
    ap.add_argument("--compression", default="none",
                    help="every type's Kafka compression in the scenarios other than compression (default none, "
                         "as the direct producers send)")
    ap.add_argument("--output", help="write the full results JSON here (default benchmarks/results/)")
    args = ap.parse_args(argv)
    args.scenarios = set(args.scenarios.split(","))
    args.sdk_latency_fractions = [float(x) for x in args.sdk_latency_fractions.split(",")]
    if args.server:
        if not args.kafka:
            ap.error("--server needs --kafka (the broker that daemon writes to)")
        dropped = args.scenarios & {"ceiling", "isolation", "compression", "privacy"}
        if dropped:
            print(f"with --server, skipping {', '.join(sorted(dropped))} (they configure their own daemon)",
                  file=sys.stderr)
        args.scenarios -= dropped
    for m in ("psutil", "confluent_kafka"):
        _need(m)
    b = Bench(args)
    try:
        b.start_broker()
        if args.quick:
            print(orjson.dumps(run_quick(b)).decode())
            return 0
        result = run_full(b)
    finally:
        b.stop()
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.output) if args.output else RESULTS / "latest.json"
    out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(result["summary"]).decode())
    print(f"full results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
