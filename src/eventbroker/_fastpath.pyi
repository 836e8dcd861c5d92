"""Type stub for the native hot path (src/eventbroker/_fastpath.pyx and its
topic files in src/eventbroker/_native/)."""

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Buffer = bytes | bytearray | memoryview

PROTOCOL_VERSION: int
MAGIC: bytes
FRAME_HEADER_BYTES: int
EVENT_HEADER_BYTES: int
MAX_TYPES_PER_BATCH: int
MAX_TYPE_NAME_BYTES: int
MAX_CLIENT_ID_BYTES: int
MAX_KEY_BYTES: int
TYPE_NAME_PATTERN: str
FRAME_HELLO: int
FRAME_WELCOME: int
FRAME_EVENT_BATCH: int
COMPRESSED_FRAME_FLAG: int
RECORD_BATCH_HEADER_BYTES: int
FRAME_ACK: int
FRAME_HEARTBEAT: int
FRAME_GOAWAY: int
FRAME_ERROR: int
ERR_BAD_CHECKSUM: int
ERR_FRAME_TOO_LARGE: int
ERR_MALFORMED_FRAME: int
ERR_UNKNOWN_FRAME_TYPE: int
ERR_BAD_HANDSHAKE: int
ERR_UNSUPPORTED_VERSION: int
ERR_AUTH_FAILED: int
ERR_TOO_MANY_EVENTS: int
ERR_TRUNCATED_STREAM: int
ERR_UNEXPECTED_FRAME: int
ERR_INTERNAL: int
ERR_CONNECTION_LIMIT: int
ERR_TIMEOUT: int
ERR_ADDRESS_LOCKED_OUT: int
STATUS_PERSISTED: int
STATUS_REJECTED: int
STATUS_RETRY_LATER: int
STATUS_ACCEPTED: int
REASON_NONE: int
REASON_UNKNOWN_TYPE: int
REASON_TOO_LARGE: int
REASON_DISABLED: int
REASON_INVALID: int
REASON_FORBIDDEN: int
REASON_INVALID_TYPE_NAME: int
REASON_INVALID_TIMESTAMP: int
REASON_OVERLOADED: int
REASON_KAFKA_UNAVAILABLE: int
REASON_SHUTTING_DOWN: int
REASON_SPOOL_UNAVAILABLE: int
REASON_KEY_UNAVAILABLE: int
REASON_SCHEMA_VIOLATION: int
REASON_UNKNOWN_SCHEMA_VERSION: int
DEAD_LETTER_PARTITION: int
GOAWAY_SHUTTING_DOWN: int
GOAWAY_REBALANCE: int
HEADER_EVENT_ID: bytes
HEADER_EVENT_TYPE: bytes
HEADER_TIMESTAMP: bytes
HEADER_RECEIVED: bytes
HEADER_SCHEMA_VERSION: bytes
HEADER_ERROR: bytes

def crc32c(data: Buffer, crc: int = 0) -> int: ...
def crc32c_uses_hardware() -> bool: ...
def murmur2(data: Buffer) -> int: ...
def encode_frame(frame_type: int, body: Buffer, flags: int = 0) -> bytes: ...
def valid_type_name(name: bytes) -> bool: ...

class FrameReader:
    frame_type: int
    frame_flags: int
    allowed_flags: int
    max_frame_bytes: int
    frames_read: int
    def __init__(self, max_frame_bytes: int) -> None: ...
    def feed(self, data: Buffer) -> None: ...
    def next_frame(self) -> int: ...
    def body(self) -> bytes: ...
    def replace_body(self, body: bytearray) -> None: ...
    @property
    def body_length(self) -> int: ...
    @property
    def buffered_bytes(self) -> int: ...
    @property
    def buffer_capacity(self) -> int: ...

# (partition, record batch bytes, record count)
KafkaBatch = tuple[int, bytes, int]

class MemoryBudget:
    used_bytes: int
    limit_bytes: int
    def __init__(self, limit_bytes: int) -> None: ...

class TypeRing:
    name: str
    name_bytes: bytes
    schemas: Any
    keys: UserKeys | None
    enabled: bool
    accepting: bool
    refuse_reason: int
    by_key: bool
    max_event_bytes: int
    capacity_bytes: int
    used_bytes: int
    pending_events: int
    pending_bytes: int
    events_in: int
    bytes_in: int
    admit_limit_bytes: int
    def __init__(
        self,
        name: str,
        *,
        capacity_bytes: int,
        max_event_bytes: int,
        by_key: bool = True,
        enabled: bool = True,
        chunk_bytes: int = 262144,
    ) -> None: ...
    @property
    def free_bytes(self) -> int: ...
    def attach_budget(self, budget: MemoryBudget, admit_limit_bytes: int) -> None: ...
    def build_unit(
        self, max_bytes: int, n_partitions: int, sticky_partition: int
    ) -> tuple[list[KafkaBatch], int, int, int, int] | None: ...
    def skip_unit(self, max_bytes: int) -> tuple[int, int, int, int] | None: ...
    def take_entries(self, max_bytes: int) -> tuple[bytes, int, int, int, int] | None: ...
    def append_entries(self, data: Buffer) -> int: ...
    def discard_all(self) -> None: ...
    def release(self, n_bytes: int, end_seq: int, end_off: int) -> None: ...

