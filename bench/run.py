#!/usr/bin/env python3
"""`make bench`: the dataplane against a direct connection and nginx, in one run.

Starts, on loopback only: the fake backend (switchyard-bench-backend), the
controller in local mode, one dataplane pinned to one core, and nginx (Debian)
as a plain reverse proxy on the same core (`access_log off`; a second nginx
that writes a JSON access log, as the dataplane does, gives a like-for-like
row for the ~1 KB chat). For each case it drives the same
load at the backend directly, through the dataplane and through nginx with
oha, and prints a Markdown table (also written to bench/results/).

Closed-loop runs (fixed connection count, as fast as possible) give the
saturation rate; open-loop runs (oha -q RATE --latency-correction) at half of
nginx's saturation rate (the dataplane's when nginx is missing) give latency
percentiles, CPU time per request (from /proc/PID/stat) and system calls per
request (`perf stat`, when perf works). Then: the dataplane's RSS idle (a
one-pod snapshot, before any request) and with the 10,000-pod / 1,000-route
snapshot (switchyard-bench-scale), a pick among 1000 candidate pods
(switchyard-bench-hotpath), and saturation with 1 and 2 traffic workers.

The Rust routers users would pick instead run as optional peers on the same
core, for the ~1 KB chat and the unpaced streaming cases: vllm-router and
sglang-router from PyPI, installed into a virtual environment under the build
directory (`target/bench-peers`) when missing; a peer that cannot be installed
or started is left out with a printed note. The run ends with the performance
targets, each with its measured value and pass/fail. Everything started here
is stopped here, also on failure or Ctrl-C.
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
# A second nginx that writes a JSON access log, for the like-for-like chat row.
NGINX_LOGGED_PORT = 18071
# The peer routers: traffic port and the Prometheus exporter each starts.
VLLM_ROUTER_PORTS = (18060, 18061)
SGLANG_ROUTER_PORTS = (18062, 18063)
# A peer checks its worker's health before it routes (vllm-router waits for it).
PEER_START_TIMEOUT_S = 60
# pip installs each peer's wheel (and its Python dependencies) once.
PEER_INSTALL_TIMEOUT_S = 600
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
# The latency target's case is measured in this many interleaved rounds and
# reported as the median: one run's p99 is set by its worst few hundred
# requests, so a single stall of the shared machine decides it.
LATENCY_CASE = "~1 KB chat"
LATENCY_ROUNDS = 3
STREAM_CHUNKS = 64
# The cases the peer routers run: the ~1 KB chat and the unpaced stream.
PEER_CASES = ("~1 KB chat", f"streaming, {STREAM_CHUNKS} chunks")
# The paced streaming case: chunks this far apart (tokio's timer rounds to
# whole ms), as an engine emits tokens, so neither proxy can coalesce chunks
# that arrive together into one write. The burst case (all chunks at once)
# lets both coalesce as much as they do.
PACED_CHUNK_INTERVAL_US = 1000
PACED_HEADER = "x-bench-chunk-interval-us"
TTFB_SAMPLES = 200
# The pods of the memory case (switchyard-bench-scale's defaults: 500 ModelServers, 1000 ModelRoutes).
SCALE_PODS = 10_000
# Events counted by `perf stat` during the open-loop runs: every system call, and futex calls alone
# (wake-ups between threads).
SYSCALL_EVENTS = "raw_syscalls:sys_enter,syscalls:sys_enter_futex"
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


def vm_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def perf_works():
    if shutil.which("perf") is None:
        return False
    result = subprocess.run(["perf", "stat", "-x,", "-e", SYSCALL_EVENTS, "--", "true"],
                            capture_output=True, text=True, check=False)
    return result.returncode == 0 and "not supported" not in result.stderr


class SyscallCount:
    """`perf stat` attached to `pids` (all their threads) while the block runs."""

    def __init__(self, pids, workdir, enabled):
        self.pids, self.enabled = pids, enabled
        self.output = workdir / "perf-stat.csv"
        self.counts = None

    def __enter__(self):
        if self.enabled:
            self.process = subprocess.Popen(
                ["perf", "stat", "-x,", "-e", SYSCALL_EVENTS, "-o", str(self.output),
                 "-p", ",".join(str(pid) for pid in self.pids)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(0.3)  # attached before the load starts
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        self.process.send_signal(signal.SIGINT)
        self.process.wait(timeout=10)
        counts = {}
        for line in self.output.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].strip().isdigit():
                counts[fields[2]] = int(fields[0])
        self.counts = counts
        return False

    @staticmethod
    def per_request_of(counts, requests):
        if not counts or requests <= 0:
            return None, None
        total = counts.get("raw_syscalls:sys_enter")
        futex = counts.get("syscalls:sys_enter_futex")
        return (None if total is None else total / requests, None if futex is None else futex / requests)


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


class Peer:
    """A router run next to the dataplane: its PyPI package and how it starts."""

    def __init__(self, name, package, argv):
        self.name, self.package, self.argv = name, package, argv


def peer_definitions(venv_bin, worker_url):
    vllm_port, vllm_metrics = VLLM_ROUTER_PORTS
    sglang_port, sglang_metrics = SGLANG_ROUTER_PORTS
    common = ["--host", "127.0.0.1", "--worker-urls", worker_url, "--policy", "round_robin",
              "--prometheus-host", "127.0.0.1", "--log-level", "error"]
    return [
        (Peer("vllm-router", "vllm-router",
              [str(venv_bin / "vllm-router"), "--port", str(vllm_port),
               "--prometheus-port", str(vllm_metrics), *common]), vllm_port),
        (Peer("sglang-router", "sglang-router",
              [str(venv_bin / "sglang-router"), "launch", "--port", str(sglang_port),
               "--prometheus-port", str(sglang_metrics), *common]), sglang_port),
    ]


def ensure_peers(venv, worker_url, install):
    """The peers that are installed (installing the missing ones into `venv`
    unless told not to); a note for each one left out."""
    venv_bin = venv / "bin"
    ready = []
    for peer, port in peer_definitions(venv_bin, worker_url):
        executable = Path(peer.argv[0])
        if not executable.exists() and install:
            log(f"installing {peer.package} from PyPI into {venv}, once")
            try:
                if not (venv_bin / "pip").exists():
                    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                                   capture_output=True, timeout=PEER_INSTALL_TIMEOUT_S)
                subprocess.run([str(venv_bin / "pip"), "install", "-q", peer.package], check=True,
                               capture_output=True, timeout=PEER_INSTALL_TIMEOUT_S)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
                detail = getattr(error, "stderr", b"") or b""
                log(f"{peer.name} left out: installing {peer.package} failed ({error}; "
                    f"{detail.decode(errors='replace').strip()[-300:]})")
                continue
        if not executable.exists():
            log(f"{peer.name} left out: not installed ({'--no-install' if not install else 'no executable'})")
            continue
        ready.append((peer, port))
    return ready


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


# What the like-for-like nginx logs per request: the dataplane's access-log
# fields nginx knows, as one JSON line of about the same size (~450 bytes),
# buffered as the dataplane's writer thread batches its lines.
NGINX_JSON_LOG_FORMAT = (
    "log_format json escape=json '{"
    '"start_time":"$time_iso8601","method":"$request_method","path":"$uri",'
    '"protocol":"$server_protocol","status_code":$status,"request_id":"$request_id",'
    '"client":"$remote_addr","user_agent":"$http_user_agent","upstream_host":"$upstream_addr",'
    '"upstream_status":"$upstream_status","bytes_received":$request_length,"bytes_sent":$bytes_sent,'
    '"duration_ms":"$request_time","upstream_connect_ms":"$upstream_connect_time",'
    '"upstream_header_ms":"$upstream_header_time","upstream_response_ms":"$upstream_response_time",'
    '"content_type":"$content_type","connection":"$connection","requests_on_connection":"$connection_requests"'
    "}';"
)


def write_nginx_config(workdir, name="nginx", port=NGINX_PORT, access_log=False):
    """nginx as a plain reverse proxy (`access_log off`), or with
    `access_log` the same proxy writing NGINX_JSON_LOG_FORMAT to a file, as
    the dataplane writes its JSON access log to stdout, a file in the bench."""
    conf = workdir / f"{name}.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    logging = (f"{NGINX_JSON_LOG_FORMAT}\n  access_log {workdir}/{name}-access.log json buffer=64k flush=1s;"
               if access_log else "access_log off;")
    conf.write_text(
        f"""{user}
