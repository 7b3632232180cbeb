"""The benchmark's baselines: what the same work costs without the service around it.

- `insert`: the batch endpoint's rows (a message and its first history row each) written with
  plain asyncpg, one multi-row INSERT per table per batch of 1,000, in one transaction per batch,
  from as many connections as the batch load uses. The rows go to the real tables (same
  indexes and foreign keys) under a client of their own, and are deleted afterwards.
- `loop`: the delivery worker's job without the service: read the same rows and POST each to the
  (fake) provider with httpx, as Twilio's API takes it, at the same concurrency.

Each prints one JSON object with its rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from bench.load import message

MESSAGE_COLUMNS = (
    'id, client_id, sender_id, kind, "to", "from", body, encoding, segments, status, provider, '
    "metadata, attempts, next_attempt_at, created_at, updated_at"
)
INSERT_MESSAGES = f"""
INSERT INTO messages ({MESSAGE_COLUMNS})
SELECT id, $2, $3, 'regular', to_, $4, body, 'GSM-7', 1, 'queued', 'twilio', metadata, 0,
       $5, $5, $5
FROM unnest($1::uuid[], $6::text[], $7::text[], $8::jsonb[]) AS r(id, to_, body, metadata)
"""
INSERT_EVENTS = """
INSERT INTO message_events (message_id, status, applied, source, created_at)
SELECT id, 'queued', true, 'api', $2 FROM unnest($1::uuid[]) AS r(id)
"""


async def insert(args: argparse.Namespace) -> dict[str, Any]:
    """Plain multi-row inserts of `batches` x `size` messages; rows a second."""
    pool = await asyncpg.create_pool(args.dsn, min_size=args.concurrency, max_size=args.concurrency)
    client_id = uuid.uuid4()
    # Far in the future, so no sweep ever picks these rows up while they exist.
    not_due = datetime.now(UTC) + timedelta(days=3650)
    async with pool.acquire() as connection:
        await connection.execute(
            "INSERT INTO clients (id, name, created_at) VALUES ($1, $2, now())",
            client_id,
            f"baseline-{client_id}",
        )
    batches = iter(range(args.batches))

    async def run() -> None:
        async with pool.acquire() as connection:
            for batch in batches:
                items = [message(batch * args.size + i, args.sender) for i in range(args.size)]
                ids = [uuid.uuid4() for _ in items]
                async with connection.transaction():
                    await connection.execute(
                        INSERT_MESSAGES,
                        ids,
                        client_id,
                        uuid.UUID(args.sender_id),
                        args.sender,
                        not_due,
                        [item["to"] for item in items],
                        [item["body"] for item in items],
                        [json.dumps(item["metadata"]) for item in items],
                    )
                    await connection.execute(INSERT_EVENTS, ids, not_due)

    started = time.perf_counter()
    await asyncio.gather(*(run() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    async with pool.acquire() as connection:
        await connection.execute("DELETE FROM messages WHERE client_id = $1", client_id)
        await connection.execute("DELETE FROM clients WHERE id = $1", client_id)
    await pool.close()
    rows = args.batches * args.size
    return {"messages": rows, "elapsed": elapsed, "messages_per_second": rows / elapsed}


async def loop(args: argparse.Namespace) -> dict[str, Any]:
    """Read `ids`' rows and POST each to the provider at `concurrency`; messages a second."""
    ids = [uuid.UUID(line) for line in sys.stdin.read().split()]
    started = time.perf_counter()
    connection = await asyncpg.connect(args.dsn)
    rows = await connection.fetch(
        'SELECT id, "to", "from", body FROM messages WHERE id = ANY($1::uuid[])', ids
    )
    await connection.close()
    url = f"{args.provider_url}/2010-04-01/Accounts/{args.account_sid}/Messages.json"
    auth = httpx.BasicAuth(args.account_sid, args.auth_token)
    pending = iter(rows)
    failures = 0
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as http:

        async def run() -> None:
            nonlocal failures
            for row in pending:
                form = {"To": row["to"], "From": row["from"], "Body": row["body"]}
                response = await http.post(url, data=form, auth=auth)
                failures += response.status_code != 201

        await asyncio.gather(*(run() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "messages": len(rows),
        "failures": failures,
        "elapsed": elapsed,
        "messages_per_second": len(rows) / elapsed,
    }


def main() -> None:
    """`python -m bench.baselines insert|loop ...`"""
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("insert", "loop"))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--sender", default="")
    parser.add_argument("--sender-id", default="")
    parser.add_argument("--batches", type=int, default=0)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--provider-url", default="")
    parser.add_argument("--account-sid", default="")
    parser.add_argument("--auth-token", default="")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(insert(args) if args.what == "insert" else loop(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
