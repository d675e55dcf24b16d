#!/usr/bin/env bash
# Session 15's last device run: the GPU tests of the final build (the cluster kernel taken
# out, `bench ops` warming up for a tenth of its budget), the seed's shapes in both dtype
# orders, twice, and Nsight Compute's GPU time of every launch of the one-launch LoRA kernels
# at the seed's shapes: lora_vec (final build) and lora_cluster (CLUSTER_XZ), with the launch
# statistics and occupancy of one lora_cluster launch at f32 1×128×2048.
# Everything lands in OUT/final.tar.gz.
#   bash bench/results/gpu-2026-12-07-session15/final.sh OUT FINAL_XZ CLUSTER_XZ
out=$1; res=$out/final; mkdir -p "$res"
torch_nvidia="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$torch_nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
xz -dc "$2" > /tmp/mc-final; xz -dc "$3" > /tmp/mc-cluster; chmod +x /tmp/mc-final /tmp/mc-cluster
ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)"
run() { local name=$1; shift; echo "== $name ($(date +%T))"; timeout 240 "$@"; echo "== $name: exit code $?"; }
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$res/gpu.txt"
seed() { /tmp/mc-$1 bench ops --device cuda --ops lora_delta --modes fwd --shapes small --dtypes f32,bf16 --seconds 0.02; }
{
run "gpu-test" /tmp/mc-final gpu-test
for round in 1 2; do
  for order in f32,bf16 bf16,f32; do
    run "seed final $order $round" /tmp/mc-final bench ops --device cuda --ops lora_delta,lora_linear --modes fwd \
      --shapes small --dtypes $order --seconds 1 --json "$res/seed-$order-$round.json"
  done
done
for side in final cluster; do
  run "ncu $side" "$ncu" --clock-control none --csv --metrics gpu__time_duration.sum -k regex:lora_ \
    --launch-count 400 /tmp/mc-$side bench ops --device cuda --ops lora_delta --modes fwd --shapes small \
    --dtypes f32,bf16 --seconds 0.02 > "$res/ncu-$side.csv"
done
run "ncu cluster launch" "$ncu" --clock-control none -k regex:lora_cluster_r8_f32 --launch-skip 45 --launch-count 1 \
  --section LaunchStats --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis \
  /tmp/mc-cluster bench ops --device cuda --ops lora_delta --modes fwd --shapes small --dtypes f32 --seconds 0.02 \
  > "$res/ncu-cluster-launch.txt"
run "ncu vec launch" "$ncu" --clock-control none -k regex:lora_vec_r8_f32 --launch-skip 45 --launch-count 1 \
  --section LaunchStats --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis \
  /tmp/mc-final bench ops --device cuda --ops lora_delta --modes fwd --shapes small --dtypes f32 --seconds 0.02 \
  > "$res/ncu-vec-launch.txt"
} > "$res/run.log" 2>&1
python3 - "$res" > "$res/ncu-summary.txt" 2>&1 <<'PY'
import csv, sys, statistics, collections
for side in ("final", "cluster"):
    rows = collections.defaultdict(list)
    try:
        lines = [l for l in open(f"{sys.argv[1]}/ncu-{side}.csv") if l.startswith('"')]
        for r in csv.DictReader(lines):
            if r.get("Metric Name") == "gpu__time_duration.sum":
                rows[(r["Kernel Name"], r["Grid Size"], r["Block Size"], r["Metric Unit"])].append(float(r["Metric Value"].replace(",", "")))
    except Exception as e:
        print(side, "parse failed:", e)
    for key, v in rows.items():
        print(side, *key, "launches", len(v), "median", statistics.median(v), "min", min(v))
PY
tar -C "$out" -czf "$out/final.tar.gz" final && rm -rf "$res"
mkdir -p /tmp/t && tar -C /tmp/t -xzf "$out/final.tar.gz"
cat /tmp/t/final/gpu.txt
grep -E "passed|failed|FAIL|exit code [^0]" /tmp/t/final/run.log | tail -20
grep -E "^== seed|^lora_delta .*fused |^lora_linear .*fused .*latency" /tmp/t/final/run.log | tail -40
cat /tmp/t/final/ncu-summary.txt
grep -E "Duration|Cluster|Block Limit|Achieved Occupancy|Waves|Registers|Grid Size|Block Size|L2 Hit|Memory Throughput" /tmp/t/final/ncu-*-launch.txt
