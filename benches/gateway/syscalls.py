#!/usr/bin/env python3
"""System calls and packets per proxied request: nginx and Bazaar plain and with JWT +
rate limit + access log, under the load of benches/gateway/run.py (wrk -t2 -c64).

Counts come from the kernel's tracepoints through `perf stat`: the proxy's own system
calls by kind (its processes only), then, in a second run, packets sent and
scheduler events machine-wide (wrk and the upstream included, the same for every
row). Divided by the requests wrk completed in the same window. Unlike CPU time,
the counts hardly move on a busy machine, so they say whether a proxy's kernel time
comes from how many calls and packets it makes or from what each costs.

Usage: python3 benches/gateway/syscalls.py [--seconds 5] [--binary PATH] [--no-build]
Needs: perf (Debian's linux-perf), wrk, nginx (installed when missing), root for
the tracepoints. Prints Markdown.
"""
import argparse
import importlib.util
import os
import re
import subprocess
import tempfile

# run.py's helpers (it imports benches/foundation/run.py as `run` itself).
_spec = importlib.util.spec_from_file_location(
    "gateway_run", os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py"))
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

CALLS = ["read", "write", "writev", "recvfrom", "sendto", "epoll_wait", "epoll_ctl", "futex"]
MACHINE = ["net:net_dev_xmit", "sched:sched_wakeup", "sched:sched_switch", "irq:softirq_entry"]


def counted(events, target, url, env, seconds):
    """Runs wrk for `seconds` while perf counts `events` on `target` (pids or -a)."""
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", ",".join(events), *target,
                             "--", "sleep", str(seconds)],
                            stderr=subprocess.PIPE, text=True)
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", "-s", env["BENCH_SCRIPT"], url],
                         capture_output=True, text=True, env=env).stdout
    err = perf.communicate()[1]
    m = re.search(r"BENCH (\d+) (\d+)", out)
    if not m:
        raise SystemExit(f"wrk printed no result:\n{out}")
    requests = int(m.group(1))
    counts = {}
    for line in err.strip().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            counts[parts[2]] = int(parts[0]) / requests
    return requests / int(m.group(2)) * 1e6, counts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--binary", default="", help="the bazaar binary (default: this build)")
    parser.add_argument("--no-build", action="store_true")
    args = parser.parse_args()
    run.ensure_tools()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "bazaar", "-p", "bench-upstream"],
                       cwd=run.ROOT, check=True)
    release = os.path.join(run.target_dir(), "release")
    binary = os.path.abspath(args.binary) if args.binary else os.path.join(release, "bazaar")
    work = tempfile.mkdtemp(prefix="bazaar-gw-syscalls-")
    up = subprocess.Popen([os.path.join(release, "bench-upstream"), "0"], stdout=subprocess.PIPE, text=True)
    upstream = int(up.stdout.readline().rsplit(":", 1)[1])
    script = os.path.join(work, "bench.lua")
    with open(script, "w") as f:
        f.write(run.WRK_SCRIPT)
    jwt = run.token()
    rows = [
        ("nginx", lambda: run.nginx(work, upstream), "/products/1", ""),
        ("bazaar", lambda: run.bazaar(binary, work, upstream, False), "/products/1", ""),
        ("bazaar+jwt+ratelimit+log", lambda: run.bazaar(binary, work, upstream, True),
         "/orders/1", jwt),
    ]
    calls = ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{c}" for c in CALLS]
    results = []
    try:
        for name, starter, path, auth in rows:
            proc, port = starter()
            try:
                url = f"http://127.0.0.1:{port}{path}"
                env = {**os.environ, "BENCH_AUTH": auth, "BENCH_SCRIPT": script}
                subprocess.run(["wrk", "-t2", "-c64", "-d2s", "-s", script, url],
                               capture_output=True, env=env)
                pids = ",".join(map(str, run.tree(proc.pid)))
                rps, own = counted(calls, ["-p", pids], url, env, args.seconds)
                _, machine = counted(MACHINE, ["-a"], url, env, args.seconds)
                results.append((name, rps, own, machine))
            finally:
                run.stop(proc)
    finally:
        up.terminate()

    print(f"### Gateway: system calls and packets per request (wrk -t2 -c64 -d{args.seconds}s)\n")
    print("| target | requests/s | system calls | " + " | ".join(CALLS)
          + " | packets sent | wake-ups | context switches | softirqs |")
    print("|---|---|---|" + "---|" * len(CALLS) + "---|---|---|---|")
    for name, rps, own, machine in results:
        cells = [f"{own.get('raw_syscalls:sys_enter', 0):.2f}"]
        cells += [f"{own.get(f'syscalls:sys_enter_{c}', 0):.2f}" for c in CALLS]
        cells += [f"{machine.get(e, 0):.2f}" for e in MACHINE]
        print(f"| {name} | {rps:,.0f} | " + " | ".join(cells) + " |")
    print("\nSystem calls are the proxy's own; packets, wake-ups, context switches and "
          "softirqs are machine-wide (wrk and the upstream included).")


if __name__ == "__main__":
    main()
