#!/usr/bin/env python3
"""PyTorch peer for `metal-candle bench ops`: the same ops, shapes, dtypes and modes, the
same JSON schema (merge with bench/compare.py).

impl "eager": one Python call per op. impl "graph": the op captured in a CUDA graph (20 calls
per graph), forward only. Timings: latency_us = one call (or one replay of a one-call graph)
then torch.cuda.synchronize(), host clock, median; per_call_us = many calls queued, one
synchronize, median. TF32 is off (matmul and cuDNN), as in candle's default f32 GEMM.

    python3 bench/peers/pytorch_ops.py --json bench/results/pytorch.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    "small": [(1, 128, d, 8) for d in (512, 1024, 2048)],
    "mid": [(4, 512, 4096, 16)],
    "large": [(8, 2048, 4096, 16)],
}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
EPS = 1e-5
SCALE = 2.0


def sync():
    torch.cuda.synchronize()


def timeit(f, budget):
    for _ in range(3):
        f()
    sync()
    lat, start = [], time.perf_counter()
    while len(lat) < 5 or (len(lat) < 200 and time.perf_counter() - start < budget / 2):
        t = time.perf_counter()
        f()
        sync()
        lat.append((time.perf_counter() - t) * 1e6)
    latency = statistics.median(lat)
    per_batch = max(1, min(200, int(2000 / latency)))
    per, start = [], time.perf_counter()
    while len(per) < 5 or (len(per) < 50 and time.perf_counter() - start < budget / 2):
        t = time.perf_counter()
        for _ in range(per_batch):
            f()
        sync()
        per.append((time.perf_counter() - t) * 1e6 / per_batch)
    return latency, statistics.median(per)


def time_graph(f, budget, calls=20):
    """Latency of a one-call graph replay; per-call time of a `calls`-call graph replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            f()
    torch.cuda.current_stream().wait_stream(s)
    g1, gn = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):
        f()
    with torch.cuda.graph(gn):
        for _ in range(calls):
            f()
    latency, _ = timeit(g1.replay, budget / 2)
    _, per = timeit(gn.replay, budget / 2)
    return latency, per / calls


def copy_bandwidth():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    _, per = timeit(lambda: dst.copy_(src), 1.0)
    return 2 * n / (per * 1e-6) / 1e9


