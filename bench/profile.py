#!/usr/bin/env python3
"""Instruction counts of the dataplane per request and per SSE chunk.

Wall-clock benchmarks are noisy on a shared 2-core machine; instruction
counts are not. This starts the same loopback stack as `make bench` (fake
backend, controller in local mode, one dataplane), but the dataplane runs
under `valgrind --tool=callgrind` with collection off. For each case it warms
up, zeroes the counters, sends a fixed number of requests with oha (few
connections: valgrind runs the dataplane slowly, one thread at a time) and
dumps the counters: user-space instructions per request. `--syscalls` runs
the dataplane natively under `strace -c -f` instead and reports system calls
per request, the part callgrind cannot see.

    python3 bench/profile.py [--requests 400] [--syscalls] [--pods N] [--keep DIR]

`--pods 1000` profiles the `make bench` row "~1 KB chat, 1000 pods": the
same config with N fake pods (one loopback address each), chat only unless
`--cases` names more.

Per-chunk cost = (instructions per streamed request - per ~1 KB chat
request) / chunks per stream. The callgrind dumps are kept with `--keep`
for `callgrind_annotate`.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the stack helpers of `make bench`)

CASES = [("~1 KB chat", "chat"), ("streaming, 64 chunks", "stream"), ("400 KB prompt", "large"),
         ("~1 KB chat, prompt with escapes", "escaped"),
         ("~1 KB completion, prompt with escapes", "completion"),
         ("~1 KB chat, token rate limit (local budget)", "limited")]
# The cases not sent to the chat API.
PATHS = {"completion": "/v1/completions"}
# Lines and non-ASCII text, which JSON encoders escape (`\n`, and `\u00e9` from
# Python's json.dumps and the OpenAI SDK by default).
ESCAPED_FILLER = "lorem ipsum dolor sit amet, caf\u00e9\n"
# Few connections: the dataplane under valgrind is ~50x slower and serialised.
CONNECTIONS = 4
WARMUP_REQUESTS = 50
WARMUP_REQUESTS_PER_POD = 3
# Not the controller's default debug port, which another controller on the machine may hold.
CONTROLLER_DEBUG_PORT = 18012


def oha_count(url, body_file, requests, headers=()):
    argv = ["oha", "--no-tui", "-n", str(requests), "-c", str(CONNECTIONS), "-m", "POST",
            "-H", "content-type: application/json", "-D", str(body_file)]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"oha failed: {result.stderr.strip()[:500]}")
    codes = re.findall(r"\[(\d{3})\]\s+(\d+) responses", result.stdout)
    ok = sum(int(count) for code, count in codes if code == "200")
    if ok != requests:
        raise RuntimeError(f"expected {requests} answers 200, got {codes}: {result.stdout[-800:]}")


def callgrind_total(path):
    # A dump's header "summary:" can read 0; the "totals:" line at its end holds the count.
    totals = [int(line.split()[1]) for line in Path(path).read_text().splitlines()
              if line.startswith("totals:")]
    if not totals:
        raise RuntimeError(f"no totals in {path}")
    return sum(totals)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--syscalls", action="store_true", help="count system calls (strace) instead")
    parser.add_argument("--bin-dir", default=None)
    parser.add_argument("--dataplane", default=None, help="dataplane binary (default: the one in --bin-dir)")
    parser.add_argument("--backend-cmd", default=None,
                        help="start this instead of switchyard-bench-backend (IP and port are appended)")
    parser.add_argument("--keep", default=None, help="directory to keep the callgrind dumps in")
    parser.add_argument("--paced", action="store_true", help="also a stream with chunks 1 ms apart")
    parser.add_argument("--pods", type=int, default=1, help="fake pods in the snapshot (make bench: 1 and 1000)")
    parser.add_argument("--cases", default=None,
                        help="comma-separated bodies to run: chat,stream,large (default: all with one pod, "
                             "chat with more)")
    args = parser.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", bench.REPO / "target"))
    bins = Path(args.bin_dir) if args.bin_dir else target / "release"
    tool = "strace" if args.syscalls else "valgrind"
    if shutil.which(tool) is None or shutil.which("oha") is None:
        raise SystemExit(f"needs {tool} and oha on PATH")

    workdir = Path(tempfile.mkdtemp(prefix="switchyard-profile-"))
    keep = Path(args.keep) if args.keep else workdir
    keep.mkdir(parents=True, exist_ok=True)
    bodies = {
        "chat": bench.make_body(workdir / "chat.json", 800, False),
        "stream": bench.make_body(workdir / "stream.json", 800, True),
        "large": bench.make_body(workdir / "large.json", 400 * 1024, False),
        "escaped": bench.make_body(workdir / "escaped.json", 800, False, filler=ESCAPED_FILLER),
        "limited": bench.make_body(workdir / "limited.json", 800, False, "bench-limited-local"),
        "completion": bench.make_body(workdir / "completion.json", 800, False, filler=ESCAPED_FILLER,
                                      completion=True),
    }
    config_dir = workdir / "config"
    bench.write_config(config_dir, args.pods, redis=False)
    results = {}
    try:
        if args.backend_cmd:
            if args.pods != 1:
                raise SystemExit("--backend-cmd serves one pod: leave --pods out")
            backend = args.backend_cmd.split() + [bench.loopback_pod_ip(0), str(bench.BACKEND_PORT)]
        else:
            # The same addresses as `make bench`: pod i on bench.loopback_pod_ip(i).
            backend = [str(bins / "switchyard-bench-backend"), "--loopback-pods", str(args.pods),
                       "--port", str(bench.BACKEND_PORT), "--stream-chunks", str(bench.STREAM_CHUNKS)]
        bench.start("backend", backend, workdir)
        bench.start("controller", [str(bins / "switchyard-controller"), "--config-dir", str(config_dir),
                                   "--xds-addr", bench.CONTROLLER_XDS, "--metrics-addr", bench.CONTROLLER_ADMIN,
                                   "--scrape-interval", bench.SCRAPE_INTERVAL,
                                   "--debug-port", str(CONTROLLER_DEBUG_PORT)], workdir)
        dataplane = [args.dataplane or str(bins / "switchyard-dataplane"), "--controller", f"http://{bench.CONTROLLER_XDS}",
                     "--host", "127.0.0.1", "--port", str(bench.DATAPLANE_PORT),
                     "--metrics-port", str(bench.DATAPLANE_METRICS_PORT),
                     "--debug-port", str(bench.DATAPLANE_DEBUG_PORT), "--node-id", "profile", "--workers", "1"]
        out_file = keep / "callgrind.out"
        if not args.syscalls:
            dataplane = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                         f"--callgrind-out-file={out_file}"] + dataplane
        process = bench.start("dataplane", dataplane, workdir)
        base = f"http://127.0.0.1:{bench.DATAPLANE_PORT}"
        bench.wait_for("dataplane ready", lambda: bench.http_get(base + "/readyz")[0] == 200, timeout=120)
        debug = f"http://127.0.0.1:{bench.DATAPLANE_DEBUG_PORT}/debug/routing/table"
        bench.wait_for(f"dataplane snapshot with {args.pods} pods",
                       lambda: bench.http_get(debug, timeout=30)[1].count(b"127.0.") >= args.pods, timeout=120)
        wanted = args.cases.split(",") if args.cases else (None if args.pods == 1 else ["chat"])
        cases = [case for case in CASES if wanted is None or case[1] in wanted]
        if args.paced:
            cases.append(("streaming, paced", "stream"))
        for label, body_name in cases:
            body = bodies[body_name]
            url = base + PATHS.get(body_name, "/v1/chat/completions")
            headers = (f"{bench.PACED_HEADER}: {bench.PACED_CHUNK_INTERVAL_US}",) if "paced" in label else ()
            # Every pod served a few requests before counting: its pooled
            # connection is open, as in a long saturation run.
            oha_count(url, body, WARMUP_REQUESTS + WARMUP_REQUESTS_PER_POD * args.pods, headers)
            if args.syscalls:
                trace_file = keep / f"strace-{body_name}.txt"
                strace = subprocess.Popen(["strace", "-c", "-f", "-o", str(trace_file), "-p", str(process.pid)],
                                          stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # strace attaches to every thread
                oha_count(url, body, args.requests, headers)
                strace.send_signal(signal.SIGINT)
                strace.wait(timeout=30)
                total = parse_strace_total(trace_file)
                results[label] = total / args.requests
                bench.log(f"{label}: {total / args.requests:.1f} syscalls per request ({trace_file})")
            else:
                subprocess.run(["callgrind_control", "-i", "on", str(process.pid)], check=True,
                               capture_output=True)
                oha_count(url, body, args.requests, headers)
                dump = keep / ("callgrind-" + re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-"))
                subprocess.run(["callgrind_control", "-i", "off", str(process.pid)], check=True,
                               capture_output=True)
                subprocess.run(["callgrind_control", "-d", body_name, str(process.pid)], check=True,
                               capture_output=True)
                # Dumps are numbered files next to --callgrind-out-file; take the newest and name it.
                time.sleep(0.5)
                newest = max(keep.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
                newest.rename(dump)
                subprocess.run(["callgrind_control", "-z", str(process.pid)], check=True, capture_output=True)
                total = callgrind_total(dump)
                results[label] = total / args.requests
                bench.log(f"{label}: {total / args.requests:.0f} instructions per request ({dump})")
    finally:
        bench.stop_all()
    unit = "system calls" if args.syscalls else "instructions (user space)"
    print(f"| Case | dataplane {unit} per request |")
    print("|---|---|")
    for label, value in results.items():
        print(f"| {label} | {value:.1f} |" if args.syscalls else f"| {label} | {value:.0f} |")
    chat, stream = results.get("~1 KB chat"), results.get("streaming, 64 chunks")
    if chat is not None and stream is not None:
        per_chunk = (stream - chat) / (bench.STREAM_CHUNKS + 1)
        print(f"\nPer SSE chunk (stream - chat) / {bench.STREAM_CHUNKS + 1} chunks: {per_chunk:.1f} {unit}")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


def parse_strace_total(path):
    for line in Path(path).read_text().splitlines():
        if line.strip().endswith("total"):
            fields = line.split()
            # "100.00 0.001 1 1234 56 total": calls is the 4th column.
            return int(fields[3])
    raise RuntimeError(f"no total line in {path}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: (bench.stop_all(), sys.exit(1)))
    try:
        main()
    except KeyboardInterrupt:
        bench.stop_all()
        sys.exit(130)
