//! Run-time choice of backend: the pure-Rust CPU backend (`Flex`) or CUDA, in one binary, and process tuning.
//!
//! Creating a `CudaDevice` on a machine without the NVIDIA driver panics inside a burn device thread (cudarc
//! cannot load `libcuda`). [`cuda_status`] checks that the driver library loads and reports at least one GPU
//! *before* anything touches CUDA, so callers can give a clear error instead.

use std::fmt;
use std::str::FromStr;

/// The CPU backend used for tests, the tiny demo and machines without a GPU.
pub type Cpu = burn::backend::Flex;
/// The CPU backend with autodiff.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
/// The CUDA backend.
pub type Cuda = burn::backend::Cuda;
/// The CUDA backend with autodiff.
pub type CudaAutodiff = burn::backend::Autodiff<Cuda>;

/// Which device a command runs on, as given on the command line: `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(Self::Cuda(i)),
                _ => Err(format!(
                    "unknown device '{s}' (expected cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Why CUDA cannot be used, or how many GPUs the driver reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CudaStatus {
    /// The driver loaded and reports this many devices (at least one).
    Available(usize),
    /// The driver library could not be loaded or initialised, or it reports no device.
    Unavailable(String),
}

/// Probes the NVIDIA driver (`libcuda.so.1` / `nvcuda.dll`) without creating any burn device.
pub fn cuda_status() -> CudaStatus {
    #[cfg(windows)]
    const LIBS: &[&str] = &["nvcuda.dll"];
    #[cfg(not(windows))]
    const LIBS: &[&str] = &["libcuda.so.1", "libcuda.so"];
    let mut last_err = String::new();
    for name in LIBS {
        // SAFETY: loading the NVIDIA driver runs its initialisers, which is what cudarc does too.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return probe_driver(&lib),
            Err(e) => last_err = format!("{name}: {e}"),
        }
    }
    CudaStatus::Unavailable(format!(
        "the NVIDIA driver library could not be loaded ({last_err}); is an NVIDIA GPU with its driver installed?"
    ))
}

fn probe_driver(lib: &libloading::Library) -> CudaStatus {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: the symbols have these C signatures in every CUDA driver API version.
    unsafe {
        let (Ok(init), Ok(count)) = (
            lib.get::<CuInit>(b"cuInit\0"),
            lib.get::<CuDeviceGetCount>(b"cuDeviceGetCount\0"),
        ) else {
            return CudaStatus::Unavailable(
                "the CUDA driver library lacks cuInit/cuDeviceGetCount".into(),
            );
        };
        let rc = init(0);
        if rc != 0 {
            return CudaStatus::Unavailable(format!(
                "cuInit failed with CUDA error {rc} (no usable GPU?)"
            ));
        }
        let mut n = 0i32;
        let rc = count(&mut n);
        if rc != 0 || n <= 0 {
            return CudaStatus::Unavailable(format!(
                "the CUDA driver reports no GPU (error {rc}, count {n})"
            ));
        }
        CudaStatus::Available(n as usize)
    }
}

/// The default choice: CUDA when a GPU is present, else the CPU.
pub fn default_device() -> DeviceChoice {
    match cuda_status() {
        CudaStatus::Available(_) => DeviceChoice::Cuda(0),
        CudaStatus::Unavailable(_) => DeviceChoice::Cpu,
    }
}

/// Creates the CUDA device `index`, or explains why it cannot (never panics for a missing driver).
pub fn cuda_device(index: usize) -> Result<burn::backend::cuda::CudaDevice, String> {
    match cuda_status() {
        CudaStatus::Available(n) if index < n => Ok(burn::backend::cuda::CudaDevice::new(index)),
        CudaStatus::Available(n) => Err(format!(
            "cuda:{index} requested but the driver reports {n} GPU(s)"
        )),
        CudaStatus::Unavailable(why) => Err(format!("CUDA requested but unavailable: {why}")),
    }
}

/// Tunes the C allocator for tensor workloads: keep freed memory for reuse instead of returning it to the OS.
///
/// Tensor programs free and re-allocate the same large buffers (activations of every layer, every step). With
/// glibc's defaults, blocks above the dynamic mmap threshold are `mmap`ed and `munmap`ed each time, so every
/// allocation pays fresh page faults and zeroing of its pages, and freed heap tops are trimmed back to the OS. This
/// raises the mmap threshold to its maximum (32 MiB on 64-bit) and turns trimming off. Peak resident memory is
/// unchanged; memory freed after the peak stays mapped for reuse. Call it once at start, before the first
/// allocation of tensors. Returns whether the settings were applied (glibc only; elsewhere a no-op).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            let a = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            let b = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            a == 1 && b == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_choices() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            "cuda".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn cuda_probe_never_panics() {
        // On a machine without a GPU this must be a clear Unavailable, and cuda_device an error, not a panic.
        match cuda_status() {
            CudaStatus::Available(n) => assert!(n > 0),
            CudaStatus::Unavailable(why) => {
                assert!(!why.is_empty());
                let err = cuda_device(0).unwrap_err();
                assert!(err.contains("CUDA requested but unavailable"), "{err}");
            }
        }
    }
}
