//! `alignprop-bench`: runs one benchmark workload in this process and prints one JSON line.
//!
//! ```text
//! alignprop-bench --list
//! alignprop-bench --workload unet/mid_fwd [--iters N] [--warmup W] [--device cpu|cuda[:N]] [--no-malloc-tuning]
//!                 [--bf16-products]
//! alignprop-bench --bf16-grad-error                          # the mid UNet's LoRA gradient, bf16 products vs f32
//! alignprop-bench --plot-scaling RESULTS.json OUT.png     # the scaling curves of a `cargo xtask bench` run
//! alignprop-bench --peak [THREADS]                          # the machine's float32 FMA peak, one JSON line
//! ```
//!
//! A workload's line carries `flops`: the floating-point operations of one iteration, counted by
//! `alignprop_kernels::flops` over the first warm-up run.
//!
//! Threads: the CPU backend uses rayon's global pool; set `RAYON_NUM_THREADS` to pin its size (`cargo xtask
//! bench` sets it to the `--threads` it gives PyTorch). A CPU workload runs on one of the pool's workers
//! (`alignprop_kernels::in_pool`, all threads on the main heap: `alignprop_device::one_heap`), as the CLI runs
//! single-device jobs; the data-parallel ones run as the CLI runs those.

use std::process::ExitCode;

use alignprop_bench::parallel::{ParallelTiming, parse_parallel};
use alignprop_bench::{default_iters, measure, names, peak_rss_mib, prepare};
use alignprop_device::{self as device, CpuAutodiff, CudaAutodiff, DeviceChoice, WgpuAutodiff};
use alignprop_kernels::flops;

