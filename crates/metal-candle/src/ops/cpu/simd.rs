//! Accumulator arithmetic shaped for auto-vectorisation.
//!
//! Floating-point addition is not associative, so the compiler will not vectorise a plain
//! `iter().sum()`. These helpers keep `LANES` independent partial results, which it does
//! vectorise, and combine them at the end.

use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub};

const LANES: usize = 16;

/// A float type the kernels accumulate in (`f32` or `f64`).
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + MulAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// The candle dtype of this accumulator.
    const DTYPE: candle_core::DType;
    /// The elements of a tensor of dtype [`Acc::DTYPE`] on the CPU, in row-major order.
    fn read_tensor(t: &candle_core::Tensor) -> candle_core::Result<Vec<Self>>;
    /// Wraps values as CPU storage of dtype [`Acc::DTYPE`].
    fn into_storage(v: Vec<Self>) -> candle_core::CpuStorage;
    /// Wraps values as a CPU tensor of dtype [`Acc::DTYPE`] and shape `shape`.
    fn into_tensor(v: Vec<Self>, shape: &[usize]) -> candle_core::Result<candle_core::Tensor>;
    fn from_f64(v: f64) -> Self;
    fn from_usize(v: usize) -> Self;
    fn sqrt(self) -> Self;
    /// `ln(1 + self)`, accurate for small `self`.
    fn ln_1p(self) -> Self;
    /// `self·b + c` with one rounding (`mul_add`).
    fn fused_mul_add(self, b: Self, c: Self) -> Self;
    /// `self·b + c`, fused (one rounding) where `FMA`: call it with `FMA = true` only from
    /// code compiled with fused multiply-add (see `dispatch`), else it is a slow libm call.
    #[inline(always)]
    fn madd<const FMA: bool>(self, b: Self, c: Self) -> Self {
        if FMA {
            self.fused_mul_add(b, c)
        } else {
            self * b + c
        }
    }
    /// `e^self` for `self ≤ 0` (or −∞ or NaN): what softmax needs after subtracting the row's
    /// maximum.
    fn exp_nonpositive<const FMA: bool>(self) -> Self;
    fn max(self, other: Self) -> Self;
}

impl Acc for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    const DTYPE: candle_core::DType = candle_core::DType::F32;
    fn into_storage(v: Vec<f32>) -> candle_core::CpuStorage {
        candle_core::CpuStorage::F32(v)
    }
    fn into_tensor(v: Vec<f32>, shape: &[usize]) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
    }
    fn read_tensor(t: &candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
        super::tensor_data::<f32>(t)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn fused_mul_add(self, b: f32, c: f32) -> f32 {
        self.mul_add(b, c)
    }
    #[inline(always)]
    fn from_usize(v: usize) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn ln_1p(self) -> f32 {
        f32::ln_1p(self)
    }
    #[inline(always)]
    fn exp_nonpositive<const FMA: bool>(self) -> f32 {
        exp_nonpositive_f32::<FMA>(self)
    }
    #[inline(always)]
    fn max(self, other: f32) -> f32 {
        // A plain comparison (not f32::max) so that it lowers to a vector max.
        if self > other {
            self
        } else {
            other
        }
    }
}

