//! Shared plumbing for the CUDA kernels: element types, inputs made contiguous, outputs,
//! launches.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, Layout, Result, Shape, Storage, Tensor, WithDType};

pub(super) const SOFTMAX_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));
pub(super) const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
pub(super) const LORA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora.ptx"));
pub(super) const LORA_TC_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora_tc.ptx"));
pub(super) const ELEMENTWISE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/elementwise.ptx"));
pub(super) const OPTIM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
pub(super) const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// A storage element type with CUDA kernels.
pub(super) trait Elem:
    CudaDType + DeviceRepr + ValidAsZeroBits + WithDType + Copy + 'static
{
    /// Suffix of the kernel names (`f32`, `bf16`, `f16`).
    const NAME: &'static str;
    /// Elements per 16-byte vector.
    const VEC: usize;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    const VEC: usize = 4;
}
impl Elem for half::bf16 {
    const NAME: &'static str = "bf16";
    const VEC: usize = 8;
}
impl Elem for half::f16 {
    const NAME: &'static str = "f16";
    const VEC: usize = 8;
}

/// Runs `$body` with `$T` bound to the storage type of `$dtype`.
macro_rules! with_elem {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $T = f32;
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
pub(super) use with_elem;

static POISON: AtomicBool = AtomicBool::new(false);

/// Test hook: when on, every output buffer the CUDA kernels allocate is filled with NaN
/// (all bits set) before the kernel runs, so that an element a kernel fails to write shows up
/// as NaN instead of as a stale value. Off by default (it costs one memset per output).
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

/// An input as a contiguous run of elements: borrowed when the layout is already contiguous,
/// otherwise copied once into a fresh contiguous buffer.
pub(super) struct Input<'a> {
    owned: Option<CudaStorage>,
    src: &'a CudaStorage,
    start: usize,
    len: usize,
}

impl<'a> Input<'a> {
    /// A buffer built by the caller (`len` elements from its start); `src` is only a fallback
    /// reference and is never read.
    pub(super) fn owned(storage: CudaStorage, src: &'a CudaStorage, len: usize) -> Self {
        Self {
            owned: Some(storage),
            src,
            start: 0,
            len,
        }
    }

    pub(super) fn view<T: CudaDType>(&self) -> Result<CudaView<'_, T>> {
        let s = self.owned.as_ref().unwrap_or(self.src);
        Ok(s.as_cuda_slice::<T>()?
            .slice(self.start..self.start + self.len))
    }
}

/// `s` under layout `l` as a contiguous row-major run (copied once if strided).
pub(super) fn input<'a>(s: &'a CudaStorage, l: &Layout) -> Result<Input<'a>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(Input {
            owned: None,
            src: s,
            start,
            len: end - start,
        }),
        None => Ok(Input {
            owned: Some(copy_contiguous(s, l)?),
            src: s,
            start: 0,
            len: l.shape().elem_count(),
        }),
    }
}

fn copy_contiguous(s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
    // SAFETY: copy_strided_src writes every element of the fresh buffer.
    let mut dst = unsafe { s.device().alloc_uninit(l.shape(), s.dtype()) }?;
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok(dst)
}

/// A 2-D matrix operand for cuBLAS: row-major with leading dim `ld`, or the transpose of one
/// (`trans`), as candle's `.t()` views are; any other layout is copied contiguous once.
pub(super) struct Matrix<'a> {
    pub(super) data: Input<'a>,
    pub(super) trans: bool,
    pub(super) ld: usize,
}

/// Where element (i, j) of a stored matrix operand sits: at `i·s0 + j·s1`; returns (s0, s1).
pub(super) fn element_strides(mat: &Matrix<'_>) -> (usize, usize) {
    if mat.trans {
        (1, mat.ld)
    } else {
        (mat.ld, 1)
    }
}

pub(super) fn matrix<'a>(s: &'a CudaStorage, l: &Layout) -> Result<Matrix<'a>> {
    let (dims, strides) = (l.dims(), l.stride());
    if dims.len() != 2 {
        candle_core::bail!("expected a matrix, got shape {:?}", dims)
    }
    let (r, c) = (dims[0], dims[1]);
    let len = r * c;
    let start = l.start_offset();
    if strides[1] == 1 && (strides[0] == c || r <= 1) {
        return Ok(Matrix {
            data: Input {
                owned: None,
                src: s,
                start,
                len,
            },
            trans: false,
            ld: c.max(1),
        });
    }
    if strides[0] == 1 && (strides[1] == r || c <= 1) {
        return Ok(Matrix {
            data: Input {
                owned: None,
                src: s,
                start,
                len,
            },
            trans: true,
            ld: r.max(1),
        });
    }
    let owned = copy_contiguous(s, l)?;
    Ok(Matrix {
        data: Input {
            owned: Some(owned),
            src: s,
            start: 0,
            len,
        },
        trans: false,
        ld: c.max(1),
    })
}

