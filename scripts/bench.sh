#!/usr/bin/env bash
# `make bench`: token-ratelimit side by side with the alternatives, in one run, on loopback.
#
# One Envoy (--concurrency 1) with one listener per variant, the same upstream (llm-simulator, no
# latency) and the same rate-limit service (ratelimit-service), measured one after the other
# while the others are idle:
#   (a) Envoy, no rate limiting
#   (b) Envoy's native envoy.filters.http.ratelimit calling ShouldRateLimit (one call per request),
#       with enable_x_ratelimit_headers, so that it adds the same three x-ratelimit-* headers
#       to the response as (c) does (checked on the first request)
#   (c) token-ratelimit in admission mode checkReport (CheckRateLimit per request, Report
#       aggregated per tick), non-streaming
#   (c-r) token-ratelimit in admission mode reservation (Reserve per request before the upstream,
#       Commit of the actual tokens after it: two calls per request), non-streaming; otherwise
#       (c)'s configuration, so c-r minus c is what the second call costs. Like (c), Envoy does not
#       hand the filter the body before the headers go upstream (no allow_on_headers_stop_iteration),
#       so the reservation holds reservation.defaultAmount (256 tokens)
#   (c-l1) (c-r) with leases (rateLimitService.lease): the worker Reserves a larger amount for
#       the one hot counter (x-user: bench-user) and admits its requests from it, without a call;
#       the lease is renewed (a Reserve) in the background, and committed (the tokens spent
#       under it) when replaced. Checked on a leased request: it adds x-ratelimit-* as (c-r) does
#   (c-lN) (c-l1)'s configuration with BENCH_LEASE_USERS (1,000) users round-robin, x-user
#       bench-user-<i> (i = the request's number mod 1,000), the same connections: one lease each.
#       Under wrk its warm-up is repeated (5 times at most) until every user has its lease
#   Lease settings of both: fraction 0.1 of the never-reached budget, so that a lease holds the
#       default maxAmount (1,000,000 tokens, ~4,000 reservation amounts); minRequests 2: a user
#       asks for its lease on its second request, so two rounds over the users lease them all;
#       ttl BENCH_LEASE_TTL (300 s), so that the steady state is what is measured: a lease is
#       renewed once half its ttl is over (and given up when idle that long), and the callgrind
#       pass runs Envoy ~50x slower: a round over the 1,000 users takes 18-36 s there, and a lease
#       asked in the warm-up's second round is that old when the measured round uses it. Half the
#       ttl outlives that several times over, so that every measured request is a leased
#       admission and no lease is renewed meanwhile (the service's calls during the measured
#       round are shown, and a line says so when Reserves were made). Under wrk the leases
#       (c-lN's) are as young and are not renewed either; (c-l1)'s is renewed each time half its
#       room is spent (~23,000 requests). The service caps a hold at --max-reservation-ttl (60 s
#       by default) while the filter keeps the lease for the ttl it asked: the service is given
#       --max-reservation-ttl BENCH_LEASE_TTL when that is longer
#   (d) token-ratelimit, checkReport, streaming ("stream": true; the filter adds include_usage)
#   (e) Envoy, no rate limiting, the streaming requests of (d): (d)'s baseline
#   (n) on request only (BENCH_VARIANTS): token-ratelimit where no limit applies (no check call)
# Load: wrk (Debian package, installed when missing) POSTing a chat completion, bounded in time.
# Envoy's CPU time per request: utime+stime of the Envoy process (/proc/PID/stat) over the
# measured interval, divided by the requests wrk completed in it.
#
# Knobs (environment): BENCH_DURATION (s, default 10), BENCH_WARMUP (s, 2), BENCH_CONNECTIONS
# (32), BENCH_PORT_BASE (19000), BENCH_PIN (1: Envoy on CPU 0, the rest on the other CPUs,
# when there are at least 2), BENCH_VARIANTS (default "a b c c-r c-l1 c-lN d e"), BENCH_LEASE_USERS (1000:
# (c-lN)'s users), BENCH_LEASE_TTL (s, 300: the lease ttl), ENVOY (default .venv/bin/envoy),
# CARGO_TARGET_DIR (default target: where the module and the binaries are built and found),
# BENCH_WASM (a module to measure instead of building $CARGO_TARGET_DIR/wasm32-wasip1/release/token_ratelimit.wasm),
# BENCH_WASM_BASELINE (another module, e.g. an older build: variants C, D and N are c, d and n
# with it, in the same Envoy, for a side-by-side comparison), BENCH_PERF (1: `perf record` Envoy during each measured run, into .run/bench/perf-<variant>.data;
# its CPU figures then include perf's overhead), BENCH_CALLGRIND (1, the default when valgrind is
# installable: a second pass counts the instructions Envoy executes per request under valgrind's
# callgrind, BENCH_CALLGRIND_REQUESTS (300) sequential requests per variant on one connection,
# after 100 to warm up; (c-lN): round-robin over its users, after two rounds to warm up (every
# user then has its lease), whole rounds of at least BENCH_CALLGRIND_REQUESTS, measured;
# instruction counts do not depend on what else the machine is doing, unlike CPU time).
# Rate-limit calls per request: per variant and per method (CheckRateLimit, Report,
# ShouldRateLimit, Reserve, Commit), from the service's /metrics over each measured run; for
# (c-l1) and (c-lN) also the requests admitted from a lease (Envoy's stat
# wasmcustom.token_ratelimit.requests_leased) per request.
# Builds what it needs (installs wrk and valgrind from Debian when missing); the last four lines
# of its output are `instructions b/c: X.XX`, `instructions b/c-r: X.XX`, `instructions b/c-l1:
# X.XX` and `instructions b/c-lN: X.XX` (without callgrind, the last line is `ratio c/b: X.XX`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${BENCH_DURATION:-10}
WARMUP=${BENCH_WARMUP:-2}
CONNECTIONS=${BENCH_CONNECTIONS:-32}
BASE=${BENCH_PORT_BASE:-19000}
PIN=${BENCH_PIN:-1}
VARIANTS=${BENCH_VARIANTS:-a b c c-r c-l1 c-lN d e}
USERS=${BENCH_LEASE_USERS:-1000}
LEASE_TTL=${BENCH_LEASE_TTL:-300}
ENVOY=${ENVOY:-.venv/bin/envoy}
PROFILE=bench-tools
OUT=.run/bench
mkdir -p "$OUT"

