#!/usr/bin/env python3
"""Foundation benchmark: time from `bazaar up` to ready, idle RSS of every process,
and GET /products/{id} through the gateway versus straight to the service, with wrk,
all in one run on this machine.

Usage: python3 benches/foundation/run.py [--duration 10] [--connections 32]
Needs: a release build (the script runs `cargo build --release -p bazaar`) and wrk
(`apt-get install wrk`; the script installs it when missing and it can).
Prints a Markdown report to stdout.
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def ensure_wrk():
    if shutil.which("wrk"):
        return
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)


def up(binary, data_dir):
    """Starts the shop; returns (process, seconds until ready, urls)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [binary, "up", "--port", "0", "--data-dir", data_dir],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "BAZAAR_CONTROL_PLANE__PORT": "0"},
    )
    urls = {}
    for line in proc.stdout:
        words = line.split()
        if len(words) >= 2 and words[1].startswith("http://"):
            urls[words[0]] = words[1]
        if line.startswith("Press Ctrl-C"):
            break
    ready = time.monotonic() - started
    return proc, ready, urls


def stop(proc):
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wrk(url, duration, connections):
    out = subprocess.run(
        ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": pct(50), "p99_ms": pct(99), "non_2xx": int(errors.group(1)) if errors else 0}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()

    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "bazaar"], cwd=ROOT, check=True)
    binary = os.path.join(target_dir(), "release", "bazaar")
    ensure_wrk()
    data_dir = tempfile.mkdtemp(prefix="bazaar-bench-")
    try:
        # First start: new databases (migrations, catalog seed, key generation).
        proc, first_ready, _ = up(binary, data_dir)
        stop(proc)
        # Second start: existing data, the everyday case.
        proc, warm_ready, urls = up(binary, data_dir)
        time.sleep(2)
        ps = json.loads(subprocess.run(
            [binary, "ps", "--json", "--data-dir", data_dir], capture_output=True, text=True, check=True,
        ).stdout)
        rss = [(p["name"], p["pid"], rss_kib(p["pid"])) for p in ps]
        rss.append(("supervisor (bazaar up)", proc.pid, rss_kib(proc.pid)))
        with urllib.request.urlopen(f"{urls['gateway']}/products?limit=1") as r:
            product = json.load(r)["items"][0]["id"]
        path = f"/products/{product}"
        direct = wrk(urls["products"] + path, args.duration, args.connections)
        through = wrk(urls["gateway"] + path, args.duration, args.connections)
        stop(proc)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"### Foundation ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, release build)\n")
    print("| measure | value |\n|---|---|")
    print(f"| `bazaar up` to ready, new data dir | {first_ready:.2f} s |")
    print(f"| `bazaar up` to ready, existing data dir | {warm_ready:.2f} s |")
    print("\nIdle RSS, 2 s after ready:\n\n| process | RSS |\n|---|---|")
    for name, _, kib in rss:
        print(f"| {name} | {kib / 1024:.1f} MiB |")
    print(f"\n`GET /products/{{id}}`, wrk -t2 -c{args.connections} -d{args.duration}s, both in this run:\n")
    print("| path | req/s | p50 | p99 | non-2xx |\n|---|---|---|---|---|")
    for name, r in [("direct to products", direct), ("through the gateway", through)]:
        print(f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {r['non_2xx']} |")
    print(f"\nGateway / direct throughput: {through['rps'] / direct['rps']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