/// The CUDA storage behind a tensor's storage guard.
pub(super) fn cuda_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{what} is not on a CUDA device"),
    }
}

/// A fresh device buffer of `len` elements (NaN-poisoned when the test hook is on).
pub(super) fn alloc_out<T: Elem>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller writes the whole buffer before it is read.
    let mut out = unsafe { dev.alloc::<T>(len) }?;
    if POISON.load(Ordering::Relaxed) && len > 0 {
        let stream = dev.cuda_stream();
        let bytes = len * std::mem::size_of::<T>();
        let (ptr, _guard) = out.device_ptr_mut(&stream);
        // SAFETY: ptr is a live allocation of `bytes` bytes on this stream.
        unsafe { result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }.w()?;
    }
    Ok(out)
}

/// Wraps a finished buffer as a tensor of `shape` (no gradient tracking: used in backward).
pub(super) fn to_tensor<T: Elem>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = Storage::Cuda(T::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// Whether a view's device address is 16-byte aligned (a vector load of it is legal).
pub(super) fn aligned16<T>(v: &CudaView<'_, T>, dev: &CudaDevice) -> bool {
    let stream = dev.cuda_stream();
    let (ptr, _guard) = v.device_ptr(&stream);
    ptr % 16 == 0
}

/// A kernel and the most threads per block it can be launched with.
#[derive(Clone)]
pub(super) struct Kernel {
    func: CudaFunction,
    max_threads: u32,
}

impl std::ops::Deref for Kernel {
    type Target = CudaFunction;
    fn deref(&self) -> &CudaFunction {
        &self.func
    }
}

/// Kernels and SM counts already looked up, per device. Looking a function up in its module,
/// asking its thread limit and asking the SM count are driver calls, which need not be made
/// again for every launch. (Measured on an H200, taking them out moved the seed-shape
/// latency by less than the run-to-run spread, about 1 µs.)
struct DeviceCache {
    kernels: HashMap<(DeviceId, String), Kernel>,
    sm_counts: HashMap<DeviceId, u32>,
    compute_majors: HashMap<DeviceId, u32>,
}

fn device_cache() -> MutexGuard<'static, DeviceCache> {
    static CACHE: OnceLock<Mutex<DeviceCache>> = OnceLock::new();
    CACHE
        .get_or_init(|| {
            Mutex::new(DeviceCache {
                kernels: HashMap::new(),
                sm_counts: HashMap::new(),
                compute_majors: HashMap::new(),
            })
        })
        .lock()
        // The cache holds only finished lookups: a panic elsewhere cannot leave it half-written.
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Loads (once per device) the module `module` from `ptx` and returns its kernel `name`.
pub(super) fn load(dev: &CudaDevice, name: &str, module: &str, ptx: &str) -> Result<Kernel> {
    let key = (dev.id(), name.to_string());
    if let Some(kernel) = device_cache().kernels.get(&key) {
        return Ok(kernel.clone());
    }
    let func = dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function();
    let max = func
        .get_attribute(sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)
        .w()?;
    let kernel = Kernel {
        func,
        max_threads: (max.max(32) as u32) / 32 * 32,
    };
    device_cache().kernels.insert(key, kernel.clone());
    Ok(kernel)
}

pub(super) fn sm_count(dev: &CudaDevice) -> Result<u32> {
    if let Some(&n) = device_cache().sm_counts.get(&dev.id()) {
        return Ok(n);
    }
    let n = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let n = n.max(1) as u32;
    device_cache().sm_counts.insert(dev.id(), n);
    Ok(n)
}

/// Whether the tensor-core kernels (`kernels/lora_tc.cu`: mma.sync and movmatrix, sm_80 and
/// later) can run: the device is sm_80 or later and the PTX was built for sm_80 or later
/// (`CUDA_COMPUTE_CAP`; built for less, those kernels are empty).
pub(super) fn tensor_cores(dev: &CudaDevice) -> Result<bool> {
    let built: u32 = env!("METAL_CANDLE_CUDA_CAP").parse().unwrap_or(0);
    if built < 80 {
        return Ok(false);
    }
    let cached = device_cache().compute_majors.get(&dev.id()).copied();
    let major = match cached {
        Some(major) => major,
        None => {
            let major = dev
                .cuda_stream()
                .context()
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .w()?;
            let major = major.max(0) as u32;
            device_cache().compute_majors.insert(dev.id(), major);
            major
        }
    };
    Ok(major >= 8)
}

/// Dynamic shared memory every kernel may take without asking (48 KiB less its static part).
const DEFAULT_DYNAMIC_SMEM: usize = 48 * 1024;

/// Whether kernel `f` can launch with `bytes` of dynamic shared memory on `dev`: up to 48 KiB
/// (with its static shared memory) it always can; beyond, up to the device's opt-in limit, once
/// the kernel's limit is raised, which this does.
pub(super) fn allow_dynamic_smem(dev: &CudaDevice, f: &CudaFunction, bytes: usize) -> Result<bool> {
    let static_bytes = f
        .get_attribute(sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        .w()? as usize;
    if bytes + static_bytes <= DEFAULT_DYNAMIC_SMEM {
        return Ok(true);
    }
    let opt_in = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()? as usize;
    if bytes + static_bytes > opt_in {
        return Ok(false);
    }
    f.set_attribute(
        sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .w()?;
    Ok(true)
}

/// Rows and row length of a row op, checked to fit the kernels' 32-bit indices.
pub(super) fn rows_and_len(op: &str, shape: &Shape) -> Result<(usize, usize)> {
    let n = shape.dims().last().copied().unwrap_or(1);
    let rows = shape.elem_count().checked_div(n).unwrap_or(0);
    if n > i32::MAX as usize || rows > i32::MAX as usize {
        candle_core::bail!(
            "{op}: shape {shape:?} is too large for the CUDA kernels (32-bit row indices)"
        )
    }
    Ok((rows, n))
}

/// Packs of `width` elements a row kernel's thread keeps in registers (`row_packs` in
/// common.cuh): `elems` elements for the 16-byte-pack kernels whatever the storage type, so a
/// 16-bit row gets half as many packs per thread as an f32 row and twice the threads; `scalar`
/// packs for the one-element kernels (`width` 1). With the same packs for every type, bf16
/// threads held twice the elements and registers of f32 ones; the change took bf16 softmax
/// backward from 131 to 118 µs and LayerNorm backward from 212 to 196 µs at 8×2048×4096 on an
/// H200 (BENCHMARKS.md, session 7). The forward kernels now keep 4 packs whatever the type
/// instead (`FWD_PACKS` in norm.rs, `SOFTMAX_FWD_PACKS` in softmax.rs): with one barrier per
/// reduction, fewer and fuller threads were faster for 16-bit rows (session 8).
pub(super) const fn row_packs(width: usize, elems: usize, scalar: usize) -> usize {
    if width == 1 {
        scalar
    } else {
        elems / width
    }
}

/// Threads per block for a row of `nvec` vectors, `per_thread` vectors held by each thread.
pub(super) fn row_threads(nvec: usize, per_thread: usize) -> u32 {
    let t = nvec.div_ceil(per_thread).div_ceil(32) * 32;
    t.clamp(32, 1024) as u32
}

/// `threads` lowered (in whole warps) to what kernel `f` can launch with: a kernel using many
/// registers cannot run 1024 threads per block. The kernels handle any block size (rows that
/// no longer fit the registers take the looping path).
pub(super) fn fit_threads(f: &Kernel, threads: u32) -> Result<u32> {
    Ok(threads.min(f.max_threads))
}

/// A grid-stride launch of `f` over `items` work items: blocks of 256 threads (fewer if `f`
/// cannot launch that many), and no more blocks than the SMs hold at once, since the kernel's
/// loop covers the rest without paying for more block launches.
pub(super) fn grid_stride_config(
    dev: &CudaDevice,
    f: &Kernel,
    items: usize,
) -> Result<LaunchConfig> {
    let threads = fit_threads(f, 256)?;
    let resident = sm_count(dev)? as usize * (2048 / threads as usize);
    let blocks = items.div_ceil(threads as usize).clamp(1, resident);
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

pub(super) fn row_config(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.min(i32::MAX as usize) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
