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
/// burn's wgpu backend (Vulkan, Metal, DX12): any GPU with a driver for one of them; the same cube-backend kernels
/// as CUDA.
pub type Wgpu = burn::backend::Wgpu;
/// The wgpu backend with autodiff.
pub type WgpuAutodiff = burn::backend::Autodiff<Wgpu>;

/// Which device a command runs on, as given on the command line: `cpu`, `cuda`, `cuda:N`, `wgpu` or `wgpu:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    /// The N-th adapter wgpu reports (in [`wgpu_adapters`]' order).
    Wgpu(usize),
}

impl DeviceChoice {
    /// The device's index within its backend (`cuda:N`, `wgpu:N`; 0 for the CPU).
    pub fn index(&self) -> usize {
        match self {
            Self::Cpu => 0,
            Self::Cuda(i) | Self::Wgpu(i) => *i,
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "wgpu" => Ok(Self::Wgpu(0)),
            _ => {
                let index = |prefix: &str| s.strip_prefix(prefix).map(str::parse::<usize>);
                match (index("cuda:"), index("wgpu:")) {
                    (Some(Ok(i)), _) => Ok(Self::Cuda(i)),
                    (_, Some(Ok(i))) => Ok(Self::Wgpu(i)),
                    _ => Err(format!(
                        "unknown device '{s}' (expected cpu, cuda, cuda:N, wgpu or wgpu:N)"
                    )),
                }
            }
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Wgpu(i) => write!(f, "wgpu:{i}"),
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

/// One graphics adapter as wgpu reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgpuAdapter {
    /// The driver's name for it (e.g. "NVIDIA H100", "llvmpipe (LLVM 15.0.6, 256 bits)").
    pub name: String,
    /// `Vulkan`, `Metal`, `Dx12`, ...
    pub backend: String,
    /// `DiscreteGpu`, `IntegratedGpu`, `VirtualGpu`, `Cpu` (a software driver such as Mesa's llvmpipe), `Other`.
    pub device_type: String,
    /// The burn device that selects it.
    pub device: burn::backend::wgpu::WgpuDevice,
}

/// The adapters wgpu finds (Vulkan, Metal, DX12; no GL), without creating any burn device. Each gets the burn
/// device of its type and its index among the adapters of that type.
pub fn wgpu_adapters() -> Vec<WgpuAdapter> {
    use burn::backend::wgpu::WgpuDevice;
    let backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12;
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    let adapters = futures_lite::future::block_on(instance.enumerate_adapters(backends));
    let mut seen = [0usize; 4];
    adapters
        .into_iter()
        .filter_map(|a| {
            let info = a.get_info();
            let (slot, make): (usize, fn(usize) -> WgpuDevice) = match info.device_type {
                wgpu::DeviceType::DiscreteGpu => (0, WgpuDevice::DiscreteGpu),
                wgpu::DeviceType::IntegratedGpu => (1, WgpuDevice::IntegratedGpu),
                wgpu::DeviceType::VirtualGpu => (2, WgpuDevice::VirtualGpu),
                wgpu::DeviceType::Cpu => (3, |_| WgpuDevice::Cpu),
                wgpu::DeviceType::Other => return None,
            };
            let device = make(seen[slot]);
            seen[slot] += 1;
            Some(WgpuAdapter {
                name: info.name,
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                device,
            })
        })
        .collect()
}

/// The wgpu device of adapter `index` ([`wgpu_adapters`]), or why there is none (never panics for a machine
/// without a GPU driver: the adapters are listed first).
pub fn wgpu_device(index: usize) -> Result<burn::backend::wgpu::WgpuDevice, String> {
    let adapters = wgpu_adapters();
    match adapters.get(index) {
        Some(a) => Ok(a.device.clone()),
        None if adapters.is_empty() => Err(
            "wgpu requested but no Vulkan, Metal or DX12 adapter was found: install the GPU's driver (on Linux \
             without a GPU, Mesa's software Vulkan driver: apt-get install mesa-vulkan-drivers)"
                .into(),
        ),
        None => Err(format!(
            "wgpu:{index} requested but wgpu reports {} adapter(s): {}",
            adapters.len(),
            adapters
                .iter()
                .enumerate()
                .map(|(i, a)| format!("wgpu:{i} {} ({}, {})", a.name, a.backend, a.device_type))
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}

/// Tunes the C allocator for tensor workloads: keep freed memory for reuse instead of returning it to the OS.
///
/// Tensor programs free and re-allocate the same large buffers (activations of every layer, every step). With
/// glibc's defaults, blocks above the dynamic mmap threshold are `mmap`ed and `munmap`ed each time, so every
/// allocation pays fresh page faults and zeroing of its pages, and freed heap tops are trimmed back to the OS. This
/// raises the mmap threshold to its maximum (32 MiB on 64-bit), serves the blocks above it from the heap too (no
/// `mmap` for the main thread's allocations: SD's 64 MiB attention scores and VAE activations were a fresh
/// `mmap`, 16,384 page faults and a `munmap` per call) and turns trimming off. Memory freed after the peak stays
/// mapped for reuse. Call it once at start, before the first allocation of tensors. Returns whether the settings
/// were applied (glibc only; elsewhere a no-op). See also [`one_heap`].
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe {
            let a = libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            let b = libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            let c = libc::mallopt(libc::M_MMAP_MAX, 0);
            a == 1 && b == 1 && c == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Serves every thread's allocations from the main heap (glibc's arena limit set to one), for a single job run
/// on a worker of the kernels' thread pool (`alignprop_kernels::in_pool`).
///
/// glibc gives each thread that allocates its own arena, whose heaps are at most 64 MiB and are unmapped when
/// emptied: a job on a pool worker would then get its large tensors as fresh pages every time (the 64 MiB
/// attention scores of `op/attn_scores_softmax`: 106-111 ms per call, against 36-38 ms on the main heap with
/// [`keep_freed_memory`]'s settings; AMD EPYC, 2 threads). Not for several threads that allocate at the same time,
/// such as data-parallel workers on the CPU: they contend for the one heap's lock (`parallel/tiny_w2`: 534-593 ms
/// per step with an arena per thread, 644-704 ms with one). Call it before the pool's threads first allocate
/// (before the first `in_pool`). Returns whether it was applied (glibc only; elsewhere a no-op).
pub fn one_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Runs one single-device job the way the CPU kernels run fastest: every thread on the main heap ([`one_heap`]),
/// then `f` on a worker of the kernels' thread pool ([`alignprop_kernels::in_pool`]). The `alignprop` command runs
/// `train` on one device, `sample` and `eval` through it; not data-parallel workers (see both functions).
pub fn single_job<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    one_heap();
    alignprop_kernels::in_pool(f)
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
        assert_eq!(
            "wgpu".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Wgpu(0)
        );
        assert_eq!(
            "wgpu:2".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Wgpu(2)
        );
        assert_eq!(DeviceChoice::Wgpu(2).to_string(), "wgpu:2");
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn wgpu_probe_never_panics() {
        // Without any adapter this is a clear error naming the driver to install, not a panic.
        let adapters = wgpu_adapters();
        match wgpu_device(adapters.len()) {
            Ok(d) => panic!("device {d:?} past the {} adapters", adapters.len()),
            Err(e) if adapters.is_empty() => assert!(e.contains("mesa-vulkan-drivers"), "{e}"),
            Err(e) => assert!(e.contains("adapter(s)"), "{e}"),
        }
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
