#!/usr/bin/env bash
# End-to-end check of dynrt's GPU path, for a machine with NVIDIA GPUs.
#
#   UNVERIFIED HERE: dynrt's development and CI machines have no GPU. This script is what a
#   GPU machine runs to check the GPU path; its results are not part of any figure the
#   project quotes.
#
#   deploy/gpu-check.sh compose [MODEL]   the compose stack: images built, profile gpu1 or
#                                         gpu (2 GPUs), a request through the load balancer,
#                                         one worker container killed mid-stream (2+ GPUs)
#   deploy/gpu-check.sh bare [MODEL]      no Docker: etcd, NATS, a frontend and one
#                                         `dynrt worker --engine vllm` per GPU (its own
#                                         CUDA_VISIBLE_DEVICES), a request, a worker
#                                         SIGKILLed mid-stream (2+ GPUs)
#
# MODEL defaults to Qwen/Qwen2.5-0.5B-Instruct. Needs: nvidia-smi; for `compose`, Docker
# with the NVIDIA Container Toolkit and the compose v2 plugin (or DOCKER_COMPOSE=path);
# for `bare`, this checkout's .venv with `pip install -e '.[local,vllm]'`. HF_TOKEN is
# passed on for gated models. Exit 0 only when every check passed.
set -euo pipefail
MODE="${1:-compose}"
MODEL="${2:-Qwen/Qwen2.5-0.5B-Instruct}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PORT="${DYNRT_HTTP_PORT:-8000}"
fail() { echo "gpu-check: FAIL: $*" >&2; exit 1; }
say() { echo "gpu-check: $*" >&2; }

command -v nvidia-smi >/dev/null || fail "no nvidia-smi: not a GPU machine"
GPUS="$(nvidia-smi -L | grep -c '^GPU ')"
[ "$GPUS" -ge 1 ] || fail "nvidia-smi lists no GPU"
say "$GPUS GPU(s); model $MODEL; mode $MODE"

# One streamed chat completion of 200 tokens: prints the number of content chunks.
stream() {  # stream URL KEY
  python3 - "$1" "$2" "$MODEL" <<'EOF'
import json, sys, urllib.request
url, key, model = sys.argv[1:]
body = json.dumps({"model": model, "stream": True, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                   "messages": [{"role": "user", "content": "Count from one to one hundred in words."}]}).encode()
headers = {"Content-Type": "application/json"}
if key:
    headers["Authorization"] = f"Bearer {key}"
chunks, done, finish = 0, False, None
with urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", body, headers), timeout=600) as r:
    for line in r:
        line = line.decode().strip()
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            if "error" in event:
                sys.exit(f"stream error: {event['error']}")
            for choice in event.get("choices", []):
                chunks += bool(choice.get("delta", {}).get("content"))
                finish = choice.get("finish_reason") or finish
if not done or finish != "length":
    sys.exit(f"stream ended badly: done={done} finish_reason={finish}")
print(chunks)
EOF
}

wait_url() {  # wait_url URL SECONDS
  local deadline=$((SECONDS + $2))
  until python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3)" "$1" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "$1 not ready after $2 s"
    sleep 5
  done
}

case "$MODE" in
compose)
  COMPOSE="${DOCKER_COMPOSE:-docker compose}"
  PROFILE=gpu1; [ "$GPUS" -ge 2 ] && PROFILE=gpu
  cd "$ROOT/deploy/compose"
  ../scripts/gen-secrets.sh >/dev/null
  KEY="$(cat secrets/api-key)"
  export MODEL HF_TOKEN="${HF_TOKEN:-}" DYNRT_HTTP_PORT="$PORT" DYNRT_PUBLISH_ADDRESS=127.0.0.1
  trap '$COMPOSE --profile $PROFILE down --timeout 10' EXIT
  $COMPOSE --profile "$PROFILE" build
  say "docker compose --profile $PROFILE up --wait (weights download and load: minutes)"
  $COMPOSE --profile "$PROFILE" up --wait --wait-timeout 1800
  # Each worker container sees exactly one GPU, and no two see the same one.
  seen=""
  for c in $($COMPOSE --profile "$PROFILE" ps -q vllm-worker-0 vllm-worker-1 2>/dev/null); do
    uuid="$(docker exec "$c" nvidia-smi --query-gpu=uuid --format=csv,noheader)"
    [ "$(echo "$uuid" | wc -l)" = 1 ] || fail "container $c sees $(echo "$uuid" | wc -l) GPUs"
    case "$seen" in *"$uuid"*) fail "two workers share GPU $uuid" ;; esac
    seen="$seen $uuid"
  done
  say "workers on distinct GPUs:$seen"
  say "one request: $(stream "http://127.0.0.1:$PORT" "$KEY") content chunks"
  if [ "$GPUS" -ge 2 ]; then
    out="$(mktemp)"
    stream "http://127.0.0.1:$PORT" "$KEY" > "$out" &
    pid=$!
    sleep 2
    docker kill "$($COMPOSE --profile "$PROFILE" ps -q vllm-worker-0)" >/dev/null
    wait "$pid" || fail "the stream did not survive a worker kill"
    say "stream survived a worker kill: $(cat "$out") content chunks"
  fi
  ;;
bare)
  BIN="$ROOT/.venv/bin"
  [ -x "$BIN/dynrt" ] || fail "no $BIN/dynrt: python3 -m venv .venv && .venv/bin/pip install -e '.[local,vllm]'"
  WORKERS=1; [ "$GPUS" -ge 2 ] && WORKERS=2
  state="$(mktemp -d)"
  pids=""
  trap 'kill $pids 2>/dev/null; wait 2>/dev/null' EXIT
  "$BIN/etcd" --data-dir "$state/etcd" --listen-client-urls http://127.0.0.1:23790 \
    --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800 > "$state/etcd.log" 2>&1 &
  pids="$pids $!"
  "$BIN/nats-server" -a 127.0.0.1 -p 42220 > "$state/nats.log" 2>&1 &
  pids="$pids $!"
  common=(--etcd-endpoints 127.0.0.1:23790 --nats-url nats://127.0.0.1:42220)
  "$BIN/dynrt" frontend --http-port "$PORT" "${common[@]}" > "$state/frontend.log" 2>&1 &
  pids="$pids $!"
  worker_pids=""
  for i in $(seq 0 $((WORKERS - 1))); do
    # One GPU per worker: CUDA_VISIBLE_DEVICES names it.
    CUDA_VISIBLE_DEVICES="$i" "$BIN/dynrt" worker --engine vllm --model "$MODEL" "${common[@]}" \
      > "$state/worker-$i.log" 2>&1 &
    worker_pids="$worker_pids $!"
  done
  pids="$pids $worker_pids"
  say "workers loading (logs in $state)"
  wait_url "http://127.0.0.1:$PORT/health" 1800
  say "one request: $(stream "http://127.0.0.1:$PORT" "") content chunks"
  if [ "$WORKERS" -ge 2 ]; then
    stream "http://127.0.0.1:$PORT" "" > "$state/stream.out" &
    pid=$!
    sleep 2
    kill -9 $(echo "$worker_pids" | awk '{print $1}')
    wait "$pid" || fail "the stream did not survive a worker kill"
    say "stream survived a worker kill: $(cat "$state/stream.out") content chunks"
  fi
  ;;
*)
  fail "usage: deploy/gpu-check.sh compose|bare [MODEL]"
  ;;
esac
say "PASS"
