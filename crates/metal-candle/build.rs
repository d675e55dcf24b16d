//! Compiles the CUDA kernels in `src/ops/cuda/kernels/*.cu` to PTX when the `cuda` feature is
//! on (nothing happens otherwise). The PTX is embedded in the library and loaded at run time
//! with `CudaDevice::get_or_load_custom_func`.
//!
//! nvcc is found as `$NVCC`, else `$CUDA_HOME/bin/nvcc` (or `$CUDA_PATH`), else on `PATH`.
//! The virtual architecture is `compute_$CUDA_COMPUTE_CAP` (default 90, Hopper); PTX runs on
//! that architecture and every later one (the driver compiles it at first use).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: [&str; 7] = [
    "softmax",
    "norm",
    "lora",
    "lora_tc",
    "elementwise",
    "optim",
    "attention",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_COMPUTE_CAP",
        "METAL_CANDLE_NVCC_FLAGS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let dir = Path::new("src/ops/cuda/kernels");
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("common.cuh").display()
    );
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc();
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    if cap.is_empty() {
        panic!("CUDA_COMPUTE_CAP must be a compute capability such as 90 (H100/H200) or 80 (A100)");
    }
    // The library asks for the tensor-core kernels only where the PTX was built for them too.
    println!("cargo:rustc-env=METAL_CANDLE_CUDA_CAP={cap}");
    let extra = env::var("METAL_CANDLE_NVCC_FLAGS").unwrap_or_default();
    for name in KERNELS {
        let src = dir.join(format!("{name}.cu"));
        println!("cargo:rerun-if-changed={}", src.display());
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(format!("-I{}", dir.display()))
            .args(extra.split_whitespace())
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "could not run nvcc ({}): {e}. The `cuda` feature needs the CUDA compiler: \
                     `source scripts/setup-cuda.sh` (no toolkit needed) or set CUDA_HOME",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var) {
            let p = Path::new(&home).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    PathBuf::from("nvcc")
}