PORT_A=$((BASE + 80)) PORT_B=$((BASE + 81)) PORT_C=$((BASE + 82)) PORT_D=$((BASE + 83)) PORT_N=$((BASE + 84))
PORT_C0=$((BASE + 85)) PORT_D0=$((BASE + 86)) PORT_N0=$((BASE + 87)) PORT_CR=$((BASE + 88))
PORT_CL1=$((BASE + 89)) PORT_CLN=$((BASE + 90))
ADMIN=$((BASE + 901)) RLS_GRPC=$((BASE + 181)) RLS_HTTP=$((BASE + 182)) SIM=$((BASE + 190))

log() { echo "bench: $*" >&2; }

# --- prerequisites ------------------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
  log "installing wrk (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y wrk >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; }
fi
CALLGRIND=${BENCH_CALLGRIND:-1}
if [ "$CALLGRIND" = 1 ] && ! command -v valgrind >/dev/null 2>&1; then
  log "installing valgrind (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get install -y valgrind >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y valgrind >/dev/null; } \
    || { log "valgrind could not be installed: no instruction counts"; CALLGRIND=0; }
fi
command -v curl >/dev/null || { log "curl is needed"; exit 1; }
[ -x "$ENVOY" ] || make --no-print-directory envoy >&2
rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1 >&2
log "building the wasm module (release) and the services (profile $PROFILE)"
[ -n "${BENCH_WASM:-}" ] || cargo build --quiet --release --target wasm32-wasip1 --lib >&2
cargo build --quiet --profile "$PROFILE" -p ratelimit-service -p llm-simulator --bins >&2
cargo build --quiet -p token-ratelimit-cli --bin token-ratelimit >&2
TARGET=$(realpath "${CARGO_TARGET_DIR:-$ROOT/target}")
WASM=$(realpath "${BENCH_WASM:-$TARGET/wasm32-wasip1/release/token_ratelimit.wasm}")
BASELINE=${BENCH_WASM_BASELINE:+$(realpath "$BENCH_WASM_BASELINE")}
BIN=$TARGET/$PROFILE
TOOL=$TARGET/debug/token-ratelimit

for port in $PORT_A $PORT_B $PORT_C $PORT_D $PORT_N $PORT_C0 $PORT_D0 $PORT_N0 $PORT_CR $PORT_CL1 $PORT_CLN $ADMIN $RLS_GRPC $RLS_HTTP $SIM; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    log "port $port on 127.0.0.1 is in use (set BENCH_PORT_BASE)"; exit 1
  fi
done

# --- configuration ------------------------------------------------------------------------
# The plugin configuration of (c) and (d): a typical policy (a path predicate, a per-user
# counter from a header), with a budget no run can spend. Admission mode checkReport, named:
# the default (auto) would reserve, and (c), (d) stay comparable with earlier recorded runs.
cat > "$OUT/plugin.yaml" <<EOF
rateLimitService: {cluster: ratelimit, domain: llm, timeout: 1s, failureMode: deny, mode: checkReport}
limits:
  per-user:
    rates: [{limit: 1000000000000000, window: 1h}]
    when:
    - predicate: request.path == "/v1/chat/completions"
    counters:
    - expression: request.headers["x-user"]
EOF
"$TOOL" limits "$OUT/plugin.yaml" | grep -v '^#' > "$OUT/limits.yaml"
# (b)'s descriptor: generic_key "bench" + the x-user header, the same per-user counter.
cat >> "$OUT/limits.yaml" <<EOF
- namespace: llm
  name: native
  max_value: 1000000000000000
  seconds: 3600
  conditions: ["descriptors[0]['generic_key'] == 'bench'"]
  variables: ["descriptors[0]['user']"]
EOF
PLUGIN_JSON=$("$TOOL" json "$OUT/plugin.yaml" | tr -d '\n')
# (c-r): the same policy in admission mode reservation.
sed 's|mode: checkReport|mode: reservation|' "$OUT/plugin.yaml" > "$OUT/plugin-reservation.yaml"
grep -q 'mode: reservation' "$OUT/plugin-reservation.yaml" || { log "no mode in $OUT/plugin.yaml"; exit 1; }
PLUGIN_RES_JSON=$("$TOOL" json "$OUT/plugin-reservation.yaml" | tr -d '\n')
# (c-l1) and (c-lN): (c-r) with leases (settings: see the top). Only when one of them is
# measured (a module without leases refuses the configuration).
LEASES=0
case " $VARIANTS " in *" c-l1 "* | *" c-lN "*) LEASES=1 ;; esac
if [ "$LEASES" = 1 ]; then
  sed "s|mode: reservation}|mode: reservation, lease: {fraction: 0.1, minRequests: 2, ttl: ${LEASE_TTL}s}}|" \
    "$OUT/plugin-reservation.yaml" > "$OUT/plugin-lease.yaml"
  grep -q 'lease:' "$OUT/plugin-lease.yaml" || { log "no lease in $OUT/plugin-lease.yaml"; exit 1; }
  PLUGIN_LEASE_JSON=$("$TOOL" json "$OUT/plugin-lease.yaml" | tr -d '\n')
