"""eventbroker: an event delivery gateway."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eventbroker")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"
