//! `cargo xtask gpu-check`: the GPU check, as one command for the day a GPU is lent.
//!
//! ```text
//! cargo xtask gpu-check [--device cuda[:N]|wgpu[:N]] [--no-build] [--build-only] [--no-torch] [--no-suite]
//!                       [--only PATTERN] [--iters N] [--no-append] [--bin-dir DIR]
//! ```
//!
//! 1. Builds the two release binaries (`alignprop-gpucheck`, `alignprop-bench`) unless `--no-build`; with
//!    `--build-only` it stops there (`--bin-dir`: take the binaries from another folder than `target/release`), so they can be built on a CPU machine and carried (with the working tree, for
//!    the fixtures) to the GPU machine, where `cargo xtask gpu-check --no-build` or the binaries themselves run.
//! 2. Checks that the device exists (`alignprop-gpucheck --adapters`): without an NVIDIA driver and GPU it stops
//!    here with one clear error.
//! 3. Runs the parity suite on the device (`alignprop-gpucheck --device cuda:N`: op sweeps, every model, sampling,
//!    every reward, the AlignProp gradient, seeded training runs).
//! 4. Runs full-size SD1.5 (random weights) at 512x512, 50 DDIM steps, CFG 7.5, K = 1 and K = 50, float32 and
//!    bfloat16 (`gpu/*` workloads of `alignprop-bench`), and the same in PyTorch (diffusers + peft +
//!    torch.utils.checkpoint, SDPA attention: `xtask/bench/bench_torch_gpu.py`) when the fixture venv's torch has
//!    CUDA: step time and peak GPU memory (sampled from `nvidia-smi` for each process, the same way for both
//!    sides) in one table, appended to BENCHMARKS.md with the GPU, driver and versions.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::bench::{last_json_line, shell, target_dir};
use crate::{fixture_venv_python, root, run};

struct Options {
    device: String,
    build: bool,
    build_only: bool,
    torch: bool,
    suite: bool,
    only: Vec<String>,
    iters: Option<usize>,
    append: bool,
    bin_dir: PathBuf,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        device: "cuda".into(),
        build: true,
        build_only: false,
        torch: true,
        suite: true,
        only: Vec::new(),
        iters: None,
        append: true,
        bin_dir: target_dir().join("release"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--device" => o.device = value("--device")?,
            "--no-build" => o.build = false,
            "--build-only" => o.build_only = true,
            "--no-torch" => o.torch = false,
            "--no-suite" => o.suite = false,
            "--only" => o.only.push(value("--only")?),
            "--iters" => {
                o.iters = Some(
                    value("--iters")?
                        .parse()
                        .map_err(|e| format!("--iters: {e}"))?,
                )
            }
            "--no-append" => o.append = false,
            "--bin-dir" => o.bin_dir = root().join(value("--bin-dir")?),
            other => return Err(format!("unknown option '{other}' for `gpu-check`")),
        }
    }
    if !(o.device.starts_with("cuda") || o.device.starts_with("wgpu")) {
        return Err(format!(
            "--device {}: the GPU check runs on cuda[:N] or wgpu[:N]",
            o.device
        ));
    }
    Ok(o)
}

