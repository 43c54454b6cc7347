#!/usr/bin/env python3
"""`make bench`: the dataplane against a direct connection and nginx, in one run.

Starts, on loopback only: the fake backend (switchyard-bench-backend), the
controller in local mode, one dataplane pinned to one core, and nginx (Debian)
as a plain reverse proxy on the same core. For each case it drives the same
load at the backend directly, through the dataplane and through nginx with
oha, and prints a Markdown table (also written to bench/results/).

Closed-loop runs (fixed connection count, as fast as possible) give the
saturation rate; open-loop runs (oha -q RATE --latency-correction) at half of
the dataplane's saturation rate give latency percentiles, the dataplane's CPU
time (from /proc/PID/stat) and its peak RSS (VmHWM). Everything started here is
stopped here, also on failure or Ctrl-C.
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKEND_PORT = 18000
CONTROLLER_XDS = "127.0.0.1:18010"
CONTROLLER_ADMIN = "127.0.0.1:18011"
DATAPLANE_PORT = 18080
DATAPLANE_METRICS_PORT = 18090
DATAPLANE_DEBUG_PORT = 18091
NGINX_PORT = 18070
REDIS_PORT = 18079
# Rate-limited routes: budgets far above what the bench sends, so every
# request is admitted and the rows show what checking and settling cost.
RATE_LIMIT_TOKENS_PER_SECOND = 4_000_000_000
# Load generator, backend and controller share core 0; the dataplane and nginx
# get core 1 each in turn ("one dataplane core"), so they never compete.
LOAD_CORE = "0"
PROXY_CORE = "1"
# Enough parallel connections to saturate one proxy core, few enough that the
# load generator on the other core keeps up.
SATURATION_CONNECTIONS = 32
OPEN_LOOP_CONNECTIONS = 32
STREAM_CHUNKS = 64
# The paced streaming case: chunks this far apart (tokio's timer rounds to
# whole ms), as an engine emits tokens, so neither proxy can coalesce chunks
# that arrive together into one write. The burst case (all chunks at once)
# lets both coalesce as much as they do.
PACED_CHUNK_INTERVAL_US = 1000
PACED_HEADER = "x-bench-chunk-interval-us"
TTFB_SAMPLES = 200
# The controller scrapes every fake pod; slow scrapes keep that traffic out of the numbers.
SCRAPE_INTERVAL = "30s"
CLK_TCK = os.sysconf("SC_CLK_TCK")

started = []  # Popen objects, stopped in reverse order


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def loopback_pod_ip(index):
    # Same layout as switchyard-bench-backend --loopback-pods.
    return f"127.0.{10 + index // 250}.{1 + index % 250}"


def start(name, argv, logdir, core=None):
    if core is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", core] + argv
    out = open(logdir / f"{name}.log", "wb")
    process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    process.bench_name = name
    started.append(process)
    return process


def stop(process):
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process in started:
        started.remove(process)


def stop_all():
    for process in reversed(list(started)):
        stop(process)


def http_get(url, timeout=2):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def http_post(url, body, timeout=10):
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read()


def redis_ping():
    with socket.create_connection(("127.0.0.1", REDIS_PORT), timeout=2) as connection:
        connection.sendall(b"PING\r\n")
        return connection.recv(64).startswith(b"+PONG")


def wait_for(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as error:  # not up yet
            last = error
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what} (last error: {last})")


def real_pid(process):
    """The pid of the program itself (taskset execs it, so it is the same pid)."""
    return process.pid


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def vm_hwm_mib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
    return total / 1024


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def ensure_tools(install):
    if shutil.which("oha") is None and Path.home().joinpath(".cargo/bin/oha").exists():
        os.environ["PATH"] += os.pathsep + str(Path.home() / ".cargo/bin")
    if shutil.which("oha") is None:
        if not install:
            raise RuntimeError("oha not found; run `cargo install oha --locked`")
        log("installing oha (cargo install oha --locked), once")
        subprocess.run(["cargo", "install", "oha", "--locked"], check=True)
        os.environ["PATH"] += os.pathsep + str(Path.home() / ".cargo/bin")
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists() and install:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            log("installing nginx-light from Debian, without starting its service")
            policy = Path("/usr/sbin/policy-rc.d")
            had_policy = policy.exists()
            if not had_policy:
                policy.write_text("#!/bin/sh\nexit 101\n")
                policy.chmod(0o755)
            try:
                subprocess.run(["apt-get", "update", "-qq"], check=False)
                subprocess.run(
                    ["apt-get", "install", "-y", "-qq", "nginx-light"],
                    check=False,
                    env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                )
            finally:
                if not had_policy:
                    policy.unlink()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        log("nginx not available: the nginx column is left out")
    return nginx


def rate_limited_route(name, redis):
    global_limit = f"""
    global:
      redis:
        address: 127.0.0.1:{REDIS_PORT}""" if redis else ""
    return f"""apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata:
  name: {name}
  namespace: default
