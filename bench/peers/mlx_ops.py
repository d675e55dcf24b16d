#!/usr/bin/env python3
"""MLX peer (CUDA backend) for `metal-candle bench ops`: the same ops, shapes and dtypes, the
same JSON schema as pytorch_ops.py (merge with bench/compare.py), impl "mlx".

Ops: softmax (`mx.softmax`), rms_norm (`mx.fast.rms_norm`), layer_norm (`mx.fast.layer_norm`),
lora_delta `scale·(x·A)·B` and lora_linear `x·Wᵀ + scale·(x·A)·B` composed from matmuls (MLX has
no fused LoRA). Modes: fwd, and fwd_bwd (`mx.vjp` with the upstream gradient handed to y, as
`metal-candle bench ops` does; MLX builds the forward and backward as one graph, so there is
no separate backward-only time; the outputs are evaluated with the gradients, as a training
step needs them). f32 matmuls run without TF32 (MLX_ENABLE_TF32=0, set here before MLX loads),
like the PyTorch peer and candle. MLX is lazy: latency_us = one call then `mx.eval` (which
waits for the GPU), host clock, median; per_call_us = a batch of independent calls evaluated
together, median per call.

    python3 bench/peers/mlx_ops.py --json OUT/mlx.json
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("MLX_ENABLE_TF32", "0")
import mlx.core as mx  # noqa: E402

SHAPES = {
    "small": [(1, 128, d, 8) for d in (512, 1024, 2048)],
    "mid": [(4, 512, 4096, 16)],
    "large": [(8, 2048, 4096, 16)],
}
DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16}
EPS = 1e-5
SCALE = 2.0


def timeit(f, budget):
    for _ in range(3):
        mx.eval(f())
    lat, start = [], time.perf_counter()
    while len(lat) < 5 or (len(lat) < 200 and time.perf_counter() - start < budget / 2):
        t = time.perf_counter()
        mx.eval(f())
        lat.append((time.perf_counter() - t) * 1e6)
    latency = statistics.median(lat)
    per_batch = max(1, min(100, int(2000 / latency)))
    per, start = [], time.perf_counter()
    while len(per) < 5 or (len(per) < 50 and time.perf_counter() - start < budget / 2):
        t = time.perf_counter()
        mx.eval([f() for _ in range(per_batch)])
        per.append((time.perf_counter() - t) * 1e6 / per_batch)
    return latency, statistics.median(per)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--shapes", default="small,mid,large")
    p.add_argument("--ops", default="softmax,rms_norm,layer_norm,lora_delta,lora_linear")
    p.add_argument("--modes", default="fwd,fwd_bwd")
    p.add_argument("--seconds", type=float, default=0.3)
    a = p.parse_args()
    rows = []

    def record(op, shape, dtype, mode, impl, lat, per, nbytes=0.0, flops=0.0):
        bsz, seq, dim, rank = shape
        gbps = nbytes / (per * 1e-6) / 1e9 if nbytes else None
        tflops = flops / (per * 1e-6) / 1e12 if flops else None
        rows.append(dict(op=op, shape=f"{bsz}x{seq}x{dim}", rank=rank, dtype=dtype, mode=mode, impl=impl,
                         latency_us=lat, per_call_us=per, bytes=nbytes, flops=flops, gbps=gbps, tflops=tflops))
        print(f"{op:<12} {bsz}x{seq}x{dim:<6} r{rank:<3} {dtype:<5} {mode:<8} {impl:<10} latency {lat:10.2f} us  "
              f"per call {per:10.2f} us  {gbps or 0:8.1f} GB/s  {tflops or 0:7.2f} TFLOP/s", flush=True)

    mx.random.seed(0)
    for dname in a.dtypes.split(","):
        dt = DTYPES[dname]
        s = {"f32": 4, "bf16": 2, "f16": 2}[dname]
        for cls in a.shapes.split(","):
            for shape in SHAPES[cls]:
                bsz, seq, n, r = shape
                m = bsz * seq
                x = mx.random.normal((bsz, seq, n)).astype(dt)
                dy = mx.random.normal((bsz, seq, n)).astype(dt)
                w = (mx.random.normal((n,)) * 0.1 + 1).astype(dt)
                b = (mx.random.normal((n,)) * 0.1).astype(dt)
                A = (mx.random.normal((n, r)) / n ** 0.5).astype(dt)
                B = (mx.random.normal((r, n)) * 0.05).astype(dt)
                W = (mx.random.normal((n, n)) / n ** 0.5).astype(dt)
                mx.eval(x, dy, w, b, A, B, W)
                for op in a.ops.split(","):
                    if op == "softmax":
                        f, args = (lambda xx: mx.softmax(xx, axis=-1, precise=True)), [x]
                    elif op == "rms_norm":
                        f, args = (lambda xx, ww: mx.fast.rms_norm(xx, ww, EPS)), [x, w]
                    elif op == "layer_norm":
                        f, args = (lambda xx, ww, bb: mx.fast.layer_norm(xx, ww, bb, EPS)), [x, w, b]
                    elif op == "lora_delta":
                        f, args = (lambda xx, AA, BB: (xx @ AA @ BB) * SCALE), [x, A, B]
                    elif op == "lora_linear":
                        f, args = (lambda xx, AA, BB: xx @ W.T + (xx @ AA @ BB) * SCALE), [x, A, B]
                    else:
                        raise SystemExit(f"unknown op {op}")
                    lora = op.startswith("lora")
                    flops = 2 * m * r * 2 * n + (2 * m * n * n if op == "lora_linear" else 0)
                    for mode in a.modes.split(","):
                        if mode == "fwd":
                            if lora:
                                nbytes = (2 * m * n + 2 * n * r + (n * n if op == "lora_linear" else 0)) * s
                            else:
                                nbytes = 2 * m * n * s + 2 * n * s
                            lat, per = timeit(lambda: f(*args), a.seconds)
                            record(op, shape, dname, mode, "mlx", lat, per, nbytes, flops if lora else 0.0)
                        elif mode == "fwd_bwd":
                            def step():
                                # Evaluate the outputs too: MLX is lazy and would otherwise skip
                                # the forward work the gradients do not need (x·Wᵀ, y).
                                outs, grads = mx.vjp(f, args, [dy])
                                return outs + grads
                            lat, per = timeit(step, a.seconds)
                            record(op, shape, dname, mode, "mlx", lat, per)
                del x, dy, W
    doc = dict(meta=dict(framework="mlx", version=mx.__version__, device=str(mx.default_device()),
                         command=" ".join(sys.argv), unix_time=int(time.time()),
                         timing="latency_us: one call then mx.eval (host clock), median; per_call_us: independent calls evaluated together, median"),
               results=rows)
    tmp = a.json + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, a.json)
    print("wrote", a.json)


if __name__ == "__main__":
    main()
