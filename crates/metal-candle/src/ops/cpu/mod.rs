//! CPU kernels for the fused ops.
//!
//! Every kernel works row by row: a row is loaded once into an accumulator buffer (`f32` for
//! `f32`/`bf16`/`f16`, `f64` for `f64`), processed with loops that the compiler vectorises, and
//! stored once. Rows are split across threads with rayon. Reductions use several independent
//! lanes so that they vectorise without reassociation flags.

pub(crate) mod attention;
pub(crate) mod cross_entropy;
mod dispatch;
pub(crate) mod lora;
pub(crate) mod norm;
pub(crate) mod rope;
mod rows;
mod simd;
pub(crate) mod softmax;
mod stream;
pub(crate) mod swiglu;

use std::borrow::Cow;

use candle_core::{CpuStorage, DType, Layout, Tensor, WithDType};
use std::mem::MaybeUninit;

pub(crate) use dispatch::with_widest_simd;
pub(crate) use rows::{
    build_row_groups, build_rows, map_rows, row_in_acc, rows_per_task, rows_per_task_for_work,
};
pub(crate) use simd::Acc;

/// A storage element type the kernels accept, with the type it accumulates in.
pub(crate) trait Elem: WithDType + Copy + Send + Sync + 'static {
    /// Accumulation type: `f32` for 32-bit and narrower floats, `f64` for `f64`.
    type A: Acc;
    fn to_acc(self) -> Self::A;
    fn from_acc(a: Self::A) -> Self;

    /// Takes the buffer out of CPU storage of this element type.
    fn take(storage: CpuStorage) -> Option<Vec<Self>>;

    /// Loads `src` into `dst` in accumulation precision.
    #[inline(always)]
    fn load(src: &[Self], dst: &mut [Self::A]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_acc();
        }
    }

    /// Stores `src` into `dst`, rounding to the storage type.
    #[inline(always)]
    fn store(src: &[Self::A], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_acc(*s);
        }
    }

    /// Stores `src` into not-yet-initialised `dst`, rounding to the storage type; writes every
    /// element of `dst` (the lengths must match).
    #[inline(always)]
    fn store_uninit(src: &[Self::A], dst: &mut [MaybeUninit<Self>]) {
        assert_eq!(src.len(), dst.len(), "store_uninit: length mismatch");
        for (d, s) in dst.iter_mut().zip(src) {
            d.write(Self::from_acc(*s));
        }
    }

    /// [`Elem::store_uninit`] with streaming stores (see `stream`): rounds into `staging` (a
    /// row of scratch, resized as needed) and streams that to `dst`; the types whose storage
    /// is their accumulation type stream `src` directly.
    #[inline(always)]
    fn store_uninit_streaming(
        src: &[Self::A],
        dst: &mut [MaybeUninit<Self>],
        staging: &mut Vec<Self>,
    ) {
        staging.resize(src.len(), Self::from_acc(Self::A::ZERO));
        Self::store(src, staging);
        stream::copy_streaming(staging, dst);
    }

    /// `src` viewed in accumulation precision, where that is the storage type (no copy).
    #[inline(always)]
    fn as_acc(src: &[Self]) -> Option<&[Self::A]> {
        let _ = src;
        None
    }
}

