//! `alignprop-gpucheck`: runs the parity suite of this crate on one device and prints one line per check.
//!
//! ```text
//! alignprop-gpucheck --device wgpu|wgpu:N|cuda|cuda:N|cpu [--only PATTERN]... [--list] [--check-timeout SECS]
//! alignprop-gpucheck --adapters        # the wgpu adapters and the CUDA driver status, then exit
//! ```
//!
//! Each line reads `check NAME ... ok|FAILED|skipped (SECONDS s): figures`, then a summary line `gpucheck: N
//! passed; M failed; K skipped`. The exit status is 0 only when no check failed. A check still running after
//! `--check-timeout` seconds (default 1800), or a panic on a thread other than this one (a backend's device thread,
//! after which the check would wait forever), ends the process at once with the check named: status 2.
//! The fixtures are found as `alignprop_testing::fixtures_root` says (`ALIGNPROP_FIXTURES` for a binary carried to
//! another machine).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use alignprop_device::{CpuAutodiff, CudaAutodiff, DeviceChoice, WgpuAutodiff};
use alignprop_gpucheck::{Check, Outcome, checks};
use burn::tensor::backend::AutodiffBackend;

static CURRENT: Mutex<Option<(String, Instant)>> = Mutex::new(None);
static PASSED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);
static SKIPPED: AtomicUsize = AtomicUsize::new(0);

struct Args {
    device: DeviceChoice,
    only: Vec<String>,
    list: bool,
    adapters: bool,
    timeout: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        device: DeviceChoice::Cpu,
        only: Vec::new(),
        list: false,
        adapters: false,
        timeout: Duration::from_secs(1800),
    };
    let mut device_given = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |what: &str| it.next().ok_or(format!("{what} needs a value"));
        match arg.as_str() {
            "--device" => {
                a.device = value("--device")?.parse()?;
                device_given = true;
            }
            "--only" => a.only.push(value("--only")?),
            "--list" => a.list = true,
            "--adapters" => a.adapters = true,
            "--check-timeout" => {
                let s: u64 = value("--check-timeout")?
                    .parse()
                    .map_err(|e| format!("--check-timeout: {e}"))?;
                a.timeout = Duration::from_secs(s);
            }
            "-h" | "--help" => {
                println!(
                    "alignprop-gpucheck --device wgpu|wgpu:N|cuda|cuda:N|cpu [--only PATTERN]... [--list] \
                     [--check-timeout SECS] | --adapters"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    if !device_given && !a.list && !a.adapters {
        return Err("give --device wgpu|wgpu:N|cuda|cuda:N|cpu (or --list, --adapters)".into());
    }
    Ok(a)
}

fn summary(device: &str, start: Instant) {
    println!(
        "gpucheck: {} passed; {} failed; {} skipped; device {device}; {:.0} s",
        PASSED.load(Ordering::SeqCst),
        FAILED.load(Ordering::SeqCst),
        SKIPPED.load(Ordering::SeqCst),
        start.elapsed().as_secs_f64()
    );
}

fn current() -> String {
    CURRENT
        .lock()
        .map(|c| c.as_ref().map(|(n, _)| n.clone()))
        .ok()
        .flatten()
        .unwrap_or_else(|| "(setup)".into())
}

/// A panic on any thread but this one stops the process (the main thread would wait forever on its result); a check
/// over `timeout` stops it too. Both print the failed check and the summary first.
fn install_guards(device: String, timeout: Duration, start: Instant) {
    let default = std::panic::take_hook();
    let dev = device.clone();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let thread = std::thread::current();
        if thread.name() != Some("main") {
            let name = current();
            println!(
                "check {name} ... FAILED (panic on thread '{}': {info}; the process stops, the check would wait \
                 forever)",
                thread.name().unwrap_or("unnamed")
            );
            FAILED.fetch_add(1, Ordering::SeqCst);
            summary(&dev, start);
            std::process::exit(2);
        }
    }));
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let over = CURRENT.lock().ok().and_then(|c| {
                c.as_ref()
                    .filter(|(_, t)| t.elapsed() > timeout)
                    .map(|(n, _)| n.clone())
            });
            if let Some(name) = over {
                println!(
                    "check {name} ... FAILED (no result after {} s: hung or far too slow)",
                    timeout.as_secs()
                );
                FAILED.fetch_add(1, Ordering::SeqCst);
                summary(&device, start);
                std::process::exit(2);
            }
        }
    });
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

fn selected<A: AutodiffBackend>(only: &[String]) -> Vec<Check<A>> {
    checks::<A>()
        .into_iter()
        .filter(|c| only.is_empty() || only.iter().any(|p| c.name.contains(p.as_str())))
        .collect()
}

fn suite<A: AutodiffBackend>(device: &A::Device, args: &Args) -> ExitCode {
    let start = Instant::now();
    let label = args.device.to_string();
    install_guards(label.clone(), args.timeout, start);
    let list = selected::<A>(&args.only);
    println!("gpucheck: {} checks on {label} ({device:?})", list.len());
    for check in list {
        *CURRENT.lock().unwrap() = Some((check.name.to_string(), Instant::now()));
        let t = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| (check.run)(device)));
        let _ = A::sync(device);
        let secs = t.elapsed().as_secs_f64();
        let (status, detail) = match result {
            Ok(Ok(Outcome::Pass(s))) => {
                PASSED.fetch_add(1, Ordering::SeqCst);
                ("ok", s)
            }
            Ok(Ok(Outcome::Skip(s))) => {
                SKIPPED.fetch_add(1, Ordering::SeqCst);
                ("skipped", s)
            }
            Ok(Err(e)) => {
                FAILED.fetch_add(1, Ordering::SeqCst);
                ("FAILED", e)
            }
            Err(p) => {
                FAILED.fetch_add(1, Ordering::SeqCst);
                ("FAILED", format!("panicked: {}", panic_message(p.as_ref())))
            }
        };
        println!("check {} ... {status} ({secs:.1} s): {detail}", check.name);
    }
    *CURRENT.lock().unwrap() = None;
    summary(&label, start);
    if FAILED.load(Ordering::SeqCst) == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    if args.adapters {
        let adapters = alignprop_device::wgpu_adapters();
        for (i, a) in adapters.iter().enumerate() {
            println!("wgpu:{i} {} ({}, {})", a.name, a.backend, a.device_type);
        }
        if adapters.is_empty() {
            println!("no wgpu adapter (Vulkan, Metal, DX12)");
        }
        match alignprop_device::cuda_status() {
            alignprop_device::CudaStatus::Available(n) => println!("cuda: available ({n} GPU(s))"),
            alignprop_device::CudaStatus::Unavailable(why) => println!("cuda: unavailable: {why}"),
        }
        return ExitCode::SUCCESS;
    }
    if args.list {
        for c in selected::<CpuAutodiff>(&args.only) {
            println!("{}", c.name);
        }
        return ExitCode::SUCCESS;
    }
    let device_error = |e: String| {
        eprintln!("error: {e}");
        ExitCode::from(3)
    };
    match args.device {
        DeviceChoice::Cpu => suite::<CpuAutodiff>(&Default::default(), &args),
        DeviceChoice::Cuda(i) => match alignprop_device::cuda_device(i) {
            Ok(d) => suite::<CudaAutodiff>(&d, &args),
            Err(e) => device_error(e),
        },
        DeviceChoice::Wgpu(i) => match alignprop_device::wgpu_device(i) {
            Ok(d) => suite::<WgpuAutodiff>(&d, &args),
            Err(e) => device_error(e),
        },
    }
}
