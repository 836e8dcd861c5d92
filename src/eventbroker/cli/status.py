"""``eventbroker status``: a live per-type table from the admin endpoint's
/metrics (every worker summed), for an SRE at a terminal."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from eventbroker.cli.base import command, config_path
from eventbroker.config import DEFAULT_ADMIN_LISTEN, load_config

_COUNTERS = ("eventbroker_events_received_total", "eventbroker_events_persisted_total",
             "eventbroker_events_rejected_total", "eventbroker_events_retry_later_total",
             "eventbroker_events_handed_back_total", "eventbroker_schema_events_validated_total",
             "eventbroker_schema_events_invalid_total")


def scrape(admin: str, timeout_s: float = 5.0) -> dict:
    """Per-type sums over workers, plus the process-wide gauges."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=timeout_s) as r:  # noqa: S310 - http only
        text = r.read().decode()
    types: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    glob: dict[str, float] = defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            t = s.labels.get("type")
            if s.name == "eventbroker_type_state" and t is not None:
                if s.value:
                    types[t]["state:" + s.labels["state"]] += 1
            elif t is not None and (s.name in _COUNTERS or s.name in (
                    "eventbroker_ring_used_bytes", "eventbroker_ring_capacity_bytes",
                    "eventbroker_spool_backlog_bytes")):
                types[t][s.name] += s.value
            elif t is None and not s.name.endswith(("_bucket", "_created")):
                glob[s.name] += s.value
    return {"types": types, "global": glob, "at": time.monotonic()}


def _fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def render(prev: dict, cur: dict) -> str:
    dt = max(cur["at"] - prev["at"], 1e-6)
    g = cur["global"]
    lines = [f"workers {int(g.get('eventbroker_workers', 1))}   connections {int(g.get('eventbroker_connections', 0))}"
             f"   memory {g.get('eventbroker_memory_budget_used_bytes', 0) / 2**20:.0f}"
             f"/{g.get('eventbroker_memory_budget_limit_bytes', 0) / 2**20:.0f} MiB"
             f"   draining {'yes' if g.get('eventbroker_draining') else 'no'}"]
    if g.get("eventbroker_auth_open_despite_producers"):
        lines.append("WARNING: producers are configured but auth.required = false: anonymous producers may send "
                     "every type")
    lines += [
             f"{'type':<20} {'state':<11} {'recv/s':>9} {'persist/s':>9} {'reject/s':>9} {'retry/s':>9} "
             f"{'invalid/s':>9} {'fill':>6} {'spool':>9} {'persisted':>11} {'rejected':>9} {'invalid':>8}"]
    for name in sorted(cur["types"]):
        c, p = cur["types"][name], prev["types"].get(name, {})

        def rate(key: str) -> str:
            return _fmt_rate(max(0.0, c.get(key, 0.0) - p.get(key, 0.0)) / dt)  # noqa: B023

        states = [k.split(":", 1)[1] for k in c if k.startswith("state:")]
        state = "/".join(sorted(set(states))) or "?"
        cap = c.get("eventbroker_ring_capacity_bytes", 0.0)
        fill = f"{100 * c.get('eventbroker_ring_used_bytes', 0.0) / cap:.0f}%" if cap else "-"
        backlog = c.get("eventbroker_spool_backlog_bytes")
        # Schema failures (rejected or dead-lettered): per second, and as a share of the validated events.
        checked = c.get("eventbroker_schema_events_validated_total")
        bad = c.get("eventbroker_schema_events_invalid_total", 0.0)
        invalid_rate = rate("eventbroker_schema_events_invalid_total") if checked is not None else "-"
        invalid_share = f"{100 * bad / (checked + bad):.1f}%" if checked is not None and checked + bad else "-"
        lines.append(f"{name:<20} {state:<11} {rate('eventbroker_events_received_total'):>9} "
                     f"{rate('eventbroker_events_persisted_total'):>9} {rate('eventbroker_events_rejected_total'):>9} "
                     f"{rate('eventbroker_events_retry_later_total'):>9} {invalid_rate:>9} {fill:>6} "
                     f"{(f'{backlog / 2**20:.1f}M' if backlog is not None else '-'):>9} "
                     f"{int(c.get('eventbroker_events_persisted_total', 0)):>11} "
                     f"{int(c.get('eventbroker_events_rejected_total', 0)):>9} {invalid_share:>8}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace, config_path: str | None) -> int:
    admin = args.admin
    if not admin:
        admin = load_config(config_path).server.admin_listen or DEFAULT_ADMIN_LISTEN
    try:
        prev = scrape(admin)
        while True:
            time.sleep(args.interval)
            cur = scrape(admin)
            table = render(prev, cur)
            if args.once:
                print(table)
                return 0
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n"
            sys.stdout.write(clear + time.strftime("%H:%M:%S ") + admin + "\n" + table + "\n")
            sys.stdout.flush()
            prev = cur
    except (urllib.error.URLError, OSError) as e:
        print(f"eventbroker status: cannot read http://{admin}/metrics: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def add_parser(sub) -> None:
    st = command(sub, "status", help="live per-type table (rates, buffer fill, rejects) of a running daemon")
    st.add_argument("--admin", help=f"the daemon's admin address (default: the config's server.admin_listen, "
                    f"else {DEFAULT_ADMIN_LISTEN})")
    st.add_argument("--config", help="config file, for server.admin_listen")
    st.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    st.add_argument("--once", action="store_true", help="print one table and exit")
    st.set_defaults(func=lambda a: cmd_status(a, config_path(a.config)))
