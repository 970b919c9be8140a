#!/usr/bin/env python3
"""Gateway benchmark: one upstream (benches/gateway/upstream, hyper answering 1 KB of
JSON), wrk with fixed connections, and side by side in one run: direct to the upstream;
nginx and HAProxy as plain reverse proxies (configs below); the guide's Express gateway
(../shared/peers/express-gateway) plain and with JWT; hyper-floor (the least a
hyper-based proxy built like the gateway does: no routing, auth, limits or logs);
Bazaar's gateway as a plain proxy and with JWT verification + rate limiting + access
log. For each: requests/s,
p50/p99/p99.9 latency, CPU time per request (the proxy's processes only) and peak RSS.

Usage: python3 benches/gateway/run.py [--duration 10] [--connections 64] [--only a,b]
       [--rounds N] [--compare OTHER_BAZAAR_BINARY] [--no-build]
Needs: apt-get (nginx, haproxy, wrk are installed when missing), node and npm for the
Express peer. Prints Markdown.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "foundation"))
from run import ROOT, target_dir  # noqa: E402

SECRET = "bench-secret-bench-secret-bench-secret!"
PEER = os.path.abspath(os.path.join(ROOT, "..", "shared", "peers", "express-gateway"))
CACHE = os.path.expanduser("~/.cache/bazaar")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def ensure_tools():
    # nginx and haproxy install into /usr/sbin, which a user's PATH may lack.
    os.environ["PATH"] = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [t for t in ["nginx", "haproxy", "wrk"] if not shutil.which(t)
               and not os.path.exists(f"/usr/sbin/{t}")]
    if missing:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)


def hs256(claims):
    enc = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = enc(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = enc(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{enc(sig)}"


def token():
    now = int(time.time())
    return hs256({"sub": "bench-user", "iss": "bench", "aud": "bench", "iat": now, "exp": now + 3600})


def tree(pid):
    """pid and its descendants."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds(pids):
    """(user, kernel) CPU seconds of pids: the split says whether a gap is the
    proxy's own code or the syscalls and network stack it drives."""
    user = kernel = 0
    for p in pids:
        try:
            fields = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            kernel += int(fields[12])
        except OSError:
            pass
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, kernel / tick


def rss_mib(pids):
    total = 0
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


WRK_SCRIPT = """
local auth = os.getenv("BENCH_AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = "Bearer " .. auth end
done = function(summary, latency, requests)
  io.write(string.format("BENCH %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def measure(name, url, pid, args, auth=None, work=None):
    script = os.path.join(work, "bench.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    env = {**os.environ, "BENCH_AUTH": auth or ""}
    # Warm up (connections, caches, JITs), then measure.
    subprocess.run(["wrk", "-t2", f"-c{args.connections}", "-d2s", "-s", script, url],
                   capture_output=True, env=env)
    pids = tree(pid) if pid else []
    cpu0 = cpu_seconds(pids)
    wrk = subprocess.Popen(["wrk", "-t2", f"-c{args.connections}", f"-d{args.duration}s",
                            "-s", script, url], stdout=subprocess.PIPE, text=True, env=env)
    peak = 0.0
    while wrk.poll() is None:
        peak = max(peak, rss_mib(pids))
        time.sleep(0.2)
    out = wrk.stdout.read()
    cpu1 = cpu_seconds(pids)
    user, kernel = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    m = re.search(r"BENCH (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    if not m:
        raise SystemExit(f"{name}: wrk printed no result:\n{out}")
    requests, duration_us, p50, p99, p999, errors = map(int, m.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "name": name, "rps": requests / (duration_us / 1e6), "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000, "p999_ms": p999 / 1000,
        "errors": errors + (int(non2xx.group(1)) if non2xx else 0),
        "cpu_us": ((user + kernel) / requests * 1e6) if pids and requests else None,
        "user_us": (user / requests * 1e6) if pids and requests else None,
        "kernel_us": (kernel / requests * 1e6) if pids and requests else None,
        "rss_mib": peak if pids else None,
    }


def start(cmd, env=None, cwd=None):
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def nginx_http(upstream, listen):
    """nginx's `http` block: a plain reverse proxy with upstream keep-alive."""
    return f"""
http {{
  access_log off;
  upstream app {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen {listen};
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $remote_addr;
    }}
  }}
}}
"""


def nginx(work, upstream):
    port = free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes auto;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
