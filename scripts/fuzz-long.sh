#!/usr/bin/env bash
# A long run of the property-based fuzz targets in tests/fuzz.rs (CI runs 256 fixed-seed cases
# each in a debug build): CASES cases per target (default 1,000,000) in a release build, with
# each target's case count, time and accept/refuse tally as the test prints it, and the wall time.
# Usage: scripts/fuzz-long.sh [CASES]   (or CASES=N scripts/fuzz-long.sh; PROPTEST_RNG_SEED=N
# for another seed; FUZZ_ERRORS=1 to list the refusals' messages; TMPDIR to choose where the
# inputs are written, /dev/shm by default).
set -uo pipefail
cd "$(dirname "$0")/.."
cases=${1:-${CASES:-1000000}}
# The targets write their inputs to temporary files and famc syncs what it writes: on a memory
# file system a case costs a few hundred microseconds instead of milliseconds of disk syncs.
if [ -z "${TMPDIR:-}" ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
  export TMPDIR=/dev/shm
fi
start=$(date +%s)
PROPTEST_CASES=$cases cargo test --release --test fuzz -- --test-threads=2 --nocapture 2>&1 |
  grep -aE "fuzz target|^ +[0-9]+ x |test result|panicked|FAILED|^error"
status=${PIPESTATUS[0]}
echo "wall time: $(( $(date +%s) - start )) s for $cases cases per target (exit status $status)"
exit "$status"
