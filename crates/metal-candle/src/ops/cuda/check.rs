//! Self-test of the CUDA kernels: every fused op on CUDA against the plain-candle reference
//! ([`crate::ops::reference`]) computed on the CPU in f64, on fresh random inputs (never
//! zeros), forward and gradients (candle autograd), f32 / bf16 / f16, many shapes (odd sizes,
//! one row, wide rows, batch dims, transposed and narrowed views). Output buffers are poisoned
//! with NaN before every kernel ([`super::set_poison_outputs`]), so an element a kernel fails
//! to write fails the check.
//!
//! Run by `crates/metal-candle/tests/gpu.rs` and by `metal-candle gpu-test` (one binary that
//! can be carried to a GPU machine). Every check returns an error naming the op, shape, dtype
//! and the error it measured; without a usable GPU [`device`] fails.

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::ops::{self, kernel_path, reference, KernelPath};

fn mc<T>(r: crate::Result<T>) -> Result<T> {
    r.map_err(crate::Error::into_candle)
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            candle_core::bail!($($arg)*)
        }
    };
}

/// CUDA device 0, with output poisoning switched on; an error (never a skip) without a GPU.
pub fn device() -> Result<Device> {
    super::set_poison_outputs(true);
    let device = Device::new_cuda(0).map_err(|e| {
        candle_core::Error::Msg(format!(
            "CUDA device 0 could not be opened ({e}); the GPU checks need an NVIDIA GPU and its driver (libcuda.so.1)"
        ))
    })?;
    // As the CLI opens its device, so that the checks run what users run.
    crate::alloc::skip_single_stream_events(&device);
    Ok(device)
}

/// One check: runs on the given CUDA device, an error describes the failure.
pub type Check = fn(&Device) -> Result<()>;

/// Every check, by name, in the order [`run_all`] runs them.
pub const CHECKS: &[(&str, Check)] = &[
    ("dispatch_picks_cuda_kernels", dispatch_picks_cuda_kernels),
    ("softmax_matches_reference", softmax_matches_reference),
    (
        "cross_entropy_matches_reference",
        cross_entropy_matches_reference,
    ),
    ("rms_norm_matches_reference", rms_norm_matches_reference),
    ("layer_norm_matches_reference", layer_norm_matches_reference),
    (
        "layer_norm_backward_without_saved_stats",
        layer_norm_backward_without_saved_stats,
    ),
    ("rope_matches_reference", rope_matches_reference),
    ("swiglu_matches_reference", swiglu_matches_reference),
    ("lora_delta_matches_reference", lora_delta_matches_reference),
    (
        "lora_linear_matches_reference",
        lora_linear_matches_reference,
    ),
    (
        "fused_lora_op_matches_reference",
        fused_lora_op_matches_reference,
    ),
    (
        "frozen_linear_matches_reference",
        frozen_linear_matches_reference,
    ),
    ("adamw_matches_cpu", adamw_matches_cpu),
    (
        "add_rms_norm_matches_reference",
        add_rms_norm_matches_reference,
    ),
    (
        "single_query_attention_matches_reference",
        single_query_attention_matches_reference,
    ),
    (
        "causal_attention_matches_reference",
        causal_attention_matches_reference,
    ),
    ("backward_is_deterministic", backward_is_deterministic),
    (
        "graph_decode_matches_eager",
        crate::generate::graph_check::graph_decode_matches_eager,
    ),
];

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// Relative tolerance on ‖got − want‖ / ‖want‖ for results computed in `dtype` (f32 arithmetic
/// inside every kernel; bf16/f16 round inputs, intermediates and outputs).
fn tol(dtype: DType) -> f64 {
    match dtype {
        // f32: sums that nearly cancel (one output of 16 products) land near 2e-5.
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 2e-2,
    }
}

/// Gradients in bf16/f16 are computed from the saved output and the upstream gradient as
/// stored (rounded), as every framework does; on short rows the softmax gradient
/// `y ⊙ (dy − Σ y ⊙ dy)` cancels and amplifies that rounding, hence a wider tolerance.
fn grad_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 6e-2,
    }
}

fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    let g: Vec<f64> = got
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let w: Vec<f64> = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    ensure!(
        g.len() == w.len(),
        "element counts differ: {:?} vs {:?}",
        got.dims(),
        want.dims()
    );
    if let Some(i) = g.iter().position(|v| !v.is_finite()) {
        candle_core::bail!(
            "element {i} of {:?} is {} (unwritten output or overflow)",
            got.dims(),
            g[i]
        );
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (a, b) in g.iter().zip(&w) {
        num += (a - b) * (a - b);
        den += b * b;
    }
    // Results that are exactly zero in exact arithmetic (softmax over one element, the
    // LayerNorm input gradient of a one-element row) are compared in absolute terms.
    Ok(num.sqrt() / den.sqrt().max(1e-6))
}

fn check(what: &str, t: f64, got: &Tensor, want: &Tensor) -> Result<()> {
    check_with_yardstick(what, t, got, want, None)
}

