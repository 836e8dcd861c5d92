"""Long fuzzing of the two decoders that read bytes from outside the process:
the wire protocol (``FrameReader`` + ``Router.ingest`` + the control-frame
decoders) and the disk spool (``parse_record`` + ``TypeRing.append_entries``
+ batch building from what was read).

Two drivers, one set of targets:

- ``--engine atheris``: coverage-guided (Google's atheris, libFuzzer), when
  installed (``pip install atheris``). It sees the Python-level code; the
  Cython hot path is not instrumented, so atheris mostly explores the control
  frames and the spool's Python parser.
- ``--engine mutate`` (default, no extra dependency): mutates valid seed
  inputs (bit flips, cuts, inserts, duplicated runs, random length fields),
  about a third of inputs random bytes.

Either way it counts inputs, fails on the first exception that is not the
documented answer to bad input (``ProtocolError`` / ``ValueError``), and
checks for leaks: the resident set size after a warm-up must not grow by more
than ``--rss-slack-mb`` by the end.

    python fuzz/fuzz_targets.py protocol --inputs 1000000
    python fuzz/fuzz_targets.py spool --inputs 1000000
    python fuzz/fuzz_targets.py spool --engine atheris --inputs 1000000

tests/unit/test_fuzz.py runs a short version in CI; EVENTBROKER_FUZZ_LONG=1 runs
a million inputs per target.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

from eventbroker import _fastpath as fp
from eventbroker import protocol
from eventbroker.errors import ProtocolError
from eventbroker.spool import log as sp

MAX_FRAME = 64 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------
# targets


class ProtocolTarget:
    """Bytes as a producer's stream: frames, then each frame's decoder."""

    def __init__(self) -> None:
        self.rings = [fp.TypeRing(n, capacity_bytes=1 << 20, max_event_bytes=4096) for n in ("play", "search")]
        self.router = fp.BatchSplitter(max_events_per_batch=512, max_event_bytes=4096)
        for r in self.rings:
            self.router.add(r)
        self.frames = 0

    def __call__(self, data: bytes) -> None:
        reader = fp.FrameReader(MAX_FRAME)
        step = 1 + (data[0] % 64 if data else 0)  # deliver in chunks, like TCP does
        try:
            for i in range(0, len(data), step):
                reader.feed(data[i : i + step])
                while (ft := reader.next_frame()) >= 0:
                    self.frames += 1
                    self._frame(ft, reader)
        except ProtocolError:
            pass
        for r in self.rings:
            r.discard_all()

    def _frame(self, ft: int, reader: fp.FrameReader) -> None:
        if ft == fp.FRAME_EVENT_BATCH:
            try:
                self.router.ingest(reader, 1_700_000_000_000)
            except ProtocolError:
                return
            for r in self.rings:  # what was accepted builds valid Kafka batches
                while (u := r.build_unit(1 << 20, 3, 1)) is not None:
                    r.release(u[2], u[3], u[4])
            return
        body = reader.body()
        decoders = {
            fp.FRAME_HELLO: protocol.Hello.decode,
            fp.FRAME_WELCOME: protocol.Welcome.decode,
            fp.FRAME_ACK: protocol.Ack.decode,
            fp.FRAME_HEARTBEAT: protocol.decode_heartbeat,
            fp.FRAME_GOAWAY: protocol.Goaway.decode,
            fp.FRAME_ERROR: protocol.ErrorFrame.decode,
        }
        dec = decoders.get(ft)
        if dec is not None:
            try:
                dec(body)
            except (ProtocolError, ValueError):
                pass


def protocol_seeds() -> list[bytes]:
    rng = random.Random(7)
    seeds = [protocol.Hello(client_id="fuzz", auth=b"token").encode()]
    for n in (1, 5, 40):
        enc = fp.BatchEncoder()
        for i in range(n):
            enc.add(rng.choice([b"play", b"search", b"other"]), rng.randbytes(16), 1_700_000_000_000 + i,
                    rng.choice([None, b"k%d" % i]), rng.randbytes(rng.randrange(1, 300)))
        seeds.append(enc.finish(n))
    seeds.append(fp.encode_frame(fp.FRAME_HEARTBEAT, (12345).to_bytes(8, "big")))
    seeds.append(protocol.Ack(3, (protocol.AckEntry(0, protocol.Status.RETRY_LATER, protocol.Reason.OVERLOADED,
                                                     5, 200, ()),)).encode())
    seeds.append(protocol.Goaway(1, 0, "bye").encode())
    seeds.append(protocol.ErrorFrame(3, "bad").encode())
    return seeds


class SpoolTarget:
    """Bytes as a spool segment's records, then as a record's entries."""

    def __init__(self) -> None:
        self.ring = fp.TypeRing("audit", capacity_bytes=1 << 40, max_event_bytes=1 << 20)
        self.records = 0

    def __call__(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            r = sp.parse_record(data, pos)
            if isinstance(r, str):
                break
            self.records += 1
            self._entries(r[1])
            pos = r[2]
        # The body on its own, as if its checksum had matched.
        self._entries(memoryview(data)[4:])

    def _entries(self, entries) -> None:
        try:
            n = self.ring.append_entries(entries)
        except ValueError:
            return
        if n:
            u = self.ring.build_unit(1 << 40, 3, 0)
            assert u is not None and u[1] == n
            self.ring.release(u[2], u[3], u[4])


def spool_seeds() -> list[bytes]:
    ring = fp.TypeRing("audit", capacity_bytes=1 << 30, max_event_bytes=1 << 20)
    router = fp.BatchSplitter(max_events_per_batch=1000, max_event_bytes=1 << 20)
    router.add(ring)
    rng = random.Random(3)
    seeds = []
    for n in (1, 3, 30):
        enc = fp.BatchEncoder()
        for i in range(n):
            enc.add(b"audit", rng.randbytes(16), 1_700_000_000_000 + i, rng.choice([None, b"key"]),
                    rng.randbytes(rng.randrange(1, 200)))
        reader = fp.FrameReader(1 << 24)
        reader.feed(enc.finish(1))
        reader.next_frame()
        router.ingest(reader, 1_700_000_000_001)
        entries, count, *_ = ring.take_entries(1 << 30)
        ring.discard_all()
        seeds.append(sp.encode_record(count, entries) + sp.encode_record(count, entries[: len(entries) // 2]))
    return seeds


TARGETS = {"protocol": (ProtocolTarget, protocol_seeds), "spool": (SpoolTarget, spool_seeds)}


# --------------------------------------------------------------------------
# drivers


def refit(name: str, seed: bytes, mutated_tail: bytes) -> bytes:
    """Re-frame a mutated body so its checksum matches and the decoder past
    the checksum sees it (frame header: 12 bytes; spool record header: 8)."""
    if name == "protocol":
        return fp.encode_frame(seed[4], mutated_tail)
    n = int.from_bytes(mutated_tail[:4].rjust(4, b"\0"), "big") if len(mutated_tail) >= 4 else 0
    return sp.encode_record(n, mutated_tail[4:])


def mutate(rng: random.Random, seed: bytes, name: str = "") -> bytes:
    r = rng.random()
    if r < 0.2:
        return rng.randbytes(rng.randrange(0, 600))
    if name and r < 0.6:  # mutate behind a valid checksum
        head = 12 if name == "protocol" else 8
        return refit(name, seed, _mutate_bytes(rng, seed[head:]))
    return _mutate_bytes(rng, seed)


def _mutate_bytes(rng: random.Random, seed: bytes) -> bytes:
    b = bytearray(seed)
    for _ in range(rng.randrange(1, 5)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[i % len(b)] ^= 1 << rng.randrange(8)
        elif op == 1:
            del b[i:]
        elif op == 2:
            b[i:i] = rng.randbytes(rng.randrange(1, 16))
        elif op == 3:
            b[i:i] = b[i : i + rng.randrange(1, 64)]
        elif op == 4 and len(b) >= 4:  # a length-sized field set to something extreme
            j = i % (len(b) - 3)
            b[j : j + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                                       rng.randbytes(4)])
        elif b:
            del b[i % len(b)]
    return bytes(b)


def run_mutate(name: str, inputs: int, seed: int, rss_slack_mb: float) -> dict:
    factory, seeds_fn = TARGETS[name]
    target = factory()
    seeds = seeds_fn()
    rng = random.Random(seed)
    warm = max(1, inputs // 10)
    t0 = time.monotonic()
    rss_warm = 0
    for i in range(inputs):
        data = mutate(rng, rng.choice(seeds), name)
        try:
            target(data)
        except Exception:
            path = f"fuzz-crash-{name}-{i}.bin"
            with open(path, "wb") as f:
                f.write(data)
            print(f"{name}: input {i} raised; saved to {path}", file=sys.stderr)
            raise
        if i == warm:
            rss_warm = rss_bytes()
    rss_end = rss_bytes()
    growth = (rss_end - rss_warm) / 2**20
    out = {"target": name, "engine": "mutate", "inputs": inputs, "seconds": round(time.monotonic() - t0, 1),
           "rss_after_warmup_mb": round(rss_warm / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
           "rss_growth_mb": round(growth, 2), "crashes": 0}
    out.update({k: getattr(target, k) for k in ("frames", "records") if hasattr(target, k)})
    if growth > rss_slack_mb:
        raise AssertionError(f"{name}: resident memory grew {growth:.1f} MiB after warm-up: a leak? {out}")
    return out


def run_atheris(name: str, inputs: int) -> None:
    import atheris

    factory, seeds_fn = TARGETS[name]
    target = factory()
    corpus = os.path.join(os.path.dirname(__file__), "corpus", name)
    os.makedirs(corpus, exist_ok=True)
    for i, s in enumerate(seeds_fn()):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(s)
    atheris.instrument_all()  # Python-level coverage of everything loaded (the Cython module is opaque)
    atheris.Setup([sys.argv[0], f"-runs={inputs}", "-rss_limit_mb=2048", "-max_len=4096", corpus], target)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=sorted(TARGETS))
    ap.add_argument("--inputs", type=int, default=1_000_000)
    ap.add_argument("--engine", choices=["mutate", "atheris"], default="mutate")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rss-slack-mb", type=float, default=16.0)
    args = ap.parse_args(argv)
    if args.engine == "atheris":
        run_atheris(args.target, args.inputs)
        return 0
    print(json.dumps(run_mutate(args.target, args.inputs, args.seed, args.rss_slack_mb)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
