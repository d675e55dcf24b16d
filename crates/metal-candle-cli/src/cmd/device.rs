//! `--device` and `--dtype`, shared by the commands that run a model.

use candle_core::{DType, Device};

/// Where and in which precision a model runs.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on the CPU, bf16 on a GPU).
    #[arg(long)]
    pub dtype: Option<String>,
}

impl DeviceArgs {
    /// The device named by `--device`.
    pub fn device(&self) -> Result<Device, Box<dyn std::error::Error>> {
        parse_device(&self.device)
    }

    /// The dtype named by `--dtype`, or the default for `device`.
    pub fn dtype(&self, device: &Device) -> Result<DType, Box<dyn std::error::Error>> {
        parse_dtype(self.dtype.as_deref(), device)
    }
}

/// The dtype named by `name`, or the default for `device` (f32 on the CPU, bf16 on a GPU).
pub fn parse_dtype(
    name: Option<&str>,
    device: &Device,
) -> Result<DType, Box<dyn std::error::Error>> {
    match name {
        None if device.is_cpu() => Ok(DType::F32),
        None => Ok(DType::BF16),
        Some("f32") => Ok(DType::F32),
        Some("bf16") => Ok(DType::BF16),
        Some("f16") => Ok(DType::F16),
        Some(other) => Err(format!("--dtype {other}: expected f32, bf16 or f16").into()),
    }
}

/// Parses `cpu`, `cuda`, `cuda:N` or `metal`; a GPU without its feature compiled in is an error
/// that says how to build with it.
pub fn parse_device(name: &str) -> Result<Device, Box<dyn std::error::Error>> {
    let (kind, ordinal) = match name.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>()
                .map_err(|_| format!("--device {name}: {n:?} is not a device number"))?,
        ),
        None => (name, 0),
    };
    match kind {
        "cpu" => Ok(Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => {
            let device = Device::new_cuda(ordinal)
                .map_err(|e| format!("--device {name}: cannot open the GPU: {e}"))?;
            metal_candle::alloc::retain_freed_gpu_memory(&device)?;
            metal_candle::alloc::skip_single_stream_events(&device);
            Ok(device)
        }
        "metal" if cfg!(feature = "metal") => Ok(Device::new_metal(ordinal)?),
        "cuda" | "metal" => Err(format!(
            "--device {name}: this binary was built without {kind} support; rebuild with `cargo build --release --features {kind}`"
        )
        .into()),
        _ => Err(format!("--device {name}: expected cpu, cuda, cuda:N or metal").into()),
    }
}
