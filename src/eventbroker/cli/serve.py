"""``eventbroker serve``: the daemon, under its supervisor or in this process."""

from __future__ import annotations

import argparse
import asyncio
import os

from eventbroker.cli.base import DEFAULT_CONFIG, command, config_path, run
from eventbroker.config import DEFAULT_ADMIN_LISTEN, DEFAULT_EMBEDDED_PORT, load_config, with_overrides
from eventbroker.errors import ConfigError, EventBrokerError
from eventbroker.ops.daemon import Daemon
from eventbroker.ops.supervisor import run_supervisor
from eventbroker.protocol import DEFAULT_LISTEN


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as set by taskset or
    systemd's CPUAffinity=), else all of them."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cmd_serve(args: argparse.Namespace) -> int:
    path = config_path(args.config)
    overrides = {k: v for k, v in (("listen", args.listen), ("kafka", args.kafka), ("sink", args.sink),
                                   ("admin_listen", args.admin_listen), ("embedded_port", args.embedded_port))
                 if v is not None}
    cfg = with_overrides(load_config(path), **overrides)
    if args.worker_of is not None and os.getppid() != args.worker_of:
        raise EventBrokerError("worker: its supervisor is gone")  # died before PDEATHSIG was set
    if args.worker_of is None and not args.single_process:
        n = args.workers if args.workers is not None else (cfg.server.workers or _usable_cores())
        if n < 1:
            raise ConfigError("--workers: must be at least 1 (or use --single-process)")
        return asyncio.run(run_supervisor(cfg, path, overrides, n, args.log_format, args.verbose))
    daemon = Daemon(cfg, config_path=path, config_source=args.config_source, overrides=overrides,
                    control_socket=args.control_socket,
                    worker_index=args.worker_index, reuse_port=True if args.worker_of is not None else None)

    async def main() -> int:
        await daemon.run_until_signalled()
        return 0

    return run(main())


def add_parser(sub) -> None:
    s = command(sub, "serve", help="run the daemon")
    s.add_argument("--config", help=f"TOML config file (default: {DEFAULT_CONFIG} if present)")
    s.add_argument("--listen", help=f"HOST:PORT to accept producers on (default {DEFAULT_LISTEN})")
    s.add_argument("--admin-listen", help=f"HOST:PORT of /metrics, /healthz and /readyz (default "
                   f"{DEFAULT_ADMIN_LISTEN}; \"\" turns them off)")
    s.add_argument("--kafka", help="Kafka bootstrap servers; without it an embedded development broker is started")
    s.add_argument("--embedded-port", type=int, help=f"port of the embedded development broker (default "
                   f"{DEFAULT_EMBEDDED_PORT})")
    s.add_argument("--sink", choices=["kafka", "null"], help="override [kafka] sink (null: discard, for benchmarks)")
    s.add_argument("--workers", type=int, help="worker processes sharing the port (default: server.workers, "
                   "else one per core); a supervisor restarts them, reloads them on SIGHUP and replaces them "
                   "without downtime on SIGUSR2")
    s.add_argument("--single-process", action="store_true",
                   help="run the daemon in this process, without a supervisor (development, debugging)")
    # Set by the supervisor for its workers.
    s.add_argument("--worker-of", type=int, help=argparse.SUPPRESS)
    s.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    s.add_argument("--control-socket", help=argparse.SUPPRESS)
    s.add_argument("--config-source", help=argparse.SUPPRESS)  # the user's config file, for messages
    s.set_defaults(func=cmd_serve)
