//! Backend-facing pieces kept where the seed documents put them.

/// Custom candle ops, applied with `Tensor::apply_op1`.
pub mod custom_ops {
    pub use crate::ops::FusedLoRAOp;
}
