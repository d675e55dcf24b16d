use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> metal_candle::Result<()> {
    metal_candle::alloc::reuse_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let op = args.get(1).map(|s| s.as_str()).unwrap_or("rms");
    let rows: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(128);
    let n: usize = args.get(3).map(|s| s.parse().unwrap()).unwrap_or(512);
    let iters: usize = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(2000);
    let x = Tensor::randn(0f32, 1., (rows, n), &Device::Cpu)?;
    let w = Tensor::randn(0f32, 1., n, &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1., n, &Device::Cpu)?;
    let mut ts = vec![];
    for _ in 0..iters {
        let t = Instant::now();
        let y = match op {
            "rms" => metal_candle::ops::rms_norm(&x, &w, 1e-5)?,
            "ln" => metal_candle::ops::layer_norm(&x, &w, &b, 1e-5)?,
            "sm" => metal_candle::ops::softmax_last_dim(&x)?,
            _ => x.copy()?,
        };
        drop(y);
        ts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = ts[ts.len() / 2];
    println!(
        "{op} {rows}x{n}: median {med:.1} us, {:.2} GB/s",
        8.0 * (rows * n) as f64 / med / 1e3
    );
    Ok(())
}
