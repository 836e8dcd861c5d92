"""Logging: JSON lines (orjson) for machines, a one-line human format for
terminals. ``--log-format auto`` picks human when stderr is a terminal."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys

import orjson


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, pid, worker, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        worker = os.environ.get("EVENTBROKER_WORKER")
        if worker is not None:
            out["worker"] = int(worker)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


# Control characters (and Unicode line breaks) in a message are written as
# escapes: peers choose strings that end up in log lines (client ids, type
# names, certificate names), and a newline in one must not forge a line.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029",
                 0x5C: "\\\\"})  # and the backslash itself, so an escape cannot be faked


class TextFormatter(logging.Formatter):
    """One line per record for people: the message's control characters escaped."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = record.message.translate(_ESCAPES)
        return super().formatMessage(record)


# syslog priorities for journald's "<N>" line prefix (SyslogLevelPrefix=yes).
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class _JournalPrefix(logging.Formatter):
    """Prefix each line with its syslog priority, so `journalctl -p err` works."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in self.inner.format(record).split("\n"))


def _stderr_is_journal() -> bool:
    """systemd sets $JOURNAL_STREAM to the device:inode of the journal stream."""
    js = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return js == f"{st.st_dev}:{st.st_ino}"


def is_json() -> bool:
    return any(isinstance(getattr(h.formatter, "inner", h.formatter), JsonFormatter)
               for h in logging.getLogger().handlers)


def setup_logging(verbose: bool = False, fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter()
    else:
        worker = os.environ.get("EVENTBROKER_WORKER")
        who = f"[worker {worker}] " if worker is not None else ""
        formatter = TextFormatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s")
    handler.setFormatter(_JournalPrefix(formatter) if _stderr_is_journal() else formatter)
    if fmt == "json":
        # Uncaught errors as JSON too, not as a bare traceback.
        def hook(tp, value, tb) -> None:
            logging.getLogger("eventbroker").critical("uncaught exception", exc_info=(tp, value, tb))

        sys.excepthook = hook
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def plural(n: int, word: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