/// [`check`], where `yardstick` (candle's own composition of the op, run in the same dtype)
/// shows how well-conditioned the case is: where its own error approaches the tolerance (a
/// peaked short softmax row, whose gradient `y ⊙ (dy − Σ y ⊙ dy)` cancels to near zero), the
/// result must be within 10× of that error, never a fixed bound that rounding alone can miss.
fn check_with_yardstick(
    what: &str,
    t: f64,
    got: &Tensor,
    want: &Tensor,
    yardstick: Option<&Tensor>,
) -> Result<()> {
    ensure!(
        got.dims() == want.dims(),
        "{what}: shape {:?}, expected {:?}",
        got.dims(),
        want.dims()
    );
    let e = rel_err(got, want)?;
    let own = yardstick
        .map(|y| rel_err(y, want))
        .transpose()?
        .unwrap_or(0.0);
    let bound = t.max(10.0 * own);
    if e.is_nan() || e > bound {
        candle_core::bail!(
            "{what} ({:?}): relative error {e:.3e} exceeds {bound:.1e} (tolerance {t:.1e}; \
             candle's own composition in this dtype: {own:.3e})",
            got.dtype()
        )
    }
    Ok(())
}

/// Random CPU f32 tensor, rounded once through `dtype` so that the GPU and the f64 reference
/// see exactly the same values.
fn rand(shape: &[usize], std: f32, dtype: DType) -> Result<Tensor> {
    Tensor::randn(0f32, std, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)
}

type View = fn(&Tensor) -> Result<Tensor>;

fn plain(t: &Tensor) -> Result<Tensor> {
    Ok(t.clone())
}
/// Stored transposed: the base is (.., n, m) and the view (.., m, n) is strided.
fn transposed(t: &Tensor) -> Result<Tensor> {
    let r = t.rank();
    t.transpose(r - 2, r - 1)
}
/// The base has 3 extra columns; the view takes the middle ones (offset, strided rows).
fn narrowed(t: &Tensor) -> Result<Tensor> {
    let last = t.dim(candle_core::D::Minus1)?;
    t.narrow(t.rank() - 1, 1, last - 3)
}

/// Evaluates `f` on `bases` (CPU f32) viewed through `views`, on `dev` in `dtype`, and returns
/// the output and the gradients of `sum(y ⊙ r)` w.r.t. every base, all as CPU f64.
fn eval(
    dev: &Device,
    dtype: DType,
    bases: &[Tensor],
    views: &[View],
    r: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> = bases
        .iter()
        .map(|b| Var::from_tensor(&b.to_dtype(dtype)?.to_device(dev)?))
        .collect::<Result<_>>()?;
    let inputs: Vec<Tensor> = vars
        .iter()
        .zip(views)
        .map(|(v, view)| view(v.as_tensor()))
        .collect::<Result<_>>()?;
    let y = f(&inputs)?;
    let acc = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let loss = (y.to_dtype(acc)? * r.to_dtype(acc)?.to_device(dev)?)?.sum_all()?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for v in &vars {
        let Some(g) = grads.get(v.as_tensor()) else {
            candle_core::bail!("no gradient for an input of shape {:?}", v.dims())
        };
        out.push(g.to_device(&Device::Cpu)?.to_dtype(DType::F64)?);
    }
    Ok((y.to_device(&Device::Cpu)?.to_dtype(DType::F64)?, out))
}

/// Runs `fused` on the GPU and `reference` on the CPU in f64 and compares output and grads.
fn compare(
    dev: &Device,
    what: &str,
    dtype: DType,
    bases: &[Tensor],
    views: &[View],
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    compare_with_rounded_terms(dev, what, dtype, bases, views, fused, reference, None)
}

/// A computation on a list of input tensors (an op under test, its reference, or a bound).
type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

/// Unit roundoff of `dtype`: the largest relative error of one rounding.
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        DType::F32 => 2f64.powi(-24),
        _ => 2f64.powi(-53),
    }
}

fn norm(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .sqrt()?
        .to_scalar::<f64>()
}

/// [`compare`] for an op that rounds partial results to `dtype` before summing them (the LoRA
/// linear layer: the low-rank term plus bias is stored, then the base GEMM accumulates into
/// it). `rounded_terms` gives, in y's shape, Σ |partial result| for each output element
/// (computed in f64 from the same inputs); each of those roundings may cost one unit
/// roundoff of it, which the forward bound allows for on top of the tolerance. Where the
/// partial results nearly cancel, that rounding, not a bug, dominates the relative error.
#[allow(clippy::too_many_arguments)]
fn compare_with_rounded_terms(
    dev: &Device,
    what: &str,
    dtype: DType,
    bases: &[Tensor],
    views: &[View],
    fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    rounded_terms: Option<OpFn>,
) -> Result<()> {
    ensure!(
        kernel_path(dev, dtype) == KernelPath::Fused,
        "{what}: CUDA must take the fused kernels for {dtype:?}"
    );
    // The loss weights: random, rounded through dtype like the inputs.
    let probe: Vec<Tensor> = bases
        .iter()
        .zip(views)
        .map(|(b, v)| v(&b.to_dtype(DType::F64)?))
        .collect::<Result<_>>()?;
    let y_shape = reference(&probe)?.dims().to_vec();
    let r = rand(&y_shape, 1.0, dtype)?;
    let (y, g) = eval(dev, dtype, bases, views, &r, fused)?;
    let (y_ref, g_ref) = eval(&Device::Cpu, DType::F64, bases, views, &r, reference)?;
    // The same composition rounded as the op's dtype rounds: how well-conditioned each case is.
    let (y_low, g_low) = eval(&Device::Cpu, dtype, bases, views, &r, reference)?;
    let rounding = match rounded_terms {
        Some(terms) => {
            2.0 * unit_roundoff(dtype) * norm(&terms(&probe)?)? / norm(&y_ref)?.max(1e-6)
        }
        None => 0.0,
    };
    check_with_yardstick(
        &format!("{what} forward"),
        tol(dtype) + rounding,
        &y,
        &y_ref,
        Some(&y_low),
    )?;
    for (i, ((a, b), low)) in g.iter().zip(&g_ref).zip(&g_low).enumerate() {
        check_with_yardstick(
            &format!("{what} gradient of input {i}"),
            grad_tol(dtype),
            a,
            b,
            Some(low),
        )?;
    }
    Ok(())
}

