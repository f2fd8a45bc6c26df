//! `alignprop-bench`: runs one benchmark workload in this process and prints one JSON line.
//!
//! ```text
//! alignprop-bench --list
//! alignprop-bench --workload unet/mid_fwd [--iters N] [--warmup W] [--device cpu|cuda[:N]] [--no-malloc-tuning]
//! alignprop-bench --plot-scaling RESULTS.json OUT.png     # the scaling curves of a `cargo xtask bench` run
//! ```
//!
//! Threads: the CPU backend uses rayon's global pool; set `RAYON_NUM_THREADS` to pin its size (`cargo xtask
//! bench` sets it to the `--threads` it gives PyTorch).

use std::process::ExitCode;

use alignprop_bench::{default_iters, measure, names, peak_rss_mib, prepare};
use alignprop_device::{self as device, CpuAutodiff, CudaAutodiff, DeviceChoice, WgpuAutodiff};

struct Args {
    workload: Option<String>,
    iters: Option<usize>,
    warmup: Option<usize>,
    device: DeviceChoice,
    list: bool,
    malloc_tuning: bool,
    plot: Option<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        workload: None,
        iters: None,
        warmup: None,
        device: DeviceChoice::Cpu,
        list: false,
        malloc_tuning: true,
        plot: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().ok_or(format!("{what} needs a value"));
        match arg.as_str() {
            "--list" => a.list = true,
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
            "--plot-scaling" => {
                let json = value("--plot-scaling")?;
                a.plot = Some((json, value("--plot-scaling (PNG path)")?));
            }
            "-h" | "--help" => {
                println!(
                    "alignprop-bench --list | --workload NAME [--iters N] [--warmup W] [--device cpu|cuda[:N]] \
                     [--no-malloc-tuning]"
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
) -> Result<alignprop_bench::Timing, String> {
    let mut w = prepare::<A>(name, device)?;
    let sync = || {
        let _ = A::sync(device);
    };
    Ok(measure(&mut w, &sync, warmup, iters))
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
    let (dw, di) = default_iters(&name);
    let (warmup, iters) = (args.warmup.unwrap_or(dw), args.iters.unwrap_or(di));
    let result = match args.device {
        DeviceChoice::Cpu => run::<CpuAutodiff>(&name, &Default::default(), warmup, iters),
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
        Ok(t) => {
            let line = serde_json::json!({
                "workload": name,
                "side": "burn",
                "median_ms": t.median_ms,
                "min_ms": t.min_ms,
                "max_ms": t.max_ms,
                "iters": t.iters,
                "peak_rss_mib": peak_rss_mib(),
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
    }
}
