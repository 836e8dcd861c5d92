"""A throwaway PostgreSQL server for tests.

``postgres_server()`` finds ``initdb``/``pg_ctl`` (on PATH, else the newest
``/usr/lib/postgresql/*/bin``), initializes a cluster in a fresh temporary
folder (trust authentication, no fsync), starts it on a free loopback port
with its Unix socket in that folder, creates a database and yields a
``PgServer`` whose ``uri`` points at it. On exit the server is stopped
(``pg_ctl stop -m immediate``) and the folder removed.

PostgreSQL refuses to run as root: as root the server runs as ``nobody``
through ``runuser`` (the folder is handed to that user), or the test is
skipped when that is impossible. Without the binaries, or without psycopg,
the test is skipped with the reason.

Use it from a module- or session-scoped fixture::

    @pytest.fixture(scope="module")
    def pg():
        with postgres_server() as server:
            yield server
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 30


def find_pg_bin() -> Path | None:
    """The folder holding initdb and pg_ctl: PATH first, then the newest Debian install."""
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "pg_ctl").is_file():  # a matching pair
        return Path(initdb).resolve().parent
    candidates = []
    for folder in glob.glob("/usr/lib/postgresql/*/bin"):
        version = Path(folder).parent.name
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            with contextlib.suppress(ValueError):
                candidates.append((float(version), Path(folder)))
    return max(candidates)[1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """A running cluster: ``uri`` is its test database; ``new_database()`` makes
    another; ``restart()`` restarts the server (fast shutdown: open sessions are
    terminated)."""

    def __init__(self, bin_dir: Path, root: Path, run_as: list[str]) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.run_as = run_as
        self.port = 0
        self.uri = ""

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([*self.run_as, *args], cwd=self.root, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "LC_ALL": "C", "TZ": "UTC"})

    def _options(self) -> str:
        return (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=40")

    def _fail(self, what: str, r: subprocess.CompletedProcess) -> None:
        log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stdout}{r.stderr}\n--- server log ---\n{log}")

    def init(self) -> None:
        r = self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "--no-sync", "-E", "UTF8", "--locale=C")
        if r.returncode:
            self._fail("initdb", r)

    def start(self) -> None:
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = _free_port()
            r = self._run(str(self.bin_dir / "pg_ctl"), "start", "-w", "-t", str(START_TIMEOUT_S), "-D",
                          str(self.data), "-l", str(self.log), "-o", self._options())
            if r.returncode == 0:
                break
        else:
            self._fail("pg_ctl start", r)
        self._wait_ready()
        self.uri = self.new_database("eventbroker_test")

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg.connect(self.admin_uri, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def admin_uri(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self, name: str | None = None) -> str:
        """Create a database (a fresh name unless given) and return its URI."""
        import psycopg

        name = name or "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.admin_uri, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def start_again(self) -> None:
        """Start a stopped server on the port it had (clients reconnect to the same URI)."""
        r = self._run(str(self.bin_dir / "pg_ctl"), "start", "-w", "-t", str(START_TIMEOUT_S), "-D",
                      str(self.data), "-l", str(self.log), "-o", self._options())
        if r.returncode:
            self._fail("pg_ctl start", r)
        self._wait_ready()

    def restart(self) -> None:
        r = self._run(str(self.bin_dir / "pg_ctl"), "restart", "-w", "-m", "fast", "-t", str(START_TIMEOUT_S),
                      "-D", str(self.data), "-l", str(self.log), "-o", self._options())
        if r.returncode:
            self._fail("pg_ctl restart", r)
        self._wait_ready()

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` (a crash: with fsync off, recent writes may be lost) or ``fast`` (clean)."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin_dir / "pg_ctl"), "stop", "-m", mode, "-D", str(self.data))


def _run_as_for_root(root: Path) -> list[str]:
    """As root: the command prefix that runs the server as nobody, with the folder handed over."""
    runuser = shutil.which("runuser")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        nobody = None
    if runuser is None or nobody is None:
        pytest.skip("PostgreSQL refuses to run as root, and runuser or the user nobody is missing")
    os.chown(root, nobody.pw_uid, nobody.pw_gid)
    return [runuser, "-u", "nobody", "--"]


@contextlib.contextmanager
def postgres_server() -> Iterator[PgServer]:
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'eventbroker[postgres]')")
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql")
    # Not under pytest's tmp_path: as root that is private to root, and the server runs as nobody.
    # Short, too: a Unix socket path has to fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ebpg-"))
    server = None
    try:
        run_as = _run_as_for_root(root) if os.geteuid() == 0 else []
        server = PgServer(bin_dir, root, run_as)
        server.init()
        server.start()
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