/// Row shapes: odd sizes, one row, batch dims, wide rows (beyond the register-cached length,
/// so the looping path runs too), vector-friendly sizes, and many short rows (several rows
/// for each block of the norms' backward grid).
const ROW_SHAPES: &[&[usize]] = &[
    &[1, 1],
    &[1, 3],
    &[5, 17],
    &[2, 3, 1000],
    &[1, 4099],
    &[7, 4096],
    &[3, 2, 4, 512],
    &[2, 40000],
    &[33, 768],
    &[12000, 72],
];

/// Rows of at least `min_len` elements. The norms start at 3: over one or two elements their
/// output is ±w whatever x (the x-gradient is an O(eps) cancellation, ill-conditioned in f32
/// and meaningless to compare); softmax starts at 1.
fn row_cases(min_len: usize) -> Vec<(Vec<usize>, View, &'static str)> {
    let mut cases: Vec<(Vec<usize>, View, &'static str)> = ROW_SHAPES
        .iter()
        .filter(|s| s.last().is_some_and(|&n| n >= min_len))
        .map(|s| (s.to_vec(), plain as View, "contiguous"))
        .collect();
    // Non-contiguous x: a transposed (6, 17)ᵀ and (64, 40)ᵀ, narrowed rows of 1003 and 4096.
    cases.push((vec![17, 6], transposed, "transposed"));
    cases.push((vec![2, 40, 64], transposed, "transposed"));
    cases.push((vec![9, 1006], narrowed, "narrowed"));
    cases.push((vec![3, 4099], narrowed, "narrowed"));
    cases
}

fn view_dims(shape: &[usize], view: View) -> Result<Vec<usize>> {
    Ok(view(&Tensor::zeros(shape, DType::F32, &Device::Cpu)?)?
        .dims()
        .to_vec())
}

/// See the module docs.
pub fn softmax_matches_reference(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        for (shape, view, kind) in row_cases(1) {
            let x = rand(&shape, 3.0, dtype)?;
            compare(
                dev,
                &format!("softmax {shape:?} {kind}"),
                dtype,
                &[x],
                &[view],
                &|t| mc(ops::softmax_last_dim(&t[0])),
                &|t| reference::softmax_last_dim(&t[0]),
            )?;
        }
    }
    Ok(())
}

/// Targets for `rows` rows of `n` classes, spread over the whole range (the last class too).
fn class_targets(rows: usize, n: usize) -> Result<Tensor> {
    let t: Vec<u32> = (0..rows)
        .map(|r| ((r * 7919 + 13 + n - 1) % n) as u32)
        .collect();
    Tensor::from_vec(t, rows, &Device::Cpu)
}

/// See the module docs. The loss is returned in the logits' dtype so that the comparison's
/// dtype bookkeeping applies (the op itself returns f32).
pub fn cross_entropy_matches_reference(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        for (shape, view, kind) in row_cases(1) {
            let dims = view_dims(&shape, view)?;
            let (lead, n) = dims.split_at(dims.len() - 1);
            let targets = class_targets(lead.iter().product(), n[0])?.reshape(lead)?;
            let x = rand(&shape, 4.0, dtype)?;
            let loss = |t: &[Tensor], f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
                f(&t[0], &targets.to_device(t[0].device())?)?.to_dtype(t[0].dtype())
            };
            compare(
                dev,
                &format!("cross_entropy {shape:?} {kind}"),
                dtype,
                &[x],
                &[view],
                &|t| loss(t, &|x, y| mc(ops::cross_entropy(x, y))),
                &|t| loss(t, &|x, y| reference::cross_entropy(x, y)),
            )?;
        }
    }
    Ok(())
}

/// See the module docs.
pub fn rms_norm_matches_reference(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        for (shape, view, kind) in row_cases(3) {
            let n = *view_dims(&shape, view)?.last().unwrap_or(&1);
            let x = rand(&shape, 1.5, dtype)?;
            let w = (rand(&[n], 0.5, dtype)? + 1.0)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            compare(
                dev,
                &format!("rms_norm {shape:?} {kind}"),
                dtype,
                &[x, w],
                &[view, plain],
                &|t| mc(ops::rms_norm(&t[0], &t[1], 1e-5)),
                &|t| reference::rms_norm(&t[0], &t[1], 1e-5),
            )?;
        }
    }
    Ok(())
}

