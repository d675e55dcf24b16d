//! `metal-candle bench ops`: times every fused op against candle's unfused composition and
//! candle-nn's fused forward, per shape and dtype, on the CPU or a CUDA GPU.
//!
//! For each (op, shape, dtype, mode, implementation) it reports
//! - `latency_us`: one call, then wait for the result (`Device::synchronize`), median (after
//!   a tenth of the time budget of warm-up calls);
//! - `host_us`: within those calls, the time until the call returned (before the wait), median:
//!   the host's share of the latency (on a GPU, queuing the work; on the CPU, all of it);
//! - `per_call_us`: many calls queued, one wait at the end, divided by the count, median;
//! - `gbps` (bytes that must move: every input read once, every output written once, over
//!   `per_call_us`) and `tflops` for the GEMM-bound rows.
//!
//! For the LoRA linear layer it also times the fused layer against the bare GEMM in alternating
//! batches (`interleaved_ratios` in the JSON: both medians and the median ratio), so that the
//! ratio does not carry the GPU clock's drift between two separate measurements.
//!
//! Modes: `fwd`; `bwd` (the fused backward kernels called directly with a random upstream
//! gradient, LayerNorm's with the row statistics and the LoRA ops' with the projections their
//! forward passes keep in training; CUDA only), and `fwd_bwd` (forward, then candle's autograd
//! from y with a fixed upstream gradient r, through `metal_candle::autograd::backward_with`: the same for every
//! implementation, and without the multiply, sum and their backward that a `sum(y ⊙ r)` loss
//! would add). The run also measures
//! the device-to-device copy bandwidth (bytes read + written), the ceiling for the
//! memory-bound ops. The JSON schema is shared with `bench/peers/*.py` and merged by
//! `bench/compare.py`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use metal_candle::autograd::backward_with;
use metal_candle::ops;
use serde_json::{json, Value};

use super::bench::median;

type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Time the fused ops (forward, backward) against candle's unfused and candle-nn's paths.
#[derive(clap::Args, Debug)]
pub struct OpsArgs {
    /// `cpu` or `cuda` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Write all results as JSON to this file (schema shared with bench/peers).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Comma-separated dtypes.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16")]
    dtypes: Vec<String>,
    /// Comma-separated ops: softmax, cross_entropy (the shape's last dim as the vocabulary),
    /// rms_norm, layer_norm, lora_delta, lora_linear.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "softmax,cross_entropy,rms_norm,layer_norm,lora_delta,lora_linear"
    )]
    ops: Vec<String>,
    /// Comma-separated shape classes: small (1x128x{512,1024,2048}, r 8), mid (4x512x4096,
    /// r 16), large (8x2048x4096, r 16).
    #[arg(long, value_delimiter = ',', default_value = "small,mid,large")]
    shapes: Vec<String>,
    /// Comma-separated modes: fwd, bwd, fwd_bwd.
    #[arg(long, value_delimiter = ',', default_value = "fwd,bwd,fwd_bwd")]
    modes: Vec<String>,
    /// Time budget per measurement, in seconds (at least 5 samples are always taken).
    #[arg(long, default_value_t = 0.3)]
    seconds: f64,
}

struct Shape {
    batch: usize,
    seq: usize,
    dim: usize,
    rank: usize,
}

impl Shape {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
    fn label(&self) -> String {
        format!("{}x{}x{}", self.batch, self.seq, self.dim)
    }
}

fn shapes(classes: &[String]) -> BoxResult<Vec<Shape>> {
    let mut out = Vec::new();
    for c in classes {
        match c.as_str() {
            "small" => out.extend([512, 1024, 2048].map(|dim| Shape {
                batch: 1,
                seq: 128,
                dim,
                rank: 8,
            })),
            "mid" => out.push(Shape {
                batch: 4,
                seq: 512,
                dim: 4096,
                rank: 16,
            }),
            "large" => out.push(Shape {
                batch: 8,
                seq: 2048,
                dim: 4096,
                rank: 16,
            }),
            other => {
                return Err(
                    format!("unknown shape class '{other}'; use small, mid or large").into(),
                )
            }
        }
    }
    Ok(out)
}

