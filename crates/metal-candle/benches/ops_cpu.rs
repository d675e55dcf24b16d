//! CPU benchmarks of the fused ops against candle's unfused composition ("reference") and
//! candle-nn's fused forward ("candle_nn", forward only: it has no backward; for the LoRA linear,
//! the base GEMM alone, "base_gemm"), with a memory
//! copy of the same bytes timed in the same run. `scripts/bench_table.py` turns criterion's
//! output into the table in BENCHMARKS.md.
//!
//! Run: `cargo bench -p metal-candle --bench ops_cpu`

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metal_candle::ops::{self, reference};
use std::time::Duration;

/// (label, leading dims, hidden, rank): the seed's shapes and the large training shape.
const SHAPES: [(&str, usize, usize, usize, usize); 4] = [
    ("1x128x512", 1, 128, 512, 8),
    ("1x128x1024", 1, 128, 1024, 8),
    ("1x128x2048", 1, 128, 2048, 8),
    ("4x512x4096", 4, 512, 4096, 16),
];

/// An op variant under test.
type OpRef<'a> = &'a dyn Fn(&[Tensor]) -> Tensor;

fn parallel_copy(src: &[f32], dst: &mut [f32]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

fn randn(dims: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1., dims, &Device::Cpu).unwrap()
}

/// Forward and forward+backward of one op family, three ways.
fn bench_op(
    c: &mut Criterion,
    name: &str,
    bytes: impl Fn(usize) -> u64,
    fused: &dyn Fn(&[Tensor]) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
    extra: Option<(&str, OpRef)>,
    make_inputs: &dyn Fn(usize, usize, usize, usize) -> Vec<Tensor>,
) {
    let mut g = c.benchmark_group(format!("{name}/forward"));
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    for (label, b, s, h, r) in SHAPES {
        let inputs = make_inputs(b, s, h, r);
        g.throughput(Throughput::Bytes(bytes(b * s * h)));
        g.bench_function(BenchmarkId::new("fused", label), |bch| {
            bch.iter(|| fused(&inputs))
        });
        g.bench_function(BenchmarkId::new("reference", label), |bch| {
            bch.iter(|| reference(&inputs))
        });
        if let Some((extra_name, extra_fn)) = extra {
            g.bench_function(BenchmarkId::new(extra_name, label), |bch| {
                bch.iter(|| extra_fn(&inputs))
            });
        }
        // The machine's bandwidth for the same bytes: a copy of x split across all threads.
        let src: Vec<f32> = inputs[0].flatten_all().unwrap().to_vec1().unwrap();
        let mut dst = vec![0f32; src.len()];
        g.bench_function(BenchmarkId::new("copy", label), |bch| {
            bch.iter(|| parallel_copy(&src, &mut dst))
        });
        // The same copy into a freshly allocated output, as every op must write one.
        g.bench_function(BenchmarkId::new("copy_fresh", label), |bch| {
            bch.iter(|| {
                let mut fresh = vec![0f32; src.len()];
                parallel_copy(&src, &mut fresh);
                fresh
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group(format!("{name}/forward_backward"));
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    for (label, b, s, h, r) in SHAPES {
        let inputs = make_inputs(b, s, h, r);
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let upstream = randn(fused(&ts).dims());
        // The upstream gradient goes straight to y (see `autograd::backward_with`): a
        // `(y * r).sum_all()` loss would add its own backward, larger than the ops at the
        // seed shapes, to both columns.
        let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            metal_candle::autograd::backward_with(&f(&ts), &upstream).unwrap()
        };
        g.bench_function(BenchmarkId::new("fused", label), |bch| {
            bch.iter(|| run(fused))
        });
        g.bench_function(BenchmarkId::new("reference", label), |bch| {
            bch.iter(|| run(reference))
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    // As the CLI does: freed 32 MiB outputs are reused instead of page-faulted afresh, which
    // otherwise dominates every op (fused or not) at the 4x512x4096 shape. See alloc.rs.
    metal_candle::alloc::reuse_freed_memory();
    let f32b = |elems: usize| (2 * elems * 4) as u64; // read x once, write y once
    bench_op(
        c,
        "softmax",
        f32b,
        &|t| ops::softmax_last_dim(&t[0]).unwrap(),
        &|t| reference::softmax_last_dim(&t[0]).unwrap(),
        Some(("candle_nn", &|t| {
            candle_nn::ops::softmax_last_dim(&t[0]).unwrap()
        })),
        &|b, s, h, _| vec![randn(&[b, s, h])],
    );
    bench_op(
        c,
        "rms_norm",
        f32b,
        &|t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        &|t| reference::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        Some(("candle_nn", &|t| {
            candle_nn::ops::rms_norm(&t[0], &t[1], 1e-5).unwrap()
        })),
        &|b, s, h, _| vec![randn(&[b, s, h]), randn(&[h])],
    );
    bench_op(
        c,
        "layer_norm",
        f32b,
        &|t| ops::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        &|t| reference::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        Some(("candle_nn", &|t| {
            candle_nn::ops::layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap()
        })),
        &|b, s, h, _| vec![randn(&[b, s, h]), randn(&[h]), randn(&[h])],
    );
    bench_op(
        c,
        "lora_delta",
        f32b,
        &|t| ops::lora_delta(&t[0], &t[1], &t[2], 2.0).unwrap(),
        &|t| reference::lora_delta(&t[0], &t[1], &t[2], 2.0).unwrap(),
        None,
        &|b, s, h, r| {
            vec![
                randn(&[b, s, h]),
                (randn(&[h, r]) * 0.05).unwrap(),
                (randn(&[r, h]) * 0.05).unwrap(),
            ]
        },
    );
    let w_cache = std::sync::Mutex::new(std::collections::HashMap::<usize, Tensor>::new());
    let weight = |h: usize| -> Tensor {
        w_cache
            .lock()
            .unwrap()
            .entry(h)
            .or_insert_with(|| (randn(&[h, h]) * 0.02).unwrap())
            .clone()
    };
    bench_op(
        c,
        "lora_linear",
        f32b,
        &|t| {
            ops::lora_linear(
                &t[0],
                &weight(t[0].dim(2).unwrap()),
                None,
                &t[1],
                &t[2],
                2.0,
            )
            .unwrap()
        },
        &|t| {
            reference::lora_linear(
                &t[0],
                &weight(t[0].dim(2).unwrap()),
                None,
                &t[1],
                &t[2],
                2.0,
            )
            .unwrap()
        },
        Some(("base_gemm", &|t| {
            t[0].broadcast_matmul(&weight(t[0].dim(2).unwrap()).t().unwrap())
                .unwrap()
        })),
        &|b, s, h, r| {
            vec![
                randn(&[b, s, h]),
                (randn(&[h, r]) * 0.05).unwrap(),
                (randn(&[r, h]) * 0.05).unwrap(),
            ]
        },
    );
}

criterion_group!(ops_cpu, benches);
criterion_main!(ops_cpu);