daemon off;
worker_processes 1;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  {logging}
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
    listen 127.0.0.1:{port};
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


def make_body(path, prompt_bytes, stream, model="bench-model", filler="lorem ipsum dolor sit amet ",
              completion=False):
    prompt = (filler * (prompt_bytes // len(filler) + 1))[:prompt_bytes]
    body = {"model": model}
    if completion:
        body["prompt"] = prompt
    else:
        body["messages"] = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ]
    body["temperature"] = 0.7
    body["max_tokens"] = 256
    if stream:
        body["stream"] = True
    path.write_text(json.dumps(body, separators=(",", ":")))
    return path


class Stack:
    """Controller + one dataplane for one config."""

    def __init__(self, bins, workdir, pods, redis=False, core=PROXY_CORE, extra_args=()):
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
             "--node-id", "bench", *extra_args],
            workdir, core=core,
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
    parser.add_argument("--no-peers", action="store_true", help="leave vllm-router and sglang-router out")
    args = parser.parse_args()
    seconds = 2 if args.quick else args.seconds
    ttfb_samples = 30 if args.quick else TTFB_SAMPLES

    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    bins = Path(args.bin_dir) if args.bin_dir else target / "release"
    for name in ["switchyard-bench-backend", "switchyard-controller", "switchyard-dataplane",
                 "switchyard-bench-hotpath", "switchyard-bench-scale"]:
        if not (bins / name).exists():
            raise SystemExit(f"{bins / name} missing: build with `cargo build --release` first (make bench does)")
    nginx = ensure_tools(not args.no_install)
    count_syscalls = perf_works()
    if not count_syscalls:
        log("perf stat cannot count system calls here: the syscall column is left out")

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
    extra = {}
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
        nginx_process = nginx_logged = None
        if nginx:
            conf = write_nginx_config(workdir)
            nginx_process = start("nginx", [nginx, "-c", str(conf)], workdir, core=PROXY_CORE)
            wait_for("nginx", lambda: http_post(f"http://127.0.0.1:{NGINX_PORT}/v1/chat/completions",
                                                b'{"model":"bench-model"}')[0] == 200)
            extra["nginx_idle_rss"] = sum(
                vm_rss_bytes(pid) for pid in [nginx_process.pid] + children(nginx_process.pid))
            conf = write_nginx_config(workdir, "nginx-logged", NGINX_LOGGED_PORT, access_log=True)
            nginx_logged = start("nginx-logged", [nginx, "-c", str(conf)], workdir, core=PROXY_CORE)
            wait_for("nginx-logged", lambda: http_post(f"http://127.0.0.1:{NGINX_LOGGED_PORT}/v1/chat/completions",
                                                       b'{"model":"bench-model"}')[0] == 200)
        dp_url = f"http://127.0.0.1:{DATAPLANE_PORT}/v1/chat/completions"
        nginx_url = f"http://127.0.0.1:{NGINX_PORT}/v1/chat/completions"
        nginx_logged_url = f"http://127.0.0.1:{NGINX_LOGGED_PORT}/v1/chat/completions"
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
                if pods == 1 and "idle_rss" not in extra:
                    extra["idle_rss"] = vm_rss_bytes(real_pid(stack.dataplane))
            status, _ = http_post(dp_url, body.read_bytes())
            if status != 200:
                raise RuntimeError(f"{label}: dataplane answered {status}")
            dp_pid = real_pid(stack.dataplane)
            log(f"{label}: saturation runs ({seconds}s each)")
            sat = {"direct": oha(direct_url, body, seconds, SATURATION_CONNECTIONS, headers=headers)}
            sat["dataplane"] = saturation_with_cpu([dp_pid], dp_url, body, seconds, headers)
            if nginx_process:
                nginx_pids = [nginx_process.pid] + children(nginx_process.pid)
                sat["nginx"] = saturation_with_cpu(nginx_pids, nginx_url, body, seconds, headers)
                if label == LATENCY_CASE:
                    logged_pids = [nginx_logged.pid] + children(nginx_logged.pid)
                    sat["nginx_logged"] = saturation_with_cpu(logged_pids, nginx_logged_url, body, seconds, headers)
            # Latency is compared at half of nginx's saturation: the load a
            # plain proxy on one core carries comfortably.
            reference = sat.get("nginx", sat["dataplane"])["rps"]
            rate = max(10, int(reference / 2))
            rounds = LATENCY_ROUNDS if label == LATENCY_CASE else 1
            log(f"{label}: open-loop runs at {rate} req/s ({rounds} round(s))")
            targets = [("direct", direct_url, None), ("dataplane", dp_url, [dp_pid])]
            if nginx_process:
                targets.append(("nginx", nginx_url, [nginx_process.pid] + children(nginx_process.pid)))
            fixed = open_loop(targets, body, seconds, rate, headers, rounds, workdir, count_syscalls)
            cpu_per_1000 = fixed["dataplane"]["cpu_per_1000"]
            nginx_cpu = fixed.get("nginx", {}).get("cpu_per_1000")
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
                "syscalls": fixed["dataplane"]["syscalls"],
                "nginx_syscalls": fixed.get("nginx", {}).get("syscalls", (None, None)),
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
        if stack:
            stack.stop()
            stack = None
        if nginx_process:
            extra["nginx_peak_rss_mib"] = vm_hwm_mib([nginx_process.pid] + children(nginx_process.pid))
        if not args.no_peers:
            peers = ensure_peers(target / "bench-peers", f"http://{loopback_pod_ip(0)}:{BACKEND_PORT}",
                                 not args.no_install)
            peer_cases = [(label, body_name, headers) for label, body_name, pods, headers in cases
                          if label in PEER_CASES]
            extra["peers"] = run_peers(peers, workdir, peer_cases, bodies, seconds)
        extra["workers"] = worker_scaling(bins, workdir, dp_url, bodies["chat"], seconds)
    finally:
        if stack:
            stack.stop()
        stop_all()
    extra["pick_1000_ns"] = pick_among_1000_ns(bins)
    extra["scale_rss_mib"] = scale_snapshot_rss_mib(bins, workdir)

    table = render(rows, extra, seconds, args.note)
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(table)
    log(f"written to {output}")
    shutil.rmtree(workdir, ignore_errors=True)