fi
# (n), a diagnostic: the same filter where no limit applies (no check call).
sed 's|request.path == "/v1/chat/completions"|request.path == "/nothing"|' "$OUT/plugin.yaml" > "$OUT/plugin-none.yaml"
PLUGIN_NONE_JSON=$("$TOOL" json "$OUT/plugin-none.yaml" | tr -d '\n')

hcm() { # name port route-extra filters
  cat <<EOF
  - name: $1
    address: {socket_address: {address: 127.0.0.1, port_value: $2}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $1
          route_config:
            virtual_hosts:
            - name: llm
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route:
                  cluster: llm
                  timeout: 60s
$3
          http_filters:
$4
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
EOF
}
NATIVE_ROUTE='                  rate_limits:
                  - actions:
                    - generic_key: {descriptor_value: bench}
                    - request_headers: {header_name: x-user, descriptor_key: user}'
NATIVE_FILTER='          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: llm
              timeout: 1s
              failure_mode_deny: true
              enable_x_ratelimit_headers: DRAFT_VERSION_03
              rate_limit_service:
                transport_api_version: V3
                grpc_service: {envoy_grpc: {cluster_name: ratelimit}}'
WASM_FILTER="          - name: envoy.filters.http.wasm
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: token-ratelimit
                root_id: token-ratelimit
                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: token-ratelimit
                  runtime: envoy.wasm.runtime.v8
                  code: {local: {filename: $WASM}}
                configuration:
                  \"@type\": type.googleapis.com/google.protobuf.StringValue
                  value: '$PLUGIN_JSON'"
{
  cat <<EOF
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: $ADMIN}}
static_resources:
  listeners:
EOF
  hcm plain "$PORT_A" "" ""
  hcm native "$PORT_B" "$NATIVE_ROUTE" "$NATIVE_FILTER"
  hcm token "$PORT_C" "" "$WASM_FILTER"
  hcm token_stream "$PORT_D" "" "$WASM_FILTER"
  hcm token_none "$PORT_N" "" "${WASM_FILTER//"$PLUGIN_JSON"/"$PLUGIN_NONE_JSON"}"
  hcm token_reservation "$PORT_CR" "" "${WASM_FILTER//"$PLUGIN_JSON"/"$PLUGIN_RES_JSON"}"
  if [ "$LEASES" = 1 ]; then
    hcm token_lease_one "$PORT_CL1" "" "${WASM_FILTER//"$PLUGIN_JSON"/"$PLUGIN_LEASE_JSON"}"
    hcm token_lease_users "$PORT_CLN" "" "${WASM_FILTER//"$PLUGIN_JSON"/"$PLUGIN_LEASE_JSON"}"
  fi
  if [ -n "$BASELINE" ]; then
    # The same listeners with another module (BENCH_WASM_BASELINE), in a VM of its own.
    base_filter=${WASM_FILTER//"$WASM"/"$BASELINE"}
    base_filter=${base_filter//"vm_id: token-ratelimit"/"vm_id: token-ratelimit-baseline"}
    hcm token_base "$PORT_C0" "" "$base_filter"
    hcm token_stream_base "$PORT_D0" "" "$base_filter"
    hcm token_none_base "$PORT_N0" "" "${base_filter//"$PLUGIN_JSON"/"$PLUGIN_NONE_JSON"}"
  fi
  cat <<EOF
  clusters:
  - name: llm
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: llm
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $SIM}}}}]}]
  - name: ratelimit
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: ratelimit
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: $RLS_GRPC}}}}]}]
EOF
} > "$OUT/envoy.yaml"

# The request every variant sends: `body plain` or `body stream`.
body() {
  local s=false
  [ "$1" = stream ] && s=true
  printf '{"model":"sim","messages":[{"role":"user","content":"hello there"}],"max_tokens":20,"stream":%s}' "$s"
}
# Where each variant sends it: sets PORT, KIND (plain or stream) and LUA (wrk's script).
target() {
  LUA=""
  case $1 in
    a) PORT=$PORT_A KIND=plain ;; b) PORT=$PORT_B KIND=plain ;; c) PORT=$PORT_C KIND=plain ;;
    d) PORT=$PORT_D KIND=stream ;; e) PORT=$PORT_A KIND=stream ;; n) PORT=$PORT_N KIND=plain ;;
    c-r) PORT=$PORT_CR KIND=plain ;; c-l1) PORT=$PORT_CL1 KIND=plain ;;
    c-lN) PORT=$PORT_CLN KIND=plain LUA=plain-users ;;
    C) PORT=$PORT_C0 KIND=plain ;; D) PORT=$PORT_D0 KIND=stream ;; N) PORT=$PORT_N0 KIND=plain ;;
    *) log "unknown variant $1"; exit 1 ;;
  esac
  LUA=${LUA:-$KIND}
}
for variant in stream plain plain-users; do
  cat > "$OUT/$variant.lua" <<EOF
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.body = '$(body "${variant%-users}")'
wrk.headers["content-type"] = "application/json"
wrk.headers["x-user"] = "bench-user"
EOF
  if [ "$variant" = plain-users ]; then
    # (c-lN): x-user bench-user-<i>, i = the request's number mod $USERS (one Lua state: -t1).
    cat >> "$OUT/$variant.lua" <<EOF