spec:
  modelName: {name}
  rules:
  - name: default
    targetModels:
    - modelServerName: bench
  rateLimit:
    inputTokensPerUnit: {RATE_LIMIT_TOKENS_PER_SECOND}
    outputTokensPerUnit: {RATE_LIMIT_TOKENS_PER_SECOND}
    unit: second{global_limit}
"""


def write_config(config_dir, pods, redis):
    config_dir.mkdir(parents=True, exist_ok=True)
    docs = [
        f"""apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata:
  name: bench
  namespace: default
spec:
  workloadSelector:
    matchLabels:
      app: bench
  workloadPort:
    port: {BACKEND_PORT}
  inferenceEngine: vLLM
  trafficPolicy:
    timeout: 30s
""",
        """apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata:
  name: bench
  namespace: default
spec:
  modelName: bench-model
  rules:
  - name: default
    targetModels:
    - modelServerName: bench
""",
        rate_limited_route("bench-limited-local", redis=False),
    ]
    if redis:
        docs.append(rate_limited_route("bench-limited-redis", redis=True))
    for i in range(pods):
        docs.append(
            f"""apiVersion: v1
kind: Pod
metadata:
  name: bench-{i}
  namespace: default
  labels:
    app: bench
status:
  phase: Running
  podIP: {loopback_pod_ip(i)}
  conditions:
  - type: Ready
    status: "True"
"""
        )
    (config_dir / "bench.yaml").write_text("---\n".join(docs))


def write_nginx_config(workdir):
    conf = workdir / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""{user}
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/nginx-body;
  proxy_temp_path {workdir}/nginx-proxy;
  fastcgi_temp_path {workdir}/nginx-fastcgi;
  uwsgi_temp_path {workdir}/nginx-uwsgi;
  scgi_temp_path {workdir}/nginx-scgi;
  client_max_body_size 32m;
  client_body_buffer_size 1m;
  upstream backend {{
    server {loopback_pod_ip(0)}:{BACKEND_PORT};
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{NGINX_PORT};
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering on;
    }}
  }}
}}
"""
    )
    return conf


def oha(url, body_file, seconds, connections, rate=None, headers=()):
    argv = [
        "taskset", "-c", LOAD_CORE, "oha", "--no-tui", "--output-format", "json",
        "-z", f"{seconds}s", "-c", str(connections), "-m", "POST",
        "-H", "content-type: application/json", "-D", str(body_file),
    ]
    for header in headers:
        argv += ["-H", header]
    if rate is not None:
        argv += ["-q", str(rate), "--latency-correction"]
    argv.append(url)
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"oha failed: {result.stderr.strip()[:500]}")
    report = json.loads(result.stdout)
    codes = report.get("statusCodeDistribution", {})
    ok = sum(count for code, count in codes.items() if code == "200")
    failed = sum(count for code, count in codes.items() if code != "200")
    # Requests still in flight when -z ends are reported as "aborted due to deadline": not failures.
    errors = sum(count for kind, count in report.get("errorDistribution", {}).items() if "deadline" not in kind)
    percentiles = report.get("latencyPercentiles", {})
    return {
        "rps": report["summary"]["requestsPerSec"],
        "ok": ok,
        "failed": failed + errors,
        "p50_ms": (percentiles.get("p50") or 0) * 1e3,
        "p99_ms": (percentiles.get("p99") or 0) * 1e3,
    }


