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


def setup_logging(verbose: bool = False, fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        worker = os.environ.get("EVENTBROKER_WORKER")
        who = f"[worker {worker}] " if worker is not None else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {who}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