fn parse_dtype(s: &str) -> BoxResult<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => return Err(format!("unknown dtype '{other}'; use f32, bf16 or f16").into()),
    })
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// Median call latency, its host part and median per-call time of queued calls, in
/// microseconds.
struct Timing {
    latency_us: f64,
    host_us: f64,
    per_call_us: f64,
}

fn time(
    dev: &Device,
    budget: f64,
    f: &mut dyn FnMut() -> candle_core::Result<()>,
) -> BoxResult<Timing> {
    // Warm up as measured (call, wait) for a tenth of the budget, at least 3 calls, so that
    // the first samples do not carry cold caches and a first call's one-time work. (On one H100
    // host the host time per call still differed by up to 2 µs between processes after this
    // warm-up: compare runs of one process, or several processes, not single numbers.)
    let warm = Instant::now();
    let mut calls = 0;
    while calls < 3 || warm.elapsed().as_secs_f64() < budget / 10.0 {
        f()?;
        dev.synchronize()?;
        calls += 1;
    }
    let start = Instant::now();
    let (mut lat, mut host) = (Vec::new(), Vec::new());
    while lat.len() < 5 || (lat.len() < 2000 && start.elapsed().as_secs_f64() < budget / 2.0) {
        let t = Instant::now();
        f()?;
        host.push(t.elapsed().as_secs_f64() * 1e6);
        dev.synchronize()?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let latency_us = median(lat);
    // Queue enough calls per batch to hide the final wait (about 2 ms of work, 1..=200 calls).
    let per_batch = ((2000.0 / latency_us) as usize).clamp(1, 200);
    let start = Instant::now();
    let mut per = Vec::new();
    while per.len() < 5 || (per.len() < 50 && start.elapsed().as_secs_f64() < budget / 2.0) {
        per.push(batch_us(dev, f, per_batch)?);
    }
    Ok(Timing {
        latency_us,
        host_us: median(host),
        per_call_us: median(per),
    })
}

/// `calls` calls of `f` queued, then one wait: the time per call in microseconds.
fn batch_us(
    dev: &Device,
    f: &mut dyn FnMut() -> candle_core::Result<()>,
    calls: usize,
) -> BoxResult<f64> {
    let t = Instant::now();
    for _ in 0..calls {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / calls as f64)
}

/// Per-call times of `f` and `g` measured in alternating batches (f, g, f, g, …), with their
/// medians and the median of the per-pair ratios f/g. A GEMM at several hundred TFLOP/s runs
/// at whatever clock the GPU's power limit allows, which drifts over seconds: timed one after
/// the other, two GEMMs carry that drift into their ratio (on an H200 the same base GEMM took
/// 711.6 µs and 796.5 µs on two leases, first in a sequence of measurements), interleaved
/// they share it.
fn time_interleaved(
    dev: &Device,
    budget: f64,
    f: &mut dyn FnMut() -> candle_core::Result<()>,
    g: &mut dyn FnMut() -> candle_core::Result<()>,
) -> BoxResult<(f64, f64, f64)> {
    let batch = |h: &mut dyn FnMut() -> candle_core::Result<()>, calls| batch_us(dev, h, calls);
    // Warm-up, and the size of a batch: about 2 ms of work (1..=200 calls).
    batch(f, 3)?;
    batch(g, 3)?;
    let calls = ((2000.0 / batch(f, 1)?) as usize).clamp(1, 200);
    let start = Instant::now();
    let (mut tf, mut tg, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    while tf.len() < 9 || (tf.len() < 100 && start.elapsed().as_secs_f64() < budget) {
        let (a, b) = (batch(f, calls)?, batch(g, calls)?);
        tf.push(a);
        tg.push(b);
        ratio.push(a / b);
    }
    Ok((median(tf), median(tg), median(ratio)))
}

/// Common fields of one result row.
struct Row<'a> {
    op: &'a str,
    shape: &'a Shape,
    dtype: DType,
    mode: &'a str,
}

struct Recorder {
    dev: Device,
    budget: f64,
    rows: Vec<Value>,
    /// Ratios of two implementations timed in alternating batches (see [`time_interleaved`]).
    ratios: Vec<Value>,
}

impl Recorder {
    /// Times `f` against its baseline `g` in alternating batches ([`time_interleaved`]) and
    /// records their medians and the median ratio.
    fn measure_ratio(
        &mut self,
        row: &Row<'_>,
        (name_f, name_g): (&str, &str),
        f: &mut dyn FnMut() -> candle_core::Result<()>,
        g: &mut dyn FnMut() -> candle_core::Result<()>,
    ) -> BoxResult<()> {
        let (tf, tg, ratio) = time_interleaved(&self.dev, self.budget, f, g)?;
        println!(
            "{:<12} {:<12} r{:<3} {:<5} {:<8} {name_f} / {name_g}, interleaved: {tf:.2} / {tg:.2} us per call, median ratio {ratio:.3}",
            row.op,
            row.shape.label(),
            row.shape.rank,
            dtype_name(row.dtype),
            row.mode,
        );
        self.ratios.push(json!({
            "op": row.op, "shape": row.shape.label(), "rank": row.shape.rank, "dtype": dtype_name(row.dtype),
            "mode": row.mode, "impl": name_f, "baseline": name_g, "per_call_us": tf,
            "baseline_per_call_us": tg, "median_ratio": ratio,
        }));
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn measure(
        &mut self,
        row: &Row<'_>,
        imp: &str,
        bytes: f64,
        flops: f64,
        f: &mut dyn FnMut() -> candle_core::Result<()>,
    ) -> BoxResult<()> {
        let t = time(&self.dev, self.budget, f)?;
        let secs = t.per_call_us * 1e-6;
        let gbps = if bytes > 0.0 {
            Some(bytes / secs / 1e9)
        } else {
            None
        };
        let tflops = if flops > 0.0 {
            Some(flops / secs / 1e12)
        } else {
            None
        };
        println!(
            "{:<12} {:<12} r{:<3} {:<5} {:<8} {:<15} latency {:>10.2} us (host {:>9.2})  per call {:>10.2} us  {:>8} GB/s  {:>7} TFLOP/s",
            row.op,
            row.shape.label(),
            row.shape.rank,
            dtype_name(row.dtype),
            row.mode,
            imp,
            t.latency_us,
            t.host_us,
            t.per_call_us,
            gbps.map_or("-".into(), |g| format!("{g:.1}")),
            tflops.map_or("-".into(), |g| format!("{g:.2}")),
        );
        self.rows.push(json!({
            "op": row.op, "shape": row.shape.label(), "rank": row.shape.rank, "dtype": dtype_name(row.dtype),
            "mode": row.mode, "impl": imp, "latency_us": t.latency_us, "host_us": t.host_us, "per_call_us": t.per_call_us,
            "bytes": bytes, "flops": flops, "gbps": gbps, "tflops": tflops,
        }));
        Ok(())
    }
}

/// Runs `bench ops`.
pub fn run(args: OpsArgs) -> BoxResult<()> {
    let dev = super::device::parse_device(&args.device)?;
    let dtypes: Vec<DType> = args
        .dtypes
        .iter()
        .map(|d| parse_dtype(d))
        .collect::<BoxResult<_>>()?;
    let shapes = shapes(&args.shapes)?;
    for op in &args.ops {
        if ![
            "softmax",
            "cross_entropy",
            "rms_norm",
            "layer_norm",
            "lora_delta",
            "lora_linear",
        ]
        .contains(&op.as_str())
        {
            return Err(format!("unknown op '{op}'").into());
        }
    }
    for m in &args.modes {
        if !["fwd", "bwd", "fwd_bwd"].contains(&m.as_str()) {
            return Err(format!("unknown mode '{m}'; use fwd, bwd or fwd_bwd").into());
        }
    }
    let copy_gbps = copy_bandwidth(&dev)?;
    println!("device-to-device copy: {copy_gbps:.1} GB/s (bytes read + written)");
    let mut rec = Recorder {
        dev: dev.clone(),
        budget: args.seconds,
        rows: Vec::new(),
        ratios: Vec::new(),
    };
    // A failing measurement is reported and kept in the JSON; the others still run.
    let mut errors = Vec::new();
    for &dtype in &dtypes {
        for shape in &shapes {
            for op in &args.ops {
                for mode in &args.modes {
                    if let Err(e) = bench_one(&mut rec, op, shape, dtype, mode) {
                        let msg =
                            format!("{op} {} {} {mode}: {e}", shape.label(), dtype_name(dtype));
                        eprintln!("error: {msg}");
                        errors.push(msg);
                    }
                }
            }
        }
    }
    if let Some(path) = &args.json {
        let doc = json!({
            "meta": {
                "framework": "metal-candle",
                "device": args.device,
                "gpu": gpu_name(&dev),
                "command": std::env::args().collect::<Vec<_>>().join(" "),
                "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                "timing": "latency_us: one call then synchronize (host clock), median, after a tenth of the budget of warm-up calls; host_us: the part of it until the call returned, median; per_call_us: calls queued, one synchronize, median",
            },
            "copy_gbps": copy_gbps,
            "results": rec.rows,
            "interleaved_ratios": rec.ratios,
            "errors": errors,
        });
        write_atomic(path, &serde_json::to_string_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} measurement(s) failed:\n{}",
            errors.len(),
            errors.join("\n")
        )
        .into())
    }
}