struct Args {
    workload: Option<String>,
    iters: Option<usize>,
    warmup: Option<usize>,
    device: DeviceChoice,
    list: bool,
    /// `--peak`: the thread count to measure the FMA peak with.
    peak: Option<usize>,
    malloc_tuning: bool,
    /// `--bf16-products`: the linear layers' products in bf16 with f32 sums (`alignprop_kernels::flex_bf16`).
    bf16_products: bool,
    /// `--bf16-grad-error`: print `alignprop_bench::bf16_lora_gradient_error` and exit.
    bf16_grad_error: bool,
    plot: Option<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        workload: None,
        iters: None,
        warmup: None,
        device: DeviceChoice::Cpu,
        list: false,
        peak: None,
        malloc_tuning: true,
        bf16_products: false,
        bf16_grad_error: false,
        plot: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().ok_or(format!("{what} needs a value"));
        match arg.as_str() {
            "--list" => a.list = true,
            "--peak" => {
                let threads = std::env::var("RAYON_NUM_THREADS")
                    .ok()
                    .and_then(|v| v.parse().ok());
                a.peak =
                    Some(threads.unwrap_or_else(|| {
                        std::thread::available_parallelism().map_or(1, |n| n.get())
                    }))
            }
            "--workload" => a.workload = Some(value("--workload")?),
            "--iters" => {
                a.iters = Some(
                    value("--iters")?
                        .parse()
                        .map_err(|e| format!("--iters: {e}"))?,
                )
            }
            "--warmup" => {
                a.warmup = Some(
                    value("--warmup")?
                        .parse()
                        .map_err(|e| format!("--warmup: {e}"))?,
                )
            }
            "--device" => a.device = value("--device")?.parse()?,
            "--no-malloc-tuning" => a.malloc_tuning = false,
            "--bf16-products" => a.bf16_products = true,
            "--bf16-grad-error" => a.bf16_grad_error = true,
            "--plot-scaling" => {
                let json = value("--plot-scaling")?;
                a.plot = Some((json, value("--plot-scaling (PNG path)")?));
            }
            "-h" | "--help" => {
                println!(
                    "alignprop-bench --list | --peak | --workload NAME [--iters N] [--warmup W] \
                     [--device cpu|cuda[:N]|wgpu[:N]] [--no-malloc-tuning] [--bf16-products]\n\
                     --peak: the float32 FMA peak of RAYON_NUM_THREADS threads (default: every CPU), one JSON line\n\
                     --bf16-products: the linear layers' products in bf16 with f32 sums (CPU with AVX512_BF16)\n\
                     --bf16-grad-error: the mid UNet's LoRA gradient with bf16 products against f32, one JSON line"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(a)
}

fn run<A: burn::tensor::backend::AutodiffBackend>(
    name: &str,
    device: &A::Device,
    warmup: usize,
    iters: usize,
) -> Result<(alignprop_bench::Timing, u64), String> {
    let mut w = prepare::<A>(name, device)?;
    let sync = || {
        let _ = A::sync(device);
    };
    // The first warm-up run (or one extra run) counts the floating-point operations of one iteration.
    flops::start();
    w();
    sync();
    let flops = flops::stop();
    Ok((
        measure(&mut w, &sync, warmup.saturating_sub(1), iters),
        flops,
    ))
}

/// A `parallel/*_wN` workload: `N` workers on the CPU device (sharing its cores) or on `cuda:0..N` / `wgpu:0..N`.
fn run_parallel_workload(
    name: &str,
    device: &DeviceChoice,
    workers: usize,
    warmup: usize,
    iters: usize,
) -> Result<ParallelTiming, String> {
    use alignprop_bench::parallel::run_workload;
    match device {
        DeviceChoice::Cpu => {
            run_workload::<CpuAutodiff>(name, &vec![Default::default(); workers], warmup, iters)
        }
        DeviceChoice::Cuda(_) => {
            let devices = (0..workers)
                .map(device::cuda_device)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{name} runs worker i on cuda:i: {e}"))?;
            run_workload::<CudaAutodiff>(name, &devices, warmup, iters)
        }
        DeviceChoice::Wgpu(_) => {
            let devices = (0..workers)
                .map(device::wgpu_device)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{name} runs worker i on wgpu:i: {e}"))?;
            run_workload::<WgpuAutodiff>(name, &devices, warmup, iters)
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some((json, png)) = &args.plot {
        return match alignprop_bench::plot::scaling_plot(json.as_ref(), png.as_ref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(threads) = args.peak {
        let p = alignprop_bench::peak::measure(threads);
        println!(
            "{}",
            serde_json::json!({
                "peak_gflops": p.gflops,
                "threads": p.threads,
                "lanes": p.lanes,
                "isa": p.isa,
                "mhz": p.mhz,
                "fma_per_cycle": p.fma_per_cycle,
            })
        );
        return ExitCode::SUCCESS;
    }
    if (args.bf16_products || args.bf16_grad_error)
        && !alignprop_kernels::flex_bf16::bf16_supported()
    {
        eprintln!(
            "error: --bf16-products / --bf16-grad-error need a CPU with AVX512_BF16 (this one has none)"
        );
        return ExitCode::FAILURE;
    }
    if args.bf16_grad_error {
        device::one_heap();
        let r = alignprop_kernels::in_pool(|| {
            alignprop_bench::bf16_lora_gradient_error::<CpuAutodiff>(&Default::default())
        });
        return match r {
            Ok(v) => {
                println!("{v}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: --bf16-grad-error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.list {
        for n in names() {
            println!("{n}");
        }
        return ExitCode::SUCCESS;
    }
    let Some(name) = args.workload else {
        eprintln!("error: give --workload NAME or --list");
        return ExitCode::FAILURE;
    };
    let tuned = args.malloc_tuning && device::keep_freed_memory();
    if args.bf16_products {
        alignprop_kernels::flex_bf16::set_bf16_products(true);
    }
    let (dw, di) = default_iters(&name);
    let (warmup, iters) = (args.warmup.unwrap_or(dw), args.iters.unwrap_or(di));
    if let Some((_, workers)) = parse_parallel(&name) {
        return match run_parallel_workload(&name, &args.device, workers, warmup, iters) {
            Ok(p) => {
                let peak = peak_rss_mib();
                let line = serde_json::json!({
                    "workload": name,
                    "side": "burn",
                    "median_ms": p.timing.median_ms,
                    "min_ms": p.timing.min_ms,
                    "max_ms": p.timing.max_ms,
                    "iters": p.timing.iters,
                    "peak_rss_mib": peak,
                    "workers": p.workers,
                    "images_per_step": p.images_per_step,
                    "images_per_s": p.images_per_s,
                    "peak_rss_mib_per_worker": peak.map(|m| m / p.workers as f64),
                    "device": args.device.to_string(),
                    "burn": "0.21.0",
                    "malloc_tuning": tuned,
                    "threads": std::env::var("RAYON_NUM_THREADS").ok(),
                });
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {name}: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = match args.device {
        // On a worker of the kernels' thread pool with all threads on the main heap, as the CLI runs single-device
        // jobs (the data-parallel workloads returned above, as the CLI runs them).
        DeviceChoice::Cpu => {
            if args.malloc_tuning {
                device::one_heap();
            }
            alignprop_kernels::in_pool(|| {
                run::<CpuAutodiff>(&name, &Default::default(), warmup, iters)
            })
        }
        DeviceChoice::Cuda(i) => match device::cuda_device(i) {
            Ok(d) => run::<CudaAutodiff>(&name, &d, warmup, iters),
            Err(e) => Err(e),
        },
        DeviceChoice::Wgpu(i) => match device::wgpu_device(i) {
            Ok(d) => run::<WgpuAutodiff>(&name, &d, warmup, iters),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok((t, flops)) => {
            let line = serde_json::json!({
                "workload": name,
                "side": "burn",
                "flops": flops,
                "median_ms": t.median_ms,
                "min_ms": t.min_ms,
                "max_ms": t.max_ms,
                "iters": t.iters,
                "peak_rss_mib": peak_rss_mib(),
                "device": args.device.to_string(),
                "burn": "0.21.0",
                "malloc_tuning": tuned,
                "bf16_products": args.bf16_products,
                "threads": std::env::var("RAYON_NUM_THREADS").ok(),
            });
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {name}: {e}");
            ExitCode::FAILURE
        }
    }
}
