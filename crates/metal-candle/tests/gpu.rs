//! GPU test suite (feature `cuda`): every fused op on CUDA against the CPU reference, forward
//! and gradients, f32/bf16/f16, many shapes and views, outputs poisoned before each kernel.
//! The checks live in `metal_candle::ops::cuda::check` so that the same suite also runs from
//! the CLI (`metal-candle gpu-test`), one binary to carry to a GPU machine.
//!
//! With the feature on and no usable GPU every test fails; none skips.
//!
//! ```text
//! source scripts/setup-cuda.sh
//! cargo test --release --features cuda -p metal-candle --test gpu
//! ```
#![cfg(feature = "cuda")]

use metal_candle::ops::cuda::check;

fn run(f: fn(&candle_core::Device) -> candle_core::Result<()>) {
    let dev = match check::device() {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    };
    if let Err(e) = f(&dev) {
        panic!("{e}");
    }
}

#[test]
fn dispatch_picks_cuda_kernels() {
    run(check::dispatch_picks_cuda_kernels);
}

#[test]
fn softmax_matches_reference() {
    run(check::softmax_matches_reference);
}

#[test]
fn rms_norm_matches_reference() {
    run(check::rms_norm_matches_reference);
}

#[test]
fn layer_norm_matches_reference() {
    run(check::layer_norm_matches_reference);
}

#[test]
fn layer_norm_backward_without_saved_stats() {
    run(check::layer_norm_backward_without_saved_stats);
}

#[test]
fn lora_delta_matches_reference() {
    run(check::lora_delta_matches_reference);
}

#[test]
fn lora_linear_matches_reference() {
    run(check::lora_linear_matches_reference);
}

#[test]
fn fused_lora_op_matches_reference() {
    run(check::fused_lora_op_matches_reference);
}

#[test]
fn backward_is_deterministic() {
    run(check::backward_is_deterministic);
}