local i = -1
request = function()
  i = (i + 1) % $USERS
  wrk.headers["x-user"] = "bench-user-" .. i
  return wrk.format()
end
EOF
  fi
  cat >> "$OUT/$variant.lua" <<EOF
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
EOF
done

# --- processes ----------------------------------------------------------------------------
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

ncpu=$(nproc)
if [ "$PIN" = 1 ] && [ "$ncpu" -ge 2 ] && command -v taskset >/dev/null; then
  PIN_ENVOY="taskset -c 0" PIN_REST="taskset -c 1-$((ncpu - 1))"
else
  PIN_ENVOY="" PIN_REST=""
fi

# The leases' hold must last their ttl: the service caps it at --max-reservation-ttl (60 s).
RLS_TTL=()
[ "$LEASES" = 1 ] && [ "$LEASE_TTL" -gt 60 ] && RLS_TTL=(--max-reservation-ttl "$LEASE_TTL")
$PIN_REST "$BIN/ratelimit-service" "$OUT/limits.yaml" -b 127.0.0.1 -p "$RLS_GRPC" \
  --http-ip 127.0.0.1 --http-port "$RLS_HTTP" "${RLS_TTL[@]}" > "$OUT/ratelimit-service.log" 2>&1 &
pids+=($!)
$PIN_REST "$BIN/llm-simulator" --listen "127.0.0.1:$SIM" > "$OUT/llm-simulator.log" 2>&1 &
pids+=($!)
$PIN_ENVOY "$ENVOY" -c "$OUT/envoy.yaml" --concurrency 1 -l warning > "$OUT/envoy.log" 2>&1 &
ENVOY_PID=$!
pids+=("$ENVOY_PID")

for _ in $(seq 1 150); do
  [ "$(curl -s "127.0.0.1:$ADMIN/ready" 2>/dev/null)" = LIVE ] \
    && curl -sf "127.0.0.1:$RLS_HTTP/status" >/dev/null 2>&1 \
    && curl -s -o /dev/null "127.0.0.1:$SIM/" 2>/dev/null && break
  sleep 0.2
done
[ "$(curl -s "127.0.0.1:$ADMIN/ready" 2>/dev/null)" = LIVE ] || { log "envoy did not start: $OUT/envoy.log"; cat "$OUT/envoy.log" >&2; exit 1; }
# .venv/bin/envoy execs the real binary: the pid is Envoy's.
grep -q envoy "/proc/$ENVOY_PID/comm" || { log "pid $ENVOY_PID is not envoy"; exit 1; }

# The service's calls so far: "<all> <reports> <checks> <ShouldRateLimit> <reserves> <commits>".
rls_calls() {
  curl -s "127.0.0.1:$RLS_HTTP/metrics" | awk '
    /^ratelimit_(check|report|should_rate_limit|reserve|commit)_calls_total / {n += $2}
    /^ratelimit_report_calls_total / {r += $2} /^ratelimit_check_calls_total / {c += $2}
    /^ratelimit_should_rate_limit_calls_total / {s += $2} /^ratelimit_reserve_calls_total / {v += $2}
    /^ratelimit_commit_calls_total / {m += $2}
    END {print n + 0, r + 0, c + 0, s + 0, v + 0, m + 0}'
}
fstat() { curl -s "127.0.0.1:$ADMIN/stats?filter=token_ratelimit" | awk -v k="$1" -F': ' '$1 ~ "token_ratelimit." k "$" {print $2; f=1} END {if (!f) print 0}'; }
# Whether Envoy has the stat token_ratelimit.<name> (the module defines it on first use).
has_fstat() { curl -s "127.0.0.1:$ADMIN/stats?filter=token_ratelimit" | grep "token_ratelimit\.$1:" > /dev/null; }
probe() { # port user: one request, its headers in $OUT/probe.headers
  local code
  code=$(curl -s -D "$OUT/probe.headers" -o "$OUT/probe.out" -w '%{http_code}' "127.0.0.1:$1/v1/chat/completions" \
    -H 'content-type: application/json' -H "x-user: $2" -d "$(body plain)")
  [ "$code" = 200 ] || { log "listener $1 answered $code: $(cat "$OUT/probe.out")"; exit 1; }
}
probe_headers() { # port what
  grep -qi '^x-ratelimit-remaining:' "$OUT/probe.headers" \
    || { log "listener $1 added no x-ratelimit-remaining header$2"; cat "$OUT/probe.headers" >&2; exit 1; }
}
# A first request through each listener: everything answers 200.
for port in $PORT_A $PORT_B $PORT_C $PORT_D $PORT_N $PORT_CR ${BASELINE:+$PORT_C0 $PORT_D0 $PORT_N0}; do
  probe "$port" bench-user
  # (b), (c) and (c-r) do the same work for the client: they add x-ratelimit-{limit,remaining,reset}.
  if [ "$port" = "$PORT_B" ] || [ "$port" = "$PORT_C" ] || [ "$port" = "$PORT_CR" ]; then
    probe_headers "$port" ""
  fi
