//! The LoRA term and the LoRA linear layer.
//!
//! Layouts: `a` is (in, r) and `b` is (r, out), so that the term reads `scale·(x·A)·B`; the
//! base weight `w` is (out, in) as in PyTorch and Hugging Face checkpoints. PEFT stores
//! `lora_A.weight` as (r, in) and `lora_B.weight` as (out, r): transpose both when converting
//! (the adapter I/O in [`crate::lora`] does this).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Storage, Tensor, WithDType};

use super::cpu::{self, with_float_type, Acc, Elem};
use super::{check_same, kernel_path, reference, KernelPath};
use crate::{Error, Result};

/// `scale · (x·A)·B` with `a` (in, r) and `b` (r, out); differentiable in `x`, `a` and `b`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1., (1, 128, 512), &dev)?;
/// let a = Tensor::randn(0f32, 0.05, (512, 8), &dev)?;
/// let b = Tensor::randn(0f32, 0.05, (8, 512), &dev)?;
/// let y = metal_candle::ops::lora_delta(&x, &a, &b, 2.0)?;
/// assert_eq!(y.dims(), &[1, 128, 512]);
/// # Ok(())
/// # }
/// ```
pub fn lora_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    check_lora_args("lora_delta", x, a, b, scale)?;
    Ok(match kernel_path(x.device(), x.dtype()) {
        KernelPath::Fused => x.apply_op3(a, b, LoraDelta::new(scale))?,
        KernelPath::Reference => reference::lora_delta(x, a, b, scale)?,
    })
}

/// The LoRA linear layer `x·Wᵀ + bias + scale·(x·A)·B`, with `w` (out, in), `bias` (out),
/// `a` (in, r), `b` (r, out).
///
/// Fully fused when the base layer is frozen (`w` and `bias` are not variables, the LoRA
/// case): the base GEMM writes the output and one pass adds the bias and the low-rank term
/// into it, with no extra (tokens × out) tensor; gradients flow to `x`, `a` and `b`. When `w`
/// or `bias` is a variable (full fine-tuning), the base product is composed from candle ops so
/// that they get gradients too, and only the LoRA term is fused.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> metal_candle::Result<()> {
/// let dev = Device::Cpu;
/// let x = Tensor::randn(0f32, 1., (2, 16, 64), &dev)?;
/// let w = Tensor::randn(0f32, 0.1, (32, 64), &dev)?;
/// let a = Tensor::randn(0f32, 0.1, (64, 4), &dev)?;
/// let b = Tensor::randn(0f32, 0.1, (4, 32), &dev)?;
/// let y = metal_candle::ops::lora_linear(&x, &w, None, &a, &b, 4.0)?;
/// assert_eq!(y.dims(), &[2, 16, 32]);
/// # Ok(())
/// # }
/// ```
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    check_lora_args("lora_linear", x, a, b, scale)?;
    check_base_args(x, w, bias, b)?;
    let frozen = !w.track_op() && !bias.is_some_and(|b| b.track_op());
    Ok(match kernel_path(x.device(), x.dtype()) {
        KernelPath::Fused if frozen => {
            let op = LoraLinear {
                w: w.clone(),
                bias: bias.cloned(),
                scale,
                #[cfg(feature = "cuda")]
                saved_cuda: std::sync::Mutex::new(None),
            };
            x.apply_op3(a, b, op)?
        }
        KernelPath::Fused => {
            let base = x.broadcast_matmul(&w.t()?)?;
            let base = match bias {
                Some(bias) => base.broadcast_add(bias)?,
                None => base,
            };
            (base + x.apply_op3(a, b, LoraDelta::new(scale))?)?
        }
        KernelPath::Reference => reference::lora_linear(x, w, bias, a, b, scale)?,
    })
}

