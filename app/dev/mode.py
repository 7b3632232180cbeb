"""`smsgate dev`: the whole service in one command, for trying it and for development.

One code path whatever the environment: PostgreSQL and Redis are the ones `DATABASE_URL` and
`REDIS_URL` name when they are set, else embedded ones (app/dev/embedded.py) with their data in
`DEV_DATA_DIR`. Then: create the database if missing, migrate it, make sure a development sender
(fake provider) and client exist, start the API and one worker as child processes, print how to
use them, and on Ctrl-C or SIGTERM stop the children and whatever servers this command started.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx

from app.dev.embedded import EmbeddedServiceError, start_postgres, start_redis
from app.dev.embedded import stop_postgres as stop_embedded_postgres
from app.dev.embedded import stop_redis as stop_embedded_redis
from app.kernel.settings import Settings, get_settings

DEV_SENDER = "+14155550100"
DEV_CLIENT = "dev"
API_KEY_FILE = "dev-api-key"
API_URL_FILE = "dev-api-url"  # the running API's base URL, for `smsgate send` and the README
EXAMPLE_RECIPIENT = "+14155550123"
READY_TIMEOUT_SECONDS = 60.0
# A worker finishes its running jobs on SIGTERM; a development job is one fake provider call.
CHILD_STOP_TIMEOUT_SECONDS = 30.0


class DevError(Exception):
    """`smsgate dev` cannot go on; the message says why."""


def say(text: str) -> None:
    """One line for the person at the terminal."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


@dataclass(frozen=True, slots=True)
class DevKey:
    """The development client's API key, and whether it was made just now."""

    raw_key: str
    created: bool


