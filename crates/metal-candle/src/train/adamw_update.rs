//! AdamW's per-parameter update as two in-place passes: the moments, then the parameter.
//!
//! Written with candle ops the update is about fifteen element-wise kernels per parameter, and
//! LoRA on every projection of a model has hundreds of small parameters, so at GPU speeds the
//! optimiser step is launch overhead. These two passes read and write each buffer once.
//! Everything is f32; the maths and its order are those of [`super::AdamW`]'s composed form.

use candle_core::{CpuStorage, InplaceOp2, Layout};

/// The two moments of one parameter, `m` then `v`, in one (2, numel) f32 buffer.
pub(crate) struct Moments {
    pub beta1: f32,
    pub beta2: f32,
    /// Multiplies the gradient first (gradient clipping folded in).
    pub grad_scale: f32,
}

/// `p ← p·decay − lr · (m / bc1) / (√(v / bc2) + eps)`.
pub(crate) struct ParamStep {
    pub lr: f32,
    pub bc1: f32,
    pub bc2: f32,
    pub eps: f32,
    /// `1 − lr·weight_decay`.
    pub decay: f32,
}

/// The contiguous f32 elements of a storage under a contiguous layout.
fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

fn f32s_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

impl Moments {
    #[inline(always)]
    fn apply(&self, m: &mut f32, v: &mut f32, g: f32) {
        let g = g * self.grad_scale;
        *m = *m * self.beta1 + g * (1.0 - self.beta1);
        *v = *v * self.beta2 + g * g * (1.0 - self.beta2);
    }
}

impl ParamStep {
    #[inline(always)]
    fn apply(&self, p: &mut f32, m: f32, v: f32) {
        let update = (m / self.bc1) / ((v / self.bc2).sqrt() + self.eps);
        *p = *p * self.decay - update * self.lr;
    }
}

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "metal-candle-adamw-moments"
    }

    fn cpu_fwd(
        &self,
        state: &mut CpuStorage,
        sl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let g = f32s(g, gl, "the gradient")?;
        let state = f32s_mut(state, sl, "the moments")?;
        let (m, v) = state.split_at_mut(g.len());
        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
            self.apply(m, v, g);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        state: &mut candle_core::CudaStorage,
        sl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::adamw_moments(state, sl, g, gl, [self.beta1, self.beta2, self.grad_scale])
    }
}

impl InplaceOp2 for ParamStep {
    fn name(&self) -> &'static str {
        "metal-candle-adamw-param"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        pl: &Layout,
        state: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32s_mut(p, pl, "the parameter")?;
        let state = f32s(state, sl, "the moments")?;
        let (m, v) = state.split_at(p.len());
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            self.apply(p, m, v);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &mut candle_core::CudaStorage,
        pl: &Layout,
        state: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        crate::ops::cuda::adamw_param(
            p,
            pl,
            state,
            sl,
            [self.lr, self.bc1, self.bc2, self.eps, self.decay],
        )
    }
}
