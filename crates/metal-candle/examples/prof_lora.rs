//! A loop around the fused LoRA delta on the CPU, for profilers (`perf record`, `perf
//! annotate`) and quick A/B timings of its kernels: prints the median and the minimum time of a
//! call (forward, or forward and backward through `autograd::backward_with`).
//!
//! ```bash
//! cargo build --release --example prof_lora -p metal-candle
//! target/release/examples/prof_lora 2048 4096 16 fb 20    # rows, in = out, rank, f|fb, calls
//! perf record -g target/release/examples/prof_lora 128 2048 8 f 20000
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor, Var};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    metal_candle::alloc::reuse_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [m, k, r, mode, calls] = args.as_slice() else {
        return Err("usage: prof_lora ROWS IN_OUT RANK f|fb CALLS".into());
    };
    let (m, k, r, calls): (usize, usize, usize, usize) =
        (m.parse()?, k.parse()?, r.parse()?, calls.parse()?);
    let backward = match mode.as_str() {
        "f" => false,
        "fb" => true,
        other => return Err(format!("mode must be f or fb, got {other:?}").into()),
    };
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (m, k), &dev)?)?;
    let a = Var::from_tensor(&Tensor::randn(0f32, 0.02, (k, r), &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.05, (r, k), &dev)?)?;
    let dy = Tensor::randn(0f32, 1., (m, k), &dev)?;
    let mut times = Vec::with_capacity(calls);
    for _ in 0..calls.max(1) {
        let start = Instant::now();
        let y = metal_candle::ops::lora_delta(x.as_tensor(), a.as_tensor(), b.as_tensor(), 2.0)?;
        if backward {
            let grads = metal_candle::autograd::backward_with(&y, &dy)?;
            std::hint::black_box(grads.get(&x));
        }
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "median {:.1} us, min {:.1} us over {} calls",
        times[times.len() / 2],
        times[0],
        times.len()
    );
    Ok(())
}
