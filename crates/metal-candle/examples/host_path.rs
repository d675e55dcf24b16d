//! Where a small op's call latency goes on CUDA: for each step of the LoRA delta's path at a
//! seed shape, and for candle ops of one kernel beside it, the median time the call takes on
//! the host (until it returns, the GPU idle before it) and its latency (the call, then the
//! wait for the GPU). Steps are timed one call at a time, in turn, so that drift hits all
//! alike.
//!
//! ```bash
//! source scripts/setup-cuda.sh
//! cargo build --release --features cuda --example host_path -p metal-candle
//! host_path 2048 2000        # in = out of the 1×128×IN problem, calls per step
//! ```

#[cfg(feature = "cuda")]
mod lab {
    use std::time::{Duration, Instant};

    use candle_core::backend::BackendStorage;
    use candle_core::{DType, Device, Storage, Tensor};
    use metal_candle::ops;

    type BoxResult = Result<(), Box<dyn std::error::Error>>;
    type Step<'a> = (&'static str, Box<dyn FnMut() -> BoxResult + 'a>);

    fn median(v: &mut [Duration]) -> f64 {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e6
    }

    pub fn run(k: usize, calls: usize) -> Result<(), Box<dyn std::error::Error>> {
        let dev = Device::new_cuda(0)?;
        // As the command-line tool opens a GPU.
        metal_candle::alloc::retain_freed_gpu_memory(&dev)?;
        metal_candle::alloc::skip_single_stream_events(&dev);
        let cuda = match &dev {
            Device::Cuda(c) => c.clone(),
            _ => unreachable!("opened as CUDA"),
        };
        let (m, r) = (128, 8);
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::randn(0f32, 1., (1, m, k), &dev)?.to_dtype(dtype)?;
            let a = Tensor::randn(0f32, 0.05, (k, r), &dev)?.to_dtype(dtype)?;
            let b = Tensor::randn(0f32, 0.05, (r, k), &dev)?.to_dtype(dtype)?;
            let elems = m * k;
            let mut steps: Vec<Step<'_>> = vec![
                ("synchronize alone", Box::new(|| Ok(()))),
                (
                    "alloc + free (candle's CudaDevice)",
                    Box::new(|| {
                        // SAFETY: the buffer is dropped unread.
                        let buf = unsafe { cuda.alloc::<u8>(elems * dtype.size_in_bytes()) }?;
                        drop(buf);
                        Ok(())
                    }),
                ),
                (
                    "candle affine (alloc + 1 kernel)",
                    Box::new(|| {
                        x.affine(2.0, 0.0)?;
                        Ok(())
                    }),
                ),
                (
                    "candle add (alloc + 1 kernel)",
                    Box::new(|| {
                        (&x + &x)?;
                        Ok(())
                    }),
                ),
                (
                    "ops::softmax_last_dim",
                    Box::new(|| {
                        ops::softmax_last_dim(&x)?;
                        Ok(())
                    }),
                ),
                (
                    "ops::lora_delta",
                    Box::new(|| {
                        ops::lora_delta(&x, &a, &b, 2.0)?;
                        Ok(())
                    }),
                ),
                (
                    "ops::cuda::lora_delta_forward (no Tensor)",
                    Box::new(|| {
                        let (xs, xl) = x.storage_and_layout();
                        let (as_, al) = a.storage_and_layout();
                        let (bs, bl) = b.storage_and_layout();
                        let (Storage::Cuda(xs), Storage::Cuda(as_), Storage::Cuda(bs)) =
                            (&*xs, &*as_, &*bs)
                        else {
                            return Err("inputs are not on the GPU".into());
                        };
                        let (y, _) = ops::cuda::lora_delta_forward(xs, xl, as_, al, bs, bl, 2.0)?;
                        debug_assert_eq!(y.dtype(), dtype);
                        Ok(())
                    }),
                ),
            ];
            let n = steps.len();
            let mut host = vec![Vec::with_capacity(calls); n];
            let mut latency = vec![Vec::with_capacity(calls); n];
            for round in 0..calls + calls / 10 {
                for (i, (_, step)) in steps.iter_mut().enumerate() {
                    dev.synchronize()?;
                    let start = Instant::now();
                    step()?;
                    let returned = start.elapsed();
                    dev.synchronize()?;
                    let done = start.elapsed();
                    // The first tenth warms up.
                    if round >= calls / 10 {
                        host[i].push(returned);
                        latency[i].push(done);
                    }
                }
            }
            println!("1x{m}x{k} r{r} {dtype:?}: median µs over {calls} calls");
            for (i, (name, _)) in steps.iter().enumerate() {
                println!(
                    "  {name:<44} host {:>7.2}  latency {:>7.2}",
                    median(&mut host[i]),
                    median(&mut latency[i])
                );
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [k, calls] = args.as_slice() else {
        return Err("usage: host_path IN_OUT CALLS".into());
    };
    let (k, calls): (usize, usize) = (k.parse()?, calls.parse()?);
    #[cfg(feature = "cuda")]
    return lab::run(k, calls);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (k, calls);
        Err(
            "host_path needs the cuda feature: cargo build --features cuda --example host_path"
                .into(),
        )
    }
}
