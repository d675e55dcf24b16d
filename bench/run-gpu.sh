#!/usr/bin/env bash
# One GPU session: the GPU test suite (`metal-candle gpu-test`), `metal-candle bench ops`, the
# PyTorch peer and the comparison, all results under $1 (default ./gpu-results). Expects
# dist/cuda/metal-candle from scripts/build-cuda.sh (optionally as .xz).
#
#   bench/run-gpu.sh OUTDIR [DIST_DIR]
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-gpu-results}"
dist="${2:-$here/../dist/cuda}"
mkdir -p "$out"
log="$out/run.log"
venv_lib="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="${venv_lib:+$venv_lib:}${LD_LIBRARY_PATH:-}"
bins="$(mktemp -d)"
for b in metal-candle; do
  if [ -e "$dist/$b.xz" ]; then xz -dc "$dist/$b.xz" > "$bins/$b"; else cp "$dist/$b" "$bins/$b"; fi
  chmod +x "$bins/$b"
done
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  echo "== GPU tests"
  "$bins/metal-candle" gpu-test 2>&1
  echo "gpu-test exit code: $?"
  echo "== metal-candle bench ops"
  "$bins/metal-candle" bench ops --device cuda --json "$out/metal-candle.json" 2>&1
  echo "bench exit code: $?"
  echo "== PyTorch peer"
  PYTHONUNBUFFERED=1 python3 "$here/peers/pytorch_ops.py" --json "$out/pytorch.json" 2>&1
  echo "pytorch exit code: $?"
  echo "== compare"
  python3 "$here/compare.py" "$out/metal-candle.json" "$out/pytorch.json" --md "$out/compare.md" --png "$out/compare.png" 2>&1 | tail -40
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
} 2>&1 | tee "$log"