done
# (c-l1) and (c-lN) too, on a request admitted from a lease: a user's first request makes its
# own Reserve, the second too and asks for the lease; a request the service saw no Reserve for
# (its count unchanged, the lease's own call answered meanwhile) was a leased admission.
reserves() { rls_calls | cut -d' ' -f5; }
if [ "$LEASES" = 1 ]; then
  for port in $PORT_CL1 $PORT_CLN; do
    probe "$port" bench-user-probe
    probe_headers "$port" " (a request with its own Reserve)"
    leased=no
    for _ in $(seq 1 20); do
      before=$(reserves)
      probe "$port" bench-user-probe
      sleep 0.2
      if [ "$(reserves)" = "$before" ]; then leased=yes; break; fi
    done
    [ "$leased" = yes ] || { log "listener $port: every request made its own Reserve (no lease)"; exit 1; }
    probe_headers "$port" " to a request admitted from a lease"
  done
fi

cpu_ticks() { awk '{print $14 + $15}' "/proc/$ENVOY_PID/stat"; }
HZ=$(getconf CLK_TCK)

# The leases' counters so far: "<requests_leased> <leases_granted> <leases_renewed>".
lease_stats() {
  curl -s "127.0.0.1:$ADMIN/stats?filter=token_ratelimit" | awk -F': ' '
    $1 ~ /token_ratelimit\.requests_leased$/ {l = $2} $1 ~ /token_ratelimit\.leases_granted$/ {g = $2}
    $1 ~ /token_ratelimit\.leases_renewed$/ {r = $2} END {print l + 0, g + 0, r + 0}'
}
declare -A RPS P50 P99 CPU CALLS REPORTS N METHODS LEASED
run() { # variant port lua
  local v=$1 port=$2 lua=$3 gw0
  read -r _ gw0 _ < <(lease_stats)
  $PIN_REST wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" -s "$OUT/$lua.lua" "http://127.0.0.1:$port" > /dev/null 2>&1 || true
  sleep 0.3
  if [ "$lua" = plain-users ]; then
    # (c-lN): warmed up until every user has its lease (two rounds each), a few times at most.
    local tries=0 g
    while read -r _ g _ < <(lease_stats) && [ $((g - gw0)) -lt "$USERS" ] && [ $((tries += 1)) -le 5 ]; do
      $PIN_REST wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" -s "$OUT/$lua.lua" "http://127.0.0.1:$port" > /dev/null 2>&1 || true
      sleep 0.3
    done
  fi
  local c0 r0 k0 s0 v0 m0 t0 r l0 g0 w0
  read -r l0 g0 w0 < <(lease_stats)
  read -r c0 r0 k0 s0 v0 m0 < <(rls_calls); t0=$(cpu_ticks)
  local perf_pid=""
  if [ "${BENCH_PERF:-0}" = 1 ]; then
    perf record -q -F 999 -g -p "$ENVOY_PID" -o "$OUT/perf-$v.data" -- sleep "$DURATION" > /dev/null 2>&1 &
    perf_pid=$!
  fi
  r=$($PIN_REST wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 5s -s "$OUT/$lua.lua" "http://127.0.0.1:$port" | tee "$OUT/wrk-$v.txt" | grep '^RESULT')
  [ -z "$perf_pid" ] || wait "$perf_pid" || true
  local t1; t1=$(cpu_ticks)
  sleep 0.3 # the last tick's reports
  local c1 r1 k1 s1 v1 m1; read -r c1 r1 k1 s1 v1 m1 < <(rls_calls)
  local l1 g1 w1; read -r l1 g1 w1 < <(lease_stats)
  local n dur p50 p99 errs non2xx
  field() { echo "$r" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  n=$(field requests); dur=$(field duration_us); p50=$(field p50_us); p99=$(field p99_us)
  errs=$(field errors); non2xx=$(field non2xx)
  if [ "$n" -eq 0 ] || [ "$errs" -ne 0 ] || [ "$non2xx" -ne 0 ]; then
    log "($v): $n requests, $errs socket errors, $non2xx non-2xx answers: see $OUT/wrk-$v.txt"; exit 1
  fi
  RPS[$v]=$(awk -v n="$n" -v d="$dur" 'BEGIN {printf "%.0f", n / (d / 1e6)}')
  P50[$v]=$(awk -v x="$p50" 'BEGIN {printf "%.2f", x / 1000}')
  P99[$v]=$(awk -v x="$p99" 'BEGIN {printf "%.2f", x / 1000}')
  CPU[$v]=$(awk -v t="$((t1 - t0))" -v hz="$HZ" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
  CALLS[$v]=$(awk -v c="$((c1 - c0))" -v n="$n" 'BEGIN {printf "%.3f", c / n}')
  REPORTS[$v]=$((r1 - r0)) N[$v]=$n
  LEASED[$v]=$(awk -v l="$((l1 - l0))" -v n="$n" -v g="$((g1 - g0))" -v gw="$((g0 - gw0))" -v w="$((w1 - w0))" \
    'BEGIN {printf "%.3f leased admissions per request; leases granted %d (%d in the warm-up), renewed %d", l / n, g, gw, w}')
  METHODS[$v]=$(awk -v n="$n" -v k="$((k1 - k0))" -v r="$((r1 - r0))" -v s="$((s1 - s0))" -v v="$((v1 - v0))" -v m="$((m1 - m0))" \
    'BEGIN {printf "CheckRateLimit %.3f, Report %.4f, ShouldRateLimit %.3f, Reserve %.3f, Commit %.3f", k / n, r / n, s / n, v / n, m / n}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$v" "${RPS[$v]}" "${P50[$v]}" "${P99[$v]}" "${CPU[$v]}" "${CALLS[$v]}" >> "$OUT/results.tsv"
}

LOAD0=$(cut -d" " -f1-3 /proc/loadavg)
: > "$OUT/results.tsv" # every measured run: variant, req/s, p50 ms, p99 ms, CPU us/req, calls/req
checked0=$(fstat requests_checked); missing0=$(fstat usage_missing)
for v in $VARIANTS; do
  target "$v"
  run "$v" "$PORT" "$LUA"
done
checked=$(( $(fstat requests_checked) - checked0 )); missing=$(( $(fstat usage_missing) - missing0 ))
LEASE_STAT=0
has_fstat requests_leased && LEASE_STAT=1
tokens=$(fstat tokens_reported.total); reports=$(fstat reports_sent)

# --- instruction counts (callgrind) ---------------------------------------------------------
# The same Envoy configuration again, under valgrind's callgrind, with instrumentation on only
# while each variant's requests run: Envoy's instructions per request, with the event loop, the
# wasm VM (V8's compiled code included) and the gRPC calls, the same on every run of the same
# binaries whatever else the machine does. Requests are sequential on one connection.
# (c-lN) is measured in its steady state: its users round-robin, after two rounds over them
# (the first makes each user's own Reserve, the second asks for its lease), so that every
# measured request finds its user's lease; whole rounds are measured, and what the service was
# called for meanwhile (no Reserve: every request leased, no lease renewed) is shown.
declare -A INSTR CG_COUNT CG_CALLS CG_TIME
if [ "$CALLGRIND" = 1 ]; then
  ENVOY_BIN=$(readlink "/proc/$ENVOY_PID/exe")
  kill "$ENVOY_PID" 2>/dev/null; wait "$ENVOY_PID" 2>/dev/null || true
  rm -f "$OUT"/callgrind.out*
  # Reports go out per tick, not per request: under load they amount to a few calls per
  # thousand requests, but these requests are slow (valgrind), so that nearly every tick would
  # carry one. A 10-minute flushPeriod keeps them (and the tick) out of the count.
  for f in plugin plugin-none plugin-reservation ${PLUGIN_LEASE_JSON:+plugin-lease}; do
    { cat "$OUT/$f.yaml"; echo "reporting: {flushPeriod: 10m}"; } > "$OUT/$f-callgrind.yaml"
  done
  cfg=$(cat "$OUT/envoy.yaml")
  cfg=${cfg//"$PLUGIN_JSON"/"$("$TOOL" json "$OUT/plugin-callgrind.yaml" | tr -d '\n')"}
  cfg=${cfg//"$PLUGIN_NONE_JSON"/"$("$TOOL" json "$OUT/plugin-none-callgrind.yaml" | tr -d '\n')"}
  cfg=${cfg//"$PLUGIN_RES_JSON"/"$("$TOOL" json "$OUT/plugin-reservation-callgrind.yaml" | tr -d '\n')"}
  if [ "$LEASES" = 1 ]; then
    cfg=${cfg//"$PLUGIN_LEASE_JSON"/"$("$TOOL" json "$OUT/plugin-lease-callgrind.yaml" | tr -d '\n')"}
  fi
  printf '%s\n' "$cfg" > "$OUT/envoy-callgrind.yaml"
  $PIN_ENVOY valgrind --tool=callgrind --instr-atstart=no --smc-check=all-non-file \
    --callgrind-out-file="$OUT/callgrind.out" "$ENVOY_BIN" -c "$OUT/envoy-callgrind.yaml" --concurrency 1 -l warning \
    > "$OUT/envoy-callgrind.log" 2>&1 &
  ENVOY_PID=$!
  pids+=("$ENVOY_PID")
  for _ in $(seq 1 600); do [ "$(curl -s "127.0.0.1:$ADMIN/ready" 2>/dev/null)" = LIVE ] && break; sleep 0.5; done
  [ "$(curl -s "127.0.0.1:$ADMIN/ready" 2>/dev/null)" = LIVE ] || { log "envoy under valgrind did not start: $OUT/envoy-callgrind.log"; exit 1; }
  CG_N=${BENCH_CALLGRIND_REQUESTS:-300} dumps=0
  count() { # port plain|stream requests
    local port=$1 kind=$2 args=() i
    for i in $(seq 1 "$3"); do args+=(-o /dev/null "http://127.0.0.1:$port/v1/chat/completions"); done
    curl -s -w '%{http_code}\n' -H 'content-type: application/json' -H 'x-user: bench-user' \
      -d "$(body "$kind")" \
      "${args[@]}" | sort | uniq -c | awk '{printf "%s%s x %s", (NR > 1 ? ", " : ""), $1, $2}'
  }
  # (c-lN)'s requests: count's, but with x-user bench-user-<i>, i = the request's number mod
  # $USERS, still one curl on one keep-alive connection: a config file of one transfer per
  # request (`next` between them), each with its header.
  count_users() { # port plain|stream requests
    local port=$1 i
    body "$2" > "$OUT/callgrind-body.json"
    for ((i = 0; i < $3; i++)); do
      [ "$i" = 0 ] || echo next
      printf 'url = "http://127.0.0.1:%s/v1/chat/completions"\nheader = "content-type: application/json"\n' "$port"
      printf 'header = "x-user: bench-user-%d"\ndata = "@%s"\noutput = "/dev/null"\n' $((i % USERS)) "$OUT/callgrind-body.json"
      printf 'silent\nwrite-out = "%%{http_code}\\n"\n'
    done > "$OUT/callgrind-users.curl"
    curl -K "$OUT/callgrind-users.curl" | sort | uniq -c | awk '{printf "%s%s x %s", (NR > 1 ? ", " : ""), $1, $2}'
  }
  for v in $VARIANTS; do
    target "$v"
    if [ "$LUA" = plain-users ]; then
      # Two rounds to warm up; whole rounds measured, at least CG_N requests.
      cg_n=$(( (CG_N + USERS - 1) / USERS * USERS ))
      counter=count_users warm=$((2 * USERS))
    else
      cg_n=$CG_N counter=count warm=100
    fi
    cg_t0=$(date +%s.%N)
    $counter "$PORT" "$KIND" "$warm" > /dev/null # warm-up, not counted
    sleep 0.3 # the warm-up's last calls answered
    read -r _ _ _ _ cv0 cm0 < <(rls_calls)
    cg_t1=$(date +%s.%N)
    callgrind_control -i on "$ENVOY_PID" > /dev/null 2>&1
    codes=$($counter "$PORT" "$KIND" "$cg_n")
    callgrind_control -i off "$ENVOY_PID" > /dev/null 2>&1
    CG_TIME[$v]=$(awk -v a="$cg_t0" -v b="$cg_t1" -v c="$(date +%s.%N)" 'BEGIN {printf "%.0f s warm-up, %.0f s measured", b - a, c - b}')
    log "($v) under callgrind: ${CG_TIME[$v]}"
    callgrind_control -d "$v" "$ENVOY_PID" > /dev/null 2>&1
    [ "$codes" = "$cg_n x 200" ] || { log "($v) under callgrind: $codes"; exit 1; }
    read -r _ _ _ _ cv1 cm1 < <(rls_calls)
    dump=$OUT/callgrind.out.$((++dumps))
    total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ && !t {gsub(",", "", $1); t = $1} END {print t + 0}')
    INSTR[$v]=$((total / cg_n)) CG_COUNT[$v]=$cg_n
    CG_CALLS[$v]=$(awk -v n="$cg_n" -v v="$((cv1 - cv0))" -v m="$((cm1 - cm0))" 'BEGIN {printf "Reserve %.3f, Commit %.3f", v / n, m / n}')
  done
fi

envoy_version=$("$ENVOY" --version 2>/dev/null | sed -n 's/.*version: [^/]*\/\([0-9.]*\)\/.*/\1/p' | head -1)
cpu_model=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
wasm_size=$(stat -c %s "$WASM")
echo "token-ratelimit benchmark: Envoy ${envoy_version:-?} --concurrency 1, wrk -t1 -c$CONNECTIONS, ${DURATION}s per variant after ${WARMUP}s warm-up"
echo "machine: $ncpu x $cpu_model; load average before: $LOAD0, after: $(cut -d" " -f1-3 /proc/loadavg); pinned: $([ -n "$PIN_ENVOY" ] && echo "envoy cpu 0, rest cpu 1-$((ncpu - 1))" || echo no); wasm module: $wasm_size bytes"
printf '%-38s %9s %8s %8s %14s %10s\n' variant "req/s" "p50 ms" "p99 ms" "envoy CPU/req" "RLS calls/req"
label() { case $1 in a) echo "(a) envoy, no rate limiting";; b) echo "(b) native ratelimit (ShouldRateLimit)";; c) echo "(c) token-ratelimit";; d) echo "(d) token-ratelimit, streaming";;
  c-r) echo "(c-r) token-ratelimit, reservation";; c-l1) echo "(c-l1) reservation, 1 lease";;
  c-lN) echo "(c-lN) reservation, $USERS leases";;
  e) echo "(e) envoy, streaming, no rate limiting";; n) echo "(n) token-ratelimit, no limit applies";;
  C) echo "(C) = (c), baseline module";; D) echo "(D) = (d), baseline module";; N) echo "(N) = (n), baseline module";; esac; }
