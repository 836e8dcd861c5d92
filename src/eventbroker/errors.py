"""Exceptions raised by eventbroker.

One root, ``EventBrokerError``, and a few families under it:

* ``UsageError`` (also a ``ValueError``): misuse of the API; ``ConfigError``,
  a bad configuration file or option, is one; ``SchemaError``, a bad or
  incompatible event schema, is one of those.
* ``ProtocolError``: the peer broke the wire protocol; carries the error code
  sent in the ERROR frame.
* ``DeliveryError``: an event was not delivered; ``retriable`` says whether
  sending it again may succeed. ``EventRejected`` carries the reason;
  ``BufferFull``: the producer's buffer is full (nothing was added);
  ``kafka.errors.ProduceFailed`` is the gateway's own (Kafka refused a unit).
* ``AuthFailed``: a producer's credentials were refused (server side).
* ``SpoolError``: a spool directory cannot be used; ``SpoolLocked`` when
  another process holds it. ``SpoolWriteFailed``: a record was not written.
* ``KeyStoreError``: the store of users' data keys cannot be used, or a key
  or sealed value does not open (``eventbroker.privacy``).

Operating-system errors stay the built-in ``ConnectionError`` family.
"""

from __future__ import annotations


class EventBrokerError(Exception):
    """Root of every eventbroker exception."""


class UsageError(EventBrokerError, ValueError):
    """The API was called with invalid arguments."""


class ConfigError(UsageError):
    """A configuration file or argument is invalid."""


class SchemaError(ConfigError):
    """An event schema file is invalid, uses an unsupported keyword, or breaks
    its type's compatibility mode; the message names the file."""


class ProtocolError(EventBrokerError):
    """The peer sent bytes that break the wire protocol."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self):  # keep pickling (multiprocessing) working
        return (type(self), (self.code, self.message))


class ServerError(ProtocolError):
    """The server closed the connection with an ERROR frame; ``retry_after_ms``
    is its hint for connecting again (0: none)."""

    def __init__(self, code: int, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(code, message)
        self.retry_after_ms = retry_after_ms

    def __reduce__(self):
        return (type(self), (self.code, self.message, self.retry_after_ms))


class DeliveryError(EventBrokerError):
    """An event could not be delivered."""

    retriable = False


class EventRejected(DeliveryError):
    """The gateway rejected an event; ``reason`` says why (see ``Reason``)."""

    def __init__(self, reason: str, event_id: bytes, event_type: str, detail: str = "") -> None:
        super().__init__(f"event {event_id.hex()} of type {event_type!r} rejected: {reason}"
                         + (f" ({detail})" if detail else ""))
        self.reason = reason
        self.event_id = event_id
        self.event_type = event_type
        self.detail = detail  # schema_violation: the failing JSON path and rule


class BufferFull(DeliveryError):
    """``produce()`` found ``max_buffered_events`` events waiting for their
    acknowledgement; nothing was added. Wait for space (``await
    producer.wait_for_space()``, or let ``send()`` wait) and produce again."""

    retriable = True


class ProducerClosed(DeliveryError):
    """The producer was closed before the event was acknowledged."""

    retriable = True


class AuthFailed(EventBrokerError):
    """A producer's token or certificate was refused. The reason is for the
    log; the producer only hears "authentication failed"."""


class SpoolError(EventBrokerError):
    """The spool directory cannot be used (locked, unreadable, not a spool)."""


class SpoolLocked(SpoolError):
    """Another process (a daemon, ``eventbroker spool replay``) holds the spool directory."""


class SpoolWriteFailed(EventBrokerError):
    """A record could not be written (disk full, I/O error); nothing of it remains."""

    def __init__(self, path: object, err: OSError) -> None:
        self.errno = err.errno
        super().__init__(f"{path}: {err.strerror or err}")


class KeyStoreError(EventBrokerError):
    """The key store failed, or a wrapped key or sealed value does not open;
    the message names the store or the field, never a personal value."""
