//! One module per subcommand.

pub mod bench_train;
pub mod convert;
pub mod merge;
pub mod train;
