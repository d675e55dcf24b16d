//! One module per subcommand.

pub mod convert;
pub mod bench;
pub mod gpu_test;
