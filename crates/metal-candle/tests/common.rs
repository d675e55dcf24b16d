//! Shared helpers for the op tests: random inputs, views, comparisons and gradient checks.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};

/// An op under test: takes its inputs (x first) and returns its output.
pub type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> metal_candle::Result<Tensor>;

/// Relative L2 error ‖a − b‖ / ‖b‖ computed in f64 (absolute when ‖b‖ is 0).
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let err = if norm > 0.0 { diff / norm } else { diff };
    assert!(!err.is_nan(), "NaN in comparison");
    Ok(err)
}

/// Largest absolute elementwise difference, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (
        a.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The tolerance for relative error of a single op in `dtype`.
pub fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::F32 => 2e-5,
        DType::F16 => 4e-3,
        DType::BF16 => 2e-2,
        _ => unreachable!(),
    }
}

thread_local! {
    /// One generator per test thread (libtest runs each test on its own thread), seeded the
    /// same way every time: a test sees the same inputs on every run, so a failure reproduces.
    /// candle's CPU generator cannot be seeded, and unseeded inputs made rare ill-conditioned
    /// cases (a cancelling 1 × 1 bf16 sum, a 1-wide norm's weight gradient) fail CI at random.
    static RNG: std::cell::RefCell<rand::rngs::StdRng> =
        std::cell::RefCell::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x5eed));
}

/// Deterministic random tensor of `dims` in `dtype`, N(mean, std) (Box–Muller on the test
/// thread's seeded generator).
pub fn randn(dims: &[usize], mean: f64, std: f64, dtype: DType) -> Result<Tensor> {
    use rand::Rng;
    let n: usize = dims.iter().product();
    let values: Vec<f64> = RNG.with(|rng| {
        let mut rng = rng.borrow_mut();
        (0..n)
            .map(|_| {
                // u1 in (0, 1] keeps the logarithm finite.
                let u1 = 1.0 - rng.random::<f64>();
                let u2 = rng.random::<f64>();
                mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect()
    });
    Tensor::from_vec(values, dims, &Device::Cpu)?.to_dtype(dtype)
}

/// How an input is laid out in memory when handed to the op.
#[derive(Debug, Clone, Copy)]
pub enum View {
    Contiguous,
    /// Built transposed in memory (last two dims swapped), then `.t()`: non-contiguous.
    Transposed,
    /// A narrow of a wider tensor along the last dim: strided rows.
    Narrowed,
}

/// `t` re-laid out as `view` (same values, same shape).
pub fn as_view(t: &Tensor, view: View) -> Result<Tensor> {
    match view {
        View::Contiguous => Ok(t.clone()),
        View::Transposed if t.rank() >= 2 => {
            let r = t.rank();
            let v = t
                .transpose(r - 2, r - 1)?
                .contiguous()?
                .transpose(r - 2, r - 1)?;
            assert!(!v.is_contiguous() || t.dims()[r - 1] == 1 || t.dims()[r - 2] == 1);
            Ok(v)
        }
        View::Transposed => Ok(t.clone()),
        View::Narrowed => {
            let r = t.rank();
            let pad = Tensor::zeros(t.dims(), t.dtype(), t.device())?;
            let wide = Tensor::cat(&[&pad, t, &pad], r - 1)?;
            let n = t.dims()[r - 1];
            wide.narrow(r - 1, n, n)
        }
    }
}

/// Runs `op` with every input as a variable, backpropagates `sum(y ⊙ upstream)`, and returns
/// the output and the gradient of each input.
pub fn forward_backward(
    op: OpFn,
    inputs: &[Tensor],
    upstream: &Tensor,
) -> anyhow_like::Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = op(&ts)?;
    let loss = (y.to_dtype(DType::F64)? * upstream.to_dtype(DType::F64)?)?.sum_all()?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for (i, v) in vars.iter().enumerate() {
        let g = grads
            .get(v.as_tensor())
            .ok_or_else(|| format!("no gradient reached input {i}"))?;
        out.push(g.clone());
    }
    Ok((y, out))
}

/// A minimal boxed error for test helpers.
pub mod anyhow_like {
    pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;
}

/// Central finite differences of `L = Σ op(inputs) ⊙ upstream` (f64) with respect to every
/// element of input `which` (or up to `max_elems` elements, evenly spaced).
pub fn finite_difference(
    op: OpFn,
    inputs: &[Tensor],
    upstream: &Tensor,
    which: usize,
    max_elems: usize,
) -> anyhow_like::Result<Vec<(usize, f64)>> {
    let loss = |ins: &[Tensor]| -> anyhow_like::Result<f64> {
        Ok((op(ins)? * upstream)?.sum_all()?.to_scalar::<f64>()?)
    };
    let base: Vec<f64> = inputs[which].flatten_all()?.to_vec1()?;
    let n = base.len();
    let step = (n / max_elems).max(1);
    let mut out = Vec::new();
    for idx in (0..n).step_by(step) {
        let h = 1e-6 * base[idx].abs().max(1.0);
        let mut plus = base.clone();
        plus[idx] += h;
        let mut minus = base.clone();
        minus[idx] -= h;
        let mut ins = inputs.to_vec();
        ins[which] = Tensor::from_vec(plus, inputs[which].dims(), &Device::Cpu)?;
        let lp = loss(&ins)?;
        ins[which] = Tensor::from_vec(minus, inputs[which].dims(), &Device::Cpu)?;
        let lm = loss(&ins)?;
        out.push((idx, (lp - lm) / (2.0 * h)));
    }
    Ok(out)
}