/// See the module docs.
pub fn layer_norm_matches_reference(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        for (shape, view, kind) in row_cases(3) {
            let n = *view_dims(&shape, view)?.last().unwrap_or(&1);
            // A non-zero mean exercises the centring.
            let x = (rand(&shape, 1.5, dtype)? + 0.7)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            let w = (rand(&[n], 0.5, dtype)? + 1.0)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            let b = rand(&[n], 0.5, dtype)?;
            compare(
                dev,
                &format!("layer_norm {shape:?} {kind}"),
                dtype,
                &[x, w, b],
                &[view, plain, plain],
                &|t| mc(ops::layer_norm(&t[0], &t[1], &t[2], 1e-5)),
                &|t| reference::layer_norm(&t[0], &t[1], &t[2], 1e-5),
            )?;
        }
    }
    Ok(())
}

/// LayerNorm's backward called without the forward's row statistics, which `ops::layer_norm`
/// saves whenever gradients are tracked (so [`layer_norm_matches_reference`] runs the kernels
/// that take them): the kernels that recompute the statistics from x, against the gradients of
/// the f64 reference.
pub fn layer_norm_backward_without_saved_stats(dev: &Device) -> Result<()> {
    let reference = |t: &[Tensor]| reference::layer_norm(&t[0], &t[1], &t[2], 1e-5);
    for dtype in DTYPES {
        for shape in ROW_SHAPES
            .iter()
            .filter(|s| s.last().is_some_and(|&n| n >= 3))
        {
            let n = shape[shape.len() - 1];
            let x = (rand(shape, 1.5, dtype)? + 0.7)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            let w = (rand(&[n], 0.5, dtype)? + 1.0)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            let bases = [x, w, rand(&[n], 0.5, dtype)?];
            let dy = rand(shape, 1.0, dtype)?;
            let views: [View; 3] = [plain, plain, plain];
            let (_, want) = eval(&Device::Cpu, DType::F64, &bases, &views, &dy, &reference)?;
            let (_, low) = eval(&Device::Cpu, dtype, &bases, &views, &dy, &reference)?;
            let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(dev);
            let (dx, dw, db) = super::layer_norm_backward(
                &on(&bases[0])?,
                &on(&bases[1])?,
                &on(&dy)?,
                1e-5,
                None,
            )?;
            for (i, (got, (want, low))) in
                [dx, dw, db].iter().zip(want.iter().zip(&low)).enumerate()
            {
                check_with_yardstick(
                    &format!("layer_norm backward without saved statistics {shape:?}, gradient of input {i}"),
                    grad_tol(dtype),
                    got,
                    want,
                    Some(low),
                )?;
            }
        }
    }
    Ok(())
}

/// (batch, heads, seq, head_dim, tables batched): one pair, odd sizes, half_dim not a whole
/// number of 16-byte packs (130, 6), and the llama sizes (64, 128), vectorised.
const ROPE_SHAPES: &[(usize, usize, usize, usize, bool)] = &[
    (1, 1, 1, 2, true),
    (2, 3, 17, 8, true),
    (2, 3, 17, 8, false),
    (3, 2, 7, 6, true),
    (1, 2, 5, 130, false),
    (1, 4, 33, 64, true),
    (2, 8, 128, 128, false),
];

/// (batch, seq, heads, head_dim) viewed as (batch, heads, seq, head_dim), as attention feeds it.
fn heads_first(t: &Tensor) -> Result<Tensor> {
    t.transpose(1, 2)
}

/// See the module docs. cos and sin are constants captured by the closures, in the inputs'
/// dtype (rounded through the op's dtype first, so the GPU and the truth see the same values).
pub fn rope_matches_reference(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        for &(b, h, s, d, batched) in ROPE_SHAPES {
            let angles = rand(&[if batched { b } else { 1 }, s, d / 2], 3.0, DType::F32)?;
            let (cos, sin) = (
                angles.cos()?.to_dtype(dtype)?,
                angles.sin()?.to_dtype(dtype)?,
            );
            let (cg, sg) = (cos.to_device(dev)?, sin.to_device(dev)?);
            let (cc, sc) = (cos.to_dtype(DType::F64)?, sin.to_dtype(DType::F64)?);
            let cases: [(Vec<usize>, View, &str); 3] = [
                (vec![b, h, s, d], plain, "contiguous"),
                (vec![b, s, h, d], heads_first, "heads transposed"),
                (vec![b, h, s, d + 3], narrowed, "narrowed"),
            ];
            for (shape, view, kind) in cases {
                compare(
                    dev,
                    &format!("rope ({b}, {h}, {s}, {d}) tables batched {batched} {kind}"),
                    dtype,
                    &[rand(&shape, 1.0, dtype)?],
                    &[view],
                    &|t| mc(ops::rope(&t[0], &cg, &sg)),
                    &|t| {
                        let dt = t[0].dtype();
                        reference::rope(&t[0], &cc.to_dtype(dt)?, &sc.to_dtype(dt)?)
                    },
                )?;
            }
        }
    }
    Ok(())
}

/// See the module docs.
pub fn swiglu_matches_reference(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        for (shape, view, kind) in row_cases(1) {
            let gate = rand(&shape, 3.0, dtype)?;
            let up = rand(&view_dims(&shape, view)?, 1.0, dtype)?;
            compare(
                dev,
                &format!("swiglu {shape:?} {kind}"),
                dtype,
                &[gate, up],
                &[view, plain],
                &|t| mc(ops::swiglu(&t[0], &t[1])),
                &|t| reference::swiglu(&t[0], &t[1]),
            )?;
        }
    }
    Ok(())
}

