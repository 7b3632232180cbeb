"""The benchmark's baselines: what the same work costs without the service around it.

- `insert`: the batch endpoint's rows (a message and its first history row each) written with
  plain asyncpg, one multi-row INSERT per table per batch of 1,000, in one transaction per batch,
  from as many connections as the batch load uses. The rows go to the real tables (same
  indexes and foreign keys) under a client of their own, and are deleted afterwards.
- `loop`: the delivery worker's job without the service, per message: the claim (one statement),
  the POST to the (fake) provider with plain aiohttp, as Twilio's API takes it, the record of
  its answer (one statement); at the workers' concurrency, on rows of its own (the accept
  anchor's: `bench.anchor`).

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

import aiohttp
import asyncpg

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


# The worker's writes for one message, each one statement: the claim (under the recipient's
# advisory lock, then the row; the opt-out decision; the attempt's history row) and the record of
# the provider's answer (conditional on this attempt; its history row).
CLAIM = """
WITH locked AS (
    SELECT id, pg_advisory_xact_lock(hashtextextended('recipient:' || "to", 0) % 1024) AS held
    FROM messages WHERE id = $1
), claimed AS (
    UPDATE messages m
    SET status = 'sending', attempts = m.attempts + 1, claimed_at = now(), updated_at = now()
    FROM locked
    WHERE m.id = locked.id AND m.status = 'queued' AND NOT EXISTS (
        SELECT FROM (
            SELECT action FROM opt_outs o
            WHERE o.phone = m."to" AND (o.sender_id = m.sender_id OR o.sender_id IS NULL)
            ORDER BY o.created_at DESC, o.id DESC LIMIT 1
        ) AS decision
        WHERE action = 'opt_out'
    )
    RETURNING m.id, m."to", m."from", m.body, m.attempts
), history AS (
    INSERT INTO message_events (message_id, status, applied, source, detail, created_at)
    SELECT id, 'sending', true, 'worker', 'attempt ' || attempts, now() FROM claimed
)
SELECT "to", "from", body, attempts FROM claimed
"""
RECORD = """
WITH sent AS (
    UPDATE messages SET status = 'sent', provider_message_id = $3, updated_at = now()
    WHERE id = $1 AND status = 'sending' AND attempts = $2
    RETURNING id
)
INSERT INTO message_events (message_id, status, applied, source, detail, created_at)
SELECT $1, 'sent', EXISTS (SELECT FROM sent), 'worker', 'accepted by twilio as ' || $3, now()
"""


async def loop(args: argparse.Namespace, ids: list[uuid.UUID]) -> dict[str, Any]:
    """The delivery anchor: per message of `ids`, claim it, POST it to the provider with plain
    aiohttp (the fastest client `bench.transports` measures), record the answer; at
    `concurrency` messages in flight. Messages a second, and this process's CPU per message."""
    url = f"{args.provider_url}/2010-04-01/Accounts/{args.account_sid}/Messages.json"
    headers = {"Authorization": aiohttp.encode_basic_auth(args.account_sid, args.auth_token)}
    pool = await asyncpg.create_pool(args.dsn, min_size=args.pool, max_size=args.pool)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    pending = iter(ids)
    failures = 0
    cpu, started = time.process_time(), time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:

        async def deliver(message_id: uuid.UUID) -> bool:
            claimed = await pool.fetchrow(CLAIM, message_id)
            if claimed is None:
                return False
            form = {"To": claimed["to"], "From": claimed["from"], "Body": claimed["body"]}
            async with http.post(url, data=form) as response:
                answer = json.loads(await response.read())
                if response.status != 201:
                    return False
            await pool.execute(RECORD, message_id, claimed["attempts"], answer["sid"])
            return True

        async def run() -> None:
            nonlocal failures
            for message_id in pending:
                failures += not await deliver(message_id)

        await asyncio.gather(*(run() for _ in range(args.concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await pool.close()
    return {
        "messages": len(ids),
        "failures": failures,
        "elapsed": elapsed,
        "messages_per_second": len(ids) / elapsed if elapsed else 0.0,
        "cpu_ms_per_message": cpu / len(ids) * 1000 if ids else 0.0,
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
    parser.add_argument("--pool", type=int, default=20, help="database connections (loop)")
    args = parser.parse_args()
    import uvloop

    if args.what == "insert":
        result = uvloop.run(insert(args))
    else:
        result = uvloop.run(loop(args, [uuid.UUID(line) for line in sys.stdin.read().split()]))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
