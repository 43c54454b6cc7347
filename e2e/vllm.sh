#!/usr/bin/env bash
# Switchyard in front of two REAL vLLM engines (CPU build, tiny random-weight
# model `tiny-llama` with LoRA `tiny-lora`), both pods of one ModelServer
# (127.0.0.1:18100 and 127.0.0.2:18100), all on loopback. Optional and heavy
# (the first run installs ~6 GB of Python packages through
# ../shared/tools/real-vllm/serve.sh); not part of `make test`.
#
#   e2e/vllm.sh [check]   `make e2e-vllm`: one dataplane, default scheduler.
#     Checks chat and completions, streamed and not; that the scheduler spreads
#     requests over both engines; the LoRA model; that an engine error (prompt
#     longer than the 512-token context) reaches the client byte for byte; that
#     both engines' load (running, waiting, KV-cache usage and size, TTFT/TPOT,
#     loaded adapters) appears in the controller's snapshot while they are
#     loaded, and goes back to idle after (vllm_load_check.py).
#   e2e/vllm.sh quality   `make e2e-vllm-quality`: the cache-bound shared-prefix
#     workload (e2e/src/prefix_workload.rs) for round robin, the default mix and
#     prefix-cache alone, through one and through three dataplanes, each run on
#     engines restarted cold; prints the results table (hit rate from the
#     engines' own vllm:prefix_cache_hits_total / queries_total), then for
#     each default-mix run ok/MISS per target (hit rate >= 80%, busiest engine
#     <= 60% of requests); exits non-zero if one is missed.
#     QUALITY_STRATEGIES="default-mix" QUALITY_DATAPLANES="3" run a subset.
#
# Everything started here is stopped on exit, by pid.
set -euo pipefail

MODE="${1:-check}"
case "$MODE" in check|quality) ;; *) echo "usage: $0 [check|quality]" >&2; exit 2 ;; esac
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
# One ModelServer has one workloadPort: the two engines share it on two loopback IPs.
ENGINE_PORT=18100
ENGINE_HOSTS=(127.0.0.1 127.0.0.2)
XDS_ADDR=127.0.0.1:18210
ADMIN=127.0.0.1:18290
CONTROLLER_DEBUG_PORT=18293
DATAPLANE=127.0.0.1:18280
PIDS=()

stop_engine() { # host
  HOST=$1 PORT=$ENGINE_PORT "$VLLM_TOOL" stop >/dev/null 2>&1 || true
}

stop_switchyard() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}