impl Acc for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    const DTYPE: candle_core::DType = candle_core::DType::F64;
    fn into_storage(v: Vec<f64>) -> candle_core::CpuStorage {
        candle_core::CpuStorage::F64(v)
    }
    fn into_tensor(v: Vec<f64>, shape: &[usize]) -> candle_core::Result<candle_core::Tensor> {
        candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
    }
    fn read_tensor(t: &candle_core::Tensor) -> candle_core::Result<Vec<f64>> {
        super::tensor_data::<f64>(t)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn fused_mul_add(self, b: f64, c: f64) -> f64 {
        self.mul_add(b, c)
    }
    #[inline(always)]
    fn from_usize(v: usize) -> f64 {
        v as f64
    }
    #[inline(always)]
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn ln_1p(self) -> f64 {
        f64::ln_1p(self)
    }
    #[inline(always)]
    fn exp_nonpositive<const FMA: bool>(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn max(self, other: f64) -> f64 {
        if self > other {
            self
        } else {
            other
        }
    }
}

/// `e^x` for f32 `x ≤ 0` (−∞ and NaN included), softmax's `e^(x − max)`, without a libm call
/// so that loops over it vectorise. Range reduction `x = n·ln2 + r` with |r| ≤ ln2/2, a
/// degree-7 Taylor polynomial for `e^r` (relative error below 2e-7, about one f32 ulp), and
/// `2^n` (n ∈ [−126, 0]) built as one exponent field; below −87.3 (under f32's normal range,
/// and −∞ as in masked attention) the result is exactly 0; NaN gives NaN. With `FMA` (code
/// compiled with fused multiply-add: see `dispatch`) the multiply-adds are fused, which halves
/// the polynomial's instructions; without, they are separate (`mul_add` there is a libm call).
#[inline(always)]
pub(crate) fn exp_nonpositive_f32<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // Below -87.3 the result is under f32's normal range: 0, as for -inf. NaN passes through.
    let xc = if x < -87.3 { -87.3 } else { x };
    let t = xc.madd::<FMA>(LOG2E, ROUND);
    let n = t - ROUND;
    let r = (-n).madd::<FMA>(LN2_LO, (-n).madd::<FMA>(LN2_HI, xc));
    // Horner's scheme: with FMA, one instruction and one rounding per step.
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.madd::<FMA>(r, c);
    }
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let y = p * f32::from_bits(((ni + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// Σ a[i]
#[inline(always)]
pub(crate) fn sum<A: Acc>(a: &[A]) -> A {
    let mut lanes = [A::ZERO; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            lanes[l] += c[l];
        }
    }
    let mut s = A::ZERO;
    for &v in tail {
        s += v;
    }
    lanes.iter().fold(s, |acc, &v| acc + v)
}

/// Σ a[i]·b[i]
#[inline(always)]
pub(crate) fn dot<A: Acc>(a: &[A], b: &[A]) -> A {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [A::ZERO; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut s = A::ZERO;
    for (&x, &y) in ta.iter().zip(tb) {
        s += x * y;
    }
    lanes.iter().fold(s, |acc, &v| acc + v)
}

/// Σ a[i]·(x[i] − shift): the centred dot product, without the cancellation of
/// `dot(a, x) − shift·Σa` when |shift| ≫ the spread of x.
#[inline(always)]
pub(crate) fn dot_shifted<A: Acc>(a: &[A], x: &[A], shift: A) -> A {
    let n = a.len().min(x.len());
    let (a, x) = (&a[..n], &x[..n]);
    let mut lanes = [A::ZERO; LANES];
    let ca = a.chunks_exact(LANES);
    let cx = x.chunks_exact(LANES);
    let (ta, tx) = (ca.remainder(), cx.remainder());
    for (p, q) in ca.zip(cx) {
        for l in 0..LANES {
            lanes[l] += p[l] * (q[l] - shift);
        }
    }
    let mut s = A::ZERO;
    for (&p, &q) in ta.iter().zip(tx) {
        s += p * (q - shift);
    }
    lanes.iter().fold(s, |acc, &v| acc + v)
}

/// Σ (x[i] − shift)²
#[inline(always)]
pub(crate) fn dot_shifted_sq<A: Acc>(x: &[A], shift: A) -> A {
    let mut lanes = [A::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let d = c[l] - shift;
            lanes[l] += d * d;
        }
    }
    let mut s = A::ZERO;
    for &v in tail {
        s += (v - shift) * (v - shift);
    }
    lanes.iter().fold(s, |acc, &v| acc + v)
}

/// y[i] = e^(x[i] − shift) for `shift` ≥ every x[i] (the row's maximum); returns Σ y[i].
///
/// `next` (the bytes of the row to be processed next, or empty) is prefetched along the way,
/// `stride` bytes of it per 16 elements of `x`: this loop works from cache, so memory would
/// otherwise sit idle while it runs, and the next row's first pass stalls on every line.
///
/// Two loops over the (cached) row rather than one: fused, the compiler kept the sum's lanes
/// in memory inside the `exp` loop and every step waited on a store (measured slower).
#[inline(always)]
pub(crate) fn exp_shifted_sum<A: Acc, const FMA: bool>(
    x: &[A],
    shift: A,
    y: &mut [A],
    next: &[u8],
    stride: usize,
) -> A {
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    let mut xc = x.chunks_exact(LANES);
    let mut yc = y.chunks_exact_mut(LANES);
    for (i, (q, p)) in (&mut yc).zip(&mut xc).enumerate() {
        if let Some(line) = next.get(i * stride) {
            prefetch(line);
        }
        for l in 0..LANES {
            q[l] = (p[l] - shift).exp_nonpositive::<FMA>();
        }
    }
    for (q, &p) in yc.into_remainder().iter_mut().zip(xc.remainder()) {
        *q = (p - shift).exp_nonpositive::<FMA>();
    }
    sum(y)
}

/// Asks the CPU to bring the cache line holding `v` into L1 (a hint; no effect elsewhere).
#[inline(always)]
pub(crate) fn prefetch<V>(v: &V) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults, and SSE is part of the x86-64 baseline.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>((v as *const V).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// max a[i] (−∞ for an empty slice)
#[inline(always)]
pub(crate) fn max<A: Acc>(a: &[A]) -> A {
    let mut lanes = [A::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    let mut m = A::NEG_INFINITY;
    for &v in tail {
        m = m.max(v);
    }
    lanes.iter().fold(m, |acc, &v| acc.max(v))
}

/// y[i] += alpha·x[i]
#[inline(always)]
pub(crate) fn axpy<A: Acc>(alpha: A, x: &[A], y: &mut [A]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_nonpositive_f32_is_within_two_ulps_of_libm_and_handles_the_edges() {
        for (name, exp) in [
            ("fused", exp_nonpositive_f32::<true> as fn(f32) -> f32),
            ("unfused", exp_nonpositive_f32::<false>),
        ] {
            let mut worst = 0f32;
            let mut x = -87.0f32;
            while x <= 0.0 {
                let (ours, libm) = (exp(x), x.exp());
                worst = worst.max(((ours - libm) / libm).abs());
                x += 0.000_7;
            }
            assert!(worst < 2.5e-7, "{name}: worst relative error {worst}");
            assert_eq!(exp(0.0), 1.0, "{name}");
            assert_eq!(exp(-0.0), 1.0, "{name}");
            assert_eq!(exp(f32::NEG_INFINITY), 0.0, "{name}");
            assert_eq!(exp(-100.0), 0.0, "{name}");
            assert!(exp(f32::NAN).is_nan(), "{name}");
        }
    }

    #[test]
    fn lane_reductions_match_sequential_ones() {
        for n in [0usize, 1, 3, 15, 16, 17, 100, 1001] {
            let a: Vec<f64> = (0..n).map(|i| ((i * 7919) % 113) as f64 - 50.0).collect();
            let b: Vec<f64> = (0..n).map(|i| ((i * 31) % 17) as f64 * 0.5).collect();
            assert_eq!(sum(&a), a.iter().sum::<f64>());
            assert_eq!(
                dot(&a, &b),
                a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>()
            );
            let m = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(max(&a), m);
            let shifted: f64 = a.iter().zip(&b).map(|(x, y)| y * (x - 3.0)).sum();
            assert!((dot_shifted(&b, &a, 3.0) - shifted).abs() <= 1e-9 * (1.0 + shifted.abs()));
            let sq: f64 = a.iter().map(|x| (x - 3.0) * (x - 3.0)).sum();
            assert!((dot_shifted_sq(&a, 3.0) - sq).abs() <= 1e-9 * (1.0 + sq));
            let small: Vec<f32> = a.iter().map(|&v| (v / 50.0) as f32).collect();
            let mut e = vec![0f32; n];
            let next = vec![0u8; 100];
            let total = exp_shifted_sum::<f32, false>(&small, 0.5, &mut e, &next, 64);
            for (&ev, &v) in e.iter().zip(&small) {
                assert_eq!(ev, exp_nonpositive_f32::<false>(v - 0.5));
            }
            let seq: f32 = e.iter().sum();
            assert!(
                (total - seq).abs() <= 1e-5 * seq.max(1.0),
                "{total} vs {seq}"
            );
        }
    }
}
