#!/usr/bin/env python3
"""Broker benchmark: the embedded log (the control plane, release build), NATS
JetStream (a nats-server started here, file storage), a Kafka-protocol broker
(tansu, started here, in-memory storage) and RabbitMQ streams (the machine's
server, RABBITMQ_URL), one after the other on this machine: durable publish throughput of 1 KB events (64 concurrent publishers, each
waiting for its ack), and publish-to-consume latency at a fixed 10,000 msg/s (two
consumers in one group, acking each message).

Usage: python3 benches/broker/run.py [--seconds 10] [--rate 10000]
Needs: nats-server (Debian package nats-server, or NATS_SERVER_BIN) and tansu
(scripts/install-tansu.sh, or TANSU_BIN). Prints Markdown.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "foundation"))
from run import ROOT, rss_kib, target_dir  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def bench(url, mode, seconds, rate):
    out = subprocess.run(
        ["cargo", "bench", "-q", "--locked", "-p", "messaging", "--bench", "broker", "--",
         url, mode, str(seconds), str(rate)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(name, url, pid, seconds, rate):
    cpu0 = cpu_seconds(pid)
    tp = bench(url, "throughput", seconds, rate)
    cpu1 = cpu_seconds(pid)
    lat = bench(url, "latency", seconds, rate)
    return {
        "name": name, "tp": tp, "lat": lat, "rss_mib": rss_kib(pid) / 1024,
        "cpu_us_per_msg": (cpu1 - cpu0) / max(tp["messages"], 1) * 1e6,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=10_000)
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "bazaar"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "bench", "--locked", "-p", "messaging", "--bench", "broker", "--no-run"],
                   cwd=ROOT, check=True, capture_output=True)
    binary = os.path.join(target_dir(), "release", "bazaar")
    results = []
    work = tempfile.mkdtemp(prefix="bazaar-broker-bench-")
    procs = []
    try:
        port = free_port()
        env = {**os.environ, "BAZAAR_DATA_DIR": os.path.join(work, "shop"),
               "BAZAAR_CONTROL_PLANE__PORT": str(port), "BAZAAR_LOG__LEVEL": "warn"}
        cp = subprocess.Popen([binary, "run", "control-plane"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(cp)
        wait_port(port)
        results.append(measure("Bazaar embedded log", f"http://127.0.0.1:{port}", cp.pid,
                               args.seconds, args.rate))

        nats_bin = os.environ.get("NATS_SERVER_BIN") or shutil.which("nats-server") or "/usr/sbin/nats-server"
        nport = free_port()
        nats = subprocess.Popen([nats_bin, "-a", "127.0.0.1", "-p", str(nport), "-js", "-sd",
                                 os.path.join(work, "nats")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(nats)
        wait_port(nport)
        results.append(measure("NATS JetStream (file)", f"nats://127.0.0.1:{nport}", nats.pid,
                               args.seconds, args.rate))

        tansu_bin = os.environ.get("TANSU_BIN") or os.path.expanduser("~/.cache/bazaar/tansu/bin/tansu")
        kport = free_port()
        tansu = subprocess.Popen([tansu_bin, "broker", f"--listener-url=tcp://127.0.0.1:{kport}",
                                  f"--advertised-listener-url=tcp://127.0.0.1:{kport}",
                                  "--storage-engine=memory://tansu/"],
                                 env={**os.environ, "RUST_LOG": "error"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(tansu)
        wait_port(kport)
        results.append(measure("Kafka protocol: tansu (memory)", f"kafka://127.0.0.1:{kport}",
                               tansu.pid, args.seconds, args.rate))

        rabbit_pid = subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True,
                                    text=True).stdout.strip()
        if rabbit_pid:
            url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
            results.append(measure("RabbitMQ streams (machine's 3.10)", url, int(rabbit_pid),
                                   args.seconds, args.rate))
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)

    print(f"### Broker: durable publish of 1 KB events, and latency at {args.rate:,} msg/s\n")
    print("| broker | publish msg/s (64 publishers) | broker CPU µs/msg | latency p50 | p99 | p99.9 | received / sent | broker RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        lat = r["lat"]
        print(f"| {r['name']} | {r['tp']['per_second']:,.0f} | {r['cpu_us_per_msg']:.1f} | "
              f"{lat['p50_ms']:.2f} ms | {lat['p99_ms']:.2f} ms | {lat['p999_ms']:.2f} ms | "
              f"{lat['received']:,} / {lat['sent']:,} | {r['rss_mib']:.1f} MiB |")
    embedded = results[0]["tp"]["per_second"]
    for peer in results[1:]:
        print(f"\nEmbedded / {peer['name']} publish throughput: "
              f"{embedded / peer['tp']['per_second']:.2f}x")


if __name__ == "__main__":
    main()
