"""The fault suite's own PostgreSQL and Redis, on ports of their own (never the machine's shared
servers), which it may crash and restart at will.

PostgreSQL comes from the machine's binaries (`FAULT_PG_BIN`, else `pg_config --bindir`, else the
newest `/usr/lib/postgresql/*/bin`); as root it runs as the `postgres` OS user (PostgreSQL refuses
root). Redis is `redis-server` (`FAULT_REDIS_SERVER` to override) without persistence: a restart
loses everything, as the issue asks us to survive. Every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_SECONDS = 30.0


class ServerUnavailable(RuntimeError):
    """A server binary is missing: the suite cannot run (and says so)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = START_TIMEOUT_SECONDS) -> None:
    """Until something accepts connections on 127.0.0.1:port (or raise after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _postgres_bindir() -> Path:
    configured = os.environ.get("FAULT_PG_BIN")
    if configured:
        return Path(configured)
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(
            subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=False
            ).stdout.strip()
        )
        if (bindir / "pg_ctl").exists():
            return bindir
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not candidates:
        raise ServerUnavailable("no PostgreSQL binaries (set FAULT_PG_BIN)")
    return candidates[-1].parent


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1:`port`, data in `directory`."""

    def __init__(self, directory: Path, port: int) -> None:
        self.bindir = _postgres_bindir()
        self.directory = directory
        self.data = directory / "pgdata"
        self.port = port
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stdout}{result.stderr}")

    def url(self, port: int | None = None, database: str = "smsgate") -> str:
        """An asyncpg URL (through another port, e.g. a proxy's, when given)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{port or self.port}/{database}"

    def start(self) -> None:
        """initdb (first time) and start; returns once it accepts connections."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.directory, "postgres", "postgres")
        if not self.data.exists():
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory} "
            # Faster, yet safe against a crash of PostgreSQL itself (not of the machine); never
            # synchronous_commit=off, which loses acknowledged commits in a crash.
            "-c fsync=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            "30",
            "start",
        )
        wait_for_port(self.port)

    def crash_and_restart(self) -> None:
        """Stop without a clean shutdown (as a crash would), then start again."""
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-m",
            "immediate",
            "-w",
            "-t",
            "30",
            "stop",
        )
        self.start()

    def stop(self) -> None:
        """Stop it (fast); never raises."""
        try:
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "-w",
                "-t",
                "30",
                "stop",
            )
        except (RuntimeError, subprocess.TimeoutExpired):
            pass


class RedisServer:
    """A Redis without persistence on 127.0.0.1:`port`."""

    def __init__(self, directory: Path, port: int) -> None:
        binary = os.environ.get("FAULT_REDIS_SERVER") or shutil.which("redis-server")
        if binary is None:
            raise ServerUnavailable("no redis-server (set FAULT_REDIS_SERVER)")
        self.binary = binary
        self.directory = directory
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, port: int | None = None) -> str:
        """Its URL (through another port, e.g. a proxy's, when given)."""
        return f"redis://127.0.0.1:{port or self.port}/0"

    def start(self) -> None:
        """Start it; returns once it accepts connections."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port)

    def crash_and_restart(self) -> None:
        """SIGKILL (every job and key is lost), then start an empty one."""
        self.stop()
        self.start()

    def stop(self) -> None:
        """Kill it and reap it; never raises."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.process = None
