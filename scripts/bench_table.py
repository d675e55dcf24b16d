#!/usr/bin/env python3
"""Turn criterion's results for the `ops_cpu` bench into the markdown table of BENCHMARKS.md.

Usage: python3 scripts/bench_table.py [target/criterion]

For every op, shape and pass it prints the median time of each variant, the fused kernel's
achieved bandwidth (bytes read + written once, as criterion's throughput) and its ratio to the
parallel memory copy of the same bytes timed in the same run, and the speedups of the fused
kernel over candle's unfused composition and candle-nn's fused forward.
"""
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
OPS = ["softmax", "rms_norm", "layer_norm", "lora_delta", "lora_linear"]
SHAPES = ["1x128x512", "1x128x1024", "1x128x2048", "4x512x4096"]


def median_ns(group, variant, shape):
    path = os.path.join(root, group, variant, shape, "new", "estimates.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["median"]["point_estimate"]


def elems(shape):
    n = 1
    for d in shape.split("x"):
        n *= int(d)
    return n


def fmt_us(ns):
    return "—" if ns is None else f"{ns / 1e3:.1f}"


print("| op | pass | shape | fused µs | unfused µs | candle-nn µs | copy µs | fused GB/s | % of copy | vs unfused | vs candle-nn |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for op in OPS:
    for pass_ in ["forward", "forward_backward"]:
        group = os.path.join(op.replace("/", "_"), pass_)
        group = f"{op}_{pass_}"
        for shape in SHAPES:
            fused = median_ns(group, "fused", shape)
            if fused is None:
                continue
            unfused = median_ns(group, "reference", shape)
            extra = median_ns(group, "candle_nn", shape) or median_ns(group, "base_gemm", shape)
            copy = median_ns(f"{op}_forward", "copy", shape)
            nbytes = 2 * elems(shape) * 4
            gbs = nbytes / fused if pass_ == "forward" else None
            pct = (copy / fused * 100) if (copy and pass_ == "forward") else None
            print(
                f"| {op} | {pass_.replace('_', '+')} | {shape} | {fmt_us(fused)} | {fmt_us(unfused)} | "
                f"{fmt_us(extra)} | {fmt_us(copy) if pass_ == 'forward' else '—'} | "
                f"{'—' if gbs is None else f'{gbs:.1f}'} | {'—' if pct is None else f'{pct:.0f}%'} | "
                f"{'—' if not unfused else f'{unfused / fused:.2f}x'} | {'—' if not extra else f'{extra / fused:.2f}x'} |"
            )