/// (x dims ending in `in`, rank, out)
const LORA_SHAPES: &[(&[usize], usize, usize)] = &[
    (&[1, 1], 1, 1),
    (&[3, 17], 2, 5),
    (&[1, 128, 512], 8, 512),
    (&[2, 7, 1000], 4, 17),
    (&[5, 4099], 3, 33),
    (&[1, 1, 64], 16, 1),
    (&[4, 33, 256], 16, 384),
    // The small kernel's widest seed shape (512 threads per block) ...
    (&[1, 128, 2048], 8, 2048),
    // ... and rows shared by a block (3 and 4 per block, with a shorter last block).
    (&[2, 200, 33], 12, 70),
    (&[601, 40], 8, 24),
    // Large enough for the cuBLAS path (the small one-launch kernel takes the others) ...
    (&[2, 700, 512], 16, 96),
    // ... and a rank above the small kernel's limit of 16.
    (&[1, 50, 96], 24, 40),
    // The vector kernel (A stored (in, r): even index) at the widest seed shape, and the small
    // kernel at a short row (odd index: A transposed).
    (&[1, 128, 2048], 8, 2048),
    (&[3, 64], 8, 16),
    // The tensor-core kernels (bf16, f16) at sizes past the one-launch kernel's: 16-row tiles
    // with a short last one, a second 512-column slab holding 8 columns, rank 8 with A stored
    // (in, r), then rank 13 (padded to 16) with A transposed ...
    (&[3, 211, 1000], 8, 520),
    (&[1, 700, 1024], 13, 136),
    // ... and rows of x that are not whole 16-byte packs ...
    (&[2, 300, 1001], 16, 64),
    // ... and, A transposed, the one pass over dy for G and dB: enough rows for two blocks
    // of 256 rows per SM on an H200 (132 SMs, 9 slabs of 512 columns, the last of 8).
    (&[2, 3850, 8], 16, 4104),
    // The LoRA linear backward merges B·A into W for dx where the layer has no more outputs
    // than rows (the cases above with whole packs); here more outputs than rows keep the
    // low-rank term written into dx by the tensor-core kernel, the GEMM adding onto it.
    (&[1, 200, 2048], 16, 2048),
    // The LoRA linear forward merges B·A into W where y is large enough (m·n at least
    // `FORWARD_MERGE_MIN_OUTPUTS`) and the layer has no more inputs than rows.
    (&[1, 4096, 64], 16, 2048),
    // More for the one-launch kernels: the vector kernel (A (in, r) and B (r, out) dense: the
    // indices 0 and 4 mod 6) at 5 rows, at k = 1000 and at rank 16 over 150 rows; the small
    // kernel at the indices between (A or B transposed).
    (&[2, 3, 40], 4, 24),
    (&[7, 24], 2, 40),
    (&[1, 5, 1024], 8, 512),
    (&[1, 3, 16], 2, 3),
    (&[1, 64, 1000], 8, 1000),
    (&[2, 5, 256], 8, 64),
    (&[1, 9, 24], 8, 8),
    (&[3, 1, 8], 1, 2),
    (&[3, 50, 512], 16, 1024),
];

/// A is given either as (in, r) or, PEFT-style, as the transpose of an (r, in) tensor (B as
/// (r, out) or the transpose of (out, r)); x either contiguous or narrowed.
/// (name, [x, A, B] bases, their views, out, in)
type LoraCase = (String, Vec<Tensor>, Vec<View>, usize, usize);

fn lora_cases(dtype: DType) -> Result<Vec<LoraCase>> {
    let mut cases = Vec::new();
    for (i, &(x_dims, rank, out)) in LORA_SHAPES.iter().enumerate() {
        let k = *x_dims.last().unwrap_or(&1);
        let x = rand(x_dims, 1.0, dtype)?;
        let std_a = 1.0 / (k as f32).sqrt();
        let (a, a_view): (Tensor, View) = if i % 2 == 1 {
            (rand(&[rank, k], std_a, dtype)?, transposed)
        } else {
            (rand(&[k, rank], std_a, dtype)?, plain)
        };
        // B likewise, every third case: PEFT's lora_B (out, r) transposed. The merged weight
        // of the LoRA linear backward reads it through its strides.
        let (b, b_view): (Tensor, View) = if i % 3 == 2 {
            (rand(&[out, rank], 0.5, dtype)?, transposed)
        } else {
            (rand(&[rank, out], 0.5, dtype)?, plain)
        };
        cases.push((
            format!("x {x_dims:?} r {rank} out {out}"),
            vec![x, a, b],
            vec![plain as View, a_view, b_view],
            out,
            k,
        ));
    }
    // Narrowed x: rows of 515 taken from rows of 518.
    let x = rand(&[6, 518], 1.0, dtype)?;
    let a = rand(&[515, 8], 0.05, dtype)?;
    let b = rand(&[8, 40], 0.5, dtype)?;
    cases.push((
        "narrowed x (6, 515) r 8 out 40".into(),
        vec![x, a, b],
        vec![narrowed as View, plain, plain],
        40,
        515,
    ));
    Ok(cases)
}

