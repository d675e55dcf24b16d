//! One module per subcommand.

pub mod bench;
pub mod convert;
pub mod gpu_test;
