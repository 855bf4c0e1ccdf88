#!/usr/bin/env bash
# Runs each cargo-fuzz target for FUZZ_SECONDS, one after another, and prints per target the
# executions, executions per second, corpus size and outcome. Used by `make fuzz`.
#
#   FUZZ_SECONDS    seconds per target (default 60)
#   FUZZ_TARGETS    targets to run (default: all six)
#   FUZZ_SANITIZER  none (default) or address. `none` builds on the stable toolchain as is;
#                   address needs `-Zsanitizer=address`, allowed on stable with RUSTC_BOOTSTRAP=1.
#
# Each target starts from the seed corpus in fuzz/corpus/<target> (read only) and from the
# inputs earlier runs found, kept in fuzz/target/corpus/<target>, where new ones are written.
# A crash leaves its input in fuzz/artifacts/<target>/ and makes this script exit non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-config cel_eval usage_json sse check_reply cost}
sanitizer=${FUZZ_SANITIZER:-none}
if [ "$sanitizer" != none ]; then
    export RUSTC_BOOTSTRAP=1
fi

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version '^0.13'

mkdir -p fuzz/target/logs
echo "building the fuzz targets (sanitizer: $sanitizer) ..."
cargo fuzz build -s "$sanitizer" >fuzz/target/logs/build.log 2>&1 || { tail -30 fuzz/target/logs/build.log; exit 1; }

summary=fuzz/target/logs/summary.txt
printf '%-12s %8s %12s %8s %8s  %s\n' target seconds executions exec/s corpus result | tee "$summary"
failed=0
for t in $targets; do
    mkdir -p "fuzz/target/corpus/$t"
    log="fuzz/target/logs/$t.log"
    status=ok
    start=$(date +%s)
    cargo fuzz run -s "$sanitizer" "$t" "fuzz/target/corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || status=crash
    secs=$(( $(date +%s) - start ))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    corpus=$(find "fuzz/target/corpus/$t" -type f | wc -l)
    if [ "$status" = crash ]; then
        failed=1
        status="CRASH: $(sed -n 's/.*Test unit written to \([^ ]*\).*/\1/p' "$log" | head -1) (see $log)"
    fi
    printf '%-12s %8s %12s %8s %8s  %s\n' "$t" "$secs" "${runs:-?}" \
        "$(( ${runs:-0} / (secs > 0 ? secs : 1) ))" "$corpus" "$status" | tee -a "$summary"
done
exit $failed
