//! The parity suite on burn's wgpu backend (the cube backend that CUDA also runs), on the first wgpu adapter: a
//! GPU's Vulkan / Metal / DX12 driver, or Mesa's software Vulkan driver (llvmpipe) on a machine without a GPU.
//!
//! The suite runs as a child process (`alignprop-gpucheck --device wgpu`) under a time limit, so a panic on one of
//! the backend's threads or a hang fails this test quickly instead of stopping CI. Each check of the suite is
//! counted as one test in the `test result:` line below (what `.ci/run` adds up). Without any adapter the suite is
//! skipped and this says so and why (`.ci/run` installs `mesa-vulkan-drivers` so that CI never skips it).
//!
//! Environment: `ALIGNPROP_WGPU_SUITE_TIMEOUT` (seconds for the whole suite, default 3300: on llvmpipe it took 2487 s
//! on a 2-core AMD EPYC before the two SDXL checks, which add 370 s there; 1029 s on an Intel Xeon),
//! `ALIGNPROP_WGPU_SUITE_ONLY` (comma-separated name patterns), `ALIGNPROP_WGPU_SUITE=skip` (skip on purpose).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn libtest_line(passed: usize, failed: usize, ignored: usize, secs: f64) {
    let status = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "test result: {status}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; 0 filtered out; \
         finished in {secs:.2}s"
    );
}

/// Copies the committed autotune results (`crates/alignprop-gpucheck/autotune`: cubecl's cache files from a run of
/// this suite on llvmpipe at `CUBECL_AUTOTUNE_LEVEL=minimal`) into cubecl's cache folder, each file only where
/// that folder has none (a cache of this machine's own is never touched); returns how many it copied. On llvmpipe
/// most of a cold run is compiling and timing the candidate kernels of each new shape: 2,487 s cold against 1,203 s
/// warm on a 2-core AMD EPYC. cubecl checks each entry's checksum against its current kernel set and tunes again
/// where they differ, and a GPU is another device folder, so a stale or foreign entry costs only its tuning.
fn seed_autotune_cache(from: &Path, to: &Path) -> std::io::Result<usize> {
    let mut copied = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copied += seed_autotune_cache(&entry.path(), &target)?;
        } else if entry.file_name().to_string_lossy().ends_with(".json.log") && !target.exists() {
            std::fs::create_dir_all(to)?;
            std::fs::copy(entry.path(), &target)?;
            copied += 1;
        }
    }
    Ok(copied)
}

fn main() {
    let start = Instant::now();
    let exe = env!("CARGO_BIN_EXE_alignprop-gpucheck");
    if std::env::var("ALIGNPROP_WGPU_SUITE").as_deref() == Ok("skip") {
        println!("wgpu suite: skipped (ALIGNPROP_WGPU_SUITE=skip)");
        libtest_line(0, 0, 1, 0.0);
        return;
    }
    // The adapters, listed by the child (listing them may itself fail on a broken driver).
    let probe = Command::new(exe).arg("--adapters").output();
    let listing = match &probe {
        Ok(out) => String::from_utf8_lossy(&out.stdout).to_string(),
        Err(e) => panic!("cannot run {exe}: {e}"),
    };
    print!("{listing}");
    if !listing.lines().any(|l| l.starts_with("wgpu:")) {
        println!(
            "wgpu suite: SKIPPED, no Vulkan / Metal / DX12 adapter on this machine. The GPU path (burn's cube \
             backend) was not tested. On Debian/Ubuntu without a GPU: apt-get install mesa-vulkan-drivers \
             (Mesa's software Vulkan driver; .ci/run does this)."
        );
        libtest_line(0, 0, 1, start.elapsed().as_secs_f64());
        return;
    }
    let limit = Duration::from_secs(
        std::env::var("ALIGNPROP_WGPU_SUITE_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3300),
    );
    let mut cmd = Command::new(exe);
    cmd.args(["--device", "wgpu"]);
    // cubecl keeps its autotune results under `target/` beside the nearest Cargo.toml of the working directory: run
    // from the workspace root so they land in the workspace's (ignored) `target/`.
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    cmd.current_dir(root);
    match seed_autotune_cache(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("autotune"),
        &root.join("target").join("autotune"),
    ) {
        Ok(0) => {}
        Ok(n) => println!(
            "wgpu suite: autotune cache seeded with {n} committed files (llvmpipe, level minimal)"
        ),
        Err(e) => {
            println!("wgpu suite: autotune cache not seeded ({e}): kernels are tuned as they come")
        }
    }
    if let Ok(only) = std::env::var("ALIGNPROP_WGPU_SUITE_ONLY") {
        for p in only.split(',').filter(|p| !p.is_empty()) {
            cmd.args(["--only", p]);
        }
    }
    // One autotune level for the whole suite: the coarsest, fewest kernel variants to compile and time.
    if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
        cmd.env("CUBECL_AUTOTUNE_LEVEL", "minimal");
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {exe}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut passed, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    let mut timed_out = false;
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(line) => {
                println!("{line}");
                if let Some(rest) = line.strip_prefix("check ") {
                    if rest.contains(" ... ok") {
                        passed += 1;
                    } else if rest.contains(" ... skipped") {
                        skipped += 1;
                    } else if rest.contains(" ... FAILED") {
                        failed += 1;
                        failures.push(rest.split(" ... ").next().unwrap_or(rest).to_string());
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().expect("child status");
    let secs = start.elapsed().as_secs_f64();
    if timed_out {
        println!(
            "wgpu suite: stopped after {} s (ALIGNPROP_WGPU_SUITE_TIMEOUT)",
            limit.as_secs()
        );
        failed += 1;
    } else if !status.success() && failed == 0 {
        println!(
            "wgpu suite: the suite process ended with {status} before reporting a failed check"
        );
        failed += 1;
    }
    println!("wgpu suite: {passed} passed, {failed} failed, {skipped} skipped in {secs:.0} s");
    libtest_line(passed, failed, skipped, secs);
    if failed > 0 {
        eprintln!("wgpu suite failed: {}", failures.join(", "));
        std::process::exit(101);
    }
}