/// See the module docs.
pub fn lora_delta_matches_reference(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        for (name, bases, views, _, _) in lora_cases(dtype)? {
            compare(
                dev,
                &format!("lora_delta {name}"),
                dtype,
                &bases,
                &views,
                &|t| mc(ops::lora_delta(&t[0], &t[1], &t[2], 2.0)),
                &|t| reference::lora_delta(&t[0], &t[1], &t[2], 2.0),
            )?;
        }
    }
    Ok(())
}

/// See the module docs.
pub fn lora_linear_matches_reference(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        for (name, bases, views, out, k) in lora_cases(dtype)? {
            // W and the bias are frozen constants (the fused path); built in dtype.
            let w = rand(&[out, k], 1.0 / (k as f32).sqrt(), dtype)?;
            let bias = rand(&[out], 0.5, dtype)?;
            for with_bias in [false, true] {
                let (wg, bg) = (
                    w.to_dtype(dtype)?.to_device(dev)?,
                    bias.to_dtype(dtype)?.to_device(dev)?,
                );
                let (wc, bc) = (w.to_dtype(DType::F64)?, bias.to_dtype(DType::F64)?);
                // Σ |partial result| the kernels round: scale·(x·A)·B + bias, then x·Wᵀ.
                let terms = |t: &[Tensor]| -> Result<Tensor> {
                    let lora = reference::lora_delta(&t[0], &t[1], &t[2], 0.5)?;
                    let lora = match with_bias {
                        true => lora.broadcast_add(&bc)?,
                        false => lora,
                    };
                    let base = t[0].broadcast_matmul(&wc.t()?)?;
                    lora.abs()? + base.abs()?
                };
                compare_with_rounded_terms(
                    dev,
                    &format!("lora_linear {name} bias {with_bias}"),
                    dtype,
                    &bases,
                    &views,
                    &|t| {
                        mc(ops::lora_linear(
                            &t[0],
                            &wg,
                            with_bias.then_some(&bg),
                            &t[1],
                            &t[2],
                            0.5,
                        ))
                    },
                    // In the dtype of the inputs: f64 for the truth, the op's dtype for the
                    // yardstick (see `compare`).
                    &|t| {
                        let (w, b) = (wc.to_dtype(t[0].dtype())?, bc.to_dtype(t[0].dtype())?);
                        reference::lora_linear(
                            &t[0],
                            &w,
                            with_bias.then_some(&b),
                            &t[1],
                            &t[2],
                            0.5,
                        )
                    },
                    Some(&terms),
                )?;
            }
        }
    }
    Ok(())
}

/// `FusedLoRAOp` (the seed's API) on CUDA against the reference.
pub fn fused_lora_op_matches_reference(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        let x = rand(&[1, 128, 512], 1.0, dtype)?;
        let a = rand(&[512, 8], 0.05, dtype)?;
        let b = rand(&[8, 512], 0.5, dtype)?;
        let op = ops::FusedLoRAOp::new(
            a.to_dtype(dtype)?.to_device(dev)?,
            b.to_dtype(dtype)?.to_device(dev)?,
            2.0,
        );
        let op = mc(op)?;
        let y = x.to_dtype(dtype)?.to_device(dev)?.apply_op1(op)?;
        let want = reference::lora_delta(
            &x.to_dtype(DType::F64)?,
            &a.to_dtype(DType::F64)?,
            &b.to_dtype(DType::F64)?,
            2.0,
        )?;
        check("FusedLoRAOp", tol(dtype), &y, &want)?;
    }
    Ok(())
}

/// f32/bf16/f16 take the CUDA kernels, f64 candle's composed ops.
pub fn dispatch_picks_cuda_kernels(dev: &Device) -> Result<()> {
    for dtype in DTYPES {
        ensure!(
            kernel_path(dev, dtype) == KernelPath::Fused,
            "{dtype:?} does not take the fused kernels on CUDA"
        );
    }
    ensure!(
        kernel_path(dev, DType::F64) == KernelPath::Reference,
        "f64 must take the reference path on CUDA"
    );
    Ok(())
}

/// The same inputs twice give bit-identical results (no race in the reductions).
pub fn backward_is_deterministic(dev: &Device) -> Result<()> {
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (4096, 1024), dev)?)?;
    let w = Var::from_tensor(&(Tensor::randn(0f32, 0.2, 1024, dev)? + 1.0)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.2, 1024, dev)?)?;
    let r = Tensor::randn(0f32, 1., (4096, 1024), dev)?;
    let run = || -> Result<Vec<Vec<f32>>> {
        let y = mc(ops::layer_norm(
            x.as_tensor(),
            w.as_tensor(),
            b.as_tensor(),
            1e-5,
        ))?;
        let g = (y * &r)?.sum_all()?.backward()?;
        [x.as_tensor(), w.as_tensor(), b.as_tensor()]
            .iter()
            .map(|t| {
                g.get(t).map_or_else(
                    || candle_core::bail!("missing grad"),
                    |g| g.flatten_all()?.to_vec1::<f32>(),
                )
            })
            .collect()
    };
    ensure!(
        run()? == run()?,
        "layer_norm backward differs between two identical runs"
    );
    Ok(())
}

