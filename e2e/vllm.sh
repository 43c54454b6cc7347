#!/usr/bin/env bash
# `make e2e-vllm`: Switchyard in front of two REAL vLLM engines (CPU build,
# tiny random-weight model `tiny-llama` with LoRA `tiny-lora`), all on loopback.
# Optional and heavy (first run installs ~6 GB of Python packages through
# ../shared/tools/real-vllm/serve.sh); not part of `make test`.
#
# Checks: chat and completions, streamed and not; the LoRA model; that both
# engines' load (running, waiting, KV-cache usage, TTFT/TPOT, loaded adapters)
# appears in the controller's snapshot; that an engine error (prompt longer than
# the 512-token context) reaches the client unchanged.
# Everything started here is stopped on exit, by pid.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_TOOL="${VLLM_TOOL:-$ROOT/../shared/tools/real-vllm/serve.sh}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
WORK="$(mktemp -d)"
PORT_A=18100
PORT_B=18101
XDS_ADDR=127.0.0.1:18210
ADMIN=127.0.0.1:18290
DATAPLANE=127.0.0.1:18280
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  PORT=$PORT_A "$VLLM_TOOL" stop >/dev/null 2>&1 || true
  PORT=$PORT_B "$VLLM_TOOL" stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok: $*"; }

[ -x "$VLLM_TOOL" ] || fail "$VLLM_TOOL not found (set VLLM_TOOL)"
"$VLLM_TOOL" setup
PORT=$PORT_A VLLM_CPU_OMP_THREADS_BIND=0 "$VLLM_TOOL" start
PORT=$PORT_B VLLM_CPU_OMP_THREADS_BIND=1 "$VLLM_TOOL" start

# One ModelServer per engine (each has its own port), one route over both.
mkdir -p "$WORK/config"
for side in a b; do
  port=$PORT_A; [ "$side" = b ] && port=$PORT_B
  cat >>"$WORK/config/objects.yaml" <<YAML
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: { name: vllm-$side }
spec:
  inferenceEngine: vLLM
  workloadSelector: { matchLabels: { app: vllm-$side } }
  workloadPort: { port: $port }
---
apiVersion: v1
kind: Pod
metadata: { name: vllm-$side-0, labels: { app: vllm-$side } }
status:
  phase: Running
  podIP: 127.0.0.1
  conditions: [{ type: Ready, status: "True" }]
---
YAML
done
cat >>"$WORK/config/objects.yaml" <<'YAML'
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: { name: tiny-llama }
spec:
  modelName: tiny-llama
  loraAdapters: [tiny-lora]
  rules:
  - name: both
    targetModels:
    - { modelServerName: vllm-a, weight: 50 }
    - { modelServerName: vllm-b, weight: 50 }
YAML

"$TARGET/switchyard-controller" --config-dir "$WORK/config" --xds-addr "$XDS_ADDR" \
  --metrics-addr "$ADMIN" --controller-id e2e-vllm >"$WORK/controller.log" 2>&1 &
PIDS+=($!)
"$TARGET/switchyard-dataplane" --controller "http://$XDS_ADDR" --host 127.0.0.1 \
  --port "${DATAPLANE##*:}" --metrics-port 18291 --debug-port 18292 --node-id e2e-vllm \
  >"$WORK/dataplane.log" 2>&1 &
PIDS+=($!)

for _ in $(seq 1 120); do
  curl -fs "http://$DATAPLANE/readyz" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fs "http://$DATAPLANE/readyz" >/dev/null || fail "dataplane not ready (see $WORK/dataplane.log)"

post() { # path body -> prints "status\nbody"
  curl -s -o "$WORK/body" -w '%{http_code}' "http://$DATAPLANE$1" \
    -H 'Content-Type: application/json' -d "$2"
  echo; cat "$WORK/body"
}

json_check() { # python expression over `r` (the JSON body), message
  python3 -c "import json,sys; r=json.load(open('$WORK/body')); sys.exit(0 if ($1) else 1)" || fail "$2: $(head -c 400 "$WORK/body")"
}

status=$(post /v1/chat/completions '{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":8}' | head -1)
[ "$status" = 200 ] || fail "chat: $status"
json_check "r['object']=='chat.completion' and r['choices'][0]['message']['content'] is not None" "chat body"
pass "chat completion"

status=$(post /v1/completions '{"model":"tiny-llama","prompt":"San Francisco is a","max_tokens":8}' | head -1)
[ "$status" = 200 ] || fail "completion: $status"
json_check "r['object']=='text_completion' and r['usage']['completion_tokens']>0" "completion body"
pass "completion"

for path in /v1/chat/completions /v1/completions; do
  if [ "$path" = /v1/completions ]; then body='{"model":"tiny-llama","prompt":"hello","max_tokens":8,"stream":true}'
  else body='{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true}'; fi
  curl -sN "http://$DATAPLANE$path" -H 'Content-Type: application/json' -d "$body" >"$WORK/stream"
  grep -q '^data: {' "$WORK/stream" || fail "$path stream has no chunks"
  grep -q '^data: \[DONE\]' "$WORK/stream" || fail "$path stream does not end with [DONE]"
  pass "streamed $path"
done

status=$(post /v1/completions '{"model":"tiny-lora","prompt":"hello","max_tokens":4}' | head -1)
[ "$status" = 200 ] || fail "LoRA: $status"
json_check "r['model']=='tiny-lora'" "LoRA answered by the adapter"
pass "LoRA route"

# Engine error passes through unchanged: a prompt far beyond the 512-token context.
long_prompt=$(python3 -c "print('word ' * 2000)")
status=$(post /v1/completions "{\"model\":\"tiny-llama\",\"prompt\":\"$long_prompt\",\"max_tokens\":4}" | head -1)
[ "$status" = 400 ] || fail "context overflow: expected the engine's 400, got $status"
json_check "'error' in r and 'context' in json.dumps(r).lower()" "engine error body unchanged"
pass "engine error passed through"

# Both engines' load in the snapshot (scraped every second).
sleep 3
curl -fs "http://$ADMIN/debug/snapshot" >"$WORK/body" || fail "snapshot"
json_check "len(r['endpoint_loads']['loads'])==2" "two endpoint loads"
json_check "all('tiny-lora' in l.get('models',[]) and 'tiny-llama' in l.get('models',[]) for l in r['endpoint_loads']['loads'])" "loaded adapters"
json_check "all(0 <= l.get('kv_cache_usage',0) <= 1 and l.get('requests_running',0) >= 0 and l.get('requests_waiting',0) >= 0 for l in r['endpoint_loads']['loads'])" "running/waiting/KV usage"
json_check "all('ttft_seconds' in l and 'tpot_seconds' in l for l in r['endpoint_loads']['loads'])" "TTFT/TPOT present"
pass "engine metrics of both instances in the snapshot"
echo "e2e-vllm: all checks passed"
