"""The ``eventbroker`` command as a user runs it: real processes, real broker."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from conftest import make_config, read_topic, record_headers, write_config
from eventbroker.kafka.embedded import free_port, wait_for_port

EB = [sys.executable, "-m", "eventbroker.cli"]


@contextlib.contextmanager
def serve(args: list[str], log: Path, port: int) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([*EB, "serve", *args], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 60, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def produce(event_type: str, lines: list[bytes], port: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EB, "produce", "--type", event_type, "--server", f"127.0.0.1:{port}", "--json", *extra],
        input=b"".join(line + b"\n" for line in lines),
        capture_output=True,
        timeout=300,
    )


def test_produce_100k_events_of_three_types(tmp_path, kafka_bootstrap):
    """100,000 events via `eventbroker produce`: all acked, each found exactly once in its own topic."""
    cfg = make_config(kafka_bootstrap)
    conf = write_config(tmp_path, cfg)
    port = free_port()
    per_type = {"play": 33_334, "search": 33_333, "client_log": 33_333}
    sent: dict[str, list[bytes]] = {}
    with serve(["--single-process", "--config", str(conf), "--listen", f"127.0.0.1:{port}"], tmp_path / "serve.log",
               port) as proc:
        procs = {}
        for t, n in per_type.items():
            lines = [orjson.dumps({"type": t, "i": i, "user": f"u{i % 97}", "pad": "x" * 120}) for i in range(n)]
            sent[t] = lines
            procs[t] = subprocess.Popen(
                [*EB, "produce", "--type", t, "--server", f"127.0.0.1:{port}", "--key-field", "user", "--json"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
        for t, pr in procs.items():
            out, err = pr.communicate(b"".join(x + b"\n" for x in sent[t]), timeout=300)
            assert pr.returncode == 0, err.decode()
            summary = orjson.loads(out)
            assert summary == {"type": t, "sent": per_type[t], "persisted": per_type[t], "rejected": {},
                               "unacknowledged": 0, "invalid_json": 0}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert sum(per_type.values()) == 100_000
    for t, lines in sent.items():
        got = read_topic(kafka_bootstrap, cfg.types[t].topic, len(lines), timeout_s=60)
        assert len(got) == len(lines), f"{t}: {len(got)} records for {len(lines)} events"
        assert len({record_headers(m)["eb.id"] for m in got}) == len(lines), f"{t}: duplicate ids"
        assert sorted(m.value() for m in got) == sorted(lines)
        assert all(m.key() == orjson.loads(m.value())["user"].encode() for m in got)


def test_produce_reports_rejections_and_fails(tmp_path, kafka_bootstrap):
    cfg = make_config(kafka_bootstrap, {"play": {"max_event_bytes": 50}})
    conf = write_config(tmp_path, cfg)
    port = free_port()
    with serve(["--single-process", "--config", str(conf), "--listen", f"127.0.0.1:{port}"], tmp_path / "serve.log",
               port):
        r = produce("nosuch", [b'{"a":1}', b'{"a":2}'], port)
        assert r.returncode == 1
        assert orjson.loads(r.stdout)["rejected"] == {"unknown_type": 2}
        r = produce("play", [b'{"a":1}', orjson.dumps({"pad": "x" * 60}), b"not json"], port)
        assert r.returncode == 1
        summary = orjson.loads(r.stdout)
        assert (summary["persisted"], summary["rejected"], summary["invalid_json"]) == (1, {"too_large": 1}, 1)
        assert b"line 3: not JSON" in r.stderr


def test_tail_prints_what_was_sent(tmp_path, kafka_bootstrap):
    cfg = make_config(kafka_bootstrap)
    conf = write_config(tmp_path, cfg)
    port = free_port()
    lines = [orjson.dumps({"song": i}) for i in range(5)]
    with serve(["--single-process", "--config", str(conf), "--listen", f"127.0.0.1:{port}"], tmp_path / "serve.log",
               port):
        assert produce("play", lines, port).returncode == 0
    r = subprocess.run(
        [*EB, "tail", "--type", "play", "--config", str(conf), "--max-events", "5", "--idle-exit-ms", "20000"],
        capture_output=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr.decode()
    printed = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert sorted(p["payload"]["song"] for p in printed) == list(range(5))
    assert all(p["type"] == "play" and len(p["id"]) == 32 for p in printed)


def test_serve_on_embedded_default_starts_and_stops_its_broker(tmp_path):
    """No Kafka configured: serve starts Tansu itself, events flow, SIGTERM stops both."""
    kport, port = free_port(), free_port()
    conf = tmp_path / "eventbroker.toml"
    conf.write_text(f'[server]\nadmin_listen = "127.0.0.1:0"\n[kafka]\nembedded_port = {kport}\n'
                    '[types.play]\npriority = "critical"\n')
    log = tmp_path / "serve.log"
    with serve(["--config", str(conf), "--listen", f"127.0.0.1:{port}"], log, port) as proc:
        r = produce("play", [b'{"hello":"world"}'], port)
        assert r.returncode == 0, r.stderr.decode()
        t = subprocess.run(
            [*EB, "tail", "--type", "play", "--config", str(conf), "--max-events", "1", "--payload-only"],
            capture_output=True, timeout=60,
        )
        assert t.stdout == b'{"hello":"world"}\n'
        # A reload on the embedded default (the supervisor started the broker).
        with open(conf, "a") as f:
            f.write('[types.signup]\npriority = "high"\n')
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while b"config reloaded by" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        r = produce("signup", [b'{"new":"type"}'], port)
        assert r.returncode == 0, (r.stderr.decode(), log.read_text()[-2000:])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    text = log.read_text()
    assert "embedded development broker" in text and "For development only" in text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            wait_for_port("127.0.0.1", kport, 0.1)
        except (TimeoutError, OSError):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the embedded broker still listens after the daemon stopped")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[server]\nmax_frame_bytes = "big"\n', "key 'server.max_frame_bytes': Expected `int`, got `str`"),
        ('[types.play]\npriority = "urgent"\n', "key 'types.play.priority': Invalid enum value 'urgent'"),
        ('[types.play]\nprio = "x"\n', "key 'types.play.prio': unknown key"),
        ('[server]\nmax_frame_byte = 5\n', "key 'server.max_frame_byte': unknown key"),
        ('[server]\nlisten = "nowhere"\n', "key 'server.listen': 'nowhere' is not HOST:PORT"),
        ("[types.Play]\n", "type name 'Play' under [types] is not allowed"),
        ('[types.play]\nring_bytes = 100000\n', "key 'types.play.ring_bytes'"),
        ("[types.play\n", "line 1"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, toml, expected):
    conf = tmp_path / "bad.toml"
    conf.write_text(toml)
    r = subprocess.run([*EB, "serve", "--config", str(conf)], capture_output=True, timeout=60)
    assert r.returncode == 2
    assert str(conf) in r.stderr.decode()
    assert expected in r.stderr.decode()


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.toml"
    r = subprocess.run([*EB, "serve", "--config", str(missing)], capture_output=True, timeout=60)
    assert r.returncode == 2 and str(missing) in r.stderr.decode()



def test_produce_gives_up_when_no_gateway_listens():
    port = free_port()  # nothing listens here
    r = subprocess.run(
        [*EB, "produce", "--type", "play", "--server", f"127.0.0.1:{port}", "--connect-timeout", "1"],
        input=b'{"a":1}\n', capture_output=True, timeout=60,
    )
    assert r.returncode == 1
    assert f"cannot connect to 127.0.0.1:{port}" in r.stderr.decode()
