#!/usr/bin/env python3
"""Instructions per proxied request, counted by valgrind's callgrind: nginx,
hyper-floor, and Bazaar plain and with JWT + rate limit + access log, each driven by
`wrk -t1 -c8` through the same upstream as benches/gateway/run.py.

Unlike requests/s or CPU time, the count does not move when the host is busy: the
same binary and load give the same figure within a few percent, so a change of 5%
shows, where a throughput run on this shared 2-core machine swings by 30%.
It counts user-space instructions only (the kernel's share is in run.py's
CPU columns).

Usage: python3 benches/gateway/instructions.py [--seconds 10] [--only a,b]
       [--binary PATH] [--no-build]
Needs: valgrind, wrk, nginx (installed when missing). Prints Markdown. With CG_WORK=DIR
the callgrind outputs (cg.<row>.1) are kept in DIR, for callgrind_annotate.
"""
import argparse
import importlib.util
import os
import re
import subprocess
import tempfile
import time

# run.py's helpers (it imports benches/foundation/run.py as `run` itself).
_spec = importlib.util.spec_from_file_location(
    "gateway_run", os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"))
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)


def wrapper(work, name, binary):
    """An executable that runs `binary` under callgrind, writing to work/cg.<name>."""
    path = os.path.join(work, f"valgrind-{name}")
    out = os.path.join(work, f"cg.{name}")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file={out} '
                f'{binary} "$@"\n')
    os.chmod(path, 0o755)
    return path, out


def nginx(work, upstream):
    """nginx as run.py configures it, but one process (callgrind follows one)."""
    port = run.free_port()
    wrapped, out = wrapper(work, "nginx", "/usr/sbin/nginx")
    conf = os.path.join(work, "nginx-cg.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
master_process off;
daemon off;
pid {work}/nginx-cg.pid;
error_log {work}/nginx-cg-error.log warn;
events {{ worker_connections 4096; }}
""" + run.nginx_http(upstream, f"127.0.0.1:{port}"))
    proc = run.start([wrapped, "-c", conf, "-p", work])
    run.wait_port(port, timeout=60)
    return proc, port, out


def count(name, proc, port, out, path, auth, seconds):
    """Instructions per request between a zeroing and a dump of the counters."""
    url = f"http://127.0.0.1:{port}{path}"
    headers = ["-H", f"Authorization: Bearer {auth}"] if auth else []
    subprocess.run(["wrk", "-t1", "-c8", "-d5s", *headers, url], capture_output=True)
    subprocess.run(["callgrind_control", "-z", str(proc.pid)], capture_output=True, check=True)
    done = subprocess.run(["wrk", "-t1", "-c8", f"-d{seconds}s", *headers, url],
                          capture_output=True, text=True)
    subprocess.run(["callgrind_control", "-d", str(proc.pid)], capture_output=True, check=True)
    requests = re.search(r"(\d+) requests in", done.stdout)
    if not requests or "Non-2xx" in done.stdout:
        raise SystemExit(f"{name}: wrk failed or got errors:\n{done.stdout}")
    dump = out + ".1"
    for _ in range(100):
        if os.path.exists(dump):
            break
        time.sleep(0.1)
    total = None
    with open(dump) as f:
        for line in f:
            m = re.match(r"(?:summary|totals): (\d+)", line)
            if m:
                total = int(m.group(1))
    if total is None:
        raise SystemExit(f"{name}: no total in {dump}")
    n = int(requests.group(1))
    return {"name": name, "requests": n, "per_request": total / n}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--only", default="")
    parser.add_argument("--binary", default="", help="the bazaar binary (default: this build)")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    run.ensure_tools()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "bazaar", "-p",
                        "bench-upstream"], cwd=run.ROOT, check=True)
    release = os.path.join(run.target_dir(), "release")
    bazaar = os.path.abspath(args.binary) if args.binary else os.path.join(release, "bazaar")
    work = os.environ.get("CG_WORK") or tempfile.mkdtemp(prefix="bazaar-gw-instructions-")
    up = subprocess.Popen([os.path.join(release, "bench-upstream"), "0"],
                          stdout=subprocess.PIPE, text=True)
    upstream = int(up.stdout.readline().rsplit(":", 1)[1])
    only = set(filter(None, args.only.split(",")))
    jwt = run.token()
    rows = []

    def measure(name, starter, path, auth=None):
        if only and name not in only:
            return
        proc, port, out = starter()
        try:
            rows.append(count(name, proc, port, out, path, auth, args.seconds))
        finally:
            run.stop(proc)

    def floor():
        wrapped, out = wrapper(work, "hyper-floor", os.path.join(release, "hyper-floor"))
        proc, port = run.hyper_floor(wrapped, upstream)
        return proc, port, out

    def gateway(name, full):
        def start():
            wrapped, out = wrapper(work, name, bazaar)
            proc, port = run.bazaar(wrapped, work, upstream, full)
            return proc, port, out
        return start

    try:
        measure("nginx", lambda: nginx(work, upstream), "/products/1")
        measure("hyper-floor", floor, "/products/1")
        measure("bazaar", gateway("bazaar", False), "/products/1")
        measure("bazaar+jwt+ratelimit+log", gateway("bazaar-full", True), "/orders/1", auth=jwt)
    finally:
        up.terminate()
    print(f"### Gateway: instructions per request (callgrind, wrk -t1 -c8 -d{args.seconds}s)\n")
    print("| target | requests counted | instructions per request | / nginx |")
    print("|---|---|---|---|")
    nginx_count = next((r["per_request"] for r in rows if r["name"] == "nginx"), None)
    for r in rows:
        ratio = f"{r['per_request'] / nginx_count:.2f}x" if nginx_count else "-"
        print(f"| {r['name']} | {r['requests']:,} | {r['per_request']:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