cleanup() {
  local rc=$?
  stop_switchyard
  for host in "${ENGINE_HOSTS[@]}"; do stop_engine "$host"; done
  if [ "$rc" = 0 ]; then rm -rf "$WORK"
  else echo "logs kept: $WORK/*.log, $VLLM_HOME/logs/server-*18100.log" >&2; fi
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
wait_engine() { # host
  local deadline=$((SECONDS + ENGINE_START_TIMEOUT_S))
  until curl -fs "http://$1:$ENGINE_PORT/health" >/dev/null 2>&1; do
    [[ "$(HOST=$1 PORT=$ENGINE_PORT "$VLLM_TOOL" status)" == pid* ]] \
      || fail "engine on $1:$ENGINE_PORT died (see $VLLM_HOME/logs/)"
    [ $SECONDS -lt $deadline ] || fail "engine on $1:$ENGINE_PORT not healthy after $ENGINE_START_TIMEOUT_S s"
    sleep 2
  done
}
# Both engines, each on its own core, started together; cold (empty caches).
# serve.sh's own --max-model-len 512, 128 KV blocks of 32 tokens, 8 sequences.
start_engines() {
  local cpu=0 starters=()
  for host in "${ENGINE_HOSTS[@]}"; do
    HOST=$host PORT=$ENGINE_PORT VLLM_CPU_OMP_THREADS_BIND=$cpu "$VLLM_TOOL" start >/dev/null 2>&1 &
    starters+=($!)
    cpu=$((cpu + 1))
  done
  # serve.sh writes its pid file at once, then polls /health for up to 300 s.
  sleep 2
  for host in "${ENGINE_HOSTS[@]}"; do wait_engine "$host"; done
  for pid in "${starters[@]}"; do wait "$pid" || true; done
}

mkdir -p "$WORK/config"
cat >"$WORK/config/objects.yaml" <<YAML
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelServer
metadata: { name: vllm }
spec:
  inferenceEngine: vLLM
  workloadSelector: { matchLabels: { app: vllm } }
  workloadPort: { port: $ENGINE_PORT }
---
apiVersion: networking.serving.volcano.sh/v1alpha1
kind: ModelRoute
metadata: { name: tiny-llama }
spec:
  modelName: tiny-llama
  loraAdapters: [tiny-lora]
  rules:
  - name: both
    targetModels:
    - { modelServerName: vllm }
YAML
for i in "${!ENGINE_HOSTS[@]}"; do
  cat >>"$WORK/config/objects.yaml" <<YAML
---
apiVersion: v1
kind: Pod
metadata: { name: vllm-$i, labels: { app: vllm } }
status:
  phase: Running
  podIP: ${ENGINE_HOSTS[$i]}
  conditions: [{ type: Ready, status: "True" }]
YAML
done

# The controller with router configuration file $1, and $2 dataplanes on
# ports 18280.. (metrics 18300.., debug 18320..); returns once every dataplane
# has both engines' load, KV-cache size included.
start_switchyard() { # router-config dataplanes
  "$TARGET/switchyard-controller" --config-dir "$WORK/config" --router-config "$1" \
    --xds-addr "$XDS_ADDR" --metrics-addr "$ADMIN" --debug-port "$CONTROLLER_DEBUG_PORT" --controller-id e2e-vllm \
    >>"$WORK/controller.log" 2>&1 &
  PIDS+=($!)
  DATAPLANES=()
  for i in $(seq 0 $(($2 - 1))); do
    "$TARGET/switchyard-dataplane" --controller "http://$XDS_ADDR" --host 127.0.0.1 \
      --port $((18280 + i)) --metrics-port $((18300 + i)) --debug-port $((18320 + i)) \
      --node-id "e2e-vllm-$i" >>"$WORK/dataplane-$i.log" 2>&1 &
    PIDS+=($!)
    DATAPLANES+=("http://127.0.0.1:$((18280 + i))")
  done
  for i in $(seq 0 $(($2 - 1))); do
    local deadline=$((SECONDS + 120))
    until curl -fs "http://127.0.0.1:$((18320 + i))/debug/router/state" 2>/dev/null | python3 -c "
import json, sys
pods = json.load(sys.stdin)['pods']
sys.exit(0 if len(pods) == 2 and all((p.get('load') or {}).get('kvCacheCapacityTokens', 0) > 0 for p in pods) else 1)" 2>/dev/null; do
      [ $SECONDS -lt $deadline ] || fail "dataplane $i has no engine load after 120 s (see $WORK/dataplane-$i.log)"
      sleep 0.5
    done
  done
}

if [ "$MODE" = quality ]; then
  # Round robin: every pod scores 0 and ties rotate.
  printf 'scheduler:\n  plugins:\n    Filter: {enabled: []}\n    Score: {enabled: [{name: least-request, weight: 0}]}\n' >"$WORK/round-robin.yaml"
  printf 'auth: {}\n' >"$WORK/default-mix.yaml"
  printf 'scheduler:\n  plugins:\n    Filter: {enabled: []}\n    Score: {enabled: [{name: prefix-cache}]}\n' >"$WORK/prefix-cache-alone.yaml"
  # QUALITY_STRATEGIES / QUALITY_DATAPLANES pick a subset of the runs.
  STRATEGIES=(${QUALITY_STRATEGIES:-round-robin default-mix prefix-cache-alone})
  DATAPLANE_COUNTS=(${QUALITY_DATAPLANES:-1 3})
  TABLE="$WORK/table.md"
  VERDICTS="$WORK/verdicts.txt"
  : >"$VERDICTS"
  echo "| strategy | dataplanes | prefix hit rate | requests per engine | latency p50 (ms) | latency p90 (ms) | errors |" >"$TABLE"
  echo "|---|---|---|---|---|---|---|" >>"$TABLE"
  missed=0
  for strategy in "${STRATEGIES[@]}"; do
    [ -f "$WORK/$strategy.yaml" ] || fail "unknown strategy $strategy (round-robin, default-mix, prefix-cache-alone)"
    for dataplanes in "${DATAPLANE_COUNTS[@]}"; do
      for host in "${ENGINE_HOSTS[@]}"; do stop_engine "$host"; done
      start_engines
      start_switchyard "$WORK/$strategy.yaml" "$dataplanes"
      args=(--strategy "${strategy//-/ }" --model tiny-llama)
      # The targets (hit rate, load split) are the default mix's; the other
      # strategies are measured for comparison.
      [ "$strategy" = default-mix ] && args+=(--check-targets)
      for url in "${DATAPLANES[@]}"; do args+=(--dataplane "$url"); done
      for host in "${ENGINE_HOSTS[@]}"; do args+=(--engine "http://$host:$ENGINE_PORT"); done
      rc=0
      "$TARGET/examples/prefix_workload" "${args[@]}" 2>"$WORK/verdict.txt" | tee -a "$TABLE" || rc=$?
      tee -a "$VERDICTS" <"$WORK/verdict.txt"
      case "$rc" in
        0) ;;
        3) missed=$((missed + 1)) ;;
        *) fail "prefix_workload failed ($rc) for $strategy with $dataplanes dataplanes" ;;
      esac
      stop_switchyard
    done
  done
  echo
  cat "$TABLE"
  echo
  cat "$VERDICTS"
  echo "e2e-vllm-quality: done in $((SECONDS - STARTED_AT)) s (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
  [ "$missed" = 0 ] || fail "$missed default-mix run(s) missed a target (see MISS lines above)"
  [ -s "$VERDICTS" ] && echo "e2e-vllm-quality: every default-mix run met its targets"
  exit 0
