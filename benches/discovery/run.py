#!/usr/bin/env python3
"""Discovery benchmark: the embedded registry (`bazaar run control-plane`) holding
10,000 registered instances. Reports the health query latency (wrk, one connection
and eight), how long a change takes to reach a blocking-query watcher, and the
registry's RSS idle, then with the 10,000 instances.

Usage: python3 benches/discovery/run.py [--instances 10000] [--services 100] [--duration 5]
Needs: a release build (the script runs `cargo build --release -p bazaar`) and wrk
(installed with apt when missing). Prints a Markdown report to stdout.
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "foundation"))
from run import ROOT, ensure_wrk, rss_kib, target_dir, wrk  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(binary, port, data_dir):
    env = {**os.environ, "BAZAAR_CONTROL_PLANE__PORT": str(port), "BAZAAR_DATA_DIR": data_dir,
           "BAZAAR_LOG__LEVEL": "warn"}
    proc = subprocess.Popen([binary, "run", "control-plane"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the registry did not start")


def register(conn, service, i):
    body = json.dumps({
        "Name": service, "ID": f"{service}-{i}", "Address": f"10.0.{i // 250}.{i % 250}",
        "Port": 8000 + i % 1000, "Tags": ["bench"], "Meta": {"zone": f"z{i % 3}"},
        "Check": {"TTL": "1h", "Status": "passing"},
    })
    conn.request("PUT", "/v1/agent/service/register", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200, r.status


def watcher_latency(port, rounds):
    """Milliseconds from a registration being sent to a blocked watcher answering."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    samples = []
    for n in range(rounds):
        conn.request("GET", "/v1/health/service/watched")
        r = conn.getresponse()
        r.read()
        index = r.getheader("X-Consul-Index")
        done = {}

        def watch():
            w = http.client.HTTPConnection("127.0.0.1", port)
            w.request("GET", f"/v1/health/service/watched?index={index}&wait=30s")
            w.getresponse().read()
            done["at"] = time.perf_counter()

        t = threading.Thread(target=watch)
        t.start()
        time.sleep(0.05)  # the watcher is parked on the index
        sent = time.perf_counter()
        register(conn, "watched", n)
        t.join()
        samples.append((done["at"] - sent) * 1000)
    return samples


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()

    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "bazaar"], cwd=ROOT, check=True)
    binary = os.path.join(target_dir(), "release", "bazaar")
    ensure_wrk()
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="bazaar-discovery-bench-")
    proc = start_registry(binary, port, data_dir)
    try:
        time.sleep(1)
        idle = rss_kib(proc.pid)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        started = time.perf_counter()
        per_service = args.instances // args.services
        for i in range(args.instances):
            register(conn, f"svc-{i // per_service}", i)
        load_s = time.perf_counter() - started
        time.sleep(2)
        full = rss_kib(proc.pid)
        base = f"http://127.0.0.1:{port}"
        one = f"{base}/v1/health/service/svc-7?passing"
        sequential = wrk(one, args.duration, 1)
        parallel = wrk(one, args.duration, 8)
        catalog = wrk(f"{base}/v1/catalog/services", args.duration, 1)
        watch = sorted(watcher_latency(port, 50))
        after = rss_kib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    p = lambda xs, q: xs[min(len(xs) - 1, int(len(xs) * q))]  # noqa: E731
    print(f"### Discovery: the embedded registry with {args.instances:,} instances\n")
    print(f"{args.instances:,} instances in {args.services} services ({per_service} each, TTL checks), "
          f"registered one by one over HTTP in {load_s:.1f} s ({args.instances / load_s:,.0f}/s).\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| `GET /v1/health/service/svc-7?passing` ({per_service} instances), 1 connection | "
          f"p50 {sequential['p50_ms']:.3f} ms, p99 {sequential['p99_ms']:.3f} ms, {sequential['rps']:,.0f} req/s |")
    print(f"| same, 8 connections | p50 {parallel['p50_ms']:.3f} ms, p99 {parallel['p99_ms']:.3f} ms, "
          f"{parallel['rps']:,.0f} req/s |")
    print(f"| `GET /v1/catalog/services` ({args.services + 1} services), 1 connection | "
          f"p50 {catalog['p50_ms']:.3f} ms, p99 {catalog['p99_ms']:.3f} ms |")
    print(f"| registration -> blocking-query watcher (50 rounds) | p50 {statistics.median(watch):.2f} ms, "
          f"p99 {p(watch, 0.99):.2f} ms, max {watch[-1]:.2f} ms |")
    print(f"| registry RSS idle (empty) | {idle / 1024:.1f} MiB |")
    print(f"| registry RSS with {args.instances:,} instances | {full / 1024:.1f} MiB "
          f"(after the load runs: {after / 1024:.1f} MiB) |")


if __name__ == "__main__":
    main()