fn write_atomic(path: &std::path::Path, text: &str) -> BoxResult<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| format!("renaming {} to {}: {e}", tmp.display(), path.display()))?;
    Ok(())
}

fn gpu_name(dev: &Device) -> Value {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = dev.as_cuda_device() {
        return cuda
            .cuda_stream()
            .context()
            .name()
            .map_or(Value::Null, Value::String);
    }
    let _ = dev;
    Value::Null
}

/// Device-to-device copy of 1 GiB (CUDA) or 256 MiB (CPU); bytes read + written per second.
fn copy_bandwidth(dev: &Device) -> BoxResult<f64> {
    #[cfg(feature = "cuda")]
    if let Ok(cuda) = dev.as_cuda_device() {
        let len = 1usize << 30;
        let src = cuda.alloc_zeros::<u8>(len)?;
        let mut dst = cuda.alloc_zeros::<u8>(len)?;
        let mut f = || cuda.memcpy_dtod(&src, &mut dst);
        let t = time(dev, 1.0, &mut f)?;
        return Ok(2.0 * len as f64 / (t.per_call_us * 1e-6) / 1e9);
    }
    let len = 256usize << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    let mut f = || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        Ok(())
    };
    let t = time(dev, 1.0, &mut f)?;
    Ok(2.0 * len as f64 / (t.per_call_us * 1e-6) / 1e9)
}

