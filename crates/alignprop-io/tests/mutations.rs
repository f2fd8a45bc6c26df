//! Seeded random mutations of valid weight files, read under `catch_unwind`: the safetensors reader
//! ([`SafetensorsSource`], its header parser [`check_header`]) and the `.pth` reader ([`PthSource`]) must answer
//! every mutant with `Ok` or a one-line `Err`, never a panic, and never allocate much more than the mutant's size
//! (measured with the counting allocator, so this binary holds one test and runs the readers one after another).
//!
//! Each reader gets `MAX_CASES` mutants or `TIME_LIMIT`, whichever ends first; the counts are printed (run with
//! `--nocapture` to see them).

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use alignprop_io::pth::PthSource;
use alignprop_io::weights::{SafetensorsSource, TensorSource, check_header, write_safetensors};
use alignprop_testing::alloc::{Counting, peak_during};
use burn::tensor::TensorData;
use common::*;

#[global_allocator]
static GLOBAL: Counting = Counting;

const MAX_CASES: usize = 20_000;
const TIME_LIMIT: Duration = Duration::from_secs(40);

/// Panics seen by the panic hook, caught ones included (the `.pth` reader catches panics of burn's reader).
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Most a read may allocate for a file of `len` bytes (parsed JSON headers and tensor copies are a few times the
/// file; a lying size would be orders of magnitude more).
fn allowed(len: usize) -> usize {
    64 * len + (4 << 20)
}

struct Tally {
    tried: usize,
    ok: usize,
    err: usize,
    started: Instant,
}

/// Reads mutants of `seeds` with `read` until `MAX_CASES` or `TIME_LIMIT`; panics, multi-line errors and large
/// allocations fail the test with the seed of the mutant.
fn run(
    reader: &str,
    seeds: &[Vec<u8>],
    seed: u64,
    ext: &str,
    mutate: impl Fn(&mut Rng, &[u8]) -> Vec<u8>,
    read: impl Fn(&Path) -> Result<(), String>,
) -> Tally {
    let dir = temp_dir(&format!("mutations-{reader}"));
    let path = dir.join(format!("mutant.{ext}"));
    let mut t = Tally {
        tried: 0,
        ok: 0,
        err: 0,
        started: Instant::now(),
    };
    let mut rng = Rng(seed);
    while t.tried < MAX_CASES && t.started.elapsed() < TIME_LIMIT {
        let case_seed = rng.next();
        let mut case = Rng(case_seed);
        let base = &seeds[case.below(seeds.len())];
        let mut bytes = mutate(&mut case, base);
        // Sometimes stack a second mutation.
        if case.below(4) == 0 {
            bytes = mutate(&mut case, &bytes);
        }
        std::fs::write(&path, &bytes).unwrap();
        let mut outcome = None;
        let peak = peak_during(|| outcome = Some(catch_unwind(AssertUnwindSafe(|| read(&path)))));
        let outcome = outcome.unwrap();
        match outcome {
            Ok(Ok(())) => t.ok += 1,
            Ok(Err(msg)) => {
                assert!(
                    !msg.contains('\n'),
                    "{reader}: case seed {case_seed}: multi-line error {msg:?}"
                );
                t.err += 1;
            }
            Err(_) => {
                std::fs::write(dir.join(format!("panic-{case_seed}.{ext}")), &bytes).unwrap();
                panic!(
                    "{reader}: case seed {case_seed} panicked (mutant kept in {})",
                    dir.display()
                );
            }
        }
        assert!(
            peak <= allowed(bytes.len()),
            "{reader}: case seed {case_seed}: {peak} bytes allocated for a {}-byte file",
            bytes.len()
        );
        t.tried += 1;
    }
    let _ = std::fs::remove_file(&path);
    println!(
        "{reader}: {} mutated inputs tried in {:.1} s ({} read, {} rejected)",
        t.tried,
        t.started.elapsed().as_secs_f64(),
        t.ok,
        t.err
    );
    t
}

fn read_safetensors(path: &Path) -> Result<(), String> {
    let bytes = std::fs::read(path).unwrap();
    let checked = check_header(&bytes);
    let src = match SafetensorsSource::open(&[path]) {
        Ok(src) => src,
        Err(e) => {
            assert!(
                checked.is_err(),
                "check_header passed a file open refused: {e}"
            );
            return Err(e.to_string());
        }
    };
    for k in src.keys() {
        src.find(&k).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn read_pth(path: &Path) -> Result<(), String> {
    let src = PthSource::open(path).map_err(|e| e.to_string())?;
    for k in src.keys() {
        src.find(&k).map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[test]
fn mutated_weight_files_never_panic() {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::Relaxed);
        hook(info);
    }));

    // Safetensors: the aesthetic head fixture and a file of several dtypes and ranks written by our writer.
    let dir = temp_dir("mutations-seeds");
    let written = dir.join("dtypes.safetensors");
    let tensors = vec![
        (
            "a.f32".to_string(),
            TensorData::new(vec![1f32, 2., 3., 4., 5., 6.], [2, 3]),
        ),
        (
            "b.f16".to_string(),
            TensorData::new(vec![half::f16::ONE; 4], [4]),
        ),
        (
            "c.bf16".to_string(),
            TensorData::new(vec![half::bf16::ONE; 2], [1, 2, 1]),
        ),
        ("d.f64".to_string(), TensorData::new(vec![0.5f64], [1])),
        ("e.i64".to_string(), TensorData::new(vec![7i64, 8], [2])),
        (
            "f.scalar".to_string(),
            TensorData::new(vec![3f32], [0usize; 0]),
        ),
        (
            "g.empty".to_string(),
            TensorData::new(Vec::<f32>::new(), [0, 4]),
        ),
    ];
    let metadata = [("format".to_string(), "pt".to_string())].into();
    write_safetensors(&written, &tensors, &metadata).unwrap();
    let fixture = alignprop_testing::tiny_reward().join("aesthetic/mlp.safetensors");
    let st_seeds = vec![
        std::fs::read(&fixture).unwrap(),
        std::fs::read(&written).unwrap(),
    ];
    for s in &st_seeds {
        check_header(s).unwrap();
    }
    let st = run(
        "safetensors",
        &st_seeds,
        0x5afe_7e45,
        "safetensors",
        mutate_safetensors,
        read_safetensors,
    );

    // .pth: the aesthetic head fixture (torch.save output) and a handmade torch zip.
    let pth_seeds = vec![
        std::fs::read(alignprop_testing::tiny_reward().join("aesthetic/mlp.pth")).unwrap(),
        torch_zip(&[2, 3], &[1., 2., 3., 4., 5., 6.]),
    ];
    let before = PANICS.load(Ordering::Relaxed);
    let pth = run(
        "pth",
        &pth_seeds,
        0x0070_7468,
        "pth",
        mutate_bytes,
        read_pth,
    );
    let caught = PANICS.load(Ordering::Relaxed) - before;
    println!("pth: {caught} panics inside burn-store's reader were caught and reported as errors");

    assert!(
        st.tried >= 200 && pth.tried >= 200,
        "too few cases in the time limit"
    );
    assert!(
        st.ok > 0 && st.err > 0 && pth.ok > 0 && pth.err > 0,
        "mutations too weak or too strong"
    );
}
