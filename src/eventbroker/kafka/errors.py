"""What a Kafka error means for eventbroker: classified once, here.

Every produce error code falls in one ``ErrorClass``; lanes, the spool's
forwarder and the sink ask this module instead of keeping code sets of their
own. aiokafka's error classes (``retriable``, ``invalid_metadata``) are the
base; the table below corrects it where produce needs another answer.
"""

from __future__ import annotations

from enum import Enum

import aiokafka.errors as Errors

from eventbroker.errors import DeliveryError

# aiokafka's root error and its connection failure, for the layers above that
# only need to tell "Kafka said no / is away" from other failures.
KafkaError = Errors.KafkaError
KafkaConnectionError = Errors.KafkaConnectionError


class ErrorClass(Enum):
    RETRIABLE = "retriable"  # send the same batches again after a back-off
    REFRESH_METADATA = "refresh_metadata"  # leaders may have moved: refresh metadata, then send again
    RECORD_TOO_LARGE = "record_too_large"  # this batch is over the topic's or broker's size limit
    RECORD_INVALID = "record_invalid"  # the broker refuses this batch's bytes (corrupt, invalid record)
    PERMANENT = "permanent"  # the topic refuses every write (authorization, invalid topic, ...)


# Kafka's NETWORK_EXCEPTION (13; aiokafka names the code StaleLeaderEpoch) and
# REPLICA_NOT_AVAILABLE (9): the partition's leader is elsewhere or away.
_NETWORK_EXCEPTION = 13
_REFRESH_CODES = frozenset({Errors.ReplicaNotAvailableError.errno, _NETWORK_EXCEPTION})
_TOO_LARGE = (Errors.MessageSizeTooLargeError, Errors.RecordListTooLargeError)
# INVALID_RECORD (87) is newer than aiokafka's table; INVALID_TIMESTAMP (32):
# the broker refuses this record's timestamp, not the topic.
_INVALID_RECORD = 87
_INVALID_CODES = frozenset({Errors.CorruptRecordException.errno, Errors.InvalidTimestampError.errno, _INVALID_RECORD})
# A topic whose metadata says this cannot be written however often one retries.
_UNWRITABLE_TOPIC = (Errors.UnknownTopicOrPartitionError, Errors.InvalidTopicError,
                     Errors.TopicAuthorizationFailedError)


def classify(code: int) -> ErrorClass:
    """The class of a produce response's error code (not 0)."""
    cls = Errors.for_code(code)
    if cls.invalid_metadata or code in _REFRESH_CODES:
        return ErrorClass.REFRESH_METADATA
    if issubclass(cls, _TOO_LARGE):
        return ErrorClass.RECORD_TOO_LARGE
    if code in _INVALID_CODES:
        return ErrorClass.RECORD_INVALID
    return ErrorClass.RETRIABLE if cls.retriable else ErrorClass.PERMANENT


def error_name(code: int) -> str:
    return Errors.for_code(code).__name__


def topic_unwritable(exc: BaseException) -> bool:
    """A metadata look-up failed in a way no retry of the same topic fixes."""
    return isinstance(exc, _UNWRITABLE_TOPIC)


class ProduceFailed(DeliveryError):
    """Some partitions of a unit were not acknowledged. ``errors`` describes
    each; ``codes`` holds the Kafka error code where the broker gave one
    (a transport failure has none, and is retriable)."""

    def __init__(self, topic: str, errors: dict[int, str], codes: dict[int, int] | None = None) -> None:
        super().__init__(f"{topic}: " + ", ".join(f"partition {p}: {e}" for p, e in sorted(errors.items())))
        self.errors = errors
        self.codes = codes or {}
        self.classes = frozenset(classify(c) for c in self.codes.values())
        self.retriable = self.classes <= {ErrorClass.RETRIABLE, ErrorClass.REFRESH_METADATA}

    @property
    def too_large(self) -> bool:
        return ErrorClass.RECORD_TOO_LARGE in self.classes

    @property
    def record_refused(self) -> bool:
        """Kafka refuses these bytes for good, though other records may pass."""
        return bool(self.classes) and self.classes <= {ErrorClass.RECORD_TOO_LARGE, ErrorClass.RECORD_INVALID}