fn randn(dev: &Device, dtype: DType, shape: &[usize], std: f64) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, std as f32, shape, dev)?.to_dtype(dtype)
}

fn bench_one(
    rec: &mut Recorder,
    op: &str,
    shape: &Shape,
    dtype: DType,
    mode: &str,
) -> BoxResult<()> {
    let dev = rec.dev.clone();
    if mode == "bwd" && !dev.is_cuda() {
        return Ok(()); // the direct backward entry points are the CUDA ones
    }
    let row = Row {
        op,
        shape,
        dtype,
        mode,
    };
    let (m, n, r) = (shape.rows(), shape.dim, shape.rank);
    let s = dtype.size_in_bytes() as f64;
    let (mf, nf, rf) = (m as f64, n as f64, r as f64);
    let x = randn(&dev, dtype, &[shape.batch, shape.seq, n], 1.0)?;
    let dy = randn(&dev, dtype, &[shape.batch, shape.seq, n], 1.0)?;
    let w = (randn(&dev, dtype, &[n], 0.1)? + 1.0)?;
    let b = randn(&dev, dtype, &[n], 0.1)?;
    let eps = 1e-5;
    match (op, mode) {
        ("softmax" | "rms_norm" | "layer_norm", "fwd") => {
            let bytes = 2.0 * mf * nf * s + nf * s * 2.0;
            rec.measure(&row, "fused", bytes, 0.0, &mut || {
                norm_op(op, &x, &w, &b, eps, Impl::Fused).map(drop)
            })?;
            rec.measure(&row, "candle_unfused", bytes, 0.0, &mut || {
                norm_op(op, &x, &w, &b, eps, Impl::Unfused).map(drop)
            })?;
            rec.measure(&row, "candle_nn", bytes, 0.0, &mut || {
                norm_op(op, &x, &w, &b, eps, Impl::CandleNn).map(drop)
            })?;
            // candle's own copy of x, output allocation included: the floor for any op that
            // returns a new tensor (the `copy` bandwidth above reuses one buffer).
            rec.measure(&row, "candle_copy", 2.0 * mf * nf * s, 0.0, &mut || {
                x.copy().map(drop)
            })?;
        }
        ("softmax" | "rms_norm" | "layer_norm", "bwd") => {
            let bytes = 3.0 * mf * nf * s + nf * s * 3.0;
            #[cfg(feature = "cuda")]
            {
                // LayerNorm's backward takes the row statistics its forward saves in training.
                let stats = match op {
                    "layer_norm" => {
                        Some(ops::cuda::layer_norm_forward_with_stats(&x, &w, &b, eps)?.1)
                    }
                    _ => None,
                };
                rec.measure(&row, "fused", bytes, 0.0, &mut || match op {
                    "softmax" => ops::cuda::softmax_backward(&x, &dy).map(drop),
                    "rms_norm" => ops::cuda::rms_norm_backward(&x, &w, &dy, eps).map(drop),
                    _ => ops::cuda::layer_norm_backward(&x, &w, &dy, eps, stats.as_ref()).map(drop),
                })?;
            }
            let _ = bytes;
        }
        ("softmax" | "rms_norm" | "layer_norm", "fwd_bwd") => {
            let (xv, wv, bv) = (
                Var::from_tensor(&x)?,
                Var::from_tensor(&w)?,
                Var::from_tensor(&b)?,
            );
            for (imp, which) in [("fused", Impl::Fused), ("candle_unfused", Impl::Unfused)] {
                rec.measure(&row, imp, 0.0, 0.0, &mut || {
                    let y = norm_op(
                        op,
                        xv.as_tensor(),
                        wv.as_tensor(),
                        bv.as_tensor(),
                        eps,
                        which,
                    )?;
                    backward_with(&y, &dy)
                        .map(drop)
                        .map_err(candle_core::Error::wrap)
                })?;
            }
        }
        ("cross_entropy", _) => bench_cross_entropy(rec, &row, &x)?,
        ("lora_delta" | "lora_linear", _) => bench_lora(rec, &row, &x, &dy)?,
        _ => {}
    }
    let _ = (rf, &dy);
    Ok(())
}