/// Runs every check in [`CHECKS`]; returns each name with its outcome.
pub fn run_all(dev: &Device) -> Vec<(&'static str, Result<()>)> {
    CHECKS.iter().map(|&(name, f)| (name, f(dev))).collect()
}

/// `frozen_linear` on CUDA (one GEMM; the bias written first and accumulated into) against
/// the CPU f64 reference, forward and x's gradient (W and the bias are constants).
pub fn frozen_linear_matches_reference(dev: &Device) -> Result<()> {
    let cases: [(&[usize], usize, View, &str); 6] = [
        (&[1, 1], 1, plain, "contiguous"),
        (&[5, 17], 3, plain, "contiguous"),
        (&[2, 3, 64], 130, plain, "contiguous"),
        (&[4, 4096], 257, plain, "contiguous"),
        (&[17, 6], 9, transposed, "transposed"),
        (&[9, 1006], 40, narrowed, "narrowed"),
    ];
    // The constants in the dtype and on the device of the op's input.
    let like = |t: &Tensor, x: &Tensor| t.to_dtype(x.dtype())?.to_device(x.device());
    for dtype in DTYPES {
        for (shape, n, view, kind) in cases {
            let k = *view_dims(shape, view)?.last().unwrap_or(&1);
            let w = rand(&[n, k], (1.0 / k as f32).sqrt(), dtype)?;
            let bias = rand(&[n], 1.0, dtype)?;
            for with_bias in [false, true] {
                let fused = |t: &[Tensor]| {
                    let b = if with_bias {
                        Some(like(&bias, &t[0])?)
                    } else {
                        None
                    };
                    mc(ops::frozen_linear(&t[0], &like(&w, &t[0])?, b.as_ref()))
                };
                let refr = |t: &[Tensor]| {
                    let y = t[0].broadcast_matmul(&like(&w, &t[0])?.t()?)?;
                    if with_bias {
                        y.broadcast_add(&like(&bias, &t[0])?)
                    } else {
                        Ok(y)
                    }
                };
                compare(
                    dev,
                    &format!("frozen_linear {shape:?} {kind} -> {n} bias {with_bias}"),
                    dtype,
                    &[rand(shape, 1.0, dtype)?],
                    &[view],
                    &fused,
                    &refr,
                )?;
            }
        }
    }
    Ok(())
}

