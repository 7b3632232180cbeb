"""A guard (tests only) that notes every network call made while a database transaction is open
in the same asyncio task or in the task that started it (or its starter, and so on): a DNS
lookup, a Redis command or pipeline, an HTTP request.

Open transactions are kept in a context variable, which a task started with `create_task`,
`gather` or `wait_for` (a task of its own on Python 3.11) inherits from the task that started it:
a call made by such a child while its parent holds a transaction is seen. A task started before
the transaction opened does not inherit it (it is not that transaction's work).

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
import contextvars
import functools
import sys
import traceback
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg.transaction
import httpx
import pytest
from redis.asyncio.client import Pipeline, Redis

import app.events.destinations

T = TypeVar("T")

APP_DIR = str(Path(app.events.destinations.__file__).resolve().parent.parent)


def _services_frame() -> str | None:
    """The innermost frame of the service's code on the stack (file:line), if any."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(APP_DIR):
            return f"{frame.f_code.co_filename[len(APP_DIR) - 3 :]}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return None


# The transactions open in this context (with where they were opened): inherited by the tasks
# it starts. One for every guard: a transaction never outlives its test, and `_live` checks it.
_HELD: contextvars.ContextVar[tuple[tuple[Any, str], ...]] = contextvars.ContextVar(
    "netguard_held", default=()
)


def another_actor(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """`work` in a task of its own that does not inherit the caller's open transactions: for a
    test that holds a lock in a transaction while it plays another process's part (a worker's
    claim against a webhook's STOP), which is not the service's transaction."""
    context = contextvars.copy_context()
    context.run(_HELD.set, ())
    return asyncio.create_task(work, context=context)


def _live(transaction: Any) -> bool:
    """Whether an asyncpg transaction is still open on its connection."""
    return bool(
        transaction._state is asyncpg.transaction.TransactionState.STARTED
        and not transaction._connection.is_closed()
        and transaction._connection.is_in_transaction()
    )


class NetworkGuard:
    """Open transactions of the running context (inherited by child tasks), and the network
    calls made inside one (`violations`)."""

    def __init__(self) -> None:
        self.held = _HELD
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
        if where is None or asyncio.current_task() is None:
            return
        # A tuple, replaced (never changed in place): a child task keeps the transactions open
        # when it started, and sees each of them end (`_live` reads the transaction's state).
        still = tuple(held for held in self.held.get() if _live(held[0]))
        self.held.set((*still, (transaction, where)))

    def closed(self, transaction: Any) -> None:
        held = self.held.get()
        if any(t is transaction for t, _ in held):
            self.held.set(tuple((t, w) for t, w in held if t is not transaction))

    def check(self, kind: str, what: str) -> None:
        self.checked += 1
        if self._paused:
            return
        live = [where for transaction, where in self.held.get() if _live(transaction)]
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
