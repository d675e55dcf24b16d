#!/usr/bin/env bash
# One GPU session, in two parts that each fit one device call (≤ 10 minutes), all results under
# OUTDIR (default ./gpu-results). Expects dist/cuda/metal-candle from scripts/build-cuda.sh
# (optionally as .xz) and, for the embedding benchmark, dist/minilm (all-MiniLM-L6-v2's folder
# without its weights: both sides use random weights of its config, speed does not depend on them).
#
#   bench/run-gpu.sh OUTDIR ops   # GPU test suite, PEFT fixtures, `bench ops` + PyTorch peer + compare
#   bench/run-gpu.sh OUTDIR e2e   # training, generation and embedding throughput + their peers
#   bench/run-gpu.sh OUTDIR ours  # our side only (ops at the mid/large shapes, training,
#                                 # generation): a re-run after a change, against peers measured before
#   bench/run-gpu.sh OUTDIR ab    # a change measured in one session: the GPU tests, then the row
#                                 # ops' forward, training and generation of
#                                 # dist/cuda/metal-candle-base(.xz) (the build before
#                                 # the change; skipped when absent) and of the new build,
#                                 # interleaved, with the peers
#   bench/run-gpu.sh OUTDIR decode  # the GPU tests, then generation with CUDA graphs and without
#                                 # (interleaved, twice) and transformers, batch 1 and 8
#   MLX_SITE=DIR bench/run-gpu.sh OUTDIR mlx   # ops vs PyTorch and MLX, generation vs mlx-lm and
#                                 # transformers (DIR: MLX unpacked by bench/pack-mlx.sh)
#
# Every step has its own time limit and logs its exit code; a failing step does not stop the
# others (the log says which failed).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$here/.."
out="${1:-gpu-results}"
part="${2:-ops}"
dist="$root/dist"
mkdir -p "$out"
log="$out/run-$part.log"
venv_lib="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="${venv_lib:+$venv_lib:}${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
bin="$(mktemp -d)/metal-candle"
if [ -e "$dist/cuda/metal-candle.xz" ]; then xz -dc "$dist/cuda/metal-candle.xz" > "$bin"; else cp "$dist/cuda/metal-candle" "$bin"; fi
chmod +x "$bin"

# step NAME SECONDS CMD...: runs CMD with a time limit and records how it ended.
step() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name ($(date -u +%T))"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1
  echo "== $name: exit code $? after $((SECONDS - t0)) s"
}

# hf_generate CONFIG BATCH: transformers `generate` on the same config, prompt 128 + 128 new.
hf_generate() {
  step "transformers generate $1 batch $2" 60 python3 "$here/peers/generate_hf.py" \
    --config "$1" --batch "$2" --prompt 128 --new 128 --device cuda --json
}

ops_part() {
  step "GPU tests" 120 "$bin" gpu-test
  local fx="$out/peft"
  mkdir -p "$fx"
  cp -r "$root/crates/metal-candle/tests/fixtures/peft/." "$fx/"
  ln -sfn "$root/crates/metal-candle/tests/fixtures/llama_gqa_tied" "$out/llama_gqa_tied"
  step "PEFT fixtures" 90 python3 "$root/crates/metal-candle/tests/fixtures/make_peft_fixtures.py" "$fx"
  rm -f "$out/llama_gqa_tied"
  step "metal-candle bench ops" 200 "$bin" bench ops --device cuda --seconds 0.2 --json "$out/metal-candle.json"
  step "PyTorch peer (ops)" 120 python3 "$here/peers/pytorch_ops.py" --seconds 0.2 --json "$out/pytorch.json"
  step "compare" 40 python3 "$here/compare.py" "$out/metal-candle.json" "$out/pytorch.json" \
    --md "$out/compare.md" --png "$out/compare.png"
}

e2e_part() {
  for cfg in smollm2-135m llama-1b; do
    step "bench-train $cfg" 90 "$bin" bench-train --config "$cfg" --batch 8 --seq 512 --rank 16 \
      --device cuda --dtype bf16 --json "$out/train-$cfg.json"
    step "PEFT peer train $cfg" 90 python3 "$here/peers/train_peft.py" --config "$cfg" --batch 8 \
      --seq 512 --rank 16 --json "$out/train-peft-$cfg.json"
  done
  for cfg in smollm2-135m llama-1b; do
    step "bench generate $cfg" 90 "$bin" bench generate --config "$cfg" --batch 1,8 --prompt 128 \
      --new 128 --device cuda --dtype bf16 --json
    for b in 1 8; do
      hf_generate "$cfg" "$b"
    done
  done
  if [ -d "$dist/minilm" ]; then
    for dt in f32 bf16; do
      step "bench embed $dt" 60 "$bin" bench embed --model "$dist/minilm" --random-weights \
        --batch-size 32 --device cuda --dtype "$dt" --json
      step "sentence-transformers embed $dt" 90 python3 "$here/peers/embed_st.py" \
        --model "$dist/minilm" --random-weights --device cuda --dtype "$dt" --batch-size 32 --json
    done
  fi
}

