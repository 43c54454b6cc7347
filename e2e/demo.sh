#!/usr/bin/env bash
# Local demo: mock engines on 127.0.0.11-15, the controller in local mode
# reading config/demo/, and two dataplanes on 127.0.0.1:8080 and :8081.
#   demo.sh run   start everything, send the routing guide's requests, stop
#   demo.sh up    start everything and leave it running
#   demo.sh down  stop what `up` started
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=.demo
BIN=target/debug
CONTROLLER_XDS=127.0.0.1:15010
CONTROLLER_ADMIN=127.0.0.1:9190
CONTROLLER_DEBUG_PORT=15000
DATAPLANE_PORTS=(8080 8081)

# pod IP, model, extra mock-engine flags (names match config/demo/pods.yaml)
ENGINES=(
  "deepseek-r1-1-5b-0 127.0.0.11 deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --lora lora-A,lora-B"
  "deepseek-r1-1-5b-1 127.0.0.12 deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --lora lora-A,lora-B"
  "deepseek-r1-7b-0 127.0.0.13 deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
  "deepseek-r1-1-5b-v1-0 127.0.0.14 deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B-v1"
  "deepseek-r1-1-5b-v2-0 127.0.0.15 deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B-v2"
)

start() {
  command -v curl >/dev/null || { echo "the demo needs curl (apt-get install curl)" >&2; exit 1; }
  for bin in switchyard-controller switchyard-dataplane switchyard-mock-engine; do
    [ -x "$BIN/$bin" ] || { echo "missing $BIN/$bin: run 'cargo build --workspace --bins'" >&2; exit 1; }
  done
  if [ -f "$STATE/pids" ]; then stop; fi
  mkdir -p "$STATE"
  : > "$STATE/pids"
  for engine in "${ENGINES[@]}"; do
    set -- $engine
    local name=$1 ip=$2 model=$3; shift 3
    "$BIN/switchyard-mock-engine" --host "$ip" --port 8000 --model "$model" --name "$name" "$@" \
      > "$STATE/$name.log" 2>&1 &
    echo $! >> "$STATE/pids"
  done
  "$BIN/switchyard-controller" --config-dir config/demo --xds-addr "$CONTROLLER_XDS" \
    --metrics-addr "$CONTROLLER_ADMIN" --debug-port "$CONTROLLER_DEBUG_PORT" > "$STATE/controller.log" 2>&1 &
  echo $! >> "$STATE/pids"
  local i=0
  for port in "${DATAPLANE_PORTS[@]}"; do
    i=$((i + 1))
    "$BIN/switchyard-dataplane" --controller "http://$CONTROLLER_XDS" --host 127.0.0.1 \
      --port "$port" --metrics-port $((9090 + i)) --debug-port $((15000 + i)) \
      --node-id "demo-dataplane-$i" > "$STATE/dataplane-$i.log" 2>&1 &
    echo $! >> "$STATE/pids"
  done
  for port in "${DATAPLANE_PORTS[@]}"; do
    wait_ready "http://127.0.0.1:$port/readyz"
  done
  echo "Switchyard demo is up: dataplanes on http://127.0.0.1:8080 and :8081, logs in $STATE/"
}

wait_ready() {
  for _ in $(seq 1 100); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "timed out waiting for $1; see $STATE/*.log" >&2
  stop
  exit 1
}

stop() {
  [ -f "$STATE/pids" ] || return 0
  while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$STATE/pids"
  while read -r pid; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done < "$STATE/pids"
  rm -f "$STATE/pids"
}

ask() {
  local title=$1 model=$2; shift 2
  echo
  echo "== $title: model=$model $*"
  curl -sS -D "$STATE/headers" http://127.0.0.1:8080/v1/completions \
    -H "Content-Type: application/json" "$@" \
    -d "{\"model\": \"$model\", \"prompt\": \"San Francisco is a\", \"temperature\": 0}"
  echo
  echo "   answered by pod: $(grep -i '^x-mock-pod:' "$STATE/headers" | cut -d' ' -f2 | tr -d '\r')"
}

requests() {
  ask "1. Simple model-based routing" deepseek-simple
  ask "2. LoRA-aware routing" lora-A
  ask "4. Header-based routing (premium)" deepseek-multi-models -H "user-type: premium"
  ask "4. Header-based routing (default)" deepseek-multi-models
  ask "5. Route fall-through (gold tier, older route)" deepseek-tiered -H "x-tier: gold-eu"
  ask "5. Route fall-through (other tiers, newer route)" deepseek-tiered
  echo
  echo "== 3. Weighted 70/30: 100 requests for deepseek-subset"
  for _ in $(seq 1 100); do
    curl -sS -o /dev/null -D - http://127.0.0.1:8080/v1/completions \
      -H "Content-Type: application/json" \
      -d '{"model": "deepseek-subset", "prompt": "San Francisco is a"}' | grep -i '^x-mock-pod:'
  done | cut -d' ' -f2 | tr -d '\r' | sort | uniq -c
  echo
  echo "== Streaming through the second dataplane (port 8081)"
  curl -sSN http://127.0.0.1:8081/v1/chat/completions -H "Content-Type: application/json" \
    -d '{"model": "deepseek-simple", "stream": true, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}'
  echo
  echo "== Unknown model"
  curl -sS http://127.0.0.1:8080/v1/completions -H "Content-Type: application/json" \
    -d '{"model": "no-such-model", "prompt": "x"}'
  echo
}

case "${1:-run}" in
  run) start; trap stop EXIT; requests ;;
  up) start ;;
  down) stop; echo "demo stopped" ;;
  *) echo "usage: $0 run|up|down" >&2; exit 64 ;;
esac
