"""The ``eventbroker`` command as a user runs it: real processes, real broker."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
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
                               "unacknowledged": 0, "invalid_json": 0, "missing_key_field": 0, "rejections": []}
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
        ('[types.play]\npriority = "urgent"\n', "key 'types.play.priority': Invalid enum value 'urgent'; "
         "expected one of 'critical', 'high', 'normal', 'low'"),
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


# --------------------------------------------------------------------------
# found by trying it as a new user would (issue 11)


def test_a_second_gateway_on_the_same_port_refuses_to_start(tmp_path, kafka_bootstrap):
    """Workers share their port with SO_REUSEPORT; a second gateway must not
    join them. It refuses, naming the address and the process that serves it,
    in both modes, and the first one keeps serving."""
    conf = write_config(tmp_path, make_config(kafka_bootstrap, {"play": {}}))
    port = free_port()
    listen = f"127.0.0.1:{port}"
    with serve(["--config", str(conf), "--listen", listen, "--workers", "2"], tmp_path / "first.log", port) as first:
        for mode in (["--workers", "2"], ["--single-process"]):
            r = subprocess.run([*EB, "serve", "--config", str(conf), "--listen", listen, *mode],
                               capture_output=True, timeout=60)
            err = r.stderr.decode()
            assert r.returncode == 1, err
            assert f"cannot accept producers on {listen}" in err and f"pid {first.pid}" in err, err
            assert "server.listen" in err and "--listen" in err
        r = produce("play", [b'{"still": "served"}'], port)
        assert r.returncode == 0 and orjson.loads(r.stdout)["persisted"] == 1


def test_bind_failures_name_what_the_address_is_for_and_what_moves_it(tmp_path, kafka_bootstrap):
    conf = write_config(tmp_path, make_config(kafka_bootstrap, {"play": {}}))
    with socket.socket() as busy:  # another program, without SO_REUSEPORT
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        free = f"127.0.0.1:{free_port()}"
        embedded = tmp_path / "embedded.toml"
        embedded.write_text(f'[server]\nadmin_listen = ""\n[kafka]\nembedded_port = {busy.getsockname()[1]}\n')
        cases = [
            (["--config", str(conf), "--listen", free, "--admin-listen", taken, "--workers", "1"],
             [f"cannot serve the admin endpoint (/metrics, /healthz, /readyz) on {taken}", "server.admin_listen",
              "--admin-listen"]),
            (["--config", str(conf), "--listen", taken, "--workers", "1"],
             [f"cannot accept producers on {taken}", "already in use", "server.listen", "--listen"]),
            (["--config", str(conf), "--listen", taken, "--single-process"],
             [f"cannot accept producers on {taken}", "server.listen", "--listen"]),
            (["--config", str(embedded), "--listen", free, "--workers", "1"],
             [f"cannot start the embedded broker on {taken}", "kafka.embedded_port", "--embedded-port"]),
        ]
        for args, expected in cases:
            r = subprocess.run([*EB, "serve", *args], capture_output=True, timeout=60)
            err = r.stderr.decode()
            assert r.returncode == 1, (args, err)
            for text in expected:
                assert text in err, (args, text, err)
            assert "signal received" not in err  # no signal came


def test_produce_with_no_gateway_fails_at_once_in_one_line():
    port = free_port()  # nothing listens here
    t0 = time.monotonic()
    r = subprocess.run([*EB, "produce", "--type", "play", "--server", f"127.0.0.1:{port}"],
                       input=b'{"a":1}\n', capture_output=True, timeout=60)
    took = time.monotonic() - t0
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1
    assert len(lines) == 1 and f"cannot connect to 127.0.0.1:{port}" in lines[0], lines
    assert took < 5, f"took {took:.1f}s (the default connect timeout is 10 s: it did not give up when refused)"


def test_what_a_new_user_sees_from_produce_tail_and_version(tmp_path, kafka_bootstrap):
    conf = write_config(tmp_path, make_config(kafka_bootstrap, {"play": {}}))
    port = free_port()
    with serve(["--single-process", "--config", str(conf), "--listen", f"127.0.0.1:{port}"],
               tmp_path / "serve.log", port):
        r = subprocess.run([*EB, "produce", "--type", "play", "--server", f"127.0.0.1:{port}", "--key-field", "user"],
                           input=b'{"user": "ada"}\n{"track": 1}\n{"track": 2}\n{oops\n', capture_output=True,
                           timeout=60)
        err, out = r.stderr.decode(), r.stdout.decode()
        assert "line 4: not JSON (" in err and "at column 2); skipped" in err and "line 1 column" not in err, err
        assert err.count("no field 'user'") == 1, err  # warned once...
        assert "sent 3, persisted 3" in out and "2 without 'user' (null key)" in out, out  # ...and counted
        assert "skipped 1 line that is not JSON" in out, out
        r = produce("Play", [b'{"a": 1}'], port)
        assert orjson.loads(r.stdout)["rejected"] == {"invalid_type_name": 1}
        r = produce("nosuch", [b'{"a": 1}'], port)
        assert orjson.loads(r.stdout)["rejected"] == {"unknown_type": 1}
        r = produce("play", [b'{"a": 1}'], port, "-v", "--log-format", "text")  # global options after the command
        assert r.returncode == 0, r.stderr.decode()
    t = subprocess.run([*EB, "tail", "--type", "neverproduced", "--kafka", kafka_bootstrap], capture_output=True,
                       timeout=60)
    assert t.returncode == 1 and "does not exist" in t.stderr.decode() and "--wait" in t.stderr.decode()
    v = subprocess.run([*EB, "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and re.match(r"eventbroker \d", v.stdout)
