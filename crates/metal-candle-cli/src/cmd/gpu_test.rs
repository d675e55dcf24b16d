//! `metal-candle gpu-test`: the GPU test suite (`metal_candle::ops::cuda::check`, the same
//! checks as `crates/metal-candle/tests/gpu.rs`) in the CLI binary, so that one stripped binary
//! carries both the tests and the benchmarks to a GPU machine. Exits non-zero when a check
//! fails or no GPU is usable; it never skips.

use std::time::Instant;

/// Runs the CUDA kernel checks against the CPU reference.
#[derive(clap::Args)]
pub struct GpuTestArgs {
    /// Run only the checks whose name contains this text.
    #[arg(long)]
    filter: Option<String>,
}

/// Runs the selected checks; an error when any fails.
pub fn run(args: GpuTestArgs) -> Result<(), Box<dyn std::error::Error>> {
    run_checks(args.filter.as_deref())
}

#[cfg(feature = "cuda")]
fn run_checks(filter: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
    use metal_candle::ops::cuda::check;
    let dev = check::device()?;
    let mut failed = Vec::new();
    for &(name, f) in check::CHECKS {
        if filter.is_some_and(|p| !name.contains(p)) {
            continue;
        }
        let t = Instant::now();
        match f(&dev) {
            Ok(()) => println!("ok     {name} ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                println!("FAILED {name}: {e}");
                failed.push(name);
            }
        }
    }
    if failed.is_empty() {
        println!("all GPU checks passed");
        Ok(())
    } else {
        Err(format!(
            "{} GPU check(s) failed: {}",
            failed.len(),
            failed.join(", ")
        )
        .into())
    }
}

#[cfg(not(feature = "cuda"))]
fn run_checks(_filter: Option<&str>) -> Result<(), Box<dyn std::error::Error>> {
    let _ = Instant::now();
    Err(
        "this binary was built without CUDA; rebuild with `--features cuda` (see docs/CUDA.md)"
            .into(),
    )
}
