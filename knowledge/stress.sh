#!/usr/bin/env bash
# The knowledge base's stress run (outside CI): the crash test with 500 SIGKILLs and the
# update/remove churn with 10 000 operations, each run twice at once so that they load the
# machine. Every run must pass; the figures are printed at the end of each.
#
#   knowledge/stress.sh            GAIA_CRASH_KILLS and GAIA_CHURN_OPS override the counts
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${GAIA_CRASH_KILLS:-500}
ops=${GAIA_CHURN_OPS:-10000}
out=${TMPDIR:-/tmp}/gaia-kb-stress
mkdir -p "$out"
cargo test --release -p gaia-knowledge --test it --no-run
run() { # name, filter, extra test-binary flag ("" or --ignored), env...
  local name=$1 filter=$2 ignored=$3; shift 3
  local start; start=$(date +%s)
  if env "$@" cargo test -q --release -p gaia-knowledge --test it "$filter" -- $ignored --exact --nocapture \
      >"$out/$name.log" 2>&1 && grep -q "1 passed" "$out/$name.log"; then
    echo "$name: passed in $(( $(date +%s) - start )) s"
  else
    echo "$name: FAILED after $(( $(date +%s) - start )) s (log: $out/$name.log)"; return 1
  fi
}
crash=crash::acknowledged_documents_survive_sigkill_at_random_moments
status=0
run crash-a "$crash" "" GAIA_CRASH_KILLS="$kills" & a=$!
run crash-b "$crash" "" GAIA_CRASH_KILLS="$kills" & b=$!
wait $a || status=1; wait $b || status=1
run churn-a churn::churn_stress --ignored GAIA_CHURN_OPS="$ops" & a=$!
run churn-b churn::churn_stress --ignored GAIA_CHURN_OPS="$ops" & b=$!
wait $a || status=1; wait $b || status=1
grep -h "crash test (seed\|^churn:" "$out"/*.log || true
exit $status
