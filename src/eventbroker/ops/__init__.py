"""Running the gateway: the daemon process and its supervisor.

- ``daemon``: one gateway process (``Daemon``): sink, router, listener, spool
  adoption and admin endpoints wired together; drain and reload;
- ``supervisor``: ``serve --workers N``: restarts, reloads, zero-downtime upgrade;
- ``admin_http``: /metrics, /healthz, /readyz (and a worker's /reload);
- ``metrics``: Prometheus families read from the components' own stats;
- ``sdnotify``: systemd's notify protocol; ``logs``: text or JSON lines.

It may import every layer below it; only ``cli`` imports it.
"""
