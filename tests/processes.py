"""Running `smsgate` as a subprocess, and looking at processes through /proc (Linux)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

# The tests' own (tests/conftest.py): a process that reads or writes signing secrets needs one.
SECRETS_KEY = "dGVzdC1zZWNyZXRzLWtleS0zMi1ieXRlcy1sb25nISE="

ROOT = Path(__file__).resolve().parent.parent

# Variables the service or `smsgate send` read, which the test environment must not leak into a
# subprocess unless a test sets them.
_SERVICE_VARIABLES = ("DATABASE_URL", "REDIS_URL", "PUBLIC_BASE_URL", "DEV_DATA_DIR")
_SERVICE_PREFIXES = ("SMSGATE_", "TWILIO__", "VONAGE__")


def clean_env(**values: str) -> dict[str, str]:
    """The environment without the service's variables, plus `values`.

    A worker's metrics port is turned off: another worker on this host may hold it.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in _SERVICE_VARIABLES and not name.startswith(_SERVICE_PREFIXES)
    }
    env["WORKER_METRICS_PORT"] = "0"
    env["EVENTS_WORKER_METRICS_PORT"] = "0"
    env["SECRETS_KEY"] = SECRETS_KEY
    env.update(values)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_smsgate(
    *args: str, env: Mapping[str, str], cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`python -m app ARGS` to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_smsgate(*args: str, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m app ARGS` in the background, its output in `log`."""
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "app", *args],
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """SIGTERM, wait (bounded), SIGKILL if needed; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return process.returncode


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def wait_http_ok(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Wait until `url` answers 200, failing early (with the log) if `process` exits."""

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, timeout, url)


def alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for candidate in _pids():
        try:
            fields = Path(f"/proc/{candidate}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(candidate)
    return found


def processes_using(directory: Path) -> list[str]:
    """Live processes whose working directory or command line is inside `directory`."""
    directory = directory.resolve()
    found = []
    for pid in _pids():
        if pid == os.getpid() or not alive(pid):
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if cwd == directory or directory in cwd.parents or str(directory) in command:
            found.append(f"{pid}: {command}")
    return found