#[derive(Clone, Copy)]
enum Impl {
    Fused,
    Unfused,
    CandleNn,
}

fn norm_op(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    which: Impl,
) -> candle_core::Result<Tensor> {
    let mc = |r: metal_candle::Result<Tensor>| r.map_err(candle_core::Error::wrap);
    match (op, which) {
        ("softmax", Impl::Fused) => mc(ops::softmax_last_dim(x)),
        ("softmax", Impl::Unfused) => ops::reference::softmax_last_dim(x),
        ("softmax", Impl::CandleNn) => candle_nn::ops::softmax_last_dim(x),
        ("rms_norm", Impl::Fused) => mc(ops::rms_norm(x, w, eps)),
        ("rms_norm", Impl::Unfused) => ops::reference::rms_norm(x, w, eps),
        ("rms_norm", Impl::CandleNn) => candle_nn::ops::rms_norm(x, w, eps as f32),
        (_, Impl::Fused) => mc(ops::layer_norm(x, w, b, eps)),
        (_, Impl::Unfused) => ops::reference::layer_norm(x, w, b, eps),
        (_, Impl::CandleNn) => candle_nn::ops::layer_norm(x, w, b, eps as f32),
    }
}

/// The cross-entropy of x's rows (the shape's last dim as the vocabulary) against fixed
/// targets: fused, and through candle-nn's `log_softmax` and a gather (`candle_unfused`, the
/// training loss before the fused op).
fn bench_cross_entropy(rec: &mut Recorder, row: &Row, x: &Tensor) -> BoxResult<()> {
    let dev = rec.dev.clone();
    let (rows, n) = (row.shape.rows(), row.shape.dim);
    let t: Vec<u32> = (0..rows).map(|r| ((r * 7919) % n) as u32).collect();
    let targets = Tensor::from_vec(t, (row.shape.batch, row.shape.seq), &dev)?;
    let g = Tensor::ones((row.shape.batch, row.shape.seq), DType::F32, &dev)?;
    let logits_bytes = (rows * n * row.dtype.size_in_bytes()) as f64;
    let mc = |r: metal_candle::Result<Tensor>| r.map_err(candle_core::Error::wrap);
    match row.mode {
        "fwd" => {
            // Logits read once; targets read and losses written, 4 bytes a row each.
            let bytes = logits_bytes + 8.0 * rows as f64;
            rec.measure(row, "fused", bytes, 0.0, &mut || {
                mc(ops::cross_entropy(x, &targets)).map(drop)
            })?;
            rec.measure(row, "candle_unfused", bytes, 0.0, &mut || {
                ops::reference::cross_entropy(x, &targets).map(drop)
            })?;
        }
        "bwd" => {
            // Logits read, their gradient written.
            let bytes = 2.0 * logits_bytes + 8.0 * rows as f64;
            #[cfg(feature = "cuda")]
            rec.measure(row, "fused", bytes, 0.0, &mut || {
                ops::cuda::cross_entropy_backward(x, &targets, &g).map(drop)
            })?;
            let _ = bytes;
        }
        _ => {
            let xv = Var::from_tensor(x)?;
            rec.measure(row, "fused", 0.0, 0.0, &mut || {
                let loss = mc(ops::cross_entropy(xv.as_tensor(), &targets))?;
                backward_with(&loss, &g)
                    .map(drop)
                    .map_err(candle_core::Error::wrap)
            })?;
            rec.measure(row, "candle_unfused", 0.0, 0.0, &mut || {
                let loss = ops::reference::cross_entropy(xv.as_tensor(), &targets)?;
                backward_with(&loss, &g)
                    .map(drop)
                    .map_err(candle_core::Error::wrap)
            })?;
        }
    }
    Ok(())
}

