//! One module per subcommand (each with its `...Args` and `run`), plus shared helpers.

pub mod bench;
pub mod bench_embed;
pub mod bench_generate;
pub mod bench_ops;
pub mod bench_train;
pub mod chat;
pub mod convert;
pub mod device;
pub mod embed;
pub mod generate;
pub mod gpu_test;
pub mod merge;
pub mod models;
pub mod sampling_args;
pub mod train;
