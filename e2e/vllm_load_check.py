#!/usr/bin/env python3
"""Part of `make e2e-vllm` (run by e2e/vllm.sh): loads two real vLLM engines and
checks that the controller's published snapshot (`GET /debug/snapshot` on its
debug listener) follows each engine's own load.

Stdlib only. Usage:
    vllm_load_check.py --controller-debug 127.0.0.1:18293 --engine vllm-0=127.0.0.1:18100 \
        --engine vllm-1=127.0.0.2:18100 --max-num-seqs 8 --kv-cache-tokens 4096 \
        --models tiny-llama,tiny-lora

For each engine, more concurrent requests than its --max-num-seqs are sent
straight to it (so the load of each is known), while the snapshot is polled.
Checked for every engine, at some poll while loaded: requests_running equal to
max-num-seqs, requests_waiting > 0, 0 < kv_cache_usage <= 1, ttft_seconds > 0,
tpot_seconds > 0; at every poll: the loaded models are exactly --models and the
KV-cache size is --kv-cache-tokens (vllm:cache_config_info); after
the load: running and waiting back to 0. All traffic is on loopback; every loop
is bounded.
"""
import argparse
import http.client
import json
import sys
import threading
import time

# Long enough that several 1 s scrapes see the engine busy on a shared 2-core
# machine (the tiny model decodes a few hundred tokens/s per engine there).
LOAD_MAX_TOKENS = 400
# Three times the engine's max-num-seqs: requests wait for a slot.
LOAD_PER_SEQ_SLOT = 3
# Bounds every wait here; a passing run takes well under a minute.
DEADLINE_S = 240


def loopback(addr):
    host, port = addr.rsplit(":", 1)
    assert host.startswith("127."), f"loopback only, got {addr}"
    return host, int(port)


def request(addr, method, path, body=None, timeout=DEADLINE_S):
    conn = http.client.HTTPConnection(*loopback(addr), timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def fail(message):
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--controller-debug", required=True)
    ap.add_argument("--engine", action="append", required=True, help="POD=HOST:PORT")
    ap.add_argument("--max-num-seqs", type=int, required=True)
    ap.add_argument("--kv-cache-tokens", type=int, required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--model", default="tiny-llama")
    a = ap.parse_args()
    engines = dict(e.split("=", 1) for e in a.engine)
    expected_models = sorted(a.models.split(","))

    failures = []

    def load(addr, i):
        status, body = request(addr, "POST", "/v1/completions", {
            "model": a.model, "prompt": f"load {i}", "max_tokens": LOAD_MAX_TOKENS,
            "ignore_eos": True, "temperature": 0.8})
        if status != 200:
            failures.append(f"load request to {addr}: {status} {body[:300]!r}")

    threads = [threading.Thread(target=load, args=(addr, i), daemon=True)
               for addr in engines.values() for i in range(a.max_num_seqs * LOAD_PER_SEQ_SLOT)]
    for t in threads:
        t.start()

    want = ["running==max-num-seqs", "waiting>0", "kv_cache_usage>0", "ttft>0", "tpot>0"]
    seen = {pod: {} for pod in engines}
    deadline = time.monotonic() + DEADLINE_S
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        status, body = request(a.controller_debug, "GET", "/debug/snapshot", timeout=10)
        if status != 200:
            fail(f"controller /debug/snapshot: {status}")
        loads = {l["pod"]: l for l in (json.loads(body).get("endpoint_loads") or {}).get("loads", [])}
        for pod in engines:
            l = loads.get(pod)
            if l is None:
                continue
            if sorted(l["models"]) != expected_models:
                fail(f"{pod}: loaded models {l['models']}, engine serves {expected_models}")
            if l.get("kv_cache_capacity_tokens") != a.kv_cache_tokens:
                fail(f"{pod}: kv_cache_capacity_tokens {l.get('kv_cache_capacity_tokens')}, "
                     f"engine has {a.kv_cache_tokens}")
            if not 0.0 <= l["kv_cache_usage"] <= 1.0:
                fail(f"{pod}: kv_cache_usage {l['kv_cache_usage']} outside [0, 1]")
            if l["requests_running"] > a.max_num_seqs:
                fail(f"{pod}: {l['requests_running']} running, engine runs at most {a.max_num_seqs}")
            checks = {
                "running==max-num-seqs": l["requests_running"] == a.max_num_seqs,
                "waiting>0": l["requests_waiting"] > 0,
                "kv_cache_usage>0": l["kv_cache_usage"] > 0,
                "ttft>0": l["ttft_seconds"] > 0,
                "tpot>0": l["tpot_seconds"] > 0,
            }
            for name, ok in checks.items():
                if ok and name not in seen[pod]:
                    seen[pod][name] = {k: l[k] for k in (
                        "requests_running", "requests_waiting", "kv_cache_usage",
                        "ttft_seconds", "tpot_seconds")}
        if all(len(s) == len(want) for s in seen.values()):
            break
        time.sleep(0.25)
    for pod, s in seen.items():
        missing = [w for w in want if w not in s]
        if missing:
            fail(f"{pod}: never seen in the snapshot while loaded: {missing} (seen: {s})")
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic()))
    if failures:
        fail("; ".join(failures[:3]))
    for pod, s in seen.items():
        print(f"ok: {pod} under load in the snapshot: "
              f"running {s['running==max-num-seqs']['requests_running']:g} (= max-num-seqs), "
              f"waiting {s['waiting>0']['requests_waiting']:g}, "
              f"kv_cache_usage {s['kv_cache_usage>0']['kv_cache_usage']:.3f}, "
              f"ttft {s['ttft>0']['ttft_seconds']:.4f} s, tpot {s['tpot>0']['tpot_seconds']:.4f} s")
    print(f"ok: both engines' loaded models in the snapshot: {expected_models}, "
          f"KV cache {a.kv_cache_tokens} tokens")

    # After the load the snapshot follows the engines back to idle.
    while time.monotonic() < deadline:
        status, body = request(a.controller_debug, "GET", "/debug/snapshot", timeout=10)
        loads = {l["pod"]: l for l in (json.loads(body).get("endpoint_loads") or {}).get("loads", [])}
        if all(pod in loads and loads[pod]["requests_running"] == 0
               and loads[pod]["requests_waiting"] == 0 for pod in engines):
            print("ok: after the load both engines are idle in the snapshot (0 running, 0 waiting)")
            return
        time.sleep(0.25)
    fail(f"engines never back to idle in the snapshot: {loads}")


if __name__ == "__main__":
    main()