def norm_fn(op, w, b):
    n = w.shape[0]
    if op == "softmax":
        return lambda x: torch.softmax(x, dim=-1)
    if op == "rms_norm":
        return lambda x: F.rms_norm(x, (n,), w, EPS)
    return lambda x: F.layer_norm(x, (n,), w, b, EPS)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--shapes", default="small,mid,large")
    p.add_argument("--ops", default="softmax,cross_entropy,rms_norm,layer_norm,lora_delta,lora_linear")
    p.add_argument("--modes", default="fwd,bwd,fwd_bwd")
    p.add_argument("--seconds", type=float, default=0.3)
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    copy_gbps = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbps:.1f} GB/s", flush=True)

    def record(op, shape, dtype, mode, impl, lat, per, nbytes=0.0, flops=0.0):
        bsz, seq, dim, rank = shape
        gbps = nbytes / (per * 1e-6) / 1e9 if nbytes else None
        tflops = flops / (per * 1e-6) / 1e12 if flops else None
        rows.append(dict(op=op, shape=f"{bsz}x{seq}x{dim}", rank=rank, dtype=dtype, mode=mode, impl=impl,
                         latency_us=lat, per_call_us=per, bytes=nbytes, flops=flops, gbps=gbps, tflops=tflops))
        print(f"{op:<12} {bsz}x{seq}x{dim:<6} r{rank:<3} {dtype:<5} {mode:<8} {impl:<10} latency {lat:10.2f} us  "
              f"per call {per:10.2f} us  {gbps or 0:8.1f} GB/s  {tflops or 0:7.2f} TFLOP/s", flush=True)

    for dname in a.dtypes.split(","):
        dt = DTYPES[dname]
        s = torch.tensor([], dtype=dt).element_size()
        for cls in a.shapes.split(","):
            for shape in SHAPES[cls]:
                bsz, seq, n, r = shape
                m = bsz * seq
                x = torch.randn(bsz, seq, n, device="cuda", dtype=dt)
                dy = torch.randn_like(x)
                w = (torch.randn(n, device="cuda") * 0.1 + 1).to(dt)
                b = (torch.randn(n, device="cuda") * 0.1).to(dt)
                A = (torch.randn(n, r, device="cuda") / n ** 0.5).to(dt)
                B = (torch.randn(r, n, device="cuda") * 0.05).to(dt)
                W = (torch.randn(n, n, device="cuda") / n ** 0.5).to(dt)
                for op in a.ops.split(","):
                    linear = op == "lora_linear"
                    for mode in a.modes.split(","):
                        if op == "cross_entropy":
                            # The shape's last dim as the vocabulary, one target per row, as
                            # `metal-candle bench ops` does; per-row losses (reduction="none").
                            t = (torch.arange(m, device="cuda") * 7919) % n
                            gl = torch.ones(m, device="cuda", dtype=torch.float32)

                            def ce(xx):
                                return F.cross_entropy(xx.view(m, n), t, reduction="none")
                            if mode == "fwd":
                                nbytes = m * n * s + 8 * m
                                lat, per = timeit(lambda: ce(x), a.seconds)
                                record(op, shape, dname, mode, "eager", lat, per, nbytes)
                                lat, per = time_graph(lambda: ce(x), a.seconds)
                                record(op, shape, dname, mode, "graph", lat, per, nbytes)
                            elif mode == "bwd":
                                xr = x.clone().requires_grad_(True)
                                loss = ce(xr)
                                glt = gl.to(loss.dtype)
                                nbytes = 2 * m * n * s + 8 * m
                                lat, per = timeit(lambda: torch.autograd.grad(loss, xr, glt, retain_graph=True), a.seconds)
                                record(op, shape, dname, mode, "eager", lat, per, nbytes)
                            else:
                                xr = x.clone().requires_grad_(True)

                                def step():
                                    loss = ce(xr)
                                    loss.backward(gl.to(loss.dtype))
                                lat, per = timeit(step, a.seconds)
                                record(op, shape, dname, mode, "eager", lat, per)
                        elif op in ("softmax", "rms_norm", "layer_norm"):
                            f = norm_fn(op, w, b)
                            if mode == "fwd":
                                nbytes = 2 * m * n * s + 2 * n * s
                                lat, per = timeit(lambda: f(x), a.seconds)
                                record(op, shape, dname, mode, "eager", lat, per, nbytes)
                                lat, per = time_graph(lambda: f(x), a.seconds)
                                record(op, shape, dname, mode, "graph", lat, per, nbytes)
                            elif mode == "bwd":
                                xr = x.clone().requires_grad_(True)
                                y = f(xr)
                                nbytes = 3 * m * n * s + 3 * n * s
                                lat, per = timeit(lambda: torch.autograd.grad(y, xr, dy, retain_graph=True), a.seconds)
                                record(op, shape, dname, mode, "eager", lat, per, nbytes)
                            else:
                                xr = x.clone().requires_grad_(True)
                                wr = w.clone().requires_grad_(True)
                                br = b.clone().requires_grad_(True)
                                g = norm_fn(op, wr, br)

                                # The upstream gradient handed to y, as `metal-candle bench ops` does.
                                def step():
                                    g(xr).backward(dy)
                                lat, per = timeit(step, a.seconds)
                                record(op, shape, dname, mode, "eager", lat, per)
                        else:
                            lora_flops = 2 * m * r * (n + n)
                            base_flops = 2 * m * n * n if linear else 0

                            def fwd(xx, AA, BB):
                                d = (xx @ AA @ BB) * SCALE
                                return xx @ W.t() + d if linear else d
                            if mode == "fwd":
                                nbytes = (2 * m * n + 2 * n * r + (n * n if linear else 0)) * s
                                lat, per = timeit(lambda: fwd(x, A, B), a.seconds)
                                record(op, shape, dname, mode, "eager", lat, per, nbytes, lora_flops + base_flops)
                                lat, per = time_graph(lambda: fwd(x, A, B), a.seconds)
                                record(op, shape, dname, mode, "graph", lat, per, nbytes, lora_flops + base_flops)
                                if linear:
                                    nb = (2 * m * n + n * n) * s
                                    lat, per = timeit(lambda: x @ W.t(), a.seconds)
                                    record(op, shape, dname, mode, "base_gemm", lat, per, nb, base_flops)
                            elif mode == "bwd":
                                xr, Ar, Br = (t.clone().requires_grad_(True) for t in (x, A, B))
                                y = fwd(xr, Ar, Br)
                                flops = 2 * m * r * (3 * n + 2 * n) + base_flops
                                nbytes = (3 * m * n + (n * n if linear else 0)) * s
                                lat, per = timeit(lambda: torch.autograd.grad(y, (xr, Ar, Br), dy, retain_graph=True), a.seconds)
                                record(op, shape, dname, mode, "eager", lat, per, nbytes, flops)
                                if linear:
                                    dy2 = dy.reshape(m, n)
                                    lat, per = timeit(lambda: dy2 @ W, a.seconds)
                                    record(op, shape, dname, mode, "dx_gemm", lat, per, (2 * m * n + n * n) * s, base_flops)
                            else:
                                xr, Ar, Br = (t.clone().requires_grad_(True) for t in (x, A, B))

                                def step():
                                    fwd(xr, Ar, Br).backward(dy)
                                lat, per = timeit(step, a.seconds)
                                record(op, shape, dname, mode, "eager", lat, per)
                del x, dy, W
                torch.cuda.empty_cache()
    doc = dict(meta=dict(framework="pytorch", version=torch.__version__, device="cuda",
                         gpu=torch.cuda.get_device_name(0), command=" ".join(sys.argv), unix_time=int(time.time()),
                         timing="latency_us: one call then synchronize (host clock), median; per_call_us: calls queued, one synchronize, median; graph: CUDA graph replay"),
               copy_gbps=copy_gbps, results=rows)
    tmp = a.json + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, a.json)
    print("wrote", a.json)


if __name__ == "__main__":
    main()