def saturation_with_cpu(pids, url, body, seconds, headers):
    """A saturation run, with the CPU time `pids` spent per answered request (µs)."""
    before = cpu_seconds(pids)
    result = oha(url, body, seconds, SATURATION_CONNECTIONS, headers=headers)
    result["cpu_us"] = (cpu_seconds(pids) - before) / max(1, result["ok"]) * 1e6
    return result


def open_loop(targets, body, seconds, rate, headers, rounds, workdir, count_syscalls):
    """Open-loop runs at `rate`: `rounds` rounds of one run per target in turn
    (direct, dataplane, nginx), so all three are measured in the same minute
    and a stall of the machine during one run shows as one outlying round
    rather than as the result. Per target: the median p50 and p99 over the
    rounds, each round's p99, and for the proxies (`pids` set) the CPU time
    and the system calls per request over all their runs."""
    runs = {name: [] for name, _, _ in targets}
    cpu = dict.fromkeys(runs, 0.0)
    calls = {name: {} for name in runs}
    for _ in range(rounds):
        for name, url, pids in targets:
            if pids is None:
                runs[name].append(oha(url, body, seconds, OPEN_LOOP_CONNECTIONS, rate, headers))
                continue
            before = cpu_seconds(pids)
            with SyscallCount(pids, workdir, count_syscalls) as counted:
                runs[name].append(oha(url, body, seconds, OPEN_LOOP_CONNECTIONS, rate, headers))
            cpu[name] += cpu_seconds(pids) - before
            for event, count in (counted.counts or {}).items():
                calls[name][event] = calls[name].get(event, 0) + count
    results = {}
    for name, url, pids in targets:
        each = runs[name]
        ok = sum(run["ok"] for run in each)
        results[name] = {
            "ok": ok,
            "failed": sum(run["failed"] for run in each),
            "p50_ms": statistics.median(run["p50_ms"] for run in each),
            "p99_ms": statistics.median(run["p99_ms"] for run in each),
            "p99_each_ms": [run["p99_ms"] for run in each],
            "cpu_per_1000": None if pids is None else cpu[name] / max(1, ok) * 1000,
            "syscalls": SyscallCount.per_request_of(calls[name], ok),
        }
    return results