/// candle's unfused LoRA in the input dtype (as PyTorch/PEFT compose it): `x·A·B·scale`
/// (+ `x·Wᵀ`).
fn lora_unfused(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    w: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let delta = (x.broadcast_matmul(a)?.broadcast_matmul(b)? * scale)?;
    match w {
        Some(w) => x.broadcast_matmul(&w.t()?)? + delta,
        None => Ok(delta),
    }
}

fn bench_lora(rec: &mut Recorder, row: &Row<'_>, x: &Tensor, dy: &Tensor) -> BoxResult<()> {
    let dev = rec.dev.clone();
    let (op, mode, dtype) = (row.op, row.mode, row.dtype);
    let (m, k, r) = (row.shape.rows(), row.shape.dim, row.shape.rank);
    let n = k; // square layers, as in the peer scripts
    let s = dtype.size_in_bytes() as f64;
    let (mf, kf, nf, rf) = (m as f64, k as f64, n as f64, r as f64);
    let scale = 2.0;
    let a = randn(&dev, dtype, &[k, r], 1.0 / kf.sqrt())?;
    let b = randn(&dev, dtype, &[r, n], 0.05)?;
    let wt = randn(&dev, dtype, &[n, k], 1.0 / kf.sqrt())?;
    let linear = op == "lora_linear";
    let w = linear.then_some(&wt);
    let lora_flops = 2.0 * mf * rf * (kf + nf);
    let base_flops = if linear { 2.0 * mf * nf * kf } else { 0.0 };
    let mc = |r: metal_candle::Result<Tensor>| r.map_err(candle_core::Error::wrap);
    let fused = |x: &Tensor, a: &Tensor, b: &Tensor| match w {
        Some(w) => mc(ops::lora_linear(x, w, None, a, b, scale)),
        None => mc(ops::lora_delta(x, a, b, scale)),
    };
    match mode {
        "fwd" => {
            let bytes =
                (mf * kf + mf * nf + kf * rf + rf * nf + if linear { nf * kf } else { 0.0 }) * s;
            let flops = lora_flops + base_flops;
            rec.measure(row, "fused", bytes, flops, &mut || {
                fused(x, &a, &b).map(drop)
            })?;
            rec.measure(row, "candle_unfused", bytes, flops, &mut || {
                lora_unfused(x, &a, &b, w, scale).map(drop)
            })?;
            if linear {
                let bytes = (mf * kf + mf * nf + nf * kf) * s;
                rec.measure(row, "base_gemm", bytes, base_flops, &mut || {
                    x.broadcast_matmul(&wt.t()?).map(drop)
                })?;
                rec.measure_ratio(
                    row,
                    ("fused", "base_gemm"),
                    &mut || fused(x, &a, &b).map(drop),
                    &mut || x.broadcast_matmul(&wt.t()?).map(drop),
                )?;
            }
        }
        "bwd" => {
            // dx, dA, dB: 2·m·r·(2k + n) for the LoRA GEMMs (x·A recomputed, dy·Bᵀ, dB, dA, dx)
            // plus the dx base GEMM dy·W for the linear layer.
            let flops = 2.0 * mf * rf * (3.0 * kf + 2.0 * nf) + base_flops;
            let bytes = (2.0 * mf * kf + mf * nf + if linear { nf * kf } else { 0.0 }) * s;
            // The projections scale·x·A that the forward pass keeps for the backward in training.
            #[cfg(feature = "cuda")]
            let saved = ops::cuda::lora_projections(x, &a, scale)?;
            #[cfg(feature = "cuda")]
            rec.measure(row, "fused", bytes, flops, &mut || match w {
                Some(w) => {
                    ops::cuda::lora_linear_backward(x, &a, &b, dy, w, scale, Some(&saved)).map(drop)
                }
                None => {
                    ops::cuda::lora_backward(x, &a, &b, dy, scale, None, Some(&saved)).map(drop)
                }
            })?;
            if linear {
                let bytes = (mf * kf + mf * nf + nf * kf) * s;
                rec.measure(row, "dx_gemm", bytes, base_flops, &mut || {
                    dy.reshape((m, n))?.matmul(&wt).map(drop)
                })?;
                #[cfg(feature = "cuda")]
                rec.measure_ratio(
                    row,
                    ("fused", "dx_gemm"),
                    &mut || {
                        ops::cuda::lora_linear_backward(x, &a, &b, dy, &wt, scale, Some(&saved))
                            .map(drop)
                    },
                    &mut || dy.reshape((m, n))?.matmul(&wt).map(drop),
                )?;
            }
            let _ = (flops, bytes);
        }
        _ => {
            let (xv, av, bv) = (
                Var::from_tensor(x)?,
                Var::from_tensor(&a)?,
                Var::from_tensor(&b)?,
            );
            rec.measure(row, "fused", 0.0, 0.0, &mut || {
                let y = fused(xv.as_tensor(), av.as_tensor(), bv.as_tensor())?;
                backward_with(&y, dy)
                    .map(drop)
                    .map_err(candle_core::Error::wrap)
            })?;
            rec.measure(row, "candle_unfused", 0.0, 0.0, &mut || {
                let y = lora_unfused(xv.as_tensor(), av.as_tensor(), bv.as_tensor(), w, scale)?;
                backward_with(&y, dy)
                    .map(drop)
                    .map_err(candle_core::Error::wrap)
            })?;
        }
    }
    Ok(())
}
