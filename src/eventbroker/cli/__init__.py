"""The ``eventbroker`` command line: ``main`` wires one module per subcommand
(serve, produce, tail, token, spool, status, bench); ``base`` holds what they
share. The top layer: it may import everything below it."""

from eventbroker.cli.main import main

__all__ = ["main"]
