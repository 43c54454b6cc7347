#!/usr/bin/env bash
# `make e2e-vllm`: Switchyard in front of two REAL vLLM engines (CPU build,
# tiny random-weight model `tiny-llama` with LoRA `tiny-lora`), all on loopback.
# Optional and heavy (first run installs ~6 GB of Python packages through
# ../shared/tools/real-vllm/serve.sh); not part of `make test`.
#
# Checks: chat and completions, streamed and not, answered by both engines; the
# LoRA model; that an engine error (prompt longer than the 512-token context)
# reaches the client byte for byte; that both engines' load (running, waiting,
# KV-cache usage, TTFT/TPOT, loaded adapters) appears in the controller's
# snapshot while they are loaded, and goes back to idle after (vllm_load_check.py).
# Everything started here is stopped on exit, by pid.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_TOOL_SRC="${VLLM_TOOL_SRC:-$ROOT/../shared/tools/real-vllm}"
TARGET_ROOT="${CARGO_TARGET_DIR:-$ROOT/target}"
TARGET="$TARGET_ROOT/debug"
# serve.sh keeps its venv (~6 GB), models and logs next to itself, and the
# shared tool directory is read-only: run a copy under the build directory,
# which `cargo clean` / removing the target dir frees with everything else.
VLLM_HOME="${VLLM_HOME:-$TARGET_ROOT/real-vllm}"
VLLM_TOOL="$VLLM_HOME/serve.sh"
WORK="$(mktemp -d)"
PORT_A=18100
PORT_B=18101
XDS_ADDR=127.0.0.1:18210
ADMIN=127.0.0.1:18290
CONTROLLER_DEBUG_PORT=18293
DATAPLANE=127.0.0.1:18280
PIDS=()

cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  PORT=$PORT_A "$VLLM_TOOL" stop >/dev/null 2>&1 || true
  PORT=$PORT_B "$VLLM_TOOL" stop >/dev/null 2>&1 || true
  if [ "$rc" = 0 ]; then rm -rf "$WORK"
  else echo "logs kept: $WORK/{controller,dataplane}.log, $VLLM_HOME/logs/server-{$PORT_A,$PORT_B}.log" >&2; fi
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok: $*"; }

