#!/usr/bin/env bash
# Session 8, one H200: the row-kernel lab (bench/kernel-lab/rowlab.cu: the shipped kernels
# against variants, bf16 8×2048×4096), then the new build's GPU tests and the row ops forward
# and backward at the seed and large shapes, f32 and bf16, against the build before (BASE_XZ),
# interleaved twice.
#   bash bench/results/h200-2026-12-03-session8/verify.sh OUT BASE_XZ
out=$1; base_xz=$2; mkdir -p "$out"
venv_lib="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')"
export LD_LIBRARY_PATH="$venv_lib:${LD_LIBRARY_PATH:-}"
new=/tmp/mc-new; base=/tmp/mc-base
xz -dc dist/cuda/metal-candle.xz > $new; xz -dc "$base_xz" > $base; chmod +x $new $base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 150 "$@"; echo "== $name: exit code $?"; }
{
run "kernel lab" dist/lab/rowlab
run "gpu-test" $new gpu-test
for round in 1 2; do
  for side in base new; do
    exe=$new; [ $side = base ] && exe=$base
    run "row ops $side $round" $exe bench ops --device cuda --ops softmax,rms_norm,layer_norm --modes fwd,bwd \
      --shapes small,large --dtypes f32,bf16 --seconds 0.2 --json "$out/rows-$side-$round.json"
  done
done
} > "$out/run.log" 2>&1
