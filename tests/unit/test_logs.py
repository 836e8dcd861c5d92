"""Log formats: a peer-chosen string never forges a log line."""

from __future__ import annotations

import logging

import orjson

from eventbroker.ops.logs import JsonFormatter, TextFormatter


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("eventbroker.server", logging.INFO, __file__, 1, msg, args, None)


def test_text_lines_escape_what_peers_chose():
    evil = "legit\n2026-12-02 00:00:00,000 CRITICAL eventbroker: FORGED\r\x1b[2Jcleared\u2028sep"
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(
        _record("closing connection from %s (%s): done", "127.0.0.1:1", evil))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert line == ("INFO eventbroker.server: closing connection from 127.0.0.1:1 (legit\\n2026-12-02 00:00:00,000 "
                    "CRITICAL eventbroker: FORGED\\r\\x1b[2Jcleared\\u2028sep): done")


def test_json_lines_keep_the_string_whole_and_on_one_line():
    evil = "a\nb\u2028c"
    line = JsonFormatter().format(_record("client %s", evil))
    assert "\n" not in line and orjson.loads(line)["msg"] == "client " + evil