""" + nginx_http(upstream, f"127.0.0.1:{port} reuseport"))
    proc = start(["nginx", "-c", conf, "-p", work])
    wait_port(port)
    return proc, port


def haproxy(work, upstream):
    port = free_port()
    conf = os.path.join(work, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(f"""
global
  nbthread 2
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
frontend web
  bind 127.0.0.1:{port}
  default_backend app
backend app
  http-reuse always
  server s1 127.0.0.1:{upstream}
""")
    proc = start(["haproxy", "-f", conf, "-db"])
    wait_port(port)
    return proc, port


def express(upstream):
    peer = os.path.join(CACHE, "express-gateway")
    if not os.path.exists(os.path.join(peer, "node_modules")):
        shutil.copytree(PEER, peer, dirs_exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=peer, check=True)
    port = free_port()
    url = f"http://127.0.0.1:{upstream}"
    proc = start(["node", "gateway.mjs"], cwd=peer, env={
        "JWT_SECRET": SECRET, "RATE_MAX": "1000000000", "USERS_URL": url, "ORDERS_URL": url,
        "PRODUCTS_URL": url, "PORT": str(port)})
    wait_port(port)
    return proc, port


def hyper_floor(binary, upstream):
    """The least a hyper-based proxy does (benches/gateway/upstream/src/bin/hyper-floor.rs)."""
    proc = subprocess.Popen([binary, str(upstream)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    port = int(proc.stdout.readline().rsplit(":", 1)[1])
    wait_port(port)
    return proc, port


def bazaar(binary, work, upstream, full, unbuffered=False, log=True):
    port = free_port()
    config = os.path.join(work, f"gateway-{'full' if full else 'plain'}.toml")
    with open(config, "w") as f:
        f.write("""
[[routes]]
prefix = "/products"
service = "upstream"

[[routes]]
prefix = "/orders"
service = "upstream"
auth = "required"
rate_limit = "per-user"

[rate_limits.per-user]
rate = 1000000000
key = "user"
""")
    settings = os.path.join(work, f"bazaar-{'full' if full else 'plain'}.toml")
    with open(settings, "w") as f:
        f.write(f"""
[gateway]
config_file = "{config}"

[gateway.auth]
issuer = "bench"
audience = "bench"
jwks_service = ""

