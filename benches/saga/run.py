#!/usr/bin/env python3
"""Saga benchmark: the whole shop (release build, `bazaar up`, processes mode) driven
through the gateway by `bazaar load` at a fixed rate (open loop), for each saga mode,
on the embedded defaults (SQLite, embedded log) and on PostgreSQL + NATS JetStream.
Reports achieved orders/s, request latency, saga completion latency (placed ->
CONFIRMED/CANCELLED, from the orders service's timestamps) and per-step latency from
sampled saga histories, then runs `bazaar verify`.

Usage: python3 benches/saga/run.py [--rate 1000] [--seconds 20] [--backends embedded,postgres+nats]
       [--modes orchestration,choreography] [--binary PATH]
Needs: PostgreSQL on 127.0.0.1:5432 (trust) and NATS with JetStream on 4222 for the
second pair of rows. Prints Markdown.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "foundation"))
from run import ROOT, target_dir  # noqa: E402


def wait_stocked(binary, data_dir):
    """Inventory learns products from product.created: wait until it knows them."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ps = json.loads(subprocess.run([binary, "ps", "--json", "--data-dir", data_dir],
                                       capture_output=True, text=True).stdout or "[]")
        inventory = next((p["url"] for p in ps if p["name"] == "inventory"), None)
        if inventory:
            try:
                page = json.load(urllib.request.urlopen(f"{inventory}/inventory?limit=500", timeout=2))
                if len(page["items"]) >= 50:
                    return
            except OSError:
                pass
        time.sleep(0.2)
    raise SystemExit("inventory never learned the catalog")


def usage(pid):
    """CPU seconds (user + system) and context switches (voluntary + not) of a
    process, over all its threads."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        switches = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            status = open(f"/proc/{pid}/task/{tid}/status").read()
            for key in ("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"):
                switches += int(status.split("\n" + key)[1].split()[0])
        return cpu, switches
    except (OSError, IndexError, ValueError):
        return 0.0, 0


def servers_usage():
    """CPU seconds and context switches of the machine's PostgreSQL and NATS
    processes, by server, summed over their processes (a PostgreSQL backend that
    started during the run counts from zero)."""
    total = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
        if comm in ("postgres", "nats-server"):
            cpu, switches = usage(pid)
            seen = total.setdefault(comm, {})
            seen[pid] = (cpu, switches)
    return total


def servers_delta(before, after):
    delta = {}
    for name, pids in after.items():
        cpu = sum(c - before.get(name, {}).get(pid, (0.0, 0))[0] for pid, (c, _) in pids.items())
        sw = sum(s - before.get(name, {}).get(pid, (0.0, 0))[1] for pid, (_, s) in pids.items())
        delta[name] = (cpu, sw)
    return delta


def pg_commits(dbs):
    """Transactions committed so far in each of the benchmark's PostgreSQL databases."""
    if not dbs:
        return {}
    names = ",".join(f"'{d}'" for d in dbs)
    out = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-Atc",
                          f"SELECT datname, xact_commit FROM pg_stat_database "
                          f"WHERE datname IN ({names})"],
                         capture_output=True, text=True).stdout
    return {name: int(n) for name, n in (line.split("|") for line in out.split() if "|" in line)}


