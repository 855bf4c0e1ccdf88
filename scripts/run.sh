#!/usr/bin/env bash
# Starts the local stack in the foreground: ratelimit-service (gRPC 127.0.0.1:8081, HTTP
# 127.0.0.1:8082), llm-simulator (127.0.0.1:9000) and Envoy (127.0.0.1:8080, admin 9901) with
# $ENVOY_CONFIG (default envoy/envoy.yaml; e.g. envoy/cost-budget.yaml), whose plugin
# configuration the service's limits are generated from. Ctrl-C stops them all. Run from the
# repository root (`make run` does).
#
# Where ratelimit-service keeps its counters (and reservations):
#   (default)                      in memory: lost when it stops
#   REDIS=1                        in a redis-server started here on 127.0.0.1:$REDIS_PORT
#                                  (default 6379), data in .run/redis, stopped with the rest
#   REDIS_URL=redis://host:port    in that Redis, which is not started or stopped here (it wins
#                                  over REDIS=1)
set -euo pipefail
cd "$(dirname "$0")/.."
ENVOY=${ENVOY:-.venv/bin/envoy}
CONFIG=${ENVOY_CONFIG:-envoy/envoy.yaml}
if [ ! -f "$CONFIG" ]; then
  echo "ENVOY_CONFIG=$CONFIG: no such file" >&2
  exit 1
fi
RUN=.run
mkdir -p "$RUN"

REDIS=${REDIS:-}
REDIS_URL=${REDIS_URL:-}
REDIS_PORT=${REDIS_PORT:-6379}
case "$REDIS" in ''|0|no|false) start_redis= ;; *) start_redis=1 ;; esac
if [ -n "$REDIS_URL" ]; then
  start_redis=  # an external Redis: nothing to start
  storage=(redis "$REDIS_URL")
elif [ -n "$start_redis" ]; then
  if ! [[ "$REDIS_PORT" =~ ^[0-9]+$ ]] || [ "$REDIS_PORT" -lt 1 ] || [ "$REDIS_PORT" -gt 65535 ]; then
    echo "REDIS_PORT=$REDIS_PORT is not a port number" >&2
    exit 1
  fi
  if ! command -v redis-server >/dev/null; then
    echo "REDIS=1 needs redis-server, which is not installed: apt-get install redis-server" >&2
    echo "(or use a Redis you already run: REDIS_URL=redis://host:port make run)" >&2
    exit 1
  fi
  REDIS_URL=redis://127.0.0.1:$REDIS_PORT
  storage=(redis "$REDIS_URL")
else
  storage=()  # ratelimit-service's default storage: memory
fi

pids=()
redis_pid=
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  # Redis last, once nothing uses it (it saves its data to .run/redis as it stops).
  if [ -n "$redis_pid" ]; then kill "$redis_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

ports=(8080 8081 8082 9000 9901)
if [ -n "$start_redis" ]; then ports+=("$REDIS_PORT"); fi
for port in "${ports[@]}"; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port on 127.0.0.1 is in use: stop what listens there first" >&2
    if [ -n "$start_redis" ] && [ "$port" = "$REDIS_PORT" ]; then
      echo "(a Redis? use it with REDIS_URL=redis://127.0.0.1:$port, or start one on another port with REDIS_PORT=...)" >&2
    fi
    exit 1
  fi
done

# One source of truth: the Limitador limits come from the plugin configuration in $CONFIG.
target/debug/token-ratelimit limits "$CONFIG" > "$RUN/limits.yaml"

if [ -n "$start_redis" ]; then
  mkdir -p "$RUN/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --dir "$RUN/redis" \
    > "$RUN/redis.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 1 50); do
    if (exec 3<>/dev/tcp/127.0.0.1/"$REDIS_PORT") 2>/dev/null || ! kill -0 "$redis_pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if ! (exec 3<>/dev/tcp/127.0.0.1/"$REDIS_PORT") 2>/dev/null; then
    echo "redis-server did not start; see $RUN/redis.log" >&2
    exit 1
  fi
fi

target/debug/ratelimit-service -b 127.0.0.1 -p 8081 --http-ip 127.0.0.1 --http-port 8082 \
  "$RUN/limits.yaml" ${storage[@]+"${storage[@]}"} > "$RUN/ratelimit-service.log" 2>&1 &
service_pid=$!
pids+=("$service_pid")
target/debug/llm-simulator --listen 127.0.0.1:9000 > "$RUN/llm-simulator.log" 2>&1 &
pids+=($!)

# The service exits at once when its storage is unreachable (a Redis that is not there).
for _ in $(seq 1 100); do
  if curl -sf 127.0.0.1:8082/status >/dev/null 2>&1 || ! kill -0 "$service_pid" 2>/dev/null; then break; fi
  sleep 0.1
done
if ! curl -sf 127.0.0.1:8082/status >/dev/null 2>&1; then
  echo "ratelimit-service did not start; see $RUN/ratelimit-service.log:" >&2
  tail -n 3 "$RUN/ratelimit-service.log" >&2
  exit 1
fi

"$ENVOY" -c "$CONFIG" --concurrency 2 -l warning --component-log-level wasm:info \
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

if [ "$CONFIG" != envoy/envoy.yaml ]; then
  echo
  echo "token-ratelimit is serving on http://127.0.0.1:8080 with $CONFIG (logs in .run/)."
  echo "Try the requests in the comments at the top of $CONFIG, and:"
  echo
  echo "  curl -s http://127.0.0.1:8082/counters/llm          # the counters in the rate-limit service"
  echo "  curl -s http://127.0.0.1:9901/stats | grep token_ratelimit   # the filter's metrics"
else
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
MSG
fi
echo
if [ -n "$REDIS_URL" ]; then
  if [ -n "$start_redis" ]; then
    cli="redis-cli -p $REDIS_PORT"
    echo "Counters: in Redis at $REDIS_URL (a redis-server started here; data in $RUN/redis,"
    echo "log in $RUN/redis.log). Look at them in Redis:"
  else
    cli="redis-cli -u '$REDIS_URL'"
    echo "Counters: in the Redis at $REDIS_URL (not started or stopped here). Look at them in Redis:"
  fi
  echo
  echo "  $cli --scan     # the keys: counters, counters_of_limit, the holds (,reservations)"
  echo "  $cli --scan --pattern '*,counter:*}' | while read -r k; do echo \"\$($cli get \"\$k\") \$k\"; done"
  echo "                                       # the tokens spent in each counter's window"
else
  echo "Counters: in memory in ratelimit-service (lost when it stops). \`make run REDIS=1\` keeps"
  echo "them in a local Redis."
fi
echo
echo "Press Ctrl-C to stop."
wait