def process_tree(pid):
    pids = [pid]
    for child in children(pid):
        pids += process_tree(child)
    return pids


def run_peers(peers, workdir, cases, bodies, seconds):
    """Each peer router on the dataplane's core, saturated with each case as the dataplane was."""
    results = {}
    for peer, port in peers:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        log(f"starting {peer.name} on core {PROXY_CORE}")
        process = start(peer.name, peer.argv, workdir, core=PROXY_CORE)
        try:
            def answers():
                # An exited peer ends the wait at once; it is told apart below.
                return process.poll() is not None or http_post(url, bodies["chat"].read_bytes())[0] == 200
            try:
                wait_for(f"{peer.name} to answer", answers, timeout=PEER_START_TIMEOUT_S)
            except RuntimeError as error:
                log(f"{peer.name} left out: {error}")
                continue
            if process.poll() is not None:
                log(f"{peer.name} left out: it exited ({process.returncode}); see {workdir / peer.name}.log")
                continue
            pids = process_tree(process.pid)
            runs = {}
            for label, body_name, headers in cases:
                log(f"{label}: {peer.name} saturation run ({seconds}s)")
                runs[label] = saturation_with_cpu(pids, url, bodies[body_name], seconds, headers)
            results[peer.name] = {"runs": runs, "rss_mib": vm_hwm_mib(pids)}
        finally:
            stop(process)
    return results