def run_one(binary, mode, backend, rate, seconds):
    work = tempfile.mkdtemp(prefix="bazaar-saga-bench-")
    env = {**os.environ, "BAZAAR_LOG__LEVEL": "warn", "BAZAAR_CONTROL_PLANE__PORT": "0",
           # Enough stock that orders measure the saga, not an empty shelf.
           "BAZAAR_INVENTORY__INITIAL_STOCK": "100000000"}
    dbs = []
    if backend == "postgres+nats":
        run = uuid.uuid4().hex[:8]
        for service in ["users", "products", "orders", "inventory", "payments",
                        "notifications", "recommendations"]:
            url = f"postgres://postgres@127.0.0.1:5432/bazaar_bench_{run}_{service}"
            env[f"BAZAAR_{service.upper()}__DATABASE_URL"] = url
            dbs.append(f"bazaar_bench_{run}_{service}")
        env["BAZAAR_EVENTS__BACKEND"] = "nats"
        env["BAZAAR_EVENTS__PREFIX"] = f"bench_{run}"
    up = subprocess.Popen([binary, "up", "--port", "0", "--data-dir", work, "--saga-mode", mode],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in up.stdout:
            if line.startswith("Press Ctrl-C"):
                break
        wait_stocked(binary, work)
        ps = json.loads(subprocess.run([binary, "ps", "--json", "--data-dir", work],
                                       capture_output=True, text=True).stdout)
        pids = {p["name"]: p["pid"] for p in ps}
        before = {name: usage(pid) for name, pid in pids.items()}
        servers_before = servers_usage() if backend != "embedded" else {}
        commits_before = pg_commits(dbs)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([binary, "load", "--rate", str(rate), "--duration", f"{seconds}s",
                              "--json", "--data-dir", work],
                             capture_output=True, text=True, check=True).stdout
        after = {name: usage(pid) for name, pid in pids.items()}
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        servers = servers_delta(servers_before, servers_usage()) if backend != "embedded" else {}
        report = json.loads(out)
        placed = max(report["orders_placed"], 1)
        if dbs:
            time.sleep(1.5)  # backends report their counts at most once a second
            committed = pg_commits(dbs)
            # By service (the database's name ends with it), then in all.
            by_service = {db.rsplit("_", 1)[1]: (n - commits_before.get(db, 0)) / placed
                          for db, n in committed.items()}
            report["pg_commits_by_service"] = by_service
            report["pg_commits_per_order"] = sum(by_service.values())
        report["cost"] = {
            name: {"cpu_ms": 1e3 * (after[name][0] - before[name][0]) / placed,
                   "switches": (after[name][1] - before[name][1]) / placed}
            for name in pids}
        # Outside the shop: the load generator (`bazaar load`, the only child that
        # ran in between) and the servers of the PostgreSQL + NATS backend.
        load_cpu = sum(getattr(children_after, f) - getattr(children_before, f)
                       for f in ("ru_utime", "ru_stime"))
        report["outside"] = {"load": {"cpu_ms": 1e3 * load_cpu / placed}}
        for name, (cpu, switches) in servers.items():
            report["outside"][name] = {"cpu_ms": 1e3 * cpu / placed}
        verify = subprocess.run([binary, "verify", "--json", "--data-dir", work],
                                capture_output=True, text=True)
        report["verify"] = json.loads(verify.stdout) if verify.stdout else {"violations": ["?"]}
        return report
    finally:
        up.terminate()
        up.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
        for db in dbs:
            subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-c",
                            f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"],
                           capture_output=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--backends", default="embedded,postgres+nats")
    parser.add_argument("--modes", default="orchestration,choreography")
    parser.add_argument("--binary", help="a bazaar binary to measure instead of this build's")
    args = parser.parse_args()
    binary = args.binary
    if not binary:
        if not os.environ.get("NO_BUILD"):
            subprocess.run(["cargo", "build", "--release", "--locked", "-p", "bazaar"], cwd=ROOT, check=True)
        binary = os.path.join(target_dir(), "release", "bazaar")
    rows = []
    for backend in args.backends.split(","):
        for mode in args.modes.split(","):
            rows.append((mode, backend, run_one(binary, mode, backend, args.rate, args.seconds)))
    print(f"### Saga: {args.rate:,} orders/s offered for {args.seconds} s through the gateway\n")
    print("| mode | backend | orders/s done | request p50 / p99 | saga p50 / p99 / p99.9 | "
          "reserve p50 / p99 | charge p50 / p99 | step retries per order | errors | outcomes | verify |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    # Attempts the orchestrator sent again (sampled orders' histories), by step.
    def retries(r):
        got = r.get("step_retries", {})
        return ", ".join(f"{n} {got[n]:.2}" for n in ("reserve", "charge") if n in got) or "0"

    for mode, backend, r in rows:
        q, s, st = r["requests"], r["saga"], r.get("steps", {})
        step = lambda n: (f"{st[n]['p50_ms']:.1f} / {st[n]['p99_ms']:.1f} ms" if n in st else "-")
        # The count, and by kind where there are any (a status, a timeout...).
        errors = sum(r["errors"].values())
        if errors:
            errors = f"{errors} (" + ", ".join(f"{k}: {n}" for k, n in sorted(r["errors"].items())) + ")"
        cancelled = sum(r["cancelled"].values())
        violations = len(r["verify"].get("violations", []))
        print(f"| {mode} | {backend} | {r['orders_per_second']:,.0f} | "
              f"{q['p50_ms']:.1f} / {q['p99_ms']:.1f} ms | "
              f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} / {s['p999_ms']:.1f} ms | "
              f"{step('reserve')} | {step('charge')} | {retries(r)} | {errors} | "
              f"{r['confirmed']} confirmed, {cancelled} cancelled, {r['pending']} pending | "
              f"{'clean' if violations == 0 else f'{violations} violations'} |")
    # Where the CPU goes: per process, per order placed (the shop's processes only;
    # work still queued when the load ends is not counted).
    print()
    print("| mode | backend | CPU per order (ms), heaviest first | total CPU / switches per order "
          "| outside the shop (ms per order) |")
    print("|---|---|---|---|---|")
    for mode, backend, r in rows:
        cost = sorted(r["cost"].items(), key=lambda kv: -kv[1]["cpu_ms"])
        parts = ", ".join(f"{n} {c['cpu_ms']:.2f}" for n, c in cost if c["cpu_ms"] >= 0.05)
        cpu = sum(c["cpu_ms"] for _, c in cost)
        switches = sum(c["switches"] for _, c in cost)
        outside = ", ".join(f"{n} {c['cpu_ms']:.2f}" for n, c in r["outside"].items())
        if "pg_commits_per_order" in r:
            heaviest = sorted(r["pg_commits_by_service"].items(), key=lambda kv: -kv[1])
            outside += (f"; {r['pg_commits_per_order']:.1f} PostgreSQL commits per order ("
                        + ", ".join(f"{n} {c:.1f}" for n, c in heaviest if c >= 0.05) + ")")
        print(f"| {mode} | {backend} | {parts} | {cpu:.2f} ms / {switches:.0f} | {outside} |")


if __name__ == "__main__":
    main()