# (type_index, status, reason, count, indices or None, ring or None,
#  schema_violation details or None)
IngestResult = tuple[int, int, int, int, list[int] | None, TypeRing | None, list[str] | None]

class BatchSplitter:
    max_events_per_batch: int
    max_event_bytes: int
    max_timestamp_ahead_ms: int
    max_timestamp_behind_ms: int
    batches_in: int
    def __init__(self, *, max_events_per_batch: int, max_event_bytes: int, max_timestamp_ahead_ms: int = 0,
                 max_timestamp_behind_ms: int = 0) -> None: ...
    def add(self, ring: TypeRing) -> None: ...
    def remove(self, name: str) -> None: ...
    def get(self, name: str) -> TypeRing | None: ...
    def rings(self) -> list[TypeRing]: ...
    def ingest(
        self, reader: FrameReader, now_ms: int, allowed: set[bytes] | frozenset[bytes] | None = None
    ) -> tuple[int, list[bytes], list[IngestResult]]: ...
    # (batch_seq, type_names, results of configured types, encoded ACK entries
    # of the others, their count, unknown_type events, invalid_type_name events)
    def ingest_answering(
        self, reader: FrameReader, now_ms: int, allowed: set[bytes] | frozenset[bytes] | None = None
    ) -> tuple[int, list[bytes], list[IngestResult], bytes, int, int, int]: ...

class BatchEncoder:
    count: int
    def __init__(self) -> None: ...
    @property
    def frame_bytes(self) -> int: ...
    @property
    def type_names(self) -> list[bytes]: ...
    @property
    def type_count(self) -> int: ...
    def type_index(self, type_name: bytes) -> int: ...
    def add(
        self, type_name: bytes, event_id: Buffer, timestamp_ms: int, key: Buffer | None, value: Buffer
    ) -> int: ...
    def finish(self, batch_seq: int) -> bytes: ...
    def reset(self) -> None: ...

class FlatSchema:
    def __init__(self, fields: list[tuple[Any, ...]]) -> None: ...
    def accepts(self, payload: bytes) -> bool: ...

# personal fields (personal.pxi)
CIPHER_PREFIX: bytes
FORGOTTEN_VALUE: bytes
PERSONAL_NONCE_BYTES: int
PERSONAL_TAG_BYTES: int
PERSONAL_KEY_BYTES: int

class PersonalFields:
    type_name: bytes
    user_field: bytes
    fields: tuple[bytes, ...]
    def __init__(self, type_name: str, user_field: str, fields: Iterable[str]) -> None: ...
    def scan(self, payload: bytes) -> tuple[int, bytes | None, list[tuple[int, int]]]: ...

class UserKeys:
    keys: dict[bytes, bytes | None]
    on_missing: Callable[[list[bytes]], int] | None
    retry_after_ms: int
    encrypted: int
    shredded: int
    parts_waiting: int
    def __init__(self, on_missing: Callable[[list[bytes]], int] | None = None) -> None: ...

def personal_aad(type_name: bytes, field: bytes, event_id: bytes) -> bytes: ...
def seal_value(key: bytes, type_name: bytes, field: bytes, event_id: bytes, value: bytes) -> bytes: ...

def record_header(key: bytes, value: bytes) -> bytes: ...
def compressed_record_batch(batch: bytes, codec: int, compressed: Buffer) -> bytes: ...

class OutBatch:
    seq: int
    frame: bytes
    count: int
    left: int
    type_names: list[bytes]
    futures: list[Any] | None
    def take(self, type_index: int, indices: Sequence[int], want_list: bool) -> Any: ...
    def unanswered(self) -> list[int]: ...
    def event_id(self, i: int) -> bytes: ...
    def event_type(self, i: int) -> bytes: ...

class ProducerCore:
    count: int
    unresolved: int
    produced: int
    max_buffered: int
    max_event_bytes: int
    frame_limit: int
    max_events: int
    batch_max_bytes: int
    closed: bool
    closed_error: BaseException | None
    on_first: Callable[[], Any] | None
    on_sealed: Callable[[], Any] | None
    def __init__(self, id_prefix: bytes, batch_max_bytes: int, max_buffered: int) -> None: ...
    @property
    def id_prefix(self) -> bytes: ...
    def produce(self, event_type: str, payload: Buffer, key: Buffer | None = None, timestamp_ms: int | None = None,
                event_id: Buffer | None = None, schema_version: int | None = None,
                on_delivery: Any = None) -> None: ...
    def readd(self, b: OutBatch, indices: Iterable[int]) -> None: ...
    def seal(self) -> None: ...
    def take_sealed(self, seal_open: bool = False) -> list[OutBatch]: ...
    def resolved(self, n: int) -> None: ...
