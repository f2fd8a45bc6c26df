//! Backend features only where they are chosen: the library crates compile no GPU backend, and the schedulers (pure
//! tensor math) no backend and no cubecl compiler or runtime at all. Read from `cargo tree` (offline, from the lock
//! file), so adding `cuda` to a library crate's burn features fails here.

use std::collections::BTreeSet;
use std::process::Command;

/// The crates `package` compiles (normal dependencies, this platform), by name.
fn dependencies(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

const GPU_BACKENDS: [&str; 6] = [
    "burn-cuda",
    "burn-wgpu",
    "burn-cubecl",
    "cubecl-cuda",
    "cubecl-wgpu",
    "cudarc",
];

#[test]
fn schedulers_compile_no_backend_and_no_cubecl_runtime() {
    let deps = dependencies("alignprop-schedulers");
    assert!(deps.contains("burn-tensor"), "the tree was read: {deps:?}");
    // cubecl-common and cubecl-zspace are plain utility crates burn-std (burn's tensor core) always needs.
    let forbidden = [
        "burn-flex",
        "burn-autodiff",
        "burn-ndarray",
        "cubecl",
        "cubecl-core",
        "cubecl-runtime",
    ];
    let found: Vec<&str> = forbidden
        .iter()
        .chain(GPU_BACKENDS.iter())
        .copied()
        .filter(|c| deps.contains(*c))
        .collect();
    assert!(found.is_empty(), "alignprop-schedulers compiles {found:?}");
}

#[test]
fn library_crates_compile_no_gpu_backend() {
    for package in [
        "alignprop-io",
        "alignprop-kernels",
        "alignprop-diffusion",
        "alignprop-lora",
        "alignprop-pipeline",
        "alignprop-rewards",
        "alignprop-trainer",
    ] {
        let deps = dependencies(package);
        let found: Vec<&str> = GPU_BACKENDS
            .iter()
            .copied()
            .filter(|c| deps.contains(*c))
            .collect();
        assert!(found.is_empty(), "{package} compiles {found:?}");
    }
    // The crate that chooses the backend does compile CUDA (the check above can see it).
    assert!(dependencies("alignprop-device").contains("burn-cuda"));
}
