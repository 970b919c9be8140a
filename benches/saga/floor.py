#!/usr/bin/env python3
"""What the durable work of one order costs PostgreSQL and NATS JetStream on this
machine, with no shop in the way: the floor under the saga benchmark's
PostgreSQL + NATS rows.

PostgreSQL: pgbench (prepared statements, 8 clients) runs the statements a placed
and confirmed order needs with a database per service, an outbox and an inbox
(orders: the order and its event; inventory: the inbox row, the stock, the
reservation and its event; payments: the inbox row, the charge and its event;
orders: the inbox row, the confirmation and its event; notifications: the inbox
row and the notification; the relays: the published events deleted), each step
its own transaction. `--batch B` runs each statement for B orders at once
(multi-row, one transaction per step for B orders): the most a shop could gain by
batching orders together at a high rate.

NATS: one JetStream stream (file storage, as the bus makes them), `--events`
publishes per order each acknowledged by the server (64 in flight), each read
once by a pull consumer and acknowledged: the fewest messages a saga can use.

Reports each server's CPU (user + system of its processes, from /proc) per order
and what it would need at 1,000 orders/s, in cores.

Usage: python3 benches/saga/floor.py [--seconds 15] [--batch 1,16] [--events 4]
Needs: PostgreSQL on 127.0.0.1:5432 (trust), pgbench, NATS with JetStream on 4222,
and the nats-py package (pip install nats-py). Prints Markdown.
"""
import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid

PG = ["-h", "127.0.0.1", "-U", "postgres"]


def cpu_of(comm):
    """CPU seconds (user + system) of every process named `comm`, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    seen = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{pid}/comm").read().strip() != comm:
                continue
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            seen[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return seen


def spent(before, after):
    """CPU seconds between two `cpu_of` readings (a process that started in
    between counts from zero)."""
    return sum(c - before.get(pid, 0.0) for pid, c in after.items())


SCHEMA = """
CREATE TABLE orders (id bigint PRIMARY KEY, status text NOT NULL, reason text,
    placed_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz);
CREATE TABLE stock (product int PRIMARY KEY, available bigint NOT NULL CHECK (available >= 0),
    reserved bigint NOT NULL DEFAULT 0);
CREATE TABLE reservations (order_id bigint PRIMARY KEY, product int NOT NULL, qty int NOT NULL,
    expires_at timestamptz NOT NULL);
CREATE TABLE charges (order_id bigint PRIMARY KEY, amount bigint NOT NULL, status text NOT NULL);
CREATE TABLE notifications (order_id bigint PRIMARY KEY, kind text NOT NULL);
CREATE TABLE inbox (service text NOT NULL, event bigint NOT NULL, PRIMARY KEY (service, event));
CREATE TABLE outbox (seq bigserial PRIMARY KEY, topic text NOT NULL, key bigint NOT NULL,
    payload jsonb NOT NULL);
