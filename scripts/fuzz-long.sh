#!/usr/bin/env bash
# A long run of the property-based fuzz targets in tests/fuzz.rs (CI runs 256 fixed-seed cases
# each): CASES cases per target (default 1,000,000), release build, each target's case count and
# time printed by the test itself. Usage: scripts/fuzz-long.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-${CASES:-1000000}}
start=$(date +%s)
PROPTEST_CASES=$cases cargo test --release --test fuzz -- --test-threads=2 --nocapture 2>&1 |
  grep -E "fuzz target|test result|panicked"
echo "wall time: $(( $(date +%s) - start )) s for $cases cases per target"
