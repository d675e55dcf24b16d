//! One module per subcommand.

pub mod bench;
pub mod bench_train;
pub mod convert;
pub mod gpu_test;
pub mod merge;
pub mod train;
