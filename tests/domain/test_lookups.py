"""The per-process TTL cache behind the cached lookups of API keys and senders."""

from __future__ import annotations

import asyncio

import pytest

from app.access.lookups import TtlCache


class Loader:
    """Counts loads; each returns `value` after `gate` opens."""

    def __init__(self, value: str | None) -> None:
        self.value = value
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> str | None:
        self.calls += 1
        await self.gate.wait()
        return self.value


async def test_concurrent_misses_share_one_load_and_the_value_is_kept() -> None:
    cache: TtlCache[str, str] = TtlCache(60)
    load = Loader("v")
    load.gate.clear()

    waiting = [asyncio.ensure_future(cache.get_or_load("k", load)) for _ in range(32)]
    await asyncio.sleep(0)
    load.gate.set()

    assert await asyncio.gather(*waiting) == ["v"] * 32
    assert await cache.get_or_load("k", load) == "v"
    assert load.calls == 1


async def test_nothing_found_is_not_kept() -> None:
    cache: TtlCache[str, str] = TtlCache(60)
    load = Loader(None)

    assert await cache.get_or_load("k", load) is None
    assert await cache.get_or_load("k", load) is None
    assert load.calls == 2


async def test_values_expire_after_the_ttl_and_zero_keeps_nothing() -> None:
    short: TtlCache[str, str] = TtlCache(0.05)
    off: TtlCache[str, str] = TtlCache(0)
    load = Loader("v")

    await short.get_or_load("k", load)
    await off.get_or_load("k", load)
    await off.get_or_load("k", load)
    await asyncio.sleep(0.06)
    await short.get_or_load("k", load)

    assert load.calls == 4


async def test_a_load_under_way_when_the_entry_is_forgotten_is_not_kept() -> None:
    cache: TtlCache[str, str] = TtlCache(60)
    stale = Loader("old")
    stale.gate.clear()
    first = asyncio.ensure_future(cache.get_or_load("k", stale))
    await asyncio.sleep(0)

    cache.clear()  # the change committed while the old row was being read
    fresh = Loader("new")
    after = await cache.get_or_load("k", fresh)
    stale.gate.set()

    assert (await first, after) == ("old", "new")
    assert await cache.get_or_load("k", stale) == "new"


async def test_a_failed_load_fails_every_waiter_and_is_not_kept() -> None:
    cache: TtlCache[str, str] = TtlCache(60)

    async def broken() -> str | None:
        await asyncio.sleep(0)
        raise ConnectionRefusedError("database down")

    results = await asyncio.gather(
        cache.get_or_load("k", broken), cache.get_or_load("k", broken), return_exceptions=True
    )

    assert all(isinstance(result, ConnectionRefusedError) for result in results)
    with pytest.raises(ConnectionRefusedError):
        await cache.get_or_load("k", broken)
