"""End-to-end throughput run: broker, daemon and load generator as separate
processes, the CPU each one used, and an independent count of what landed.

    python benchmarks/e2e.py --events 1000000 [--sink null] [--direct]

Starts Tansu (memory storage) on a free port unless --kafka is given, the
daemon (`eventbroker serve`), then benchmarks/loadgen.py. CPU seconds come
from /proc (psutil) for the window in which the load generator sends; the
verification reads every topic back with librdkafka and counts records.
With --direct it also produces the same events straight into the same broker
with confluent-kafka (librdkafka), for a ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil

from eventbroker.embedded import EmbeddedKafka, free_port, wait_for_port

HERE = Path(__file__).resolve().parent
TYPES = ["play", "search", "client_log"]


def cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def count_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 120) -> int:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{os.getpid()}-{topic}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    md = c.list_topics(topic, timeout=10)
    c.assign([TopicPartition(topic, p, 0) for p in md.topics[topic].partitions])
    n = 0
    deadline = time.monotonic() + timeout_s
    idle_since = time.monotonic()
    while time.monotonic() < deadline:
        msgs = c.consume(num_messages=100_000, timeout=0.2)
        if msgs:
            n += sum(1 for m in msgs if not m.error())
            idle_since = time.monotonic()
        elif n >= expected and time.monotonic() - idle_since > 1.0:
            break
    c.close()
    return n


def run_gateway(args: argparse.Namespace, bootstrap: str, broker: psutil.Process | None, prefix: str) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "eb.toml"
        lines = [f'[kafka]\nsink = "{args.sink}"\nbootstrap_servers = "{bootstrap}"\n']
        for t in TYPES:
            lines.append(f'[types.{t}]\ntopic = "{prefix}.{t}"\npartitioning = "spread"\n')
        conf.write_text("".join(lines))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "eventbroker.cli", "serve", "--config", str(conf), "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "daemon.log", "wb"),
        )
        try:
            wait_for_port("127.0.0.1", port, 30, daemon)
            ready = Path(tmp) / "ready"
            gen = subprocess.Popen(
                [sys.executable, str(HERE / "loadgen.py"), "--server", f"127.0.0.1:{port}",
                 "--events", str(args.events), "--connections", str(args.connections),
                 "--batch-events", str(args.batch_events), "--event-bytes", str(args.event_bytes),
                 "--ready-file", str(ready)],
                stdout=subprocess.PIPE,
            )
            while not ready.exists():
                if gen.poll() is not None:
                    raise RuntimeError("load generator failed")
                time.sleep(0.01)
            dp = psutil.Process(daemon.pid)
            d0 = cpu_s(dp)
            b0 = cpu_s(broker) if broker else 0.0
            rss_peak = 0
            while gen.poll() is None:
                rss_peak = max(rss_peak, dp.memory_info().rss)
                time.sleep(0.05)
            d1 = cpu_s(dp)
            b1 = cpu_s(broker) if broker else 0.0
            out = orjson.loads(gen.stdout.read())
        finally:
            daemon.terminate()
            daemon.wait(30)
    n = out["events_acked"]
    res = {
        "scenario": "ceiling" if args.sink == "null" else "e2e",
        "events": n,
        "seconds": out["seconds"],
        "events_per_s": out["events_per_s"],
        "mb_per_s": round(n * args.event_bytes / out["seconds"] / 1e6, 1),
        "daemon_cpu_s": round(d1 - d0, 3),
        "broker_cpu_s": round(b1 - b0, 3),
        "loadgen_cpu_s": out["loadgen_cpu_s"],
        "daemon_us_per_event": round((d1 - d0) / n * 1e6, 3),
        "daemon_events_per_cpu_s": round(n / (d1 - d0)),
        "broker_us_per_event": round((b1 - b0) / n * 1e6, 3) if broker else None,
        "loadgen_us_per_event": round(out["loadgen_cpu_s"] / n * 1e6, 3),
        "daemon_peak_rss_mb": round(rss_peak / 1e6, 1),
        "ack_latency_ms": out["ack_latency_ms"],
        "retry_later_batches": out["retry_later_batches"],
    }
    if args.sink == "kafka" and args.verify:
        found = sum(count_topic(bootstrap, f"{prefix}.{t}", 0) for t in TYPES)
        res["events_verified"] = found
        res["events_lost"] = max(0, n - found)
    return res


DIRECT = r"""
import sys, time, os, struct, json
from confluent_kafka import Producer
bootstrap, topic, n, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5, "batch.size": 1000000,
              "queue.buffering.max.messages": 2000000, "compression.type": "none", "enable.idempotence": False})
payload = b"x" * size
delivered = [0]
def cb(err, msg):
    if err is None: delivered[0] += 1
open(sys.argv[5], "w").write("ready")
t0 = time.perf_counter(); c0 = time.process_time()
for i in range(n):
    while True:
        try:
            p.produce(topic, payload, headers=[("eb.id", struct.pack(">QQ", 1, i))], on_delivery=cb); break
        except BufferError:
            p.poll(0.01)
    if i % 10000 == 0: p.poll(0)
p.flush()
print(json.dumps({"events": delivered[0], "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
"""


def run_direct(args: argparse.Namespace, bootstrap: str, broker: psutil.Process | None, prefix: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        proc = subprocess.Popen(
            [sys.executable, "-c", DIRECT, bootstrap, f"{prefix}.direct", str(args.events), str(args.event_bytes),
             str(ready)],
            stdout=subprocess.PIPE,
        )
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError("direct producer failed")
            time.sleep(0.01)
        b0 = cpu_s(broker) if broker else 0.0
        out = orjson.loads(proc.communicate()[0])
        b1 = cpu_s(broker) if broker else 0.0
    n = out["events"]
    return {
        "scenario": "direct-librdkafka",
        "events": n,
        "seconds": round(out["seconds"], 4),
        "events_per_s": round(n / out["seconds"]),
        "client_cpu_s": round(out["cpu_s"], 3),
        "client_us_per_event": round(out["cpu_s"] / n * 1e6, 3),
        "client_events_per_cpu_s": round(n / out["cpu_s"]),
        "broker_cpu_s": round(b1 - b0, 3),
        "broker_us_per_event": round((b1 - b0) / n * 1e6, 3) if broker else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--event-bytes", type=int, default=200)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--batch-events", type=int, default=2000)
    ap.add_argument("--sink", choices=["kafka", "null"], default="kafka")
    ap.add_argument("--kafka", help="use this broker instead of starting Tansu")
    ap.add_argument("--direct", action="store_true", help="also produce directly with librdkafka")
    ap.add_argument("--no-verify", dest="verify", action="store_false")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    broker_proc = None
    emb = None
    if args.kafka:
        bootstrap = args.kafka
    else:
        emb = EmbeddedKafka().start()
        bootstrap = emb.bootstrap
        broker_proc = psutil.Process(emb.proc.pid)
    try:
        for r in range(args.rounds):
            prefix = f"bench{os.getpid()}r{r}"
            print(orjson.dumps(run_gateway(args, bootstrap, broker_proc, prefix)).decode(), flush=True)
            if args.direct:
                print(orjson.dumps(run_direct(args, bootstrap, broker_proc, prefix)).decode(), flush=True)
    finally:
        if emb:
            emb.stop()


if __name__ == "__main__":
    main()
