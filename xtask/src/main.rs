//! `cargo xtask <command>`: project automation that is not part of the library crates.
//!
//! - `fixtures [--out DIR] [--preset public|alt]`: regenerate the tiny-SD parity fixtures with the reference Python
//!   libraries (diffusers, transformers, torch from PyPI) in a virtual environment `.venv-fixtures/`, created on
//!   first use from `xtask/fixtures/requirements.txt`. Default output: a temporary folder, so the committed fixtures
//!   are only replaced on purpose (`--out tests/fixtures/tiny-sd`).
//! - `bench [--torch] [--only PATTERN] [--threads N] [--quick] [--criterion]`: the benchmark workloads of
//!   `xtask/bench/WORKLOADS.md` on our side (and PyTorch's with `--torch`), one process per workload, as one table
//!   of times, ratios and peak memory; results appended to `BENCHMARKS.md` (see `bench.rs`).
//! - `gpu-check [--device cuda[:N]] [--no-build] [--build-only] [--no-torch]`: the GPU check: the parity suite on
//!   the GPU, then full-size SD1.5 at 512x512 (50 DDIM steps, CFG, K = 1 and 50, f32 and bf16) beside PyTorch;
//!   fails with a clear message where there is no GPU (see `gpu_check.rs`).

mod bench;
mod gpu_check;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("fixtures") => fixtures(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("gpu-check") => gpu_check::gpu_check(&args[1..]),
        Some("-h" | "--help") | None => {
            print_help();
            Ok(())
        }
        Some(other) => Err(format!(
            "unknown command '{other}' (try `cargo xtask --help`)"
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_help() {
    println!(
        "cargo xtask <command>\n\n\
         commands:\n  \
         fixtures [--out DIR] [--preset public|alt]   regenerate the parity fixtures (creates .venv-fixtures/ with\n                                               \
         torch, diffusers, transformers from PyPI on first use; ~3 GB)\n  \
         bench [--torch] [--only PATTERN] [--threads N] [--quick] [--criterion] [--no-append] [--device D]\n                                               \
         benchmark workloads (ours; with --torch beside PyTorch in the same run)\n                                               \
         as one table with ratios and peak memory, appended to BENCHMARKS.md\n  \
         gpu-check [--device cuda[:N]] [--no-build] [--build-only] [--no-torch] [--no-suite] [--only P]\n                                               \
         the parity suite on a GPU, then full-size SD1.5 512x512 steps (K=1/50, f32/bf16)\n                                               \
         beside PyTorch, appended to BENCHMARKS.md; needs a GPU (clear error without)"
    );
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub(crate) fn run(cmd: &mut Command) -> Result<(), String> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

/// The python of the fixture venv `.venv-fixtures/` (which may not exist yet).
pub(crate) fn fixture_venv_python() -> PathBuf {
    root().join(".venv-fixtures/bin/python")
}

/// The fixture venv's python, creating the venv from `xtask/fixtures/requirements.txt` when it is missing.
pub(crate) fn fixture_python() -> Result<PathBuf, String> {
    let python = fixture_venv_python();
    let venv = root().join(".venv-fixtures");
    if !python.exists() {
        eprintln!(
            "creating {} with the reference libraries (torch, diffusers, transformers; ~3 GB)",
            venv.display()
        );
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        let req = root().join("xtask/fixtures/requirements.txt");
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-r"])
            .arg(&req))?;
        // open_clip is only needed for its BPE vocabulary file; its dependencies are not.
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "--no-deps",
            "open_clip_torch==3.3.0",
        ]))?;
    }
    Ok(python)
}

fn fixtures(args: &[String]) -> Result<(), String> {
    let mut out = std::env::temp_dir().join("alignprop-fixtures");
    let mut preset = "public".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = PathBuf::from(it.next().ok_or("--out needs a folder")?),
            "--preset" => preset = it.next().ok_or("--preset needs a name")?.clone(),
            other => return Err(format!("unknown option '{other}' for `fixtures`")),
        }
    }
    let python = fixture_python()?;
    run(Command::new(python)
        .arg(root().join("xtask/fixtures/make_fixtures.py"))
        .arg("--out")
        .arg(&out)
        .args(["--preset", &preset]))?;
    eprintln!("fixtures written to {}", out.display());
    Ok(())
}