for v in $VARIANTS; do
  printf '%-38s %9s %8s %8s %11s us %10s\n' "$(label "$v")" "${RPS[$v]}" "${P50[$v]}" "${P99[$v]}" "${CPU[$v]}" "${CALLS[$v]}"
done
if [ "$CALLGRIND" = 1 ]; then
  echo "instructions per request (callgrind, $CG_N sequential requests per variant, Envoy's whole process):"
  for v in $VARIANTS; do
    extra=""
    if [ "$v" = c-l1 ] || [ "$v" = c-lN ]; then
      extra="   [${CG_COUNT[$v]} requests$([ "$v" = c-l1 ] || echo " round-robin after $((2 * USERS))") (${CG_TIME[$v]}); service calls per request meanwhile: ${CG_CALLS[$v]}]"
    fi
    printf '  %-36s %9s%s%s\n' "$(label "$v")" "${INSTR[$v]}" \
      "$([ -n "${INSTR[a]:-}" ] && [ "$v" != a ] && awk -v x="${INSTR[$v]}" -v a="${INSTR[a]}" 'BEGIN {printf "   (+%d over a)", x - a}')" "$extra"
  done
  for v in c-l1 c-lN; do
    # Steady state: every measured request admitted from its lease (no Reserve of its own).
    if [ -n "${CG_CALLS[$v]:-}" ] && ! awk -v c="${CG_CALLS[$v]}" 'BEGIN {split(c, f, "[ ,]+"); exit !(f[2] + 0 < 0.01)}'; then
      echo "($v) under callgrind is not the steady state: ${CG_CALLS[$v]} per request (leases missing or renewed: a longer BENCH_LEASE_TTL?)"
    fi
  done
