//! `cargo xtask bench`: our benchmark workloads beside PyTorch's, one process per workload and side.
//!
//! ```text
//! cargo xtask bench [--torch] [--only PATTERN[,PATTERN..]] [--threads N] [--iters N] [--quick]
//!                   [--criterion] [--no-append] [--no-build] [--device cpu|cuda|wgpu] [--devices all|N]
//! ```
//!
//! - Builds the runner (`alignprop-bench`, release profile) and runs every workload of `xtask/bench/WORKLOADS.md`
//!   (or those whose name contains one of the `--only` patterns) in its own process, so each peak resident
//!   memory is that workload's own. With `--torch`, the same workload runs in PyTorch (`xtask/bench/bench_torch.py`
//!   in the `.venv-fixtures` virtual environment, created from PyPI when missing) right after ours: the two sides
//!   are interleaved workload by workload on the same machine, with the same thread count.
//! - Measures the machine's float32 peak first (`alignprop-bench --peak`: an FMA loop on `--threads` threads).
//! - Prints one table (ours, torch, time ratio ours/torch, peak memory of each side and their ratio, the FLOPs of
//!   one iteration as our code and torch's `FlopCounterMode` count them, GFLOP/s of both sides from our count and
//!   their share of the peak, the peak itself), writes the
//!   raw results as JSON under `xtask/bench/results/`, draws the scaling curves (step time and peak memory
//!   against K, checkpointed and not, and against the latent size) as a PNG there, and appends the table with the
//!   date, machine, versions and the exact command to `BENCHMARKS.md` (unless `--no-append`).
//! - The data-parallel workloads (`parallel/*`: the trainer on 1, 2 and 4 workers) get a table of their own
//!   (workers, images per step, step time, images/s, peak memory in all and per worker); they have no PyTorch
//!   side. `--devices all|N` caps their worker count (`all`, the default: every count on the CPU, where the
//!   workers share its cores; on CUDA as many as `nvidia-smi -L` lists GPUs).
//! - `--quick`: ops and models only, fewer iterations (a smoke run). `--criterion`: also runs the criterion
//!   benchmarks (`cargo bench -p alignprop-bench`) first. `--no-build`: use the runner already built in
//!   `target/release` (e.g. one built on another machine and carried).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::{fixture_python, root, run};

struct Options {
    torch: bool,
    only: Vec<String>,
    threads: usize,
    iters: Option<usize>,
    quick: bool,
    criterion: bool,
    append: bool,
    device: String,
    build: bool,
    /// The largest worker count of the `parallel/*` workloads (`None`: `all`).
    devices: Option<usize>,
}

/// `cargo xtask bench --help`.
const HELP: &str = "\
cargo xtask bench [OPTIONS]: our benchmark workloads (xtask/bench/WORKLOADS.md) beside PyTorch's, one process per
workload and side; prints a table (times, peak memory, each side's FLOP count, GFLOP/s and share of the machine's
float32 peak, measured first with an FMA loop), writes raw JSON and the scaling plot under xtask/bench/results/,
appends the table with machine and versions to BENCHMARKS.md.