/// Peak memory (MiB) the GPU driver reports for process `pid`, sampled every 100 ms from `nvidia-smi` until
/// `running` is false; `None` where there is no `nvidia-smi`.
fn sample_gpu_memory(pid: u32, running: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<u64>> {
    Command::new("nvidia-smi").arg("-L").output().ok()?;
    Some(std::thread::spawn(move || {
        let mut peak = 0u64;
        while running.load(Ordering::SeqCst) {
            let apps = shell(
                "nvidia-smi",
                &[
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                ],
            );
            for line in apps.lines() {
                let mut f = line.split(',').map(str::trim);
                if let (Some(p), Some(m)) = (f.next(), f.next())
                    && p == pid.to_string()
                    && let Ok(m) = m.parse::<u64>()
                {
                    peak = peak.max(m);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        peak
    }))
}

/// Runs `cmd`, which prints one JSON line, with its GPU memory sampled; the JSON with `gpu_peak_mib` added.
fn run_json(mut cmd: Command) -> Result<Value, String> {
    eprintln!("+ {cmd:?}");
    let child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let running = Arc::new(AtomicBool::new(true));
    let sampler = sample_gpu_memory(child.id(), running.clone());
    let out = child.wait_with_output().map_err(|e| e.to_string());
    running.store(false, Ordering::SeqCst);
    let peak = sampler.and_then(|h| h.join().ok());
    let mut v = last_json_line(&cmd, &out?)?;
    if let Some(p) = peak {
        v["gpu_peak_mib"] = Value::from(p);
    }
    Ok(v)
}

/// The fixture venv's python when its torch has CUDA.
fn torch_cuda_python() -> Option<PathBuf> {
    let python = fixture_venv_python();
    let ok = Command::new(&python)
        .args([
            "-c",
            "import torch, diffusers, peft; assert torch.cuda.is_available()",
        ])
        .stderr(Stdio::null())
        .status()
        .ok()?
        .success();
    ok.then_some(python)
}

fn gpu_name() -> String {
    let name = shell(
        "nvidia-smi",
        &[
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ],
    );
    if name.is_empty() {
        "unknown GPU (no nvidia-smi)".into()
    } else {
        name.replace('\n', "; ")
    }
}

pub fn gpu_check(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    if o.build {
        run(Command::new("cargo").current_dir(root()).args([
            "build",
            "--release",
            "-p",
            "alignprop-gpucheck",
            "-p",
            "alignprop-bench",
        ]))?;
    }
    let (check, bench) = (
        o.bin_dir.join("alignprop-gpucheck"),
        o.bin_dir.join("alignprop-bench"),
    );
    for b in [&check, &bench] {
        if !b.exists() {
            return Err(format!(
                "{} is missing: build it with `cargo xtask gpu-check --build-only` (on any machine) first",
                b.display()
            ));
        }
    }
    if o.build_only {
        eprintln!(
            "built {} and {}: carry them with the working tree to the GPU machine and run `cargo xtask gpu-check \
             --no-build` there",
            check.display(),
            bench.display()
        );
        return Ok(());
    }
    // 2. The device, before anything starts on it.
    let probe = Command::new(&check)
        .arg("--adapters")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", check.display()))?;
    let listing = String::from_utf8_lossy(&probe.stdout).to_string();
    eprint!("{listing}");
    let available = if o.device.starts_with("cuda") {
        listing.lines().any(|l| l.starts_with("cuda: available"))
    } else {
        listing.lines().any(|l| l.starts_with("wgpu:"))
    };
    if !available {
        return Err(format!(
            "the GPU check needs a GPU: --device {} is not available on this machine ({}). Run it where an \
             NVIDIA GPU and driver are (carry target/release/alignprop-gpucheck and alignprop-bench with the \
             working tree, then `cargo xtask gpu-check --no-build`)",
            o.device,
            listing
                .lines()
                .find(|l| l.starts_with(if o.device.starts_with("cuda") {
                    "cuda:"
                } else {
                    "no wgpu"
                }))
                .unwrap_or("no device found")
        ));
    }
    // 3. The parity suite.
    if o.suite {
        let mut cmd = Command::new(&check);
        cmd.current_dir(root()).args(["--device", &o.device]);
        for p in &o.only {
            cmd.args(["--only", p]);
        }
        run(&mut cmd)?;
    }
    // 4. Full-size SD1.5 steps, ours and PyTorch's.
    let python = if o.torch { torch_cuda_python() } else { None };
    if o.torch && python.is_none() {
        eprintln!(
            "note: no PyTorch with CUDA in .venv-fixtures (torch, diffusers, peft): the table has our side only"
        );
    }
    let workloads = [
        "gpu/sd15_512_k1_f32",
        "gpu/sd15_512_k50_f32",
        "gpu/sd15_512_k1_bf16",
        "gpu/sd15_512_k50_bf16",
    ];
    let mut rows = Vec::new();
    for w in workloads {
        let mut cmd = Command::new(&bench);
        cmd.current_dir(root())
            .args(["--workload", w, "--device", &o.device]);
        if let Some(n) = o.iters {
            cmd.args(["--iters", &n.to_string()]);
        }
        let ours = run_json(cmd).unwrap_or_else(|e| serde_json::json!({ "error": e }));
        let torch = python.as_ref().map(|py| {
            let mut cmd = Command::new(py);
            cmd.current_dir(root())
                .arg(root().join("xtask/bench/bench_torch_gpu.py"))
                .args(["--workload", w]);
            if let Some(n) = o.iters {
                cmd.args(["--iters", &n.to_string()]);
            }
            run_json(cmd).unwrap_or_else(|e| serde_json::json!({ "error": e }))
        });
        rows.push((w, ours, torch));
    }
    let table = render(&rows);
    println!("{table}");
    if o.append {
        let header = format!(
            "\n## GPU check, {} ({})\n\nCommand: `cargo xtask gpu-check --device {}`; GPU: {}; burn 0.21.0.\n\n",
            shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            o.device,
            o.device,
            gpu_name()
        );
        let path = root().join("BENCHMARKS.md");
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        text.push_str(&header);
        text.push_str(&table);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("appended the table to {}", path.display());
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|(_, ours, _)| ours.get("error").is_some())
        .map(|(w, _, _)| *w)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("workloads failed: {}", failed.join(", ")))
    }
}

fn cell(v: &Value, key: &str) -> String {
    match v.get(key).and_then(Value::as_f64) {
        Some(x) => format!("{x:.0}"),
        None => v
            .get("error")
            .and_then(Value::as_str)
            .map(|_| "failed".into())
            .unwrap_or_else(|| "-".into()),
    }
}

fn render(rows: &[(&str, Value, Option<Value>)]) -> String {
    let mut t = String::from(
        "| workload | ours ms | torch ms | ratio | ours GPU MiB | torch GPU MiB | torch allocated MiB |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (w, ours, torch) in rows {
        let none = Value::Null;
        let th = torch.as_ref().unwrap_or(&none);
        let ratio = match (
            ours.get("median_ms").and_then(Value::as_f64),
            th.get("median_ms").and_then(Value::as_f64),
        ) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        t.push_str(&format!(
            "| {w} | {} | {} | {ratio} | {} | {} | {} |\n",
            cell(ours, "median_ms"),
            cell(th, "median_ms"),
            cell(ours, "gpu_peak_mib"),
            cell(th, "gpu_peak_mib"),
            cell(th, "cuda_max_allocated_mib"),
        ));
    }
    t
}
