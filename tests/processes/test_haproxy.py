"""Two gateways behind HAProxy (config/haproxy.cfg, health-checking /readyz):
producers spread over both, and draining one moves its producers to the other
without losing an event. Needs the haproxy binary (Debian package haproxy;
.ci/run installs it)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import msgspec
import pytest

from conftest import REPO, make_config, read_ids, serve_daemon
from eventbroker.client import Producer
from eventbroker.kafka.embedded import free_port, wait_for_port

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (apt-get install haproxy)")


def haproxy_config(front: int, backends: list[tuple[int, int]], stats_sock: Path) -> str:
    """config/haproxy.cfg with this test's addresses and a stats socket, and
    faster health checks than the documented 1 s."""
    text = (REPO / "config" / "haproxy.cfg").read_text()
    text = text.replace("global\n", f"global\n    stats socket {stats_sock} level admin\n", 1)
    text = text.replace("bind :7480", f"bind 127.0.0.1:{front}")
    text = text.replace("inter 1s", "inter 200ms")
    text = text.replace("maxconn 200000", "maxconn 4000")  # within this machine's open-files limit
    text = re.sub(r"^\s*server .*\n", "", text, flags=re.M)
    return text + "".join(f"    server gw{i} 127.0.0.1:{port} check port {admin}\n"
                          for i, (port, admin) in enumerate(backends))


def server_states(stats_sock: Path) -> dict[str, str]:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(stats_sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(head, line.split(","), strict=False))
        if row.get("pxname") == "gateways" and row.get("svname", "").startswith("gw"):
            out[row["svname"]] = row["status"]
    return out


async def wait_states(stats_sock: Path, want: dict[str, str], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    got: dict[str, str] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            got = server_states(stats_sock)
            if all(got.get(k) == v for k, v in want.items()):
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"haproxy says {got}, expected {want}")


@pytest.mark.asyncio(loop_factories=["uvloop"])
async def test_two_gateways_behind_haproxy_spread_and_drain(tmp_path, kafka_bootstrap):
    from conftest import metrics, total

    cfg = make_config(kafka_bootstrap, {"play": {}})
    procs = []
    backends = []
    log = open(tmp_path / "gateways.log", "wb")  # noqa: ASYNC230, SIM115 - closed below
    for name in ("a", "b"):
        port, admin = free_port(), free_port()
        c = msgspec.structs.replace(cfg, server=msgspec.structs.replace(cfg.server,
                                                                        admin_listen=f"127.0.0.1:{admin}"))
        conf = tmp_path / f"{name}.toml"
        conf.write_bytes(msgspec.toml.encode(c))
        procs.append(serve_daemon(conf, port, log))
        backends.append((port, admin))
    front = free_port()
    stats = tmp_path / "haproxy.sock"
    (tmp_path / "haproxy.cfg").write_text(haproxy_config(front, backends, stats))
    hap = subprocess.Popen(  # noqa: ASYNC220 - returns at once
        [HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", front, 30, hap)
        await wait_states(stats, {"gw0": "UP", "gw1": "UP"})
        producers = [Producer(f"127.0.0.1:{front}", linger_ms=2, reconnect_backoff_ms=(20, 300)) for _ in range(8)]
        for p in producers:
            await p.start()
            await p.wait_connected(30)
        admins = [f"127.0.0.1:{a}" for _, a in backends]
        spread = [total(await metrics(a), "eventbroker_connections") for a in admins]
        assert sum(spread) == 8 and min(spread) >= 2, spread  # leastconn spread them
        futs: list[asyncio.Future[bytes]] = []

        async def produce(n: int, tag: bytes) -> None:
            for i in range(n):
                futs.append(await producers[i % 8].send("play", tag + b"-%d" % i))
                if i % 100 == 0:
                    await asyncio.sleep(0.002)

        await produce(10_000, b"both")
        # Take gateway A out: SIGTERM drains it (GOAWAY, /readyz 503, exit).
        t0 = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        await asyncio.gather(produce(10_000, b"drain"), wait_states(stats, {"gw0": "DOWN", "gw1": "UP"}))
        down_s = time.monotonic() - t0
        for p in producers:
            await p.flush(timeout_s=60)
        assert procs[0].wait(30) == 0
        ids = {f.result() for f in futs}
        failures = sum(p.stats["connect_failures"] for p in producers)
        reconnects = sum(p.reconnects for p in producers)
        on_b = total(await metrics(admins[1]), "eventbroker_connections")
        for p in producers:
            await p.close()
    finally:
        hap.send_signal(signal.SIGTERM)
        hap.wait(10)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        log.close()
    found = read_ids(kafka_bootstrap, cfg.types["play"].topic, ids)
    print(f"\nhaproxy: 8 producers spread {spread} over two gateways; A drained, marked DOWN after {down_s:.2f}s; "
          f"{len(ids)} acked, {len(found)} in Kafka, {reconnects} reconnects, {failures} failed connection "
          f"attempts, {on_b:.0f} producers on B at the end")
    assert len(ids) == 20_000 and found == ids
    assert on_b == 8  # everyone moved to B