fn check_lora_args(op: &'static str, x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<()> {
    let k = match x.dims().last() {
        Some(&k) => k,
        None => return Err(Error::shape(op, "x is a scalar; expected (..., in)")),
    };
    let (a_dims, b_dims) = (a.dims(), b.dims());
    if a_dims.len() != 2 || b_dims.len() != 2 {
        return Err(Error::shape(
            op,
            format!("A must be (in, r) and B (r, out); got A {a_dims:?} and B {b_dims:?}"),
        ));
    }
    if a_dims[0] != k {
        return Err(Error::shape(
            op,
            format!(
                "x has shape {:?} (in = {k}) but A has shape {a_dims:?}; A must be ({k}, r)",
                x.dims()
            ),
        ));
    }
    if a_dims[1] != b_dims[0] {
        return Err(Error::shape(
            op,
            format!(
                "A {a_dims:?} and B {b_dims:?} do not chain: A's rank {} != B's rows {}",
                a_dims[1], b_dims[0]
            ),
        ));
    }
    if a_dims[1] == 0 {
        return Err(Error::shape(
            op,
            "rank 0: A and B must have at least one rank dimension",
        ));
    }
    if !scale.is_finite() {
        return Err(Error::InvalidConfig {
            name: "scale",
            value: scale.to_string(),
            expected: "a finite number",
        });
    }
    check_same(op, &[("x", x), ("A", a), ("B", b)])
}

fn check_base_args(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, b: &Tensor) -> Result<()> {
    let op = "lora_linear";
    let (k, n) = (x.dim(candle_core::D::Minus1)?, b.dim(1)?);
    if w.dims() != [n, k] {
        return Err(Error::shape(
            op,
            format!(
                "W has shape {:?} but must be (out, in) = ({n}, {k}) to match x {:?} and B {:?}",
                w.dims(),
                x.dims(),
                b.dims()
            ),
        ));
    }
    if let Some(bias) = bias {
        if bias.dims() != [n] {
            return Err(Error::shape(
                op,
                format!("bias has shape {:?}; expected [{n}]", bias.dims()),
            ));
        }
        check_same(op, &[("x", x), ("bias", bias)])?;
    }
    check_same(op, &[("x", x), ("W", w)])
}

/// The number of rows of a (..., k) tensor: the product of all but the last dim.
fn leading_rows(dims: &[usize]) -> usize {
    dims.split_last()
        .map_or(1, |(_, lead)| lead.iter().product())
}

/// Rows of x, its inner dim, and the output shape `(..., out)`.
fn row_shape(xl: &Layout, out: usize) -> (usize, usize, Shape) {
    let dims = xl.dims();
    let k = dims.last().copied().unwrap_or(1);
    let m = leading_rows(dims);
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out;
    }
    (m, k, Shape::from(out_dims))
}

/// A tensor's elements as contiguous f32 CPU storage.
fn cpu_f32(s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
    with_float_type!(s.dtype(), "lora_linear", T => {
        Ok(CpuStorage::F32(cpu::to_f32_vec(&cpu::contiguous::<T>(s, l)?)))
    })
}

/// Aᵀ (r, in) and B (r, out), packed for the CPU kernels straight from storages with any
/// 2-D strided layout.
fn cpu_factors<T: Elem>(
    a: (&CpuStorage, &Layout),
    b: (&CpuStorage, &Layout),
    scale: f64,
) -> candle_core::Result<cpu::lora::Factors<T::A>> {
    let (k, rank) = (a.1.dims()[0], a.1.dims()[1]);
    let n = b.1.dims()[1];
    Ok(cpu::lora::factors::<T>(
        factor_view(a, true)?,
        factor_view(b, false)?,
        rank,
        k,
        n,
        scale,
    ))
}

/// A 2-D factor's elements and (row, column) strides, those of its transpose if `transpose`.
fn factor_view<'a, T: Elem>(
    (storage, layout): (&'a CpuStorage, &Layout),
    transpose: bool,
) -> candle_core::Result<cpu::lora::FactorView<'a, T>> {
    let data = &T::cpu_storage_as_slice(storage)?[layout.start_offset()..];
    let (rows, cols) = (layout.stride()[0], layout.stride()[1]);
    let strides = if transpose {
        (cols, rows)
    } else {
        (rows, cols)
    };
    Ok(cpu::lora::FactorView { data, strides })
}

struct LoraDelta {
    scale: f64,
    /// The CPU forward pass's projections `t = scale·x·A` (M, r) in accumulation precision,
    /// for the backward pass (which would otherwise compute them again).
    saved_t: std::sync::Mutex<Option<Tensor>>,
    /// The same on CUDA, where the forward computed them (see `cuda::LoraProjections`).
    #[cfg(feature = "cuda")]
    saved_cuda: std::sync::Mutex<Option<super::cuda::LoraProjections>>,
}

