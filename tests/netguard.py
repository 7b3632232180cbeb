"""A guard (tests only) that notes every network call made while the same asyncio task has a
database transaction open: a DNS lookup, a Redis command or pipeline, an HTTP request.

Transactions are seen where every one of them starts and ends, whichever road opened it
(SQLAlchemy sessions, `raw_transaction`, the send path's asyncpg pool): asyncpg's
`Transaction.start`, `commit` and `rollback`. Only transactions opened with the service's code
on the stack count (a test's own arranging session is not the service's doing). Network calls
are seen at the service's DNS choke point (`app.events.destinations._resolve`, which every
lookup of a callback or endpoint URL takes), redis-py's `execute_command` and pipeline
`execute`, and httpx's `AsyncClient.send`.

Nothing of this exists outside the tests: production pays nothing for it.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg.transaction
import httpx
import pytest
from redis.asyncio.client import Pipeline, Redis

import app.events.destinations

APP_DIR = str(Path(app.events.destinations.__file__).resolve().parent.parent)


def _services_frame() -> str | None:
    """The innermost frame of the service's code on the stack (file:line), if any."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(APP_DIR):
            return f"{frame.f_code.co_filename[len(APP_DIR) - 3 :]}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


class NetworkGuard:
    """Open transactions per task, and the network calls made inside one (`violations`)."""

    def __init__(self) -> None:
        self.open: dict[asyncio.Task[Any], dict[int, tuple[Any, str]]] = {}
        self.violations: list[str] = []
        self.checked = 0  # network calls seen (so a test can tell the guard was in the way)
        self._paused = 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Not checking: for a test's own choreography (a test holding a lock in its task while
        it plays another worker's part), never around the service's code."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def opened(self, transaction: Any) -> None:
        where = _services_frame()
        task = asyncio.current_task()
        if where is None or task is None:
            return
        self.open.setdefault(task, {})[id(transaction)] = (transaction, where)

    def closed(self, transaction: Any) -> None:
        task = asyncio.current_task()
        for held in [self.open.get(task)] if task in self.open else self.open.values():
            if held is not None:
                held.pop(id(transaction), None)

    def check(self, kind: str, what: str) -> None:
        self.checked += 1
        if self._paused:
            return
        task = asyncio.current_task()
        held = self.open.get(task) if task is not None else None
        if not held:
            return
        live = [
            where
            for transaction, where in held.values()
            if transaction._state is asyncpg.transaction.TransactionState.STARTED
            and not transaction._connection.is_closed()
            and transaction._connection.is_in_transaction()
        ]
        if live:
            stack = "".join(traceback.format_stack(limit=12)[:-2])
            self.violations.append(
                f"{kind} {what} while a transaction opened at {live[0]} is open:\n{stack}"
            )

    @contextmanager
    def installed(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[NetworkGuard]:
        guard = self
        transaction_class = asyncpg.transaction.Transaction

        def wrap_tx(name: str, after: Callable[[Any], None]) -> None:
            original = getattr(transaction_class, name)

            @functools.wraps(original)
            async def wrapped(transaction: Any, *args: Any, **kwargs: Any) -> Any:
                try:
                    return await original(transaction, *args, **kwargs)
                finally:
                    if name != "start" or transaction._state.name == "STARTED":
                        after(transaction)

            monkeypatch.setattr(transaction_class, name, wrapped)

        wrap_tx("start", guard.opened)
        wrap_tx("commit", guard.closed)
        wrap_tx("rollback", guard.closed)

        resolve = app.events.destinations._resolve

        async def guarded_resolve(resolver: Any, host: str, port: int, timeout: float) -> Any:
            guard.check("DNS lookup of", host)
            return await resolve(resolver, host, port, timeout)

        monkeypatch.setattr(app.events.destinations, "_resolve", guarded_resolve)

        execute_command: Any = Redis.execute_command

        async def guarded_command(client: Any, *args: Any, **options: Any) -> Any:
            guard.check("Redis command", str(args[0]) if args else "?")
            return await execute_command(client, *args, **options)

        monkeypatch.setattr(Redis, "execute_command", guarded_command)

        pipeline_execute = Pipeline.execute

        async def guarded_pipeline(pipeline: Any, *args: Any, **kwargs: Any) -> Any:
            guard.check("Redis pipeline", f"of {len(pipeline.command_stack)} commands")
            return await pipeline_execute(pipeline, *args, **kwargs)

        monkeypatch.setattr(Pipeline, "execute", guarded_pipeline)

        send = httpx.AsyncClient.send

        async def guarded_send(client: Any, request: httpx.Request, **kwargs: Any) -> Any:
            guard.check("HTTP request", f"{request.method} {request.url}")
            return await send(client, request, **kwargs)

        monkeypatch.setattr(httpx.AsyncClient, "send", guarded_send)
        yield self
