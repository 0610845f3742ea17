#!/usr/bin/env bash
# The whole test suite on a busy machine: scripts/test.sh (extra arguments go to pytest) beside one
# busy loop per core, at the suite's own priority, so that the suite gets about half the CPU it
# would have. Checks that the suite's waits and time limits hold under load. Prints the elapsed time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cores="$(nproc)"
hogs=()
for _ in $(seq "$cores"); do
  # Each loop also ends if this script is killed before its trap can run.
  ( while kill -0 "$$" 2>/dev/null; do :; done ) &
  hogs+=("$!")
done
trap 'kill "${hogs[@]}" 2>/dev/null || true' EXIT
start="$SECONDS"
status=0
bash scripts/test.sh "$@" || status=$?
echo "test-busy: ${cores} busy loops beside the suite; elapsed $((SECONDS - start)) s; pytest exit status ${status}"
exit "$status"