def worker_scaling(bins, workdir, url, body, seconds):
    """Chat saturation with 1 and 2 traffic workers, the dataplane free to use both cores."""
    both = f"{LOAD_CORE},{PROXY_CORE}"
    results = {}
    for workers in (1, 2):
        log(f"~1 KB chat with --workers {workers} on cores {both}")
        stack = Stack(bins, workdir, 1, core=both, extra_args=("--workers", str(workers)))
        try:
            http_post(url, body.read_bytes())
            results[workers] = oha(url, body, seconds, SATURATION_CONNECTIONS)["rps"]
        finally:
            stack.stop()
    return results


def pick_among_1000_ns(bins):
    """The library-level pick among 1000 candidate pods (route lookup included), in ns."""
    result = subprocess.run(
        ["taskset", "-c", PROXY_CORE, str(bins / "switchyard-bench-hotpath"), "pick among 1000"],
        capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        if "pick among 1000" in line:
            return float(line.split("|")[2])
    log(f"switchyard-bench-hotpath printed no pick: {result.stderr.strip()[:300]}")
    return None


def scale_snapshot_rss_mib(bins, workdir):
    """A real dataplane's RSS holding the 10,000-pod / 1,000-route snapshot (peak, current)."""
    log(f"dataplane memory with the {SCALE_PODS}-pod snapshot (switchyard-bench-scale)")
    result = subprocess.run(
        [str(bins / "switchyard-bench-scale"), "--pods", str(SCALE_PODS), "--streams", "1",
         "--changes", "2", "--compiles", "1", "--churn-routes", "0",
         "--dataplane-bin", str(bins / "switchyard-dataplane"),
         "--output", str(workdir / "scale.md")],
        capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("| Real dataplane peak / current RSS"):
            peak, current = line.split("|")[2].replace("MiB", "").split("/")
            return float(peak), float(current)
    log(f"switchyard-bench-scale measured no dataplane memory: {result.stderr.strip()[-300:]}")
    return None


def fmt(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def target_row(name, measured, goal, met, note=""):
    verdict = "n/a" if met is None else ("pass" if met else "FAIL")
    return f"| {name} | {measured} | {goal} | {verdict} |{note}"


def render_peers(by_case, extra):
    """Switchyard, nginx and the peer routers side by side, from their saturation runs."""
    peers = extra.get("peers")
    if peers is None:
        return []
    lines = [
        "",
        f"Routers side by side (each alone on core {PROXY_CORE}, the same backend; round robin; "
        "CPU per request measured over the saturation run):",
        "",
        "| Case | Router | Saturation req/s | ÷ nginx | CPU µs / req | Peak RSS | Failed |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in PEER_CASES:
        row = by_case.get(label)
        if row is None:
            continue
        ng_rps = row["sat"].get("nginx", {}).get("rps")
        entries = [("direct", row["sat"]["direct"], None), ("Switchyard dataplane", row["sat"]["dataplane"],
                                                            row["rss_mib"])]
        if "nginx" in row["sat"]:
            entries.append(("nginx", row["sat"]["nginx"], extra.get("nginx_peak_rss_mib")))
        for name, result in peers.items():
            if label in result["runs"]:
                entries.append((name, result["runs"][label], result["rss_mib"]))
        for name, run, rss in entries:
            cpu = fmt(run.get("cpu_us"), 1) if name != "direct" else "–"
            lines.append(f"| {label} | {name} | {run['rps']:.0f} | {fmt(ratio(run['rps'], ng_rps))} | {cpu} | "
                         f"{'–' if rss is None else f'{rss:.1f} MiB'} | {run['failed']} |")
    left_out = [name for name in ("vllm-router", "sglang-router") if name not in peers]
    if left_out:
        lines += ["", f"Left out (not installed or not answering, see the run's log): {', '.join(left_out)}."]
    return lines


def render(rows, extra, seconds, note):
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
        f"{os.cpu_count()} cores ({cpu}), {seconds:g} s per run; dataplane (one traffic worker) and nginx "
        f"(one worker process) pinned to core {PROXY_CORE}, load generator (oha), backend and controller on "
        f"core {LOAD_CORE}. Open-loop runs at half of nginx's saturation rate.",
        "",
        "| Case | Saturation req/s: direct / dataplane / nginx | dataplane ÷ nginx | Open-loop rate | "
        "p50 ms: direct / dataplane / nginx | p99 ms: direct / dataplane / nginx | Added p50 / p99 (dataplane − direct) | "
        "CPU µs / req: dataplane (nginx) | Syscalls / req (futex): dataplane; nginx | Dataplane peak RSS | Failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_case = {}
    for row in rows:
        sat, fixed = row["sat"], row["fixed"]
        ng_sat = sat.get("nginx", {}).get("rps")
        row["ratio"] = ratio(sat["dataplane"]["rps"], ng_sat)
        row["added_p50_ms"] = fixed["dataplane"]["p50_ms"] - fixed["direct"]["p50_ms"]
        row["added_p99_ms"] = fixed["dataplane"]["p99_ms"] - fixed["direct"]["p99_ms"]
        by_case[row["case"]] = row
        ng_fixed = fixed.get("nginx", {})
        calls, futex = row["syscalls"]
        ng_calls, ng_futex = row["nginx_syscalls"]
        lines.append(
            f"| {row['case']} | {sat['direct']['rps']:.0f} / {sat['dataplane']['rps']:.0f} / {fmt(ng_sat, 0)} | "
            f"{fmt(row['ratio'])} | {row['rate']} | "
            f"{fixed['direct']['p50_ms']:.3f} / {fixed['dataplane']['p50_ms']:.3f} / {fmt(ng_fixed.get('p50_ms'), 3)} | "
            f"{fixed['direct']['p99_ms']:.3f} / {fixed['dataplane']['p99_ms']:.3f} / {fmt(ng_fixed.get('p99_ms'), 3)} | "
            f"{row['added_p50_ms'] * 1000:.0f} µs / {row['added_p99_ms'] * 1000:.0f} µs | "
            f"{row['cpu_per_1000'] * 1000:.1f} ({fmt(row['nginx_cpu_per_1000'] and row['nginx_cpu_per_1000'] * 1000, 1)}) | "
            f"{fmt(calls, 1)} ({fmt(futex, 2)}); {fmt(ng_calls, 1)} ({fmt(ng_futex, 2)}) | "
            f"{row['rss_mib']:.1f} MiB | {row['failed']} |"
        )
    latency = by_case.get(LATENCY_CASE)
    if latency:
        each = {name: run["p99_each_ms"] for name, run in latency["fixed"].items()}
        lines += ["", (
            f"{LATENCY_CASE}: p50 and p99 are medians of {len(each['dataplane'])} interleaved rounds "
            f"(direct, dataplane, nginx in turn); p99 of each round (ms): "
            + "; ".join(f"{name} " + ", ".join(f"{value:.3f}" for value in values) for name, values in each.items())
            + ".")]
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
    lines += render_peers(by_case, extra)
    workers = extra.get("workers") or {}
    if workers:
        one, two = workers.get(1), workers.get(2)
        lines += ["", (
            f"Traffic workers, ~1 KB chat saturation with the dataplane allowed on both cores: "
            f"{fmt(one, 0)} req/s with `--workers 1`, {fmt(two, 0)} req/s with `--workers 2` "
            f"({fmt(ratio(two, one))}×). The load generator and the backend share those two cores, "
            f"so this understates what a second core gives a dataplane that has it to itself.")]

    chat = by_case.get("~1 KB chat", {})
    stream = by_case.get(f"streaming, {STREAM_CHUNKS} chunks", {})
    many = by_case.get("~1 KB chat, 1000 pods", {})
    chat_cpu = ratio(chat.get("cpu_per_1000"), chat.get("nginx_cpu_per_1000"))
    chunk_cpu = ratio(stream.get("cpu_us_per_chunk"), stream.get("nginx_cpu_us_per_chunk"))
    pick_us = None if extra.get("pick_1000_ns") is None else extra["pick_1000_ns"] / 1000
    idle_mb = extra.get("idle_rss", 0) / 1e6 or None
    scale = extra.get("scale_rss_mib")
    scale_peak = scale[0] if scale else None

    def at_most(value, bound):
        return None if value is None else value <= bound

    def at_least(value, bound):
        return None if value is None else value >= bound

    calls, futex = chat.get("syscalls", (None, None))
    ng_calls, _ = chat.get("nginx_syscalls", (None, None))
    chat_sat = chat.get("sat", {})
    logged = chat_sat.get("nginx_logged", {})
    dp_sat_cpu = chat_sat.get("dataplane", {}).get("cpu_us")
    like_for_like = (
        f"saturation {fmt(ratio(chat_sat.get('dataplane', {}).get('rps'), logged.get('rps')))}, "
        f"CPU per request {fmt(ratio(dp_sat_cpu, logged.get('cpu_us')))} "
        f"(saturation runs: dataplane {fmt(dp_sat_cpu, 1)} µs, this nginx {fmt(logged.get('cpu_us'), 1)} µs "
        f"at {fmt(logged.get('rps'), 0)} req/s, nginx without a log {fmt(chat_sat.get('nginx', {}).get('cpu_us'), 1)} µs)")
    lines += [
        "",
        "Targets (each from this run):",
        "",
        "| Target | Measured | Goal | Result |",
        "|---|---|---|---|",
        target_row("~1 KB chat: saturation ÷ nginx", fmt(chat.get("ratio")), "≥ 1.0", at_least(chat.get("ratio"), 1.0)),
        target_row("~1 KB chat: CPU per request ÷ nginx", fmt(chat_cpu), "≤ 1.0", at_most(chat_cpu, 1.0)),
        target_row(f"Unpaced streaming ({STREAM_CHUNKS} chunks): saturation ÷ nginx", fmt(stream.get("ratio")),
                   "≥ 0.8", at_least(stream.get("ratio"), 0.8)),
        target_row("Unpaced streaming: CPU per chunk ÷ nginx's", fmt(chunk_cpu), "≤ 2.0", at_most(chunk_cpu, 2.0)),
        target_row("~1 KB chat at half nginx's saturation: added p50", f"{fmt(chat.get('added_p50_ms'), 3)} ms",
                   "≤ 0.1 ms", at_most(chat.get("added_p50_ms"), 0.1)),
        target_row("~1 KB chat at half nginx's saturation: added p99", f"{fmt(chat.get('added_p99_ms'), 3)} ms",
                   "≤ 1 ms", at_most(chat.get("added_p99_ms"), 1.0)),
        target_row("Route lookup + pick among 1000 candidate pods", f"{fmt(pick_us, 1)} µs", "≤ 20 µs",
                   at_most(pick_us, 20.0)),
        target_row("~1 KB chat, 1000 pods: saturation ÷ nginx", fmt(many.get("ratio")), "≥ 0.5",
                   at_least(many.get("ratio"), 0.5)),
        target_row("Idle RSS (one-pod snapshot, no request yet)", f"{fmt(idle_mb, 1)} MB "
                   f"(nginx {fmt(extra.get('nginx_idle_rss', 0) / 1e6 or None, 1)} MB)", "≤ 15 MB",
                   at_most(idle_mb, 15.0)),
        target_row(f"RSS with the {SCALE_PODS}-pod / 1000-route snapshot (peak)", f"{fmt(scale_peak, 1)} MiB",
                   "≤ 50 MiB", at_most(scale_peak, 50.0)),
        target_row("~1 KB chat ÷ nginx writing a JSON access log as the dataplane does", like_for_like,
                   "reported", None),
        target_row("~1 KB chat: system calls per request (futex)", f"{fmt(calls, 1)} ({fmt(futex, 2)}); "
                   f"nginx {fmt(ng_calls, 1)}", "reported", None),
    ]
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