fi
echo "token-ratelimit: $checked requests checked, $missing without usage (streams cut by wrk at the end of a run), $tokens tokens in $reports reports"
for v in c d; do
  if [ -n "${RPS[$v]:-}" ]; then
    echo "($v): ${REPORTS[$v]} Report calls for ${N[$v]} requests ($(awk -v r="${REPORTS[$v]}" -v n="${N[$v]}" 'BEGIN {printf "%.4f", r / n}') per request): reports are aggregated per tick"
  fi
done
echo "rate-limit calls per request, per method (the service's /metrics over each measured run):"
for v in $VARIANTS; do
  printf '  %-38s %s\n' "$(label "$v")" "${METHODS[$v]}"
done
if [ "$LEASES" = 1 ] && [ "$LEASE_STAT" = 1 ]; then
  echo "requests admitted from a lease (Envoy's stat token_ratelimit.requests_leased over each measured run):"
  for v in c-l1 c-lN; do
    [ -z "${LEASED[$v]:-}" ] || printf '  %-38s %s\n' "$(label "$v")" "${LEASED[$v]}"
  done
fi
if [ -n "${RPS[a]:-}" ] && [ -n "${RPS[c]:-}" ]; then
  echo "cpu c-a: $(awk -v c="${CPU[c]}" -v a="${CPU[a]}" 'BEGIN {printf "%.1f", c - a}') us/req (token-ratelimit with its check call)$( [ -n "${CPU[b]:-}" ] && echo "; c-b: $(awk -v c="${CPU[c]}" -v b="${CPU[b]}" 'BEGIN {printf "%.1f", c - b}') us/req (beyond the native filter's call)")"
  echo "ratio c/a: $(awk -v c="${RPS[c]}" -v a="${RPS[a]}" 'BEGIN {printf "%.2f", c / a}')"
fi
if [ -n "${RPS[d]:-}" ] && [ -n "${RPS[e]:-}" ]; then
  echo "streaming: cpu d-e: $(awk -v d="${CPU[d]}" -v e="${CPU[e]}" 'BEGIN {printf "%.1f", d - e}') us/req; ratio d/e: $(awk -v d="${RPS[d]}" -v e="${RPS[e]}" 'BEGIN {printf "%.2f", d / e}')"
fi
if [ -n "${RPS[c]:-}" ] && [ -n "${RPS[c-r]:-}" ]; then
  echo "reservation: cpu (c-r)-c: $(awk -v r="${CPU[c-r]}" -v c="${CPU[c]}" 'BEGIN {printf "%.1f", r - c}') us/req$(
    [ -n "${RPS[b]:-}" ] && echo "; ratio c-r/b: $(awk -v r="${RPS[c-r]}" -v b="${RPS[b]}" 'BEGIN {printf "%.2f", r / b}')")"