INSERT INTO stock SELECT g, 1000000000000, 0 FROM generate_series(1, 50) g;
"""

# One order's statements, step by step. `{ids} i` is a row source of the script
# run's order ids (one, or a batch) with the column `i`, `{n}` how many they are;
# `{k}` numbers the outbox inserts, whose first and last `seq` the relays' delete
# takes.
def event(topic, kind, k):
    return ("WITH sent AS (INSERT INTO outbox (topic, key, payload) SELECT '" + topic + "', i, "
            "jsonb_build_object('type', '" + kind + "', 'order_id', i, 'product', :p::int) "
            "FROM {ids} i RETURNING seq) "
            f"SELECT min(seq) AS lo{k}, max(seq) AS hi{k} FROM sent \\gset")


STEPS = [
    # orders: the order placed, and its event.
    ["INSERT INTO orders (id, status) SELECT i, 'PENDING' FROM {ids} i",
     event("orders", "order.placed", 1)],
    # inventory: the event taken once, the stock held, the reservation and its event.
    ["INSERT INTO inbox SELECT 'inventory', i FROM {ids} i",
     "UPDATE stock SET available = available - {n}, reserved = reserved + {n} WHERE product = :p",
     "INSERT INTO reservations SELECT i, :p::int, 1, now() + interval '15 minutes' FROM {ids} i",
     event("inventory", "stock.reserved", 2)],
    # payments: the event taken once, the charge and its event.
    ["INSERT INTO inbox SELECT 'payments', i FROM {ids} i",
     "INSERT INTO charges SELECT i, 1999, 'CHARGED' FROM {ids} i",
     event("payments", "payment.charged", 3)],
    # orders: the event taken once, the order confirmed and its event.
    ["INSERT INTO inbox SELECT 'orders', i FROM {ids} i",
     "UPDATE orders SET status = 'CONFIRMED', updated_at = now() WHERE id IN (SELECT i FROM {ids} i)",
     event("orders", "order.confirmed", 4)],
    # notifications: the event taken once, the notification.
    ["INSERT INTO inbox SELECT 'notifications', i FROM {ids} i",
     "INSERT INTO notifications SELECT i, 'order.confirmed' FROM {ids} i"],
    # the relays: the published events deleted, by `seq` as a relay does.
    ["DELETE FROM outbox WHERE (seq BETWEEN :lo1 AND :hi1 OR seq BETWEEN :lo2 AND :hi2 "
     "OR seq BETWEEN :lo3 AND :hi3 OR seq BETWEEN :lo4 AND :hi4) "
     "AND key IN (SELECT i FROM {ids} i)"],
]


def pgbench_script(batch):
    # The ids of one script run, as a row source whose column is `i`.
    source = ("(VALUES (:id::bigint)) v(i)" if batch == 1
              else f"generate_series(:id::bigint, :id::bigint + {batch - 1}) i")
    lines = [
        # Ids never repeat across clients and transactions.
        f"\\set id (:client_id * 100000000000 + random(0, 99999999999)) * {batch}",
        "\\set p random(1, 50)",
    ]
    for step in STEPS:
        lines.append("BEGIN;")
        for statement in step:
            statement = statement.replace("{ids} i", source).replace("{n}", str(batch))
            # `\\gset` ends a query as `;` does.
            lines.append(statement if statement.endswith("\\gset") else statement + ";")
        lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


def postgres_floor(batch, seconds):
    db = f"bazaar_floor_{uuid.uuid4().hex[:8]}"
    subprocess.run(["psql", *PG, "-qc", f"CREATE DATABASE {db}"], check=True)
    try:
        subprocess.run(["psql", *PG, "-q", "-d", db, "-c", SCHEMA], check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(pgbench_script(batch))
            script = f.name
        # Warm up (plans, caches), then measure.
        subprocess.run(["pgbench", *PG, "-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", "2",
                        "-f", script, db], check=True, capture_output=True)
        before = cpu_of("postgres")
        started = time.monotonic()
        bench = subprocess.Popen(["pgbench", *PG, "-n", "-M", "prepared", "-c", "8", "-j", "2",
                                  "-T", str(seconds), "-f", script, db],
                                 stdout=subprocess.PIPE, text=True)
        # pgbench's backends exit with it, taking their counters along: they are
        # read while they run (the last tenth of a second of each is lost).
        last = {}
        while bench.poll() is None:
            last.update(cpu_of("postgres"))
            time.sleep(0.1)
        out = bench.stdout.read()
        elapsed = time.monotonic() - started
        if bench.returncode != 0:
            raise SystemExit(f"pgbench failed: {out}")
        last.update(cpu_of("postgres"))
        server = spent(before, last)
        runs = int(next(l for l in out.splitlines()
                        if l.startswith("number of transactions actually processed"))
                   .split(":")[1].split("/")[0].strip())
        orders = runs * batch
        statements = sum(len(s) for s in STEPS)
        return {
            "orders/s": orders / elapsed,
            "cpu_ms": server * 1000 / orders,
            "commits": len(STEPS) / batch,
            "statements": statements / batch,
        }
    finally:
        subprocess.run(["psql", *PG, "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"])


async def nats_floor(events, seconds):
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

    nc = await nats.connect("nats://127.0.0.1:4222")
    js = nc.jetstream()
    name = f"FLOOR_{uuid.uuid4().hex[:8]}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"], storage=StorageType.FILE))
    sub = await js.pull_subscribe(f"{name}.>", durable="floor",
                                  config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT,
                                                        max_ack_pending=10_000))
    payload = b"x" * 300
    published = consumed = 0
    stop = time.monotonic() + seconds

    async def publisher():
        nonlocal published
        window = []
        while time.monotonic() < stop:
            window.append(js.publish(f"{name}.orders.{published % 8}", payload))
            published += 1
            if len(window) == 64:
                await asyncio.gather(*window)
                window = []
        await asyncio.gather(*window)

    async def consumer():
        nonlocal consumed
        # Until every message published has been read (or a minute past the end).
        while time.monotonic() < stop + 60:
            if time.monotonic() > stop and consumed >= published:
                return
            try:
                msgs = await sub.fetch(256, timeout=0.5)
            except asyncio.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
            consumed += len(msgs)

    before = cpu_of("nats-server")
    started = time.monotonic()
    await asyncio.gather(publisher(), consumer())
    await nc.flush()
    elapsed = time.monotonic() - started
    server = spent(before, cpu_of("nats-server"))
    await js.delete_stream(name)
    await nc.close()
    orders = published / events
    return {
        "msg/s": published / elapsed,
        "consumed": consumed,
        "published": published,
        "cpu_ms": server * 1000 / orders,
        "us_per_msg": server * 1e6 / published,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--events", type=int, default=4)
    parser.add_argument("--skip-nats", action="store_true")
    args = parser.parse_args()

    print("| server | work per order | orders/s reached | server CPU per order | cores at 1,000 orders/s |")
    print("|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch.split(",")]:
        r = postgres_floor(batch, args.seconds)
        print(f"| PostgreSQL, {batch} order(s) a transaction | {r['commits']:.2f} commits, "
              f"{r['statements']:.2f} statements | {r['orders/s']:,.0f} | {r['cpu_ms']:.3f} ms | "
              f"{r['cpu_ms']:.2f} |", flush=True)
    if not args.skip_nats:
        r = asyncio.run(nats_floor(args.events, args.seconds))
        print(f"| NATS JetStream | {args.events} events published and acked, each consumed and acked "
              f"({r['us_per_msg']:.1f} µs a message; {r['consumed']:,} of {r['published']:,} read) | "
              f"{r['msg/s'] / args.events:,.0f} | {r['cpu_ms']:.3f} ms | {r['cpu_ms']:.2f} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