STARTED_AT=$SECONDS
[ -x "$VLLM_TOOL_SRC/serve.sh" ] || fail "$VLLM_TOOL_SRC/serve.sh not found (set VLLM_TOOL_SRC)"
mkdir -p "$VLLM_HOME"
for file in "$VLLM_TOOL_SRC"/*.py "$VLLM_TOOL_SRC"/*.sh "$VLLM_TOOL_SRC"/*.txt; do
  copy="$VLLM_HOME/$(basename "$file")"
  cmp -s "$file" "$copy" || { cp "$file" "$copy"; chmod u+w "$copy"; }
done
"$VLLM_TOOL" setup

# serve.sh gives an engine 300 s to get healthy; on a busy 2-core machine (a
# build running beside it) startup has been seen to take 9 minutes, so keep
# waiting while the engine process is alive.
ENGINE_START_TIMEOUT_S=${ENGINE_START_TIMEOUT_S:-1200}
start_engine() { # port cpu
  PORT=$1 VLLM_CPU_OMP_THREADS_BIND=$2 "$VLLM_TOOL" start || true
  local deadline=$((SECONDS + ENGINE_START_TIMEOUT_S))
  until curl -fs "http://127.0.0.1:$1/health" >/dev/null 2>&1; do
    [[ "$(PORT=$1 "$VLLM_TOOL" status)" == pid* ]] || fail "engine on port $1 died (see $VLLM_HOME/logs/server-$1.log)"
    [ $SECONDS -lt $deadline ] || fail "engine on port $1 not healthy after $ENGINE_START_TIMEOUT_S s"
    sleep 2
  done
}
start_engine $PORT_A 0
start_engine $PORT_B 1

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
  --metrics-addr "$ADMIN" --debug-port "$CONTROLLER_DEBUG_PORT" --controller-id e2e-vllm >"$WORK/controller.log" 2>&1 &
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

post() { # path body -> HTTP status; body in $WORK/body
  curl -s -o "$WORK/body" -w '%{http_code}' "http://$DATAPLANE$1" \
    -H 'Content-Type: application/json' -d "$2"
}

json_check() { # python expression over `r` (the JSON body in $WORK/body), message
  python3 -c "import json,sys; r=json.load(open('$WORK/body')); sys.exit(0 if ($1) else 1)" \
    || fail "$2: $(head -c 400 "$WORK/body")"
}

engine_requests() { # port -> requests the engine finished (vllm:request_success_total, all reasons)
  curl -fs "http://127.0.0.1:$1/metrics" \
    | awk '/^vllm:request_success_total\{/ { sum += $NF } END { printf "%d\n", sum }'
}

status=$(post /v1/chat/completions '{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":8}')
[ "$status" = 200 ] || fail "chat: $status $(head -c 400 "$WORK/body")"
json_check "r['object']=='chat.completion' and isinstance(r['choices'][0]['message']['content'], str) and r['usage']['completion_tokens']>0" "chat body"
pass "chat completion"

status=$(post /v1/completions '{"model":"tiny-llama","prompt":"San Francisco is a","max_tokens":8}')
[ "$status" = 200 ] || fail "completion: $status $(head -c 400 "$WORK/body")"
json_check "r['object']=='text_completion' and r['model']=='tiny-llama' and r['usage']['completion_tokens']>0" "completion body"
pass "completion"

for path in /v1/chat/completions /v1/completions; do
  if [ "$path" = /v1/completions ]; then body='{"model":"tiny-llama","prompt":"hello","max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}'
  else body='{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true,"stream_options":{"include_usage":true}}'; fi
  curl -sN -D "$WORK/stream_headers" "http://$DATAPLANE$path" -H 'Content-Type: application/json' -d "$body" >"$WORK/stream"
  grep -qi '^content-type: text/event-stream' "$WORK/stream_headers" || fail "$path stream content type: $(cat "$WORK/stream_headers")"
  grep -q '^data: {' "$WORK/stream" || fail "$path stream has no chunks"
  [ "$(grep -v '^$' "$WORK/stream" | tail -1)" = 'data: [DONE]' ] || fail "$path stream does not end with [DONE]"
  # The engine's last data chunk carries the usage (stream_options.include_usage).
  grep '^data: {' "$WORK/stream" | tail -1 | cut -c7- >"$WORK/body"
  json_check "r['usage']['completion_tokens']>0" "$path stream usage chunk"
  pass "streamed $path ($(grep -c '^data: {' "$WORK/stream") chunks, usage, [DONE])"
done

# Both engines answer the route (50/50 weights): each one's own request counter moves.
before_a=$(engine_requests $PORT_A); before_b=$(engine_requests $PORT_B)
for i in $(seq 1 20); do
  status=$(post /v1/completions "{\"model\":\"tiny-llama\",\"prompt\":\"question $i\",\"max_tokens\":2}")
  [ "$status" = 200 ] || fail "completion $i: $status $(head -c 400 "$WORK/body")"
done
served_a=$(( $(engine_requests $PORT_A) - before_a )); served_b=$(( $(engine_requests $PORT_B) - before_b ))
[ $((served_a + served_b)) = 20 ] || fail "20 requests sent, engines finished $served_a + $served_b"
[ "$served_a" -gt 0 ] && [ "$served_b" -gt 0 ] || fail "one engine got nothing: vllm-a $served_a, vllm-b $served_b"
pass "20 completions spread over both engines (vllm-a $served_a, vllm-b $served_b)"

status=$(post /v1/completions '{"model":"tiny-lora","prompt":"hello","max_tokens":4}')
[ "$status" = 200 ] || fail "LoRA: $status $(head -c 400 "$WORK/body")"
json_check "r['model']=='tiny-lora' and r['usage']['completion_tokens']>0" "LoRA answered by the adapter"
pass "LoRA route (model tiny-lora answered)"

# Engine error passes through unchanged: a prompt far beyond the 512-token
# context; the dataplane's answer is byte for byte the engine's own.
long_body=$(python3 -c "import json; print(json.dumps({'model':'tiny-llama','prompt':'word ' * 2000,'max_tokens':4}))")
direct_status=$(curl -s -o "$WORK/direct" -w '%{http_code}' "http://127.0.0.1:$PORT_A/v1/completions" \
  -H 'Content-Type: application/json' -d "$long_body")
[ "$direct_status" = 400 ] || fail "the engine itself should refuse the long prompt with 400, got $direct_status"
status=$(post /v1/completions "$long_body")
[ "$status" = "$direct_status" ] || fail "context overflow: engine says $direct_status, client got $status"
cmp -s "$WORK/direct" "$WORK/body" || fail "context overflow body changed: engine $(head -c 300 "$WORK/direct") client $(head -c 300 "$WORK/body")"
json_check "'maximum context length' in r['error']['message']" "engine error body"
pass "engine error passed through unchanged (400, $(wc -c <"$WORK/body") bytes identical to the engine's)"

# Both engines' load in the controller's snapshot, while loaded and after.
python3 "$ROOT/e2e/vllm_load_check.py" --controller-debug "127.0.0.1:$CONTROLLER_DEBUG_PORT" \
  --engine "vllm-a-0=127.0.0.1:$PORT_A" --engine "vllm-b-0=127.0.0.1:$PORT_B" \
  --max-num-seqs 8 --models tiny-llama,tiny-lora
echo "e2e-vllm: all checks passed in $((SECONDS - STARTED_AT)) s"