fi
if [ -n "${RPS[c-r]:-}" ] && [ -n "${RPS[c-l1]:-}" ]; then
  echo "leases: cpu (c-l1)-(c-r): $(awk -v l="${CPU[c-l1]}" -v r="${CPU[c-r]}" 'BEGIN {printf "%.1f", l - r}') us/req$(
    [ -n "${RPS[c-lN]:-}" ] && echo ", (c-lN)-(c-r): $(awk -v l="${CPU[c-lN]}" -v r="${CPU[c-r]}" 'BEGIN {printf "%.1f", l - r}') us/req")$(
    [ -n "${RPS[b]:-}" ] && echo "; ratio c-l1/b: $(awk -v l="${RPS[c-l1]}" -v b="${RPS[b]}" 'BEGIN {printf "%.2f", l / b}')")$(
    [ -n "${RPS[b]:-}" ] && [ -n "${RPS[c-lN]:-}" ] && echo ", c-lN/b: $(awk -v l="${RPS[c-lN]}" -v b="${RPS[b]}" 'BEGIN {printf "%.2f", l / b}')")"
fi
if [ -n "${RPS[b]:-}" ] && [ -n "${RPS[c]:-}" ]; then
  echo "ratio c/b: $(awk -v c="${RPS[c]}" -v b="${RPS[b]}" 'BEGIN {printf "%.2f", c / b}')"
fi
# The last lines: the instruction ratios (repeatable, unlike the wall-clock ones above).
if [ "$CALLGRIND" = 1 ] && [ -n "${INSTR[b]:-}" ]; then
  if [ -n "${INSTR[c]:-}" ]; then
    echo "instructions b/c: $(awk -v b="${INSTR[b]}" -v c="${INSTR[c]}" 'BEGIN {printf "%.2f", b / c}') (the ratio c/b a CPU-bound Envoy would reach if time followed instructions)"
  fi
  if [ -n "${INSTR[c-r]:-}" ]; then
    echo "instructions b/c-r: $(awk -v b="${INSTR[b]}" -v c="${INSTR[c-r]}" 'BEGIN {printf "%.2f", b / c}')$(
      [ -n "${INSTR[c]:-}" ] && echo " (c-r - c: $((INSTR[c-r] - INSTR[c])) instructions per request: the second call, Commit, and the reservation's own work)")"
  fi
  for v in c-l1 c-lN; do
    if [ -n "${INSTR[$v]:-}" ]; then
      echo "instructions b/$v: $(awk -v b="${INSTR[b]}" -v c="${INSTR[$v]}" 'BEGIN {printf "%.2f", b / c}')"
    fi
  done
fi