ab_part() {
  local base sides="base new"
  base="$(mktemp -d)/metal-candle-base"
  if [ -e "$dist/cuda/metal-candle-base.xz" ]; then xz -dc "$dist/cuda/metal-candle-base.xz" > "$base";
  elif [ -e "$dist/cuda/metal-candle-base" ]; then cp "$dist/cuda/metal-candle-base" "$base";
  else echo "no base build: the new build only, against the peers"; sides="new"; fi
  chmod +x "$base" 2>/dev/null
  step "GPU tests" 120 "$bin" gpu-test
  # The row ops' forward kernels at every shape class, both builds, interleaved twice.
  for round in 1 2; do
    for side in $sides; do
      local exe="$bin"; [ "$side" = base ] && exe="$base"
      step "bench ops (row ops) $side $round" 90 "$exe" bench ops --device cuda --ops softmax,rms_norm,layer_norm \
        --modes fwd --seconds 0.2 --json "$out/ops-$side-$round.json"
    done
  done
  for cfg in smollm2-135m llama-1b; do
    for round in 1 2; do
      for side in $sides; do
        local exe="$bin"; [ "$side" = base ] && exe="$base"
        step "bench-train $cfg $side $round" 90 "$exe" bench-train --config "$cfg" --batch 8 --seq 512 \
          --rank 16 --device cuda --dtype bf16 --json "$out/train-$side-$cfg-$round.json"
      done
    done
    step "PEFT peer train $cfg" 90 python3 "$here/peers/train_peft.py" --config "$cfg" --batch 8 \
      --seq 512 --rank 16 --json "$out/train-peft-$cfg.json"
  done
  for cfg in smollm2-135m llama-1b; do
    for side in $sides; do
      local exe="$bin"; [ "$side" = base ] && exe="$base"
      step "bench generate $cfg $side" 90 "$exe" bench generate --config "$cfg" --batch 1,8 \
        --prompt 128 --new 128 --device cuda --dtype bf16 --json
    done
    for b in 1 8; do
      hf_generate "$cfg" "$b"
    done
  done
}

# MLX (CUDA backend) and mlx-lm, unpacked by bench/pack-mlx.sh into $MLX_SITE: the ops at the
# seed and large shapes (ours, PyTorch and MLX in one run, merged by compare.py), then
# generation (ours, mlx-lm, transformers).
mlx_part() {
  local torch_nvidia
  torch_nvidia="$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])')"
  export PYTHONPATH="${MLX_SITE:?set MLX_SITE to the unpacked MLX folder}${PYTHONPATH:+:$PYTHONPATH}"
  export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:$torch_nvidia/cudnn/lib:$torch_nvidia/nccl/lib:$LD_LIBRARY_PATH"
  step "MLX import" 60 python3 -c 'import mlx.core as mx, mlx_lm; print(mx.__version__, mlx_lm.__version__, mx.default_device(), (mx.ones(3) + 1).tolist())'
  step "MLX peer (ops)" 150 python3 "$here/peers/mlx_ops.py" --shapes small,large --seconds 0.2 --json "$out/mlx.json"
  step "metal-candle bench ops" 150 "$bin" bench ops --device cuda --seconds 0.2 --shapes small,large \
    --json "$out/metal-candle.json"
  step "PyTorch peer (ops)" 120 python3 "$here/peers/pytorch_ops.py" --seconds 0.2 --shapes small,large \
    --json "$out/pytorch.json"
  step "compare" 40 python3 "$here/compare.py" "$out/metal-candle.json" "$out/pytorch.json" "$out/mlx.json" \
    --md "$out/compare.md" --png "$out/compare.png"
  for cfg in smollm2-135m llama-1b; do
    step "bench generate $cfg" 90 "$bin" bench generate --config "$cfg" --batch 1,8 --prompt 128 \
      --new 128 --device cuda --dtype bf16 --json
    for b in 1 8; do
      step "mlx-lm generate $cfg batch $b" 90 python3 "$here/peers/generate_mlx.py" \
        --config "$cfg" --batch "$b" --prompt 128 --new 128 --json
      hf_generate "$cfg" "$b"
    done
  done
}

decode_part() {
  step "GPU tests" 150 "$bin" gpu-test
  for cfg in smollm2-135m llama-1b; do
    for round in 1 2; do
      step "bench generate $cfg graphs $round" 90 "$bin" bench generate --config "$cfg" --batch 1,8 \
        --prompt 128 --new 128 --device cuda --dtype bf16 --json
      step "bench generate $cfg no-graphs $round" 90 "$bin" bench generate --config "$cfg" --batch 1,8 \
        --prompt 128 --new 128 --device cuda --dtype bf16 --no-cuda-graphs --json
    done
    for b in 1 8; do
      hf_generate "$cfg" "$b"
    done
  done
}

ours_part() {
  step "metal-candle bench ops (mid, large)" 200 "$bin" bench ops --device cuda --seconds 0.2 \
    --shapes mid,large --modes fwd,bwd --json "$out/metal-candle-ours.json"
  for cfg in smollm2-135m llama-1b; do
    step "bench-train $cfg" 90 "$bin" bench-train --config "$cfg" --batch 8 --seq 512 --rank 16 \
      --device cuda --dtype bf16 --json "$out/train-ours-$cfg.json"
    step "bench generate $cfg" 90 "$bin" bench generate --config "$cfg" --batch 1,8 --prompt 128 \
      --new 128 --device cuda --dtype bf16 --json
  done
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  case "$part" in
    ops) ops_part ;;
    e2e) e2e_part ;;
    ours) ours_part ;;
    ab) ab_part ;;
    mlx) mlx_part ;;
    decode) decode_part ;;
    *) echo "unknown part $part (ops, e2e, ours, ab, mlx or decode)"; exit 2 ;;
  esac
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
} 2>&1 | tee "$log"
