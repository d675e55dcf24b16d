#!/usr/bin/env bash
# The last build of session 7 (LayerNorm's two statistics forms folded into sums about one
# centre), one H200: its GPU tests, then the row ops forward and backward at the seed and large
# shapes, f32 and bf16, against the session's base build, interleaved twice.
#   bash bench/results/h200-2026-12-03-session7/verify.sh OUT BASE_XZ
out=$1; base_xz=$2; mkdir -p "$out"
venv_lib="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')"
export LD_LIBRARY_PATH="$venv_lib:${LD_LIBRARY_PATH:-}"
new=/tmp/mc-new; base=/tmp/mc-base
xz -dc dist/cuda/metal-candle.xz > $new; xz -dc "$base_xz" > $base; chmod +x $new $base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 150 "$@"; echo "== $name: exit code $?"; }
{
run "gpu-test" $new gpu-test
for round in 1 2; do
  for side in base new; do
    exe=$new; [ $side = base ] && exe=$base
    run "row ops $side $round" $exe bench ops --device cuda --ops softmax,rms_norm,layer_norm --modes fwd,bwd \
      --shapes small,large --dtypes f32,bf16 --seconds 0.2 --json "$out/rows-$side-$round.json"
  done
done
} > "$out/run.log" 2>&1