impl Elem for f32 {
    fn take(storage: CpuStorage) -> Option<Vec<Self>> {
        match storage {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    type A = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn as_acc(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    #[inline(always)]
    fn store_uninit_streaming(src: &[f32], dst: &mut [MaybeUninit<f32>], _: &mut Vec<f32>) {
        stream::copy_streaming(src, dst);
    }
    #[inline(always)]
    fn from_acc(a: f32) -> f32 {
        a
    }
}

impl Elem for f64 {
    fn take(storage: CpuStorage) -> Option<Vec<Self>> {
        match storage {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    type A = f64;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn as_acc(src: &[f64]) -> Option<&[f64]> {
        Some(src)
    }
    #[inline(always)]
    fn store_uninit_streaming(src: &[f64], dst: &mut [MaybeUninit<f64>], _: &mut Vec<f64>) {
        stream::copy_streaming(src, dst);
    }
    #[inline(always)]
    fn from_acc(a: f64) -> f64 {
        a
    }
}

impl Elem for half::bf16 {
    fn take(storage: CpuStorage) -> Option<Vec<Self>> {
        match storage {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
    type A = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(a: f32) -> Self {
        half::bf16::from_f32(a)
    }
    #[inline(always)]
    fn load(src: &[Self], dst: &mut [f32]) {
        // bf16 is the top half of an f32: a shift, which vectorises (the generic path does not).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
}

impl Elem for half::f16 {
    fn take(storage: CpuStorage) -> Option<Vec<Self>> {
        match storage {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
    }
    type A = f32;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(a: f32) -> Self {
        half::f16::from_f32(a)
    }
}

/// Runs `$body` with `$T` bound to the Rust type of a float `DType`; other dtypes are an error
/// naming the op.
macro_rules! with_float_type {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $T = f64;
                $body
            }
            candle_core::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $T = half::f16;
                $body
            }
            other => Err($crate::ops::unsupported_dtype($op, other)),
        }
    };
}
pub(crate) use with_float_type;

/// The elements of `storage` under `layout` in row-major order: borrowed when the layout is
/// contiguous, otherwise gathered once into a new buffer.
pub(crate) fn contiguous<'a, T: Elem>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<Cow<'a, [T]>> {
    let data = T::cpu_storage_as_slice(storage)?;
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Ok(Cow::Borrowed(&data[start..end]));
    }
    Ok(Cow::Owned(gather(data, layout)))
}

/// Copies a strided view into a contiguous buffer.
fn gather<T: Copy>(data: &[T], layout: &Layout) -> Vec<T> {
    let dims = layout.dims();
    let stride = layout.stride();
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count);
    if count == 0 {
        return out;
    }
    let rank = dims.len();
    if rank == 0 {
        out.push(data[layout.start_offset()]);
        return out;
    }
    // Walk the index like an odometer; the innermost dimension is a strided run.
    let mut index = vec![0usize; rank];
    let (inner_dim, inner_stride) = (dims[rank - 1], stride[rank - 1]);
    loop {
        let base: usize =
            layout.start_offset() + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend((0..inner_dim).map(|i| data[base + i * inner_stride]));
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < dims[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// Reads a whole tensor living on the CPU as a contiguous buffer of `T`.
pub(crate) fn tensor_data<T: Elem>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(contiguous::<T>(cpu, layout)?.into_owned()),
        _ => candle_core::bail!("internal: CPU kernel called with a tensor that is not on the CPU"),
    }
}

/// The dtype the kernels accumulate `dtype` in.
pub(crate) fn acc_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Widens any float slice to f32.
pub(crate) fn to_f32_vec<T: WithDType>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f64() as f32).collect()
}

/// Wraps a result vector into a tensor on the CPU.
pub(crate) fn to_tensor<T: Elem>(data: Vec<T>, shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
}

/// Wraps a result vector into CPU storage.
pub(crate) fn to_storage<T: Elem>(data: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(data)
}

#[allow(dead_code)]
pub(crate) fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_matches_candle_contiguous_for_transposed_and_narrowed_views(
    ) -> candle_core::Result<()> {
        let t = Tensor::arange(0f32, 60., &candle_core::Device::Cpu)?.reshape((3, 4, 5))?;
        for view in [
            t.transpose(0, 2)?,
            t.narrow(1, 1, 2)?,
            t.transpose(1, 2)?.narrow(0, 1, 2)?,
        ] {
            let (s, l) = view.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*s else {
                unreachable!()
            };
            let ours = contiguous::<f32>(cpu, l)?.into_owned();
            let theirs = view.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(ours, theirs);
        }
        Ok(())
    }
}