[[gateway.auth.keys]]
alg = "HS256"
secret = "{SECRET}"
""")
    env = {
        "BAZAAR_GATEWAY__PORT": str(port), "BAZAAR_GATEWAY__ADMIN_PORT": "0",
        "BAZAAR_DATA_DIR": os.path.join(work, "data"),
        "BAZAAR_DISCOVERY__SERVICES__UPSTREAM": f"http://127.0.0.1:{upstream}",
        # The plain proxy logs warnings only; the full one writes every access line.
        "BAZAAR_LOG__LEVEL": "info" if full and log else "warn",
    }
    if unbuffered:
        # One write per access line, instead of the default: a thread's lines
        # written when it runs out of work, at most one block a millisecond.
        env["BAZAAR_LOG__BUFFER"] = "false"
    proc = subprocess.Popen([binary, "run", "gateway", "--config", settings], env={**os.environ, **env},
                            stdout=open(os.path.join(work, f"gateway-{full}.log"), "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_port(port)
    return proc, port


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--only", default="")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times, interleaved, and report each row's "
                             "best round (highest requests/s): on a shared machine, interference "
                             "only ever slows a run down")
    parser.add_argument("--no-build", action="store_true", help="use the release build as it is")
    parser.add_argument("--compare", default="",
                        help="another bazaar binary whose rows run beside this build's (A/B)")
    args = parser.parse_args()
    ensure_tools()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "bazaar", "-p", "bench-upstream"],
                       cwd=ROOT, check=True)
    release = os.path.join(target_dir(), "release")
    work = tempfile.mkdtemp(prefix="bazaar-gw-bench-")
    up = subprocess.Popen([os.path.join(release, "bench-upstream"), "0"], stdout=subprocess.PIPE, text=True)
    upstream = int(up.stdout.readline().rsplit(":", 1)[1])
    jwt = token()
    rows = []
    only = set(filter(None, args.only.split(",")))

    def run(name, starter, path, auth=None):
        # A row is named in --only as it is printed, without the "(binary)" of --compare;
        # the unbuffered-log row also as `bazaar+jwt+ratelimit+log+unbuffered`.
        plain = name.split(" (")[0]
        if only and not {plain, plain.replace(", unbuffered log", "+unbuffered")} & only:
            return
        proc, port = starter() if starter else (None, upstream)
        try:
            rows.append(measure(name, f"http://127.0.0.1:{port}{path}", proc.pid if proc else None,
                                args, auth, work))
        finally:
            if proc:
                stop(proc)

    def one_round():
        run("direct", None, "/products/1")
        run("nginx", lambda: nginx(work, upstream), "/products/1")
        run("haproxy", lambda: haproxy(work, upstream), "/products/1")
        run("express", lambda: express(upstream), "/products/1")
        run("express+jwt", lambda: express(upstream), "/orders/1", auth=jwt)
        run("hyper-floor", lambda: hyper_floor(os.path.join(release, "hyper-floor"), upstream),
            "/products/1")
        binaries = [("", os.path.join(release, "bazaar"))]
        if args.compare:
            binaries.append((f" ({os.path.basename(args.compare)})", os.path.abspath(args.compare)))
        # Interleaved, so an A/B pair is measured minutes apart at most.
        for suffix, binary in binaries:
            run("bazaar" + suffix, lambda: bazaar(binary, work, upstream, False), "/products/1")
        for suffix, binary in binaries:
            run("bazaar+jwt+ratelimit+log" + suffix, lambda: bazaar(binary, work, upstream, True),
                "/orders/1", auth=jwt)
        for suffix, binary in binaries:
            run("bazaar+jwt+ratelimit" + suffix,
                lambda: bazaar(binary, work, upstream, True, log=False), "/orders/1", auth=jwt)
        for suffix, binary in binaries:
            run("bazaar+jwt+ratelimit+log, unbuffered log" + suffix,
                lambda: bazaar(binary, work, upstream, True, unbuffered=True), "/orders/1", auth=jwt)

    try:
        for _ in range(args.rounds):
            one_round()
    finally:
        up.terminate()
        shutil.rmtree(work, ignore_errors=True)

    print(f"### Gateway: wrk -t2 -c{args.connections} -d{args.duration}s, 1 KB JSON upstream\n")
    if args.rounds > 1:
        print(f"Best of {args.rounds} interleaved rounds per row.\n")
    print("| target | requests/s | p50 | p99 | p99.9 | CPU per request (user + kernel) | peak RSS | errors |")
    print("|---|---|---|---|---|---|---|---|")
    best, rounds = {}, {}
    for r in rows:
        rounds.setdefault(r["name"], []).append(r)
        if r["name"] not in best or r["rps"] > best[r["name"]]["rps"]:
            best[r["name"]] = r
    rows = list(best.values())
    for r in rows:
        cpu = "-"
        if r["cpu_us"] is not None:
            cpu = f"{r['cpu_us']:.1f} µs ({r['user_us']:.1f} + {r['kernel_us']:.1f})"
        rss = f"{r['rss_mib']:.1f} MiB" if r["rss_mib"] is not None else "-"
        print(f"| {r['name']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | "
              f"{r['p999_ms']:.2f} ms | {cpu} | {rss} | {r['errors']} |")
    # On a noisy machine the best round by requests/s says little about a small
    # difference; the median CPU per request across rounds says more.
    if args.rounds > 1:
        print("\n| target | CPU per request, median of rounds | requests/s, median of rounds |")
        print("|---|---|---|")
        for r in rows:
            runs = rounds[r["name"]]
            median = lambda key: sorted(x[key] for x in runs)[len(runs) // 2]
            cpu = f"{median('cpu_us'):.1f} µs" if r["cpu_us"] is not None else "-"
            print(f"| {r['name']} | {cpu} | {median('rps'):,.0f} |")
    by = {r["name"]: r for r in rows}
    if "nginx" in by and "bazaar+jwt+ratelimit+log" in by:
        full, ng = by["bazaar+jwt+ratelimit+log"], by["nginx"]
        print(f"\nBazaar (JWT + rate limit + log) / nginx plain: {full['rps'] / ng['rps']:.2f}x "
              f"throughput, p99 {full['p99_ms'] - ng['p99_ms']:+.2f} ms")
    if "express+jwt" in by and "bazaar+jwt+ratelimit+log" in by:
        print(f"Bazaar (JWT + rate limit + log) / Express with JWT: "
              f"{by['bazaar+jwt+ratelimit+log']['rps'] / by['express+jwt']['rps']:.1f}x")


if __name__ == "__main__":
    main()
