"""The broker dies or hangs mid-stream: what producers saw acknowledged is in
Kafka afterwards, and the SDK finishes with every event acknowledged.

Tansu's memory storage loses everything on restart, which would hide our
losses behind the broker's, so the kill test runs Tansu on S3 storage served
by moto on loopback. These tests start their own brokers and skip when the
suite runs against an external cluster (EVENTBROKER_TEST_KAFKA).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import daemon_address, make_config, read_topic, record_headers
from eventbroker.client import Producer
from eventbroker.kafka.embedded import EmbeddedKafka, free_port, wait_for_port
from eventbroker.ops.daemon import Daemon

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("EVENTBROKER_TEST_KAFKA")), reason="needs a broker this test can kill"
)


def _moto_server() -> str:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.fail("moto_server not installed (pip install -e '.[test]')")
    return exe


@pytest.fixture
def s3_broker_env(tmp_path) -> Iterator[dict[str, str]]:
    """An S3 server on loopback with a bucket, and the environment Tansu needs to use it."""
    import boto3

    port = free_port()
    with open(tmp_path / "moto.log", "wb") as log:
        moto = subprocess.Popen([_moto_server(), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        wait_for_port("127.0.0.1", port, 30, moto)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket="tansu")
        yield {"AWS_ENDPOINT": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        moto.terminate()
        moto.wait(10)


async def _stream_with_fault(producer: Producer, total: int, fault) -> tuple[list[asyncio.Future], set[bytes]]:
    """Send ``total`` events steadily; run ``fault()`` once 3,000 are acknowledged."""
    futs: list[asyncio.Future[bytes]] = []
    acked_before: set[bytes] = set()

    async def produce() -> None:
        for i in range(total):
            futs.append(await producer.send("play", b"event-%d" % i))
            if i % 200 == 0:
                await asyncio.sleep(0.001)

    async def inject() -> None:
        nonlocal acked_before
        while sum(1 for f in futs if f.done()) < 3000:
            await asyncio.sleep(0.001)
        acked_before = {f.result() for f in futs if f.done() and not f.exception()}
        await fault()

    await asyncio.gather(produce(), inject())
    return futs, acked_before


FAULT_KAFKA = {"stall_timeout_ms": 1000, "retry_backoff_ms": 100, "retry_backoff_max_ms": 1000,
               "request_timeout_ms": 5000}
TOTAL = 20_000


async def _run_through_fault(bootstrap: str, fault, read_bootstrap, what: str, spool_dir: Path | None = None) -> dict:
    """A daemon on ``bootstrap``, an SDK producer streaming TOTAL events through
    it, ``fault()`` injected mid-stream; returns what happened, checked for loss.

    ``read_bootstrap()`` names the broker to verify against once the fault is
    over. With ``spool_dir`` the type is acknowledged from a disk spool there.
    """
    if spool_dir is None:
        cfg = make_config(bootstrap, {"play": {}}, kafka=FAULT_KAFKA)
    else:
        cfg = make_config(bootstrap, {"play": {"ack": "spool"}}, kafka=FAULT_KAFKA, spool={"dir": str(spool_dir)},
                          server={"drain_timeout_ms": 60_000})
    t0 = time.monotonic()
    d = Daemon(cfg)
    await d.start()
    try:
        async with Producer(daemon_address(d), linger_ms=2) as p:
            futs, acked_before = await _stream_with_fault(p, TOTAL, fault)
            await p.flush(timeout_s=120)
            ids = [f.result() for f in futs]  # raises if any event was not persisted
            retried = p.stats["retried"]
        lane = d.router.lanes["play"]
        shed = lane.stats.sheds
        forwarder = getattr(lane, "forwarder", None)
    finally:
        await d.stop()
    # From a thread: a fault proxy in front of the broker runs in this loop.
    got = await asyncio.get_running_loop().run_in_executor(
        None, read_topic, read_bootstrap(), cfg.types["play"].topic, TOTAL, 60.0)
    found = {record_headers(m)["eb.id"] for m in got}
    print(f"\n{what}: sent {TOTAL}, acked before the fault {len(acked_before)}, acked in the end {len(ids)}, "
          f"found {len(found)}, duplicates {len(got) - len(found)}, handed back and resent {retried}, "
          f"lane sheds {shed}, {time.monotonic() - t0:.1f}s"
          + (f", spool forwarded {forwarder.stats.events_forwarded} after "
             f"{forwarder.stats.send_failures} failed sends" if forwarder else ""))
    assert acked_before and acked_before <= found  # nothing acknowledged was lost
    assert found == set(ids)  # and everything was delivered in the end
    return {"shed": shed, "forwarder": forwarder}


@pytest.mark.parametrize("spooled", [False, True], ids=["kafka-acked", "spooled"])
@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_kill_9_broker_mid_stream_and_restart(tmp_path, s3_broker_env, spooled):
    """kill -9 of the broker, restarted 1.5 s later (longer than
    stall_timeout_ms). A Kafka-acked type hands its events back meanwhile; a
    spooled type hands back nothing, and its spool delivers everything once
    the broker is back."""
    log = str(tmp_path / "tansu.log")
    broker = EmbeddedKafka(storage="s3://tansu/", env=s3_broker_env, log_path=log).start()
    again = EmbeddedKafka(port=broker.port, storage="s3://tansu/", env=s3_broker_env, log_path=log)

    async def kill_and_restart() -> None:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait()
        broker.proc = None
        await asyncio.sleep(1.5)
        await asyncio.get_running_loop().run_in_executor(None, again.start)

    try:
        res = await _run_through_fault(broker.bootstrap, kill_and_restart, lambda: again.bootstrap,
                                       "broker kill -9" + (", spooled type" if spooled else ""),
                                       spool_dir=tmp_path / "spool" if spooled else None)
        if spooled:
            assert res["shed"] == 0  # the spool took everything: nothing was handed back
            assert res["forwarder"].stats.events_forwarded >= TOTAL
    finally:
        broker.stop()
        again.stop()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_hung_broker_sigstop_then_sigcont(tmp_path):
    """A broker that stops answering (SIGSTOP) for longer than stall_timeout_ms:
    the type hands its events back, producers wait them out, and once the
    broker resumes everything is delivered."""
    broker = EmbeddedKafka(log_path=str(tmp_path / "tansu.log")).start()

    async def hang() -> None:
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(2.5)
        broker.proc.send_signal(signal.SIGCONT)

    try:
        res = await _run_through_fault(broker.bootstrap, hang, lambda: broker.bootstrap, "broker SIGSTOP 2.5s")
        assert res["shed"] >= 1  # the stall was noticed and the type handed its events back
    finally:
        if broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)
        broker.stop()


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_network_partition_to_the_broker(proxied_broker):
    """The daemon's connections to Kafka are cut and new ones refused for 2 s
    (a partition), through a fault-injecting proxy the broker advertises."""
    proxy, broker = proxied_broker

    async def partition() -> None:
        proxy.cut()
        await asyncio.sleep(2.0)
        proxy.heal()

    res = await _run_through_fault(f"127.0.0.1:{proxy.port}", partition, lambda: broker.bootstrap, "partition 2s")
    assert res["shed"] >= 1
