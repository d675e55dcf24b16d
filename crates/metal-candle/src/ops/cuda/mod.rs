//! CUDA kernels for the fused ops (not yet written: building with `--features cuda` fails here).
compile_error!("metal-candle: the CUDA kernels are not in this build yet");