fi

start_engines
printf 'auth: {}\n' >"$WORK/default-mix.yaml"
start_switchyard "$WORK/default-mix.yaml" 1

post() { # path body -> HTTP status; body in $WORK/body
  curl -s -o "$WORK/body" -w '%{http_code}' "http://$DATAPLANE$1" \
    -H 'Content-Type: application/json' -d "$2"
}

json_check() { # python expression over `r` (the JSON body in $WORK/body), message
  python3 -c "import json,sys; r=json.load(open('$WORK/body')); sys.exit(0 if ($1) else 1)" \
    || fail "$2: $(head -c 400 "$WORK/body")"
}

engine_requests() { # host -> requests the engine finished (vllm:request_success_total, all reasons)
  curl -fs "http://$1:$ENGINE_PORT/metrics" \
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

# The scheduler spreads distinct prompts over both pods: each engine's own request counter moves.
before_a=$(engine_requests "${ENGINE_HOSTS[0]}"); before_b=$(engine_requests "${ENGINE_HOSTS[1]}")
for i in $(seq 1 20); do
  status=$(post /v1/completions "{\"model\":\"tiny-llama\",\"prompt\":\"question $i\",\"max_tokens\":2}")
  [ "$status" = 200 ] || fail "completion $i: $status $(head -c 400 "$WORK/body")"
done
served_a=$(( $(engine_requests "${ENGINE_HOSTS[0]}") - before_a )); served_b=$(( $(engine_requests "${ENGINE_HOSTS[1]}") - before_b ))
[ $((served_a + served_b)) = 20 ] || fail "20 requests sent, engines finished $served_a + $served_b"
[ "$served_a" -gt 0 ] && [ "$served_b" -gt 0 ] || fail "one engine got nothing: vllm-0 $served_a, vllm-1 $served_b"
pass "20 completions spread over both engines (vllm-0 $served_a, vllm-1 $served_b)"

status=$(post /v1/completions '{"model":"tiny-lora","prompt":"hello","max_tokens":4}')
[ "$status" = 200 ] || fail "LoRA: $status $(head -c 400 "$WORK/body")"
json_check "r['model']=='tiny-lora' and r['usage']['completion_tokens']>0" "LoRA answered by the adapter"
pass "LoRA route (model tiny-lora answered)"

# Engine error passes through unchanged: a prompt far beyond the 512-token
# context; the dataplane's answer is byte for byte the engine's own.
long_body=$(python3 -c "import json; print(json.dumps({'model':'tiny-llama','prompt':'word ' * 2000,'max_tokens':4}))")
direct_status=$(curl -s -o "$WORK/direct" -w '%{http_code}' "http://${ENGINE_HOSTS[0]}:$ENGINE_PORT/v1/completions" \
  -H 'Content-Type: application/json' -d "$long_body")
[ "$direct_status" = 400 ] || fail "the engine itself should refuse the long prompt with 400, got $direct_status"
status=$(post /v1/completions "$long_body")
[ "$status" = "$direct_status" ] || fail "context overflow: engine says $direct_status, client got $status"
cmp -s "$WORK/direct" "$WORK/body" || fail "context overflow body changed: engine $(head -c 300 "$WORK/direct") client $(head -c 300 "$WORK/body")"
json_check "'maximum context length' in r['error']['message']" "engine error body"
pass "engine error passed through unchanged (400, $(wc -c <"$WORK/body") bytes identical to the engine's)"

# Both engines' load in the controller's snapshot, while loaded and after.
python3 "$ROOT/e2e/vllm_load_check.py" --controller-debug "127.0.0.1:$CONTROLLER_DEBUG_PORT" \
  --engine "vllm-0=${ENGINE_HOSTS[0]}:$ENGINE_PORT" --engine "vllm-1=${ENGINE_HOSTS[1]}:$ENGINE_PORT" \
  --max-num-seqs 8 --kv-cache-tokens 4096 --models tiny-llama,tiny-lora
echo "e2e-vllm: all checks passed in $((SECONDS - STARTED_AT)) s"
