"""The service as real processes: `python -m app serve` (N) and `python -m app worker` (M),
started, killed and restarted like an orchestrator would (which restarts what exits).

Every method blocks (it waits for processes): call them from a thread (`asyncio.to_thread`), never
on the event loop, which runs the proxies the processes talk through. A lock keeps concurrent
calls (the supervisor and an injected fault) from racing.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.servers import wait_for_port

ROOT = Path(__file__).resolve().parents[2]
STOP_TIMEOUT_SECONDS = 40.0


@dataclass
class Process:
    """One service process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def alive(self) -> bool:
        """Still running."""
        return self.popen.poll() is None


@dataclass
class Cluster:
    """N API processes and M workers sharing one PostgreSQL and one Redis."""

    env: dict[str, str]
    logs: Path
    api_ports: list[int]
    worker_count: int
    apis: list[Process] = field(default_factory=list)
    workers: list[Process] = field(default_factory=list)
    started = 0
    crashed: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def _spawn(self, name: str, args: list[str], port: int | None = None) -> Process:
        self.started += 1
        log = self.logs / f"{name}-{self.started}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            [sys.executable, "-m", "app", *args],
            cwd=ROOT,
            env={**os.environ, **self.env},
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        handle.close()
        return Process(name, popen, log, port)

    def start_api(self, port: int) -> Process:
        """An API process on `port`, once it accepts connections."""
        process = self._spawn(
            f"api{port}", ["serve", "--host", "127.0.0.1", "--port", str(port)], port
        )
        wait_for_port(port, timeout=30)
        return process

    def start_worker(self, *, wait: bool = True) -> Process:
        """A worker process, once it polls the queue (its signal handlers are in place then)."""
        process = self._spawn("worker", ["worker"])
        deadline = time.monotonic() + 30
        while wait and time.monotonic() < deadline and process.alive:
            if b"Starting worker" in process.log.read_bytes():
                break
            time.sleep(0.1)
        return process

    def start(self) -> None:
        """Every process."""
        self.apis = [self.start_api(port) for port in self.api_ports]
        self.workers = [self.start_worker(wait=False) for _ in range(self.worker_count)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            b"Starting worker" in worker.log.read_bytes() for worker in self.workers
        ):
            time.sleep(0.1)

    def kill_worker(self, sig: signal.Signals = signal.SIGKILL) -> Process:
        """Send `sig` to a random worker; a replacement starts at once (SIGKILL) or once it has
        exited (see `supervise`). Returns the victim."""
        with self.lock:
            victim = random.choice([w for w in self.workers if w.alive])
            victim.popen.send_signal(sig)
            if sig == signal.SIGKILL:
                victim.popen.wait(timeout=10)
                self.workers.remove(victim)
                self.workers.append(self.start_worker(wait=False))
            return victim

    def restart_api(self, index: int) -> float:
        """SIGTERM an API process (uvicorn drains in-flight requests), start it again; the
        seconds it took to exit."""
        with self.lock:
            api = self.apis[index]
            started = time.monotonic()
            api.popen.send_signal(signal.SIGTERM)
            api.popen.wait(timeout=STOP_TIMEOUT_SECONDS)
            took = time.monotonic() - started
            assert api.port is not None
            self.apis[index] = self.start_api(api.port)
            return took

    def supervise(self) -> None:
        """Restart whatever exited (an orchestrator's job), noting crashes."""
        with self.lock:
            self._supervise()

    def _supervise(self) -> None:
        for process in list(self.workers):
            if not process.alive:
                if process.popen.returncode not in (0, -signal.SIGTERM):
                    self.crashed.append(f"{process.log.name} exited {process.popen.returncode}")
                self.workers.remove(process)
                self.workers.append(self.start_worker(wait=False))
        for index, api in enumerate(self.apis):
            if not api.alive:
                self.crashed.append(f"{api.log.name} exited {api.popen.returncode}")
                assert api.port is not None
                self.apis[index] = self.start_api(api.port)

    def stop(self) -> None:
        """SIGTERM everything, then SIGKILL what is left (bounded)."""
        processes = self.apis + self.workers
        for process in processes:
            if process.alive:
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for process in processes:
            try:
                process.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(timeout=10)


def tail(path: Path, lines: int = 30) -> str:
    """The end of a log file, for failure messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
