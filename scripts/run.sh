#!/usr/bin/env bash
# Starts the local stack in the foreground: ratelimit-service (gRPC 127.0.0.1:8081, HTTP
# 127.0.0.1:8082), llm-simulator (127.0.0.1:9000) and Envoy (127.0.0.1:8080, admin 9901) with
# envoy/envoy.yaml. Ctrl-C stops them all. Run from the repository root (`make run` does).
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY=${ENVOY:-.venv/bin/envoy}
RUN=.run
mkdir -p "$RUN"

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

for port in 8080 8081 8082 9000 9901; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port on 127.0.0.1 is in use: stop what listens there first" >&2
    exit 1
  fi
done

# One source of truth: the Limitador limits come from the plugin configuration in envoy.yaml.
target/debug/token-ratelimit limits envoy/envoy.yaml > "$RUN/limits.yaml"

target/debug/ratelimit-service "$RUN/limits.yaml" -b 127.0.0.1 -p 8081 --http-ip 127.0.0.1 --http-port 8082 \
  > "$RUN/ratelimit-service.log" 2>&1 &
pids+=($!)
target/debug/llm-simulator --listen 127.0.0.1:9000 > "$RUN/llm-simulator.log" 2>&1 &
pids+=($!)
"$ENVOY" -c envoy/envoy.yaml --concurrency 2 -l warning --component-log-level wasm:info \
  > >(tee "$RUN/envoy.log") 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  if [ "$(curl -s 127.0.0.1:9901/ready 2>/dev/null)" = "LIVE" ]; then break; fi
  sleep 0.2
done
if [ "$(curl -s 127.0.0.1:9901/ready 2>/dev/null)" != "LIVE" ]; then
  echo "envoy did not start; see $RUN/envoy.log" >&2
  exit 1
fi

cat <<'MSG'

token-ratelimit is serving on http://127.0.0.1:8080 (logs in .run/). Try:

  # a free user (50 tokens per minute): 200 until the budget is spent, then 429
  curl -i http://127.0.0.1:8080/v1/chat/completions \
    -H 'Authorization: APIKEY iamafreeuser' -H 'content-type: application/json' \
    -d '{"model":"sim","messages":[{"role":"user","content":"hello there"}],"max_tokens":20}'

  # a gold user (200 tokens per minute)
  curl -i http://127.0.0.1:8080/v1/chat/completions \
    -H 'Authorization: APIKEY iamagolduser' -H 'content-type: application/json' \
    -d '{"model":"sim","messages":[{"role":"user","content":"hello there"}],"max_tokens":20}'

  curl -s http://127.0.0.1:8082/counters/llm          # the counters in the rate-limit service
  curl -s http://127.0.0.1:9901/stats | grep token_ratelimit   # the filter's metrics

Press Ctrl-C to stop.
MSG
wait
