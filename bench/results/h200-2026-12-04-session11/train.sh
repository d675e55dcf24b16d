#!/usr/bin/env bash
# Session 11: LoRA training throughput of the merged-weight build against session 10's,
# interleaved twice (SmolLM2-135M and Llama-3.2-1B shapes, batch 8 × 512 tokens, rank 16, bf16).
#   bash bench/results/h200-2026-12-04-session11/train.sh OUT NEW_XZ BASE_XZ
out=$1; mkdir -p "$out"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
xz -dc "$2" > /tmp/mc-new; xz -dc "$3" > /tmp/mc-base; chmod +x /tmp/mc-new /tmp/mc-base
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 200 "$@"; echo "== $name: exit code $?"; }
{
for round in 1 2; do
  for cfg in smollm2-135m llama-1b; do
    for side in new base; do
      run "bench-train $cfg $side $round" /tmp/mc-$side bench-train --config $cfg --batch 8 --seq 512 --rank 16 \
        --device cuda --dtype bf16 --json "$out/train-$side-$cfg-$round.json"
    done
  done
done
} > "$out/run.log" 2>&1
for f in "$out"/train-*.json; do echo "$(basename "$f" .json) $(python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['tokens_per_s']))" "$f")"; done | tee "$out/train-tokens-per-s.txt"
grep "exit code" "$out/run.log" | grep -v "code 0"
