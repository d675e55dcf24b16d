#!/usr/bin/env bash
# usage: train_only.sh OUT
out=$1; mkdir -p $out
venv_lib="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')"
export LD_LIBRARY_PATH="$venv_lib:${LD_LIBRARY_PATH:-}"
bin=/tmp/mc; xz -dc dist/cuda/metal-candle.xz > $bin; chmod +x $bin
which nsys ncu > $out/tools.txt 2>&1; ls /usr/local/cuda*/bin 2>/dev/null | head -50 >> $out/tools.txt
timeout 120 $bin gpu-test > $out/gpu-test.txt 2>&1; echo "gpu-test rc $?" >> $out/gpu-test.txt
for cfg in smollm2-135m llama-1b; do
  for round in 1 2; do
    timeout 90 $bin bench-train --config $cfg --batch 8 --seq 512 --rank 16 --device cuda --dtype bf16 --json $out/train-$cfg-$round.json > /dev/null 2>&1
  done
  timeout 90 python3 bench/peers/train_peft.py --config $cfg --batch 8 --seq 512 --rank 16 --json $out/train-peft-$cfg.json > /dev/null 2>&1
done
