#!/usr/bin/env python3
"""Merge benchmark JSON files (metal-candle `bench ops --json`, bench/peers/*.py) into one
markdown table and one PNG chart, and check the CUDA targets of the project.

    python3 bench/compare.py bench/results/h200/*.json --md out.md --png out.png

Each input row is (op, shape, rank, dtype, mode, impl); a column is "framework:impl".
"""
import argparse
import json
import sys
from collections import OrderedDict


def load(paths):
    docs, rows = [], []
    for p in paths:
        with open(p) as fh:
            d = json.load(fh)
        fw = d["meta"]["framework"]
        docs.append((p, d))
        for r in d["results"]:
            rows.append(dict(r, framework=fw, column=f"{fw}:{r['impl']}", copy_gbps=d.get("copy_gbps")))
    return docs, rows


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--md", required=True)
    ap.add_argument("--png")
    a = ap.parse_args()
    docs, rows = load(a.files)
    columns = list(OrderedDict.fromkeys(r["column"] for r in rows))
    keys = list(OrderedDict.fromkeys((r["op"], r["shape"], r["rank"], r["dtype"], r["mode"]) for r in rows))
    by = {(r["op"], r["shape"], r["rank"], r["dtype"], r["mode"], r["column"]): r for r in rows}
    out = ["# Benchmark comparison", ""]
    for p, d in docs:
        m = d["meta"]
        out.append(f"- `{p}`: {m.get('framework')} {m.get('version', '')} on {m.get('gpu') or m.get('device')}, "
                   f"copy {fmt(d.get('copy_gbps'))} GB/s; `{m.get('command', '')}`")
    out += ["", "Cells: per-call µs (calls queued, one sync) / call latency µs (one call, then wait); "
            "GB/s or TFLOP/s of the per-call time in brackets.", ""]
    out.append("| op | shape | dtype | mode | " + " | ".join(columns) + " |")
    out.append("|---|---|---|---|" + "---|" * len(columns))
    for k in keys:
        cells = []
        for c in columns:
            r = by.get(k + (c,))
            if r is None:
                cells.append("")
                continue
            extra = f" ({fmt(r['gbps'], 0)} GB/s)" if r.get("gbps") and not r.get("tflops") else ""
            extra = f" ({fmt(r['tflops'], 1)} TF/s)" if r.get("tflops") and r["tflops"] > 1 else extra
            cells.append(f"{fmt(r['per_call_us'])} / {fmt(r['latency_us'])}{extra}")
        op, shape, rank, dtype, mode = k
        label = f"{shape} r{rank}" if op.startswith("lora") else shape
        out.append(f"| {op} | {label} | {dtype} | {mode} | " + " | ".join(cells) + " |")
    out += ["", "## Targets", ""] + targets(by, docs)
    text = "\n".join(out) + "\n"
    with open(a.md, "w") as fh:
        fh.write(text)
    print(text)
    if a.png:
        chart(rows, a.png)


def get(by, op, shape, rank, dtype, mode, column):
    r = by.get((op, shape, rank, dtype, mode, column))
    return r


def targets(by, docs):
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    copy = next((d.get("copy_gbps") for _, d in docs if d["meta"]["framework"] == "metal-candle"), None)
    big, rk = "8x2048x4096", 16
    for dtype in ("f32", "bf16"):
        for op in ("rms_norm", "layer_norm", "softmax"):
            f = get(by, op, big, rk, dtype, "fwd", "metal-candle:fused") or get(by, op, big, None, dtype, "fwd", "metal-candle:fused")
            if f is None:
                continue
            frac = f["gbps"] / copy if copy else None
            lines.append(f"| {op} fwd {big} {dtype} ≥ 85% of copy ({fmt(copy)} GB/s) | {fmt(f['gbps'])} GB/s = {fmt(frac * 100 if frac else None)}% | {'met' if frac and frac >= 0.85 else 'MISSED'} |")
            pt = get(by, op, big, f["rank"], dtype, "fwd", "pytorch:eager")
            if pt:
                lines.append(f"| {op} fwd {big} {dtype} faster than PyTorch eager | {fmt(f['per_call_us'])} vs {fmt(pt['per_call_us'])} µs | {'met' if f['per_call_us'] < pt['per_call_us'] else 'MISSED'} |")
            bw = get(by, op, big, f["rank"], dtype, "bwd", "metal-candle:fused")
            if bw:
                frac = bw["gbps"] / copy if copy else None
                lines.append(f"| {op} bwd {big} {dtype} ≥ 70% of copy | {fmt(bw['gbps'])} GB/s = {fmt(frac * 100 if frac else None)}% | {'met' if frac and frac >= 0.70 else 'MISSED'} |")
    for dtype in ("bf16", "f32"):
        f = get(by, "lora_linear", big, rk, dtype, "fwd", "metal-candle:fused")
        g = get(by, "lora_linear", big, rk, dtype, "fwd", "metal-candle:base_gemm")
        if f and g:
            ratio = f["per_call_us"] / g["per_call_us"]
            lines.append(f"| lora_linear fwd {big} r16 {dtype} ≤ 1.10× base GEMM | {ratio:.3f}× ({fmt(f['per_call_us'])} vs {fmt(g['per_call_us'])} µs) | {'met' if ratio <= 1.10 else 'MISSED'} |")
        f = get(by, "lora_linear", big, rk, dtype, "bwd", "metal-candle:fused")
        g = get(by, "lora_linear", big, rk, dtype, "bwd", "metal-candle:dx_gemm")
        if f and g:
            ratio = f["per_call_us"] / g["per_call_us"]
            lines.append(f"| lora_linear bwd {big} r16 {dtype} ≤ 1.15× dX GEMM | {ratio:.3f}× ({fmt(f['per_call_us'])} vs {fmt(g['per_call_us'])} µs) | {'met' if ratio <= 1.15 else 'MISSED'} |")
    for dtype in ("f32", "bf16"):
        for d in (512, 1024, 2048):
            for op in ("lora_delta", "lora_linear"):
                f = get(by, op, f"1x128x{d}", 8, dtype, "fwd", "metal-candle:fused")
                if f:
                    lines.append(f"| {op} 1x128x{d} r8 {dtype} call latency ≤ 15 µs | {fmt(f['latency_us'])} µs | {'met' if f['latency_us'] <= 15 else 'MISSED'} |")
    return lines


def chart(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = [r for r in rows if r["mode"] == "fwd" and r["shape"] == "8x2048x4096"]
    if not sel:
        sel = [r for r in rows if r["mode"] == "fwd"]
    groups = list(OrderedDict.fromkeys((r["op"], r["dtype"]) for r in sel))
    cols = list(OrderedDict.fromkeys(r["column"] for r in sel))
    fig, ax = plt.subplots(figsize=(max(8, len(groups) * 1.4), 5))
    width = 0.8 / max(1, len(cols))
    for i, c in enumerate(cols):
        ys = []
        for g in groups:
            r = next((r for r in sel if (r["op"], r["dtype"]) == g and r["column"] == c), None)
            ys.append(r["per_call_us"] if r else 0)
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=c)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{o}\n{d}" for o, d in groups], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("per-call time, µs (log; lower is better)")
    ax.set_title("forward, 8x2048x4096 (LoRA r16)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