Options:
  --torch              also run each workload in PyTorch (xtask/bench/bench_torch.py, in .venv-fixtures, made
                       from PyPI when missing), right after ours; the table gets time and memory ratios
  --only P[,P..]       only the workloads whose name contains one of the patterns (e.g. op/,unet/mid_fwd)
  --threads N          threads on both sides (RAYON_NUM_THREADS, torch.set_num_threads); default 2
  --iters N            timed iterations per workload (1 warm-up); default per workload: ops 3+20 (the sub-
                       millisecond norms and ddim/step 10+1000), models 2+5, steps, scaling and parallel 1+3
  --quick              ops and models only, fewer iterations (a smoke run)
  --criterion          run the criterion benchmarks (cargo bench -p alignprop-bench) first
  --no-append          do not append the table to BENCHMARKS.md
  --no-build           use the runner already in target/release (e.g. built elsewhere and carried)
  --device D           cpu (default), cuda or wgpu: the device our side runs on (PyTorch's: cpu or cuda)
  --devices all|N      the largest worker count of the parallel/* workloads (all: every count on the CPU, as many
                       as nvidia-smi lists GPUs on cuda)
  -h, --help           this text
";

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        torch: false,
        only: Vec::new(),
        threads: 2,
        iters: None,
        quick: false,
        criterion: false,
        append: true,
        device: "cpu".into(),
        build: true,
        devices: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--torch" => o.torch = true,
            "--only" => o
                .only
                .extend(value("--only")?.split(',').map(|s| s.trim().to_string())),
            "--threads" => {
                o.threads = value("--threads")?
                    .parse()
                    .map_err(|e| format!("--threads: {e}"))?
            }
            "--iters" => {
                o.iters = Some(
                    value("--iters")?
                        .parse()
                        .map_err(|e| format!("--iters: {e}"))?,
                )
            }
            "--quick" => o.quick = true,
            "--criterion" => o.criterion = true,
            "--no-append" => o.append = false,
            "--no-build" => o.build = false,
            "--device" => o.device = value("--device")?,
            "--devices" => {
                let v = value("--devices")?;
                o.devices = match v.as_str() {
                    "all" => None,
                    n => Some(n.parse().map_err(|e| {
                        format!("--devices: expected 'all' or a count, found '{n}': {e}")
                    })?),
                }
            }
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => {
                return Err(format!(
                    "unknown option '{other}' for `bench` (see `cargo xtask bench --help`)"
                ));
            }
        }
    }
    Ok(o)
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Runs `cmd`, passing its stderr through, and returns the last stdout line parsed as JSON.
fn json_line(cmd: &mut Command) -> Result<Value, String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    last_json_line(cmd, &out)
}

/// The last JSON line of a finished `cmd`'s stdout, or why there is none (including a failed status).
pub(crate) fn last_json_line(cmd: &Command, out: &std::process::Output) -> Result<Value, String> {
    if !out.status.success() {
        return Err(format!("{cmd:?} failed with {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or(format!("{cmd:?} printed no JSON line"))?;
    serde_json::from_str(line).map_err(|e| format!("bad JSON from {cmd:?}: {e}: {line}"))
}

/// What `cmd args` prints, trimmed (empty when it cannot run).
pub(crate) fn shell(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// CPU model, logical CPUs and memory of this machine, from `/proc`.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|k| k / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let avx512 = if cpuinfo.contains("avx512f") {
        ", AVX-512"
    } else {
        ""
    };
    format!("{model}, {cpus} logical CPUs{avx512}, {mem_gib:.0} GiB RAM")
}

fn f(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

pub fn bench(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if o.criterion {
        run(Command::new(&cargo)
            .current_dir(root())
            .args(["bench", "-p", "alignprop-bench"]))?;
    }
    if o.build {
        run(Command::new(&cargo).current_dir(root()).args([
            "build",
            "--release",
            "-p",
            "alignprop-bench",
            "--bin",
            "alignprop-bench",
        ]))?;
    }
    let runner = target_dir().join("release/alignprop-bench");
    let listed = Command::new(&runner)
        .arg("--list")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", runner.display()))?;
    let mut workloads: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if o.quick {
        workloads.retain(|w| {
            !w.starts_with("step/") && !w.starts_with("scale/") && !w.starts_with("parallel/")
        });
    }
    let max_workers = o.devices.or_else(|| {
        (o.device == "cuda").then(|| {
            shell("nvidia-smi", &["-L"])
                .lines()
                .filter(|l| l.starts_with("GPU "))
                .count()
        })
    });
    if let Some(max) = max_workers {
        workloads.retain(|w| workers_of(w).is_none_or(|n| n <= max));
    }
    if !o.only.is_empty() {
        workloads.retain(|w| o.only.iter().any(|p| w.contains(p.as_str())));
    }
    if workloads.is_empty() {
        return Err("no workload selected".into());
    }
    let python = if o.torch {
        Some(fixture_python()?)
    } else {
        None
    };
    let script = root().join("xtask/bench/bench_torch.py");
    let iters = |w: &str| -> Option<(String, String)> {
        if let Some(n) = o.iters {
            return Some((n.to_string(), "1".into()));
        }
        if o.quick {
            let heavy = !w.starts_with("op/") && w != "ddim/step";
            return Some(if heavy { ("2", "1") } else { ("5", "1") })
                .map(|(a, b)| (a.to_string(), b.to_string()));
        }
        None
    };

    // The machine's float32 peak with the benchmarks' thread count (an FMA loop; the last column of the table).
    let peak = json_line(
        Command::new(&runner)
            .arg("--peak")
            .env("RAYON_NUM_THREADS", o.threads.to_string()),
    )
    .map_err(|e| eprintln!("no peak measurement: {e}"))
    .ok();
    let peak_gflops = peak.as_ref().and_then(|p| f(p, "peak_gflops"));

    let results_dir = root().join("xtask/bench/results");
    std::fs::create_dir_all(&results_dir).map_err(|e| format!("{}: {e}", results_dir.display()))?;
    // One stamp names every file of this run (partial results, JSON, plot).
    let stamp = shell("date", &["-u", "+%Y-%m-%dT%H-%MZ"]);
    let partial = results_dir.join(format!("{stamp}.partial.jsonl"));
    eprintln!(
        "each result is appended to {} as it comes",
        partial.display()
    );
    let mut results: Vec<(String, Result<Value, String>, Option<Result<Value, String>>)> =
        Vec::new();
    let total = workloads.len();
    for (i, w) in workloads.iter().enumerate() {
        eprintln!("[{}/{total}] {w}: ours", i + 1);
        let mut ours = Command::new(&runner);
        ours.args(["--workload", w, "--device", &o.device])
            .env("RAYON_NUM_THREADS", o.threads.to_string());
        if let Some((n, wu)) = iters(w) {
            ours.args(["--iters", &n, "--warmup", &wu]);
        }
        let a = json_line(&mut ours);
        // The data-parallel workloads have no PyTorch side (see WORKLOADS.md).
        let b = python
            .as_ref()
            .filter(|_| workers_of(w).is_none())
            .map(|py| {
                eprintln!("[{}/{total}] {w}: torch", i + 1);
                let mut t = Command::new(py);
                t.arg(&script)
                    .args(["--workload", w, "--threads", &o.threads.to_string()])
                    .current_dir(root());
                if o.device != "cpu" {
                    t.args(["--device", &o.device]);
                }
                if let Some((n, wu)) = iters(w) {
                    t.args(["--iters", &n, "--warmup", &wu]);
                }
                json_line(&mut t)
            });
        // Each result is also written as soon as it exists, so a run cut short keeps what it measured.
        for side in [a.as_ref().ok(), b.as_ref().and_then(|b| b.as_ref().ok())]
            .into_iter()
            .flatten()
        {
            use std::io::Write as _;
            if let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&partial)
            {
                let _ = writeln!(file, "{side}");
            }
        }
        results.push((w.clone(), a, b));
    }

    // The table.
    let mut torch_version = String::new();
    let mut diffusers_version = String::new();
    let mut table = String::new();
    let single: Vec<_> = results
        .iter()
        .filter(|(w, _, _)| workers_of(w).is_none())
        .collect();
    if single.is_empty() {
        // Only data-parallel workloads: their own table below.
    } else if o.torch {
        table.push_str(
            "| workload | ours ms | torch ms | time ratio (ours/torch) | ours peak MiB | torch peak MiB | memory ratio \
             | GFLOP (ours / torch's count) | ours GFLOP/s | torch GFLOP/s | ours % of peak | torch % of peak \
             | peak GFLOP/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
    } else {
        table.push_str(
            "| workload | ours ms (median) | min | max | iters | ours peak MiB | GFLOP | ours GFLOP/s | ours % of peak \
             | peak GFLOP/s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
    }
    // GFLOP/s of a side from our count of the workload's operations (the same work for both sides).
    let gflops = |flops: Option<f64>, ms: Option<f64>| {
        flops
            .filter(|&n| n > 0.0)
            .zip(ms)
            .map(|(n, ms)| n / (ms * 1e6))
    };
    let percent = |g: Option<f64>| match (g, peak_gflops) {
        (Some(g), Some(p)) => format!("{:.0}%", 100.0 * g / p),
        _ => "-".into(),
    };
    let cell = |v: Option<f64>, digits: usize| match v {
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    };
    for (w, a, b) in single {
        let a = a.as_ref().ok();
        let b = b.as_ref().and_then(|b| b.as_ref().ok());
        if let Some(b) = b {
            if let Some(v) = b.get("torch").and_then(Value::as_str) {
                torch_version = v.to_string();
            }
            if let Some(v) = b.get("diffusers").and_then(Value::as_str) {
                diffusers_version = v.to_string();
            }
        }
        let (am, ap) = (
            a.and_then(|a| f(a, "median_ms")),
            a.and_then(|a| f(a, "peak_rss_mib")),
        );
        if o.torch {
            let (bm, bp) = (
                b.and_then(|b| f(b, "median_ms")),
                b.and_then(|b| f(b, "peak_rss_mib")),
            );
            let ratio = am.zip(bm).map(|(x, y)| x / y);
            let mratio = ap.zip(bp).map(|(x, y)| x / y);
            let (af, bf) = (a.and_then(|a| f(a, "flops")), b.and_then(|b| f(b, "flops")));
            let count = match (af.filter(|&n| n > 0.0), bf.filter(|&n| n > 0.0)) {
                (Some(x), Some(y)) => format!("{:.2} / {:.2}", x / 1e9, y / 1e9),
                (Some(x), None) => format!("{:.2} / -", x / 1e9),
                (None, Some(y)) => format!("- / {:.2}", y / 1e9),
                (None, None) => "-".into(),
            };
            let (ag, bg) = (gflops(af, am), gflops(af, bm));
            let _ = writeln!(
                table,
                "| {w} | {} | {} | {} | {} | {} | {} | {count} | {} | {} | {} | {} | {} |",
                cell(am, 2),
                cell(bm, 2),
                ratio.map_or("-".into(), |r| format!("{r:.2}x")),
                cell(ap, 0),
                cell(bp, 0),
                mratio.map_or("-".into(), |r| format!("{r:.2}x")),
                cell(ag, 1),
                cell(bg, 1),
                percent(ag),
                percent(bg),
                cell(peak_gflops, 0),
            );
        } else {
            let af = a.and_then(|a| f(a, "flops")).filter(|&n| n > 0.0);
            let ag = gflops(af, am);
            let _ = writeln!(
                table,
                "| {w} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(am, 2),
                cell(a.and_then(|a| f(a, "min_ms")), 2),
                cell(a.and_then(|a| f(a, "max_ms")), 2),
                a.and_then(|a| a.get("iters").and_then(Value::as_u64))
                    .map_or("-".into(), |n| n.to_string()),
                cell(ap, 0),
                cell(af.map(|n| n / 1e9), 2),
                cell(ag, 1),
                percent(ag),
                cell(peak_gflops, 0),
            );
        }
    }
    // The data-parallel table (ours only: one trainer run per worker count).
    let parallel: Vec<_> = results
        .iter()
        .filter(|(w, _, _)| workers_of(w).is_some())
        .collect();
    if !parallel.is_empty() {
        if !table.is_empty() {
            table.push('\n');
        }
        table.push_str(
            "| data-parallel workload | workers | images / step | step ms (median) | min | max | images/s | peak MiB | \
             peak MiB per worker |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for (w, a, _) in parallel {
            let a = a.as_ref().ok();
            let u = |key: &str| {
                a.and_then(|a| a.get(key).and_then(Value::as_u64))
                    .map_or("-".into(), |n| n.to_string())
            };
            let _ = writeln!(
                table,
                "| {w} | {} | {} | {} | {} | {} | {} | {} | {} |",
                u("workers"),
                u("images_per_step"),
                cell(a.and_then(|a| f(a, "median_ms")), 0),
                cell(a.and_then(|a| f(a, "min_ms")), 0),
                cell(a.and_then(|a| f(a, "max_ms")), 0),
                cell(a.and_then(|a| f(a, "images_per_s")), 3),
                cell(a.and_then(|a| f(a, "peak_rss_mib")), 0),
                cell(a.and_then(|a| f(a, "peak_rss_mib_per_worker")), 0),
            );
        }
    }
    let failures: Vec<String> = results
        .iter()
        .flat_map(|(w, a, b)| {
            let mut v = Vec::new();
            if let Err(e) = a {
                v.push(format!("ours {w}: {e}"));
            }
            if let Some(Err(e)) = b {
                v.push(format!("torch {w}: {e}"));
            }
            v
        })
        .collect();

    let date = shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let rustc = shell("rustc", &["-V"]);
    let command = format!("cargo xtask bench {}", args.join(" "));
    let machine = machine();
    let peak_line = match &peak {
        Some(p) => format!(
            " Float32 peak ({} threads, measured FMA loop): {:.0} GFLOP/s = {} threads x {} lanes ({}) x 2 x {} FMA \
             per cycle x {} GHz (`cpu MHz` of /proc/cpuinfo).",
            o.threads,
            peak_gflops.unwrap_or(0.0),
            p.get("threads").and_then(Value::as_u64).unwrap_or(0),
            p.get("lanes").and_then(Value::as_u64).unwrap_or(0),
            p.get("isa").and_then(Value::as_str).unwrap_or("?"),
            cell(f(p, "fma_per_cycle"), 2),
            cell(f(p, "mhz").map(|m| m / 1e3), 2),
        ),
        None => String::new(),
    };
    let versions = if o.torch {
        format!(
            "ours: burn 0.21.0 (Flex CPU backend, f32), {rustc}, release profile; PyTorch: torch {torch_version} \
             (CPU, f32), diffusers {diffusers_version}; {} threads on both sides",
            o.threads
        )
    } else {
        format!(
            "ours: burn 0.21.0 (Flex CPU backend, f32), {rustc}, release profile; {} threads",
            o.threads
        )
    };

    println!("{peak_line}\n\n{table}");
    for e in &failures {
        println!("FAILED: {e}");
    }

    // Raw results.
    let json_path = results_dir.join(format!("{stamp}.json"));
    let raw: BTreeMap<String, Value> = results
        .iter()
        .map(|(w, a, b)| {
            (
                w.clone(),
                serde_json::json!({
                    "ours": a.as_ref().ok(),
                    "torch": b.as_ref().and_then(|b| b.as_ref().ok()),
                }),
            )
        })
        .collect();
    let doc = serde_json::json!({
        "date": date, "machine": machine, "versions": versions, "command": command, "peak": peak,
        "results": raw,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc).unwrap())
        .map_err(|e| format!("{}: {e}", json_path.display()))?;
    eprintln!("raw results: {}", json_path.display());

    // Scaling plot (when the sweep ran).
    let mut plot_line = String::new();
    if results.iter().any(|(w, _, _)| w.starts_with("scale/")) {
        let png = results_dir.join(format!("{stamp}-scaling.png"));
        match run(Command::new(&runner)
            .arg("--plot-scaling")
            .arg(&json_path)
            .arg(&png))
        {
            Ok(()) => {
                eprintln!("scaling plot: {}", png.display());
                plot_line = format!("\nScaling curves: `{}`.\n", relative(&png).display());
            }
            Err(e) => eprintln!("no scaling plot: {e}"),
        }
    }

    if o.append {
        let path = root().join("BENCHMARKS.md");
        let mut md = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            "# Benchmarks\n\nEvery table below was written by `cargo xtask bench` (see `xtask/src/bench.rs`), \
             with the machine, versions and exact command it ran with.\n"
                .to_string()
        });
        let _ = write!(
            md,
            "\n## {date}: `{command}`\n\nMachine: {machine}. Versions: {versions}. Each workload ran in its own \
             process, ours then PyTorch's, workload by workload; times are medians; peak memory is the process's \
             VmHWM.{peak_line} GFLOP: one iteration's matrix products and convolutions (2 per multiply-add, \
             backward and recomputation included) counted by our code (`alignprop_kernels::flops`) / by torch's \
             `FlopCounterMode`; GFLOP/s of both sides from our count. Raw: `{}`.\n{plot_line}\n{table}",
            relative(&json_path).display()
        );
        for e in &failures {
            let _ = writeln!(md, "\nFailed: {e}");
        }
        std::fs::write(&path, md).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("appended to {}", path.display());
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} workload run(s) failed", failures.len()))
    }
}

/// The worker count of a `parallel/NAME_wN` workload.
fn workers_of(w: &str) -> Option<usize> {
    w.strip_prefix("parallel/")?
        .rsplit_once("_w")?
        .1
        .parse()
        .ok()
}

fn relative(p: &Path) -> PathBuf {
    p.strip_prefix(root()).unwrap_or(p).to_path_buf()
}