impl LoraDelta {
    fn new(scale: f64) -> Self {
        Self {
            scale,
            saved_t: std::sync::Mutex::new(None),
            #[cfg(feature = "cuda")]
            saved_cuda: std::sync::Mutex::new(None),
        }
    }
}

impl CustomOp3 for LoraDelta {
    fn name(&self) -> &'static str {
        "metal-candle-lora-delta"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, _, out_shape) = row_shape(xl, bl.dims()[1]);
        with_float_type!(xs.dtype(), "lora_delta", T => {
            let f = cpu_factors::<T>((as_, al), (bs, bl), self.scale)?;
            let x = cpu::contiguous::<T>(xs, xl)?;
            let (y, t) = cpu::lora::forward(&x, &f, m);
            let t = <<T as Elem>::A as Acc>::into_tensor(t, &[m, f.rank])?;
            *self.saved_t.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
            Ok((cpu::to_storage(y), out_shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        as_: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, _, out_shape) = row_shape(xl, bl.dims()[1]);
        let (y, saved) = super::cuda::lora_delta_forward(xs, xl, as_, al, bs, bl, self.scale)?;
        *self.saved_cuda.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        Ok((y, out_shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let saved = self.saved_cuda.lock().unwrap_or_else(|e| e.into_inner());
            let (dx, da, db) =
                super::cuda::lora_backward(x, a, b, dy, self.scale, None, saved.as_ref())?;
            return Ok((Some(dx), Some(da), Some(db)));
        }
        let saved_t = self
            .saved_t
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (dx, da, db) = lora_backward(x, a, b, dy, self.scale, None, saved_t.as_ref())?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// Gradients of the LoRA term for `x`, `a` and `b`; `dx_base` (same shape as x) is added
/// into dx when given. `saved_t` is the CPU forward pass's `scale·x·A` (M, r), if kept.
fn lora_backward(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    dy: &Tensor,
    scale: f64,
    dx_base: Option<&Tensor>,
    saved_t: Option<&Tensor>,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    match x.device() {
        candle_core::Device::Cpu => {
            let (xs, xl) = x.storage_and_layout();
            let (as_, al) = a.storage_and_layout();
            let (bs, bl) = b.storage_and_layout();
            let (gs, gl) = dy.storage_and_layout();
            let (Storage::Cpu(xs), Storage::Cpu(as_), Storage::Cpu(bs), Storage::Cpu(gs)) =
                (&*xs, &*as_, &*bs, &*gs)
            else {
                candle_core::bail!("lora backward: all tensors must be on the CPU")
            };
            with_float_type!(x.dtype(), "lora backward", T => {
                let f = cpu_factors::<T>((as_, al), (bs, bl), scale)?;
                let xv = cpu::contiguous::<T>(xs, xl)?;
                let gv = cpu::contiguous::<T>(gs, gl)?;
                let init = dx_base.map(<<T as Elem>::A as Acc>::read_tensor).transpose()?;
                let rows = leading_rows(x.dims());
                let t = saved_t.map(<<T as Elem>::A as Acc>::read_tensor).transpose()?;
                if t.as_ref().is_some_and(|t| t.len() != rows * f.rank) {
                    candle_core::bail!("lora backward: the saved projections do not match x");
                }
                let (dx, dat, db) = cpu::lora::backward(&xv, &gv, &f, init.as_deref(), t.as_deref(), rows);
                Ok((
                    cpu::to_tensor(dx, x.dims())?,
                    cpu::to_tensor(dat, &[f.rank, f.k])?.t()?,
                    cpu::to_tensor(db, &[f.rank, f.n])?,
                ))
            })
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(_) => {
            super::cuda::lora_backward(x, a, b, dy, scale, dx_base, None)
        }
        _ => candle_core::bail!(
            "lora backward: no fused kernel for {:?}",
            x.device().location()
        ),
    }
}

/// The fused LoRA linear op with a frozen base weight held by the op.
struct LoraLinear {
    w: Tensor,
    bias: Option<Tensor>,
    scale: f64,
    /// The CUDA forward's projections `scale·x·A`, where it computed them, for the backward.
    #[cfg(feature = "cuda")]
    saved_cuda: std::sync::Mutex<Option<super::cuda::LoraProjections>>,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "metal-candle-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = bl.dims()[1];
        let (m, k, out_shape) = row_shape(xl, n);
        let (ws, wl) = self.w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("lora_linear: W is not on the CPU")
        };
        let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        with_float_type!(xs.dtype(), "lora_linear", T => {
            let f = cpu_factors::<T>((as_, al), (bs, bl), self.scale)?;
            let x = cpu::contiguous::<T>(xs, xl)?;
            let bias = match &bias_guard {
                Some((s, l)) => match &**s {
                    Storage::Cpu(s) => Some(cpu::contiguous::<T>(s, l)?),
                    _ => candle_core::bail!("lora_linear: bias is not on the CPU"),
                },
                None => None,
            };
            let wt = wl.transpose(0, 1)?;
            let out = if <T as WithDType>::DTYPE == <<T as Elem>::A as Acc>::DTYPE {
                // f32/f64: the base GEMM through candle's CPU matmul writes the output buffer,
                // and one pass adds the bias and the low-rank term into it.
                let base = match xl.contiguous_offsets() {
                    Some((start, _)) => xs.matmul(ws, (1, m, n, k), &Layout::contiguous_with_offset((m, k), start), &wt)?,
                    None => T::to_cpu_storage(&x).matmul(ws, (1, m, n, k), &Layout::contiguous((m, k)), &wt)?,
                };
                let Some(mut out) = T::take(base) else { candle_core::bail!("lora_linear: base GEMM returned another dtype") };
                cpu::lora::forward_into(&x, &f, bias.as_deref(), &mut out);
                out
            } else {
                // bf16/f16: candle's CPU GEMM widens to f32 anyway; keep its f32 output, add
                // the bias and the low-rank term in f32, and round once.
                let x32 = cpu::to_f32_vec(&x);
                let w32 = cpu::to_f32_vec(&cpu::contiguous::<T>(ws, wl)?);
                let bias32 = bias.as_deref().map(cpu::to_f32_vec);
                let base = CpuStorage::F32(x32.clone()).matmul(&CpuStorage::F32(w32), (1, m, n, k), &Layout::contiguous((m, k)), &Layout::contiguous((n, k)).transpose(0, 1)?)?;
                let Some(mut out32) = f32::take(base) else { candle_core::bail!("lora_linear: base GEMM returned another dtype") };
                let f32_factors = cpu_factors::<f32>((&cpu_f32(as_, al)?, &Layout::contiguous(al.dims())), (&cpu_f32(bs, bl)?, &Layout::contiguous(bl.dims())), self.scale)?;
                cpu::lora::forward_into(&x32, &f32_factors, bias32.as_deref(), &mut out32);
                out32.iter().map(|&v| <T as WithDType>::from_f64(v as f64)).collect()
            };
            Ok((cpu::to_storage(out), out_shape))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        as_: &candle_core::CudaStorage,
        al: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, _, out_shape) = row_shape(xl, bl.dims()[1]);
        let (out, saved) = super::cuda::lora_linear_forward(
            xs,
            xl,
            as_,
            al,
            bs,
            bl,
            &self.w,
            self.bias.as_ref(),
            self.scale,
        )?;
        *self.saved_cuda.lock().unwrap_or_else(|e| e.into_inner()) = saved;
        Ok((out, out_shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // On CUDA the low-rank part of dx is written first and the base GEMM dy·W accumulates
        // into it (beta = 1), so no separate (tokens × in) base gradient is materialised.
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let saved = self.saved_cuda.lock().unwrap_or_else(|e| e.into_inner());
            let (dx, da, db) = super::cuda::lora_linear_backward(
                x,
                a,
                b,
                dy,
                &self.w,
                self.scale,
                saved.as_ref(),
            )?;
            return Ok((Some(dx), Some(da), Some(db)));
        }
        // dx = dy·W + scale·(dy·Bᵀ)·Aᵀ: the base part through the device GEMM, the low-rank
        // part added into it by the fused backward pass. On the CPU the base part stays in
        // accumulation precision (f32 for half types) so that dx is rounded once.
        let n = self.w.dim(0)?;
        let base_dtype = match x.device() {
            candle_core::Device::Cpu => cpu::acc_dtype(x.dtype()),
            _ => x.dtype(),
        };
        let dx_base = dy
            .to_dtype(base_dtype)?
            .reshape(((), n))?
            .matmul(&self.w.to_dtype(base_dtype)?)?
            .reshape(x.shape())?;
        let (dx, da, db) = lora_backward(x, a, b, dy, self.scale, Some(&dx_base), None)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// The seed documents' fused LoRA op: `input.apply_op1(FusedLoRAOp::new(a, b, scaling)?)`
/// computes `(input·lora_a)·lora_b·scaling` with `lora_a` (in, rank) and `lora_b`
/// (rank, out), fused on the CPU and on CUDA.
///
/// Because candle's single-input custom ops give a gradient to their one input only, this op
/// differentiates with respect to `input` alone: `lora_a` and `lora_b` are held as constants.
/// To train A and B use [`lora_delta`] or [`crate::lora::LoRALayer`], which differentiate all
/// three. On devices without a fused kernel (Metal) use [`lora_delta`], which picks candle's
/// composed ops there.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use metal_candle::backend::custom_ops::FusedLoRAOp;
/// # fn main() -> metal_candle::Result<()> {
/// let dev = Device::Cpu;
/// let lora_a = Tensor::randn(0f32, 0.1, (512, 8), &dev)?;
/// let lora_b = Tensor::randn(0f32, 0.1, (8, 512), &dev)?;
/// let input = Tensor::randn(0f32, 1., (1, 128, 512), &dev)?;
/// let out = input.apply_op1(FusedLoRAOp::new(lora_a.clone(), lora_b.clone(), 2.0)?)?;
/// let expected = (input.broadcast_matmul(&lora_a)?.broadcast_matmul(&lora_b)? * 2.0)?;
/// let err = (out - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(err < 1e-4);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FusedLoRAOp {
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: f64,
}

impl FusedLoRAOp {
    /// Builds the op; checks that `lora_a` (in, rank) and `lora_b` (rank, out) chain, that the
    /// rank is not 0, that they share a dtype and device, and that `scaling` is finite.
    pub fn new(lora_a: Tensor, lora_b: Tensor, scaling: f64) -> Result<Self> {
        let probe_in = lora_a.dims().first().copied().unwrap_or(0);
        let probe = Tensor::zeros((1, probe_in), lora_a.dtype(), lora_a.device())?;
        check_lora_args("FusedLoRAOp", &probe, &lora_a, &lora_b, scaling)?;
        Ok(Self {
            lora_a,
            lora_b,
            scaling,
        })
    }

    fn check_input(&self, xl: &Layout, dtype: candle_core::DType) -> candle_core::Result<()> {
        let k = self.lora_a.dim(0)?;
        if xl.dims().last() != Some(&k) {
            return Err(Error::shape(
                "FusedLoRAOp",
                format!(
                    "input has shape {:?}; its last dim must be {k} (lora_a's rows)",
                    xl.dims()
                ),
            )
            .into_candle());
        }
        if dtype != self.lora_a.dtype() {
            return Err(Error::dtype(
                "FusedLoRAOp",
                format!("input is {dtype:?} but lora_a is {:?}", self.lora_a.dtype()),
            )
            .into_candle());
        }
        Ok(())
    }
}

impl CustomOp1 for FusedLoRAOp {
    fn name(&self) -> &'static str {
        "metal-candle-fused-lora"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check_input(xl, xs.dtype())?;
        let (as_, al) = self.lora_a.storage_and_layout();
        let (bs, bl) = self.lora_b.storage_and_layout();
        let (Storage::Cpu(as_), Storage::Cpu(bs)) = (&*as_, &*bs) else {
            candle_core::bail!("FusedLoRAOp: lora_a and lora_b must be on the input's device (CPU)")
        };
        LoraDelta::new(self.scaling).cpu_fwd(xs, xl, as_, al, bs, bl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        self.check_input(xl, xs.dtype())?;
        let (as_, al) = self.lora_a.storage_and_layout();
        let (bs, bl) = self.lora_b.storage_and_layout();
        let (Storage::Cuda(as_), Storage::Cuda(bs)) = (&*as_, &*bs) else {
            candle_core::bail!(
                "FusedLoRAOp: lora_a and lora_b must be on the input's device (CUDA)"
            )
        };
        LoraDelta::new(self.scaling).cuda_fwd(xs, xl, as_, al, bs, bl)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (dx, _, _) =
            lora_backward(x, &self.lora_a, &self.lora_b, dy, self.scaling, None, None)?;
        Ok(Some(dx))
    }
}
