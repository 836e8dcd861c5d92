"""The alternative a gateway competes with: producing straight into Kafka.

    python benchmarks/direct.py librdkafka --bootstrap HOST:PORT --topic T --events N
    python benchmarks/direct.py aiokafka   --bootstrap HOST:PORT --topic T --events N

librdkafka (confluent-kafka) is tuned the way a careful service would tune it
for throughput (linger, large batches, acks=all, no compression); aiokafka uses
its batch API (create_batch/send_batch), the fastest aiokafka path. By default
records carry no headers and no key (the cheapest case for the direct
producer); with ``--headers`` each gets the 16-byte eb.id header the gateway
adds, with ``--keys`` a key (one of 1024).
``--producers K --batch-events B`` models many small services: K producer
instances, each sending B events and waiting for them before the next B.

Prints one JSON line with events delivered, seconds and this process's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys
import time
from pathlib import Path

import orjson


def run_librdkafka(args: argparse.Namespace) -> dict:
    from confluent_kafka import Producer

    conf = {
        "bootstrap.servers": args.bootstrap,
        "acks": "all",
        "enable.idempotence": False,
        "compression.type": "none",
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "batch.num.messages": 100_000,
        "queue.buffering.max.messages": 2_000_000,
        "queue.buffering.max.kbytes": 2_000_000,
        # A delivery callback per message would cost more than producing it:
        # report failures only, count the rest.
        "delivery.report.only.error": True,
    }
    producers = [Producer(conf) for _ in range(args.producers)]
    failed = [0]

    def on_delivery(err, _msg) -> None:
        failed[0] += 1

    payload = b"x" * args.event_bytes
    n = args.events
    for p in producers:  # metadata before the clock starts
        p.list_topics(args.topic, timeout=10)
    if args.ready_file:
        Path(args.ready_file).write_text("ready")
    t0 = time.perf_counter()
    c0 = time.process_time()
    if args.producers == 1:
        p = producers[0]
        produce = p.produce
        topic = args.topic
        keys = [b"user-%04d" % i for i in range(1024)]
        for i in range(n):
            kw = {"headers": [("eb.id", struct.pack(">QQ", 1, i + 1))]} if args.headers else {}
            if args.keys:
                kw["key"] = keys[i & 1023]
            try:
                produce(topic, payload, on_delivery=on_delivery, **kw)
            except BufferError:
                p.poll(0.01)
                produce(topic, payload, on_delivery=on_delivery, **kw)
            if i & 0x3FFF == 0:
                p.poll(0)
        p.flush()
    else:
        sent = 0
        while sent < n:
            for k, p in enumerate(producers):
                for j in range(args.batch_events):
                    kw = {"headers": [("eb.id", struct.pack(">QQ", k, sent + j))]} if args.headers else {}
                    p.produce(args.topic, payload, on_delivery=on_delivery, **kw)
                sent += args.batch_events
            for p in producers:
                p.flush()
        n = sent
    seconds = time.perf_counter() - t0
    unflushed = sum(len(p) for p in producers)
    delivered = n - failed[0] - unflushed
    return {"client": "librdkafka", "events": delivered, "failed": failed[0] + unflushed, "seconds": seconds,
            "cpu_s": time.process_time() - c0}


async def run_aiokafka(args: argparse.Namespace) -> dict:
    from aiokafka import AIOKafkaProducer

    p = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", enable_idempotence=False, linger_ms=5,
                         max_batch_size=1_000_000, max_request_size=2_000_000)
    await p.start()
    parts = sorted(await p.partitions_for(args.topic))
    payload = b"x" * args.event_bytes
    if args.ready_file:
        Path(args.ready_file).write_text("ready")  # noqa: ASYNC240 - before the clock starts
    t0 = time.perf_counter()
    c0 = time.process_time()
    futs = []
    i = 0
    k = 0
    while i < args.events:
        batch = p.create_batch()
        while i < args.events:
            headers = [("eb.id", struct.pack(">QQ", 2, i + 1))] if args.headers else []
            meta = batch.append(key=None, value=payload, timestamp=None, headers=headers)
            if meta is None:
                break
            i += 1
        batch.close()
        futs.append(await p.send_batch(batch, args.topic, partition=parts[k % len(parts)]))
        k += 1
    await asyncio.gather(*futs)
    delivered = i
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    await p.stop()
    return {"client": "aiokafka-batch", "events": delivered, "failed": 0, "seconds": seconds, "cpu_s": cpu}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("client", choices=["librdkafka", "aiokafka"])
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--event-bytes", type=int, default=200)
    ap.add_argument("--producers", type=int, default=1)
    ap.add_argument("--batch-events", type=int, default=20)
    ap.add_argument("--headers", action="store_true",
                    help="give each record an eb.id header, as the gateway does (costs librdkafka about 2 us)")
    ap.add_argument("--keys", action="store_true",
                    help="give each record a key, one of 1024 (as the sdk scenario's producers do)")
    ap.add_argument("--ready-file")
    args = ap.parse_args(argv)
    if args.client == "librdkafka":
        out = run_librdkafka(args)
    else:
        import uvloop

        out = uvloop.run(run_aiokafka(args))
    print(orjson.dumps(out).decode())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