def read_api_url(data_dir: Path) -> str | None:
    """The base URL of the API a running `smsgate dev` serves from `data_dir`, if any."""
    try:
        url = (data_dir / API_URL_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return url or None


def read_api_key(data_dir: Path) -> str | None:
    """The development API key kept in `data_dir`, if any."""
    try:
        key = (data_dir / API_KEY_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return key or None


def write_api_key(data_dir: Path, raw_key: str) -> None:
    """Keep the key in `data_dir/dev-api-key`, readable by its owner only."""
    path = data_dir / API_KEY_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        file.write(raw_key + "\n")


SECRETS_KEY_FILE = "dev-secrets-key"


def dev_secrets_key(data_dir: Path) -> str:
    """The development `SECRETS_KEY`, made once and kept in `data_dir/dev-secrets-key` (mode
    0600) beside the data it encrypts: the one default key there is, and only in dev mode."""
    from app.kernel.secrets import generate_key

    path = data_dir / SECRETS_KEY_FILE
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except OSError:
        existing = ""
    if existing:
        return existing
    key = generate_key()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(key + "\n")
    return key


def dev_keywords() -> dict[str, object]:
    """The built-in keyword sets with the built-in replies filled in, so the sender may send."""
    from app.senders.keywords import DEFAULT_REPLIES, KeywordConfig

    config = KeywordConfig().model_dump(mode="json")
    for category, replies in DEFAULT_REPLIES.items():
        config[category.value]["replies"] = dict(replies)
    return KeywordConfig.model_validate(config).model_dump(mode="json")


async def prepare_database(database_url: str, data_dir: Path, default_region: str) -> DevKey:
    """Ensure the development sender and client; reuse the kept API key while it is valid."""
    from sqlalchemy import select

    from app.access.auth import authenticate, create_api_key
    from app.db.models import Client, Sender
    from app.db.session import create_engine, create_session_factory
    from app.kernel.errors import Unauthorized
    from app.senders.keywords import KeywordConfig
    from app.senders.service import SenderKind, create_sender, grant_sender

    engine = create_engine(database_url, pool_size=1)
    try:
        async with create_session_factory(engine).begin() as session:
            sender = await session.scalar(select(Sender).where(Sender.address == DEV_SENDER))
            if sender is None:
                sender = await create_sender(
                    session,
                    address=DEV_SENDER,
                    kind=SenderKind.LONG_CODE,
                    provider="fake",
                    description="development sender (smsgate dev)",
                    default_region=default_region,
                    keywords=KeywordConfig.model_validate(dev_keywords()),
                )
                say(f"Created the development sender {DEV_SENDER} (fake provider).")
            elif sender.provider != "fake":
                say(f"Note: sender {DEV_SENDER} exists and uses {sender.provider}, not fake.")
            raw_key = read_api_key(data_dir)
            created = False
            try:
                if raw_key is None:
                    raise Unauthorized("missing_api_key", "no kept key")
                principal = await authenticate(session, f"Bearer {raw_key}")
                if principal.client_name != DEV_CLIENT:
                    raise Unauthorized("invalid_api_key", "another client's key")
            except Unauthorized:
                # An admin key, so the development client may also manage senders and opt-outs.
                raw_key = await create_api_key(session, DEV_CLIENT, is_admin=True)
                created = True
            client = await session.scalar(select(Client).where(Client.name == DEV_CLIENT))
            assert client is not None
            if client.default_sender_id is None:
                client.default_sender_id = sender.id
            await grant_sender(session, sender.id, DEV_CLIENT)  # a default sender is one's own
    finally:
        await engine.dispose()
    if created:
        write_api_key(data_dir, raw_key)
    return DevKey(raw_key, created)


# Set by the signal handler. The KeyboardInterrupt it raises can land in a weakref or garbage
# collection callback (SQLAlchemy's event registry has some), where Python prints and swallows
# it; the main loop then sees this flag and stops anyway.
_stop_requested = False


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGINT (Ctrl-C) and SIGTERM stop `smsgate dev`, through its `finally`."""
    global _stop_requested
    _stop_requested = True
    raise KeyboardInterrupt


def _url_host(host: str) -> str:
    """The host to put in URLs: a loopback address for a wildcard bind, brackets for IPv6."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A `python -m app` child in its own process group: a terminal's Ctrl-C reaches only us, and
    we stop the children in order (SIGTERM, wait, then SIGKILL)."""
    return subprocess.Popen(
        [sys.executable, "-m", "app", *args], env=env, stdin=subprocess.DEVNULL, process_group=0
    )


def _stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child, wait for them (bounded), SIGKILL the ones still there."""
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + CHILD_STOP_TIMEOUT_SECONDS
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop in {CHILD_STOP_TIMEOUT_SECONDS:.0f} s: killing it")
            child.kill()
            child.wait()


def _wait_until_serving(
    health_url: str, children: dict[str, subprocess.Popen[bytes]], timeout: float
) -> None:
    """Return once the API answers `health_url`; DevError if a child exits or time runs out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            _check_children(children)
            try:
                if client.get(health_url).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise DevError(f"the API did not answer {health_url} within {timeout:.0f} s")
            time.sleep(0.2)


def _check_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    """DevError if a child has exited."""
    for name, child in children.items():
        code = child.poll()
        if code is not None:
            raise DevError(f"the {name} exited (status {code})")


def cli_command() -> str:
    """How the person at the terminal runs `smsgate`: $SMSGATE_CLI (./scripts/smsgate when
    started by ./scripts/run), else the `smsgate` beside this Python, relative when it can be."""
    if cli := os.environ.get("SMSGATE_CLI"):
        return cli
    script = Path(sys.executable).parent / "smsgate"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _banner(base_url: str, key: DevKey, data_dir: Path, env: dict[str, str]) -> str:
    """What to do next: the docs, the key, a command that sends a message, and the URLs."""
    body = json.dumps({"to": EXAMPLE_RECIPIENT, "body": "Hello from smsgate"})
    curl = (
        f"curl -s {base_url}/v1/messages -H {shlex.quote('Authorization: Bearer ' + key.raw_key)}"
        f" \\\n       -H 'content-type: application/json' -d {shlex.quote(body)}"
    )
    kept = "new, kept" if key.created else "kept"
    cli = cli_command()
    return "\n".join(
        [
            "",
            "smsgate is running: the API, an SMS worker and an events worker (fake provider).",
            "Ctrl-C stops it.",
            f"  API docs:  {base_url}/docs  (and {base_url}/redoc)",
            f"  API key:   {key.raw_key}",
            f"             (client {DEV_CLIENT!r}, admin; {kept} in {data_dir / API_KEY_FILE})",
            "  Send a message:",
            f"    {curl}",
            f"  or: {cli} send --to {EXAMPLE_RECIPIENT} --body 'Hello' --wait",
            "  Other smsgate commands (create-api-key, seed-senders...) reach these servers with",
            f"    export DATABASE_URL={shlex.quote(env['DATABASE_URL'])}"
            f" REDIS_URL={shlex.quote(env['REDIS_URL'])}",
            "",
        ]
    )


def _forget_worker_health(redis_url: str, keys: list[str]) -> None:
    """Remove the workers' health-check keys; a live worker writes its own again within 30 s."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(*keys)
    finally:
        client.close()


def _wait_until_workers_report(
    redis_url: str, keys: list[str], children: dict[str, subprocess.Popen[bytes]], timeout: float
) -> None:
    """Return once each worker recorded its health check in Redis (which it does as it starts
    taking jobs), so the banner comes after their start-up lines."""
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(redis_url)
    try:
        while True:
            _check_children(children)
            if client.exists(*keys) == len(keys):
                return
            if time.monotonic() > deadline:
                raise DevError(f"the workers did not start within {timeout:.0f} s")
            time.sleep(0.2)
    finally:
        client.close()


def run_dev(host: str, port: int, data_dir: Path, settings: Settings | None = None) -> int:
    """Run everything until Ctrl-C or SIGTERM; the exit status (0 when stopped on request)."""
    global _stop_requested
    _stop_requested = False
    settings = settings or get_settings()
    # SIGINT too: a shell starting us in the background makes us inherit SIGINT ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    data_dir = data_dir.resolve()
    stops: list[Callable[[], object]] = []  # what to stop at the end, in reverse order
    children: dict[str, subprocess.Popen[bytes]] = {}
    status = 0
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        say(f"smsgate dev: data in {data_dir}")
        database_url, redis_url = _start_servers(settings, data_dir, stops)
        key = _prepare_database(settings, data_dir, database_url)
        base_url = f"http://{_url_host(host)}:{port}"
        env = _children_env(database_url, redis_url, base_url)
        _start_children(host, port, base_url, env, redis_url, children)
        (data_dir / API_URL_FILE).write_text(base_url + "\n", encoding="utf-8")
        stops.append(lambda: (data_dir / API_URL_FILE).unlink(missing_ok=True))
        say(_banner(base_url, key, data_dir, env))
        while not _stop_requested:
            _check_children(children)
            time.sleep(0.5)
        raise KeyboardInterrupt  # the handler's own was swallowed (see `_stop_requested`)
    except KeyboardInterrupt:
        say("\nStopping...")
    except (DevError, EmbeddedServiceError) as error:
        sys.stderr.write(f"smsgate dev: {error}\n")
        status = 1
    except Exception:  # an unreachable DATABASE_URL, a failed migration: show all, then clean up
        traceback.print_exc()
        status = 1
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave servers behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop_children(children)
        for stop in reversed(stops):
            stop()
        say("Stopped." if status == 0 else "Stopped after an error.")
    return status


def _start_servers(
    settings: Settings, data_dir: Path, stops: list[Callable[[], object]]
) -> tuple[str, str]:
    """The database and Redis URLs: the configured ones, else embedded servers (started if need
    be; the ones started here are added to `stops` as soon as they run)."""
    # Set in the environment (or .env): use it. Otherwise the embedded server.
    if "database_url" in settings.model_fields_set:
        database_url = settings.database_url
        say("PostgreSQL: DATABASE_URL")
    else:
        postgres = start_postgres(data_dir)
        if postgres.started:
            stops.append(lambda: stop_embedded_postgres(data_dir))
        database_url = postgres.url
        say(f"PostgreSQL: embedded ({'started' if postgres.started else 'already running'})")
    if "redis_url" in settings.model_fields_set:
        redis_url = settings.redis_url
        say("Redis: REDIS_URL")
    else:
        redis = start_redis(data_dir)
        if redis.started:
            stops.append(lambda: stop_embedded_redis(data_dir))
        redis_url = redis.url
        say(f"Redis: embedded at {redis_url} ({'started' if redis.started else 'running'})")
    return database_url, redis_url


def _prepare_database(settings: Settings, data_dir: Path, database_url: str) -> DevKey:
    """Create and migrate the database; ensure the development sender, client and key."""
    from app.db.migrations import create_database_if_missing, migrate

    if not settings.secrets_key.get_secret_value():
        # The migration and the children read it from the environment.
        os.environ["SECRETS_KEY"] = dev_secrets_key(data_dir)
    if asyncio.run(create_database_if_missing(database_url)):
        say("Created the database.")
    say("Migrating the database to the latest schema...")
    migrate(database_url)
    say("The database schema is up to date.")
    return asyncio.run(prepare_database(database_url, data_dir, settings.default_region))


def _children_env(database_url: str, redis_url: str, base_url: str) -> dict[str, str]:
    return {
        # Lines for a person, not for a log pipeline (LOG_FORMAT set explicitly wins).
        "LOG_FORMAT": "text",
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        # Set explicitly (a tunnel for real providers' callbacks, say), it is kept.
        "PUBLIC_BASE_URL": os.environ.get("PUBLIC_BASE_URL", base_url),
    }


def _start_children(
    host: str,
    port: int,
    base_url: str,
    env: dict[str, str],
    redis_url: str,
    children: dict[str, subprocess.Popen[bytes]],
) -> None:
    """Spawn the API and both workers into `children`; return once all of them are ready."""
    from app.worker.queue import health_check_keys

    health_keys = health_check_keys()
    _forget_worker_health(redis_url, health_keys)  # a worker of an earlier run is not ours
    say(f"Starting the API on {base_url}, an SMS worker and an events worker...")
    children["API"] = _spawn(["serve", "--host", host, "--port", str(port)], env)
    children["worker"] = _spawn(["worker"], env)
    children["events worker"] = _spawn(["worker", "--queue", "events"], env)
    _wait_until_serving(f"{base_url}/healthz", children, READY_TIMEOUT_SECONDS)
    _wait_until_workers_report(redis_url, health_keys, children, READY_TIMEOUT_SECONDS)
