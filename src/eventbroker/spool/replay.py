"""``eventbroker spool replay``: deliver what spool directories hold, then stop
(the daemon that owned them is stopped; the CLI prints the outcome)."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from eventbroker.config import Config, EventType, resolve_types
from eventbroker.kafka.sink import KafkaSink
from eventbroker.kafka.slots import PrioritySlots
from eventbroker.spool.forwarder import Forwarder
from eventbroker.spool.layout import default_type
from eventbroker.spool.log import SpoolLog


async def replay(cfg: Config, bootstrap: str, dirs: list[Path], timeout_s: float) -> list[Forwarder]:
    """Deliver every directory's spool until done or ``timeout_s``; returns the
    forwarders (their stats and what is left). Types not in the config go to
    ``events.<type>`` with the [defaults]."""
    known = resolve_types(cfg)
    types: dict[str, EventType] = {}
    for d in dirs:
        et = known.get(d.name)
        if et is None:
            et = default_type(d.name, cfg.defaults)
            print(f"{d.name}: not in the config; delivering to topic {et.topic}", file=sys.stderr)
        types[d.name] = et
    sink = KafkaSink(cfg.kafka, bootstrap)
    await sink.start(types)
    spools: list[SpoolLog] = []
    forwarders: list[Forwarder] = []
    slots = PrioritySlots(cfg.kafka.max_inflight_requests)
    deadline = 0.0
    try:
        for d in dirs:
            sp = SpoolLog(d, segment_bytes=cfg.spool.segment_bytes, fsync=cfg.spool.fsync, name=d.name)
            sp.open()
            spools.append(sp)
            f = Forwarder(sp, types[d.name], sink, cfg.kafka, slots)
            forwarders.append(f)
            print(f"{d.name}: {sp.pending_bytes} bytes to deliver to {types[d.name].topic}", file=sys.stderr)
            f.start()
        deadline = time.monotonic() + timeout_s
    finally:
        # Runs on error too: forwarders already started are stopped before
        # their spools close under them.
        await asyncio.gather(*(f.stop(deadline) for f in forwarders))
        for sp in spools:
            sp.close()
        await sink.stop()
    return forwarders