def ttfb_ms(url, body_file, samples):
    values = []
    for _ in range(samples):
        result = subprocess.run(
            ["taskset", "-c", LOAD_CORE, "curl", "-s", "-o", "/dev/null", "-w", "%{time_starttransfer}",
             "-H", "content-type: application/json", "--data-binary", f"@{body_file}", url],
            capture_output=True, text=True, check=False,
        )
        if result.returncode == 0:
            values.append(float(result.stdout) * 1e3)
    values.sort()
    if not values:
        return None
    return statistics.median(values)


def make_body(path, prompt_bytes, stream, model="bench-model"):
    filler = "lorem ipsum dolor sit amet "
    prompt = (filler * (prompt_bytes // len(filler) + 1))[:prompt_bytes]
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],
        "temperature": 0.7,
        "max_tokens": 256,
    }
    if stream:
        body["stream"] = True
    path.write_text(json.dumps(body, separators=(",", ":")))
    return path


class Stack:
    """Controller + one dataplane for one config."""

    def __init__(self, bins, workdir, pods, redis):
        self.config_dir = workdir / f"config-{pods}"
        write_config(self.config_dir, pods, redis)
        self.controller = start(
            "controller",
            [str(bins / "switchyard-controller"), "--config-dir", str(self.config_dir),
             "--xds-addr", CONTROLLER_XDS, "--metrics-addr", CONTROLLER_ADMIN,
             "--scrape-interval", SCRAPE_INTERVAL],
            workdir, core=LOAD_CORE,
        )
        self.dataplane = start(
            "dataplane",
            [str(bins / "switchyard-dataplane"), "--controller", f"http://{CONTROLLER_XDS}",
             "--host", "127.0.0.1", "--port", str(DATAPLANE_PORT),
             "--metrics-port", str(DATAPLANE_METRICS_PORT), "--debug-port", str(DATAPLANE_DEBUG_PORT),
             "--node-id", "bench"],
            workdir, core=PROXY_CORE,
        )
        base = f"http://127.0.0.1:{DATAPLANE_PORT}"
        wait_for("dataplane ready", lambda: http_get(base + "/readyz")[0] == 200)

        def has_pods():
            _, table = http_get(f"http://127.0.0.1:{DATAPLANE_DEBUG_PORT}/debug/routing/table")
            return table.count(b"127.0.") >= pods

        wait_for(f"dataplane snapshot with {pods} pods", has_pods)

    def stop(self):
        stop(self.dataplane)
        stop(self.controller)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8, help="length of each load run")
    parser.add_argument("--quick", action="store_true", help="2 s runs, fewer samples: checks the script")
    parser.add_argument("--no-install", action="store_true", help="do not install oha / nginx")
    parser.add_argument("--bin-dir", default=None, help="directory of the release binaries")
    parser.add_argument("--output", default=str(REPO / "bench/results/bench.md"))
    parser.add_argument("--note", default="", help="a line printed under the table (e.g. machine busy)")
    args = parser.parse_args()
    seconds = 2 if args.quick else args.seconds
    ttfb_samples = 30 if args.quick else TTFB_SAMPLES

    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    bins = Path(args.bin_dir) if args.bin_dir else target / "release"
    for name in ["switchyard-bench-backend", "switchyard-controller", "switchyard-dataplane"]:
        if not (bins / name).exists():
            raise SystemExit(f"{bins / name} missing: build with `cargo build --release` first (make bench does)")
    nginx = ensure_tools(not args.no_install)

    workdir = Path(tempfile.mkdtemp(prefix="switchyard-bench-"))
    for sub in ["nginx-body", "nginx-proxy", "nginx-fastcgi", "nginx-uwsgi", "nginx-scgi"]:
        (workdir / sub).mkdir()
    bodies = {
        "chat": make_body(workdir / "chat.json", 800, False),
        "stream": make_body(workdir / "stream.json", 800, True),
        "large": make_body(workdir / "large.json", 400 * 1024, False),
        "limited-local": make_body(workdir / "limited-local.json", 800, False, "bench-limited-local"),
        "limited-redis": make_body(workdir / "limited-redis.json", 800, False, "bench-limited-redis"),
    }
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        log("redis-server not available: the Redis rate-limit row is left out (apt-get install redis-server)")
    paced = (f"{PACED_HEADER}: {PACED_CHUNK_INTERVAL_US}",)
    cases = [
        # (label, body, pods in the snapshot, extra request headers)
        ("~1 KB chat", "chat", 1, ()),
        ("streaming, 64 chunks", "stream", 1, ()),
        (f"streaming, 64 chunks {PACED_CHUNK_INTERVAL_US // 1000} ms apart", "stream", 1, paced),
        ("400 KB prompt", "large", 1, ()),
        ("~1 KB chat, token rate limit (local budget)", "limited-local", 1, ()),
        ("~1 KB chat, 1000 pods", "chat", 1000, ()),
    ]
    if redis_server:
        cases.insert(-1, ("~1 KB chat, token rate limit (Redis budget)", "limited-redis", 1, ()))
    rows = []
    stack = None
    try:
        start("backend", [str(bins / "switchyard-bench-backend"), "--loopback-pods", "1000",
                          "--port", str(BACKEND_PORT), "--stream-chunks", str(STREAM_CHUNKS)],
              workdir, core=LOAD_CORE)
        if redis_server:
            start("redis", [redis_server, "--bind", "127.0.0.1", "--port", str(REDIS_PORT),
                            "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                  workdir, core=LOAD_CORE)
            wait_for("redis", redis_ping)
        direct_url = f"http://{loopback_pod_ip(0)}:{BACKEND_PORT}/v1/chat/completions"
        wait_for("backend", lambda: http_post(direct_url, b'{"model":"bench-model"}')[0] == 200)
        nginx_process = None
        if nginx:
            conf = write_nginx_config(workdir)
            nginx_process = start("nginx", [nginx, "-c", str(conf)], workdir, core=PROXY_CORE)
            wait_for("nginx", lambda: http_post(f"http://127.0.0.1:{NGINX_PORT}/v1/chat/completions",
                                                b'{"model":"bench-model"}')[0] == 200)
        dp_url = f"http://127.0.0.1:{DATAPLANE_PORT}/v1/chat/completions"
        nginx_url = f"http://127.0.0.1:{NGINX_PORT}/v1/chat/completions"
        chat_cpu_per_request = None
        nginx_chat_cpu_per_request = None
        current_pods = None
        for label, body_name, pods, headers in cases:
            body = bodies[body_name]
            if current_pods != pods:
                if stack:
                    stack.stop()
                log(f"starting controller + dataplane with {pods} pod(s)")
                stack = Stack(bins, workdir, pods, redis_server is not None)
                current_pods = pods
            status, _ = http_post(dp_url, body.read_bytes())
            if status != 200:
                raise RuntimeError(f"{label}: dataplane answered {status}")
            dp_pid = real_pid(stack.dataplane)
            log(f"{label}: saturation runs ({seconds}s each)")
            sat = {"direct": oha(direct_url, body, seconds, SATURATION_CONNECTIONS, headers=headers)}
            sat["dataplane"] = oha(dp_url, body, seconds, SATURATION_CONNECTIONS, headers=headers)
            if nginx_process:
                sat["nginx"] = oha(nginx_url, body, seconds, SATURATION_CONNECTIONS, headers=headers)
            rate = max(10, int(sat["dataplane"]["rps"] / 2))
            log(f"{label}: open-loop runs at {rate} req/s")
            fixed = {"direct": oha(direct_url, body, seconds, OPEN_LOOP_CONNECTIONS, rate, headers)}
            cpu_before = cpu_seconds([dp_pid])
            fixed["dataplane"] = oha(dp_url, body, seconds, OPEN_LOOP_CONNECTIONS, rate, headers)
            cpu_after = cpu_seconds([dp_pid])
            nginx_cpu = None
            if nginx_process:
                nginx_pids = [nginx_process.pid] + children(nginx_process.pid)
                n_before = cpu_seconds(nginx_pids)
                fixed["nginx"] = oha(nginx_url, body, seconds, OPEN_LOOP_CONNECTIONS, rate, headers)
                nginx_cpu = (cpu_seconds(nginx_pids) - n_before) / max(1, fixed["nginx"]["ok"]) * 1000
            served = max(1, fixed["dataplane"]["ok"])
            cpu_per_1000 = (cpu_after - cpu_before) / served * 1000
            if body_name == "chat" and pods == 1:
                chat_cpu_per_request = cpu_per_1000 / 1000
                if nginx_cpu is not None:
                    nginx_chat_cpu_per_request = nginx_cpu / 1000
            row = {
                "case": label,
                "sat": sat,
                "rate": rate,
                "fixed": fixed,
                "cpu_per_1000": cpu_per_1000,
                "nginx_cpu_per_1000": nginx_cpu,
                "rss_mib": vm_hwm_mib([dp_pid]),
                "failed": sum(r["failed"] for r in list(sat.values()) + list(fixed.values())),
            }
            if body_name == "stream":
                if not headers:
                    row["ttfb_direct"] = ttfb_ms(direct_url, body, ttfb_samples)
                    row["ttfb_dataplane"] = ttfb_ms(dp_url, body, ttfb_samples)
                if chat_cpu_per_request is not None:
                    stream_cpu = cpu_per_1000 / 1000
                    row["cpu_us_per_chunk"] = max(0.0, (stream_cpu - chat_cpu_per_request) / (STREAM_CHUNKS + 2) * 1e6)
                    if nginx_cpu is not None and nginx_chat_cpu_per_request is not None:
                        row["nginx_cpu_us_per_chunk"] = max(
                            0.0, (nginx_cpu / 1000 - nginx_chat_cpu_per_request) / (STREAM_CHUNKS + 2) * 1e6)
            rows.append(row)
    finally:
        if stack:
            stack.stop()
        stop_all()

    table = render(rows, seconds, args.note)
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    log(f"written to {output}")
    shutil.rmtree(workdir, ignore_errors=True)


def fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(rows, seconds, note):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    lines = [
        f"Switchyard `make bench`, {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, "
        f"{os.cpu_count()} cores ({cpu}), {seconds:g} s per run; dataplane and nginx pinned to core {PROXY_CORE}, "
        f"load generator (oha), backend and controller on core {LOAD_CORE}.",
        "",
        "| Case | Saturation req/s: direct / dataplane / nginx | dataplane ÷ nginx | Open-loop rate | "
        "p50 ms: direct / dataplane / nginx | p99 ms: direct / dataplane / nginx | Added p50 / p99 (dataplane − direct) | "
        "Dataplane CPU s / 1000 req (nginx) | Dataplane peak RSS | Failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sat, fixed = row["sat"], row["fixed"]
        ng_sat = sat.get("nginx", {}).get("rps")
        ratio = sat["dataplane"]["rps"] / ng_sat if ng_sat else None
        ng_fixed = fixed.get("nginx", {})
        added_p50 = (fixed["dataplane"]["p50_ms"] - fixed["direct"]["p50_ms"]) * 1000
        added_p99 = (fixed["dataplane"]["p99_ms"] - fixed["direct"]["p99_ms"]) * 1000
        lines.append(
            f"| {row['case']} | {sat['direct']['rps']:.0f} / {sat['dataplane']['rps']:.0f} / {fmt(ng_sat, 0)} | "
            f"{fmt(ratio)} | {row['rate']} | "
            f"{fixed['direct']['p50_ms']:.3f} / {fixed['dataplane']['p50_ms']:.3f} / {fmt(ng_fixed.get('p50_ms'), 3)} | "
            f"{fixed['direct']['p99_ms']:.3f} / {fixed['dataplane']['p99_ms']:.3f} / {fmt(ng_fixed.get('p99_ms'), 3)} | "
            f"{added_p50:.0f} µs / {added_p99:.0f} µs | "
            f"{row['cpu_per_1000']:.3f} ({fmt(row['nginx_cpu_per_1000'], 3)}) | {row['rss_mib']:.1f} MiB | {row['failed']} |"
        )
    for row in rows:
        if "cpu_us_per_chunk" in row or "ttfb_direct" in row:
            ttfb = ""
            if "ttfb_direct" in row:
                ttfb = (f"median time to first byte {fmt(row['ttfb_direct'], 3)} ms direct, "
                        f"{fmt(row['ttfb_dataplane'], 3)} ms through the dataplane (curl, sequential); ")
            lines.append("")
            lines.append(
                f"{row['case']}: {ttfb}"
                f"CPU per chunk ≈ {fmt(row.get('cpu_us_per_chunk'), 1)} µs dataplane, "
                f"{fmt(row.get('nginx_cpu_us_per_chunk'), 1)} µs nginx "
                f"((CPU per stream − CPU per ~1 KB chat) ÷ {STREAM_CHUNKS + 2} events)."
            )
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (stop_all(), sys.exit(1)))
    try:
        main()
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