/// The fused AdamW update on CUDA against the same update on the CPU: three steps with
/// weight decay and a gradient scale (clipping folded in) on parameters of several shapes.
pub fn adamw_matches_cpu(dev: &Device) -> Result<()> {
    use crate::train::{AdamW, AdamWConfig};
    let config = AdamWConfig {
        weight_decay: 0.01,
        ..AdamWConfig::default()
    };
    let shapes: [&[usize]; 4] = [&[1], &[7, 3], &[2048, 16], &[16, 4099]];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| rand(s, 1.0, DType::F32))
        .collect::<Result<_>>()?;
    let run = |device: &Device| -> Result<Vec<Tensor>> {
        let vars: Vec<(String, Var)> = init
            .iter()
            .enumerate()
            .map(|(i, t)| Ok((format!("p{i}"), Var::from_tensor(&t.to_device(device)?)?)))
            .collect::<Result<_>>()?;
        let mut opt = mc(AdamW::new(vars.clone(), config.clone()))?;
        for step in 0..3 {
            let grads = init
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    Ok(Some(
                        ((t * (0.3 + i as f64))? + step as f64)?.to_device(device)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            mc(opt.step_scaled(&grads, 1e-2, 0.7))?;
        }
        vars.iter()
            .map(|(_, v)| v.as_tensor().to_device(&Device::Cpu))
            .collect()
    };
    let (gpu, cpu) = (run(dev)?, run(&Device::Cpu)?);
    for (i, (g, c)) in gpu.iter().zip(&cpu).enumerate() {
        let e = rel_err(g, c)?;
        ensure!(
            e.is_finite() && e < 1e-5,
            "adamw parameter {i} {:?}: GPU vs CPU relative error {e:.3e}",
            g.dims()
        );
    }
    Ok(())
}

/// `add_rms_norm` on CUDA (one kernel for inference) against `x + r` rounded to the dtype and
/// RMSNorm in f64 on the CPU; outputs poisoned. The widest rows exceed the kernel's registers
/// and take the two-op path, which must agree as well.
pub fn add_rms_norm_matches_reference(dev: &Device) -> Result<()> {
    let shapes: [&[usize]; 6] = [
        &[1, 1],
        &[1, 576],
        &[8, 2048],
        &[3, 17],
        &[2, 3, 4099],
        &[2, 40000],
    ];
    for dtype in DTYPES {
        for shape in shapes {
            let n = *shape.last().unwrap_or(&1);
            let (x, r, w) = (
                rand(shape, 1.0, dtype)?,
                rand(shape, 1.0, dtype)?,
                rand(&[n], 1.0, dtype)?,
            );
            let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(dev);
            let (s, y) = mc(ops::add_rms_norm(&on(&x)?, &on(&r)?, &on(&w)?, 1e-5))?;
            let s_ref = (x.to_dtype(DType::F64)? + r.to_dtype(DType::F64)?)?
                .to_dtype(dtype)?
                .to_dtype(DType::F64)?;
            let y_ref = reference::rms_norm(&s_ref, &w.to_dtype(DType::F64)?, 1e-5)?;
            check(
                &format!("add_rms_norm {shape:?} {dtype:?} sum"),
                tol(dtype),
                &s,
                &s_ref,
            )?;
            check(
                &format!("add_rms_norm {shape:?} {dtype:?} norm"),
                tol(dtype),
                &y,
                &y_ref,
            )?;
        }
    }
    Ok(())
}

/// `single_query_attention` on CUDA (one kernel for decoding) against the same function on
/// the CPU in f64 (two matmuls and a softmax), with K/V as views of larger cache buffers and
/// grouped heads; output poisoned. The last case has more keys than shared memory holds and
/// takes the composed path, which must agree too.
pub fn single_query_attention_matches_reference(dev: &Device) -> Result<()> {
    let cases = [
        (1, 1, 1, 1, 8),
        (1, 9, 3, 130, 64),
        (8, 32, 8, 256, 64),
        (2, 4, 4, 300, 128),
        (1, 6, 2, 17, 80),
        (1, 2, 1, 20000, 64),
    ];
    for dtype in DTYPES {
        for (b, heads, kv_heads, keys, d) in cases {
            let q = rand(&[b, heads, 1, d], 0.3, dtype)?;
            let kbuf = rand(&[b, kv_heads, keys + 3, d], 1.0, dtype)?;
            let vbuf = rand(&[b, kv_heads, keys + 3, d], 1.0, dtype)?;
            let on = |t: &Tensor| t.to_dtype(dtype)?.to_device(dev);
            let (kd, vd) = (
                on(&kbuf)?.narrow(2, 0, keys)?,
                on(&vbuf)?.narrow(2, 0, keys)?,
            );
            let y = mc(ops::single_query_attention(&on(&q)?, &kd, &vd))?;
            let f64s = |t: &Tensor| t.to_dtype(DType::F64);
            let want = mc(ops::single_query_attention(
                &f64s(&q)?,
                &f64s(&kbuf)?.narrow(2, 0, keys)?,
                &f64s(&vbuf)?.narrow(2, 0, keys)?,
            ))?;
            // candle's composition in the same dtype, as the yardstick: an output that averages
            // 20000 random values is near zero, and its relative error in bf16 reached the
            // fixed tolerance in some draws for any implementation.
            let scores = on(&q)?
                .reshape((b, kv_heads, heads / kv_heads, d))?
                .matmul(&kd.contiguous()?.t()?)?;
            let own = candle_nn::ops::softmax_last_dim(&scores)?
                .matmul(&vd.contiguous()?)?
                .reshape((b, heads, 1, d))?;
            check_with_yardstick(
                &format!("single_query_attention b {b} heads {heads}/{kv_heads} keys {keys} d {d} {dtype:?}"),
                tol(dtype),
                &y,
                &want,
                Some(&own),
            )?;
        }
    }
    Ok(())
}

/// `causal_attention` on CUDA (batched GEMMs around the masked-softmax kernels) against the
/// composed reference on the CPU in f64, forward and the gradients of q, k and v: grouped
/// heads, q as the model passes it (heads transposed from (batch, seq, heads, d)), prefill
/// after cached keys, packed rows (`first_key`), and rows of keys longer than the kernels'
/// register cache (the looping path).
pub fn causal_attention_matches_reference(dev: &Device) -> Result<()> {
    // (batch, heads, kv_heads, queries, keys, head_dim, packed)
    let cases = [
        (1, 1, 1, 1, 1, 8, false),
        (2, 4, 2, 7, 7, 16, true),
        (2, 9, 3, 130, 130, 64, true),
        (1, 8, 2, 256, 256, 64, false),
        (2, 6, 6, 5, 40, 32, false),
        (1, 2, 1, 3, 9000, 16, false),
        (1, 4, 1, 1100, 1100, 8, true),
    ];
    for dtype in DTYPES {
        for (b, heads, kv_heads, s, t, d, packed) in cases {
            let first_key = if packed {
                // Examples of 1 to 48 tokens.
                let starts: Vec<u32> = (0..b * s)
                    .map(|i| {
                        let i = i % s;
                        (i - i % (1 + (i * 7919) % 48)) as u32
                    })
                    .collect();
                Some(Tensor::from_vec(starts, (b, s), &Device::Cpu)?)
            } else {
                None
            };
            let fk_dev = first_key.as_ref().map(|f| f.to_device(dev)).transpose()?;
            let scale = 1.0 / (d as f64).sqrt();
            compare(
                dev,
                &format!("causal_attention b {b} heads {heads}/{kv_heads} s {s} t {t} d {d} packed {packed}"),
                dtype,
                &[
                    rand(&[b, s, heads, d], 1.0, dtype)?,
                    rand(&[b, kv_heads, t, d], 1.0, dtype)?,
                    rand(&[b, kv_heads, t, d], 1.0, dtype)?,
                ],
                &[heads_first, plain, plain],
                &|x| mc(ops::causal_attention(&x[0], &x[1], &x[2], scale, fk_dev.as_ref())),
                &|x| reference::causal_attention(&x[0], &x[1], &x[2], scale, first_key.as_ref()),
            )?;
        }
    }
    Ok(())
}
