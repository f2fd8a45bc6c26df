//! Seeded random mutations of valid LoRA files (written by [`LoraWeights::write`] in the peft, diffusers and kohya
//! layouts, plus the tiny-sd fixture), read by [`LoraWeights::read`] under `catch_unwind`: every mutant gives `Ok`
//! or a one-line `Err`, never a panic, and no read allocates much more than the mutant's size (counting allocator:
//! this binary holds one test). `MAX_CASES` mutants or `TIME_LIMIT`, whichever ends first; the count is printed.

#[path = "../../alignprop-io/tests/common/mod.rs"]
mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use alignprop_lora::{LoraFormat, LoraPair, LoraWeights, Matrix};
use alignprop_testing::alloc::{Counting, peak_during};
use common::*;

#[global_allocator]
static GLOBAL: Counting = Counting;

const MAX_CASES: usize = 20_000;
const TIME_LIMIT: Duration = Duration::from_secs(60);

#[test]
fn mutated_lora_files_never_panic() {
    let dir = temp_dir("lora-mutations");
    let pair = |seed: f32| LoraPair {
        down: Matrix::new([2, 4], (0..8).map(|i| seed + i as f32).collect()),
        up: Matrix::new([4, 2], (0..8).map(|i| seed - i as f32).collect()),
        alpha: Some(2.0),
    };
    let weights = LoraWeights {
        modules: [
            (
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".to_string(),
                pair(1.0),
            ),
            (
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0".to_string(),
                pair(2.0),
            ),
        ]
        .into(),
    };
    let mut seeds = Vec::new();
    for format in [LoraFormat::Peft, LoraFormat::Diffusers, LoraFormat::Kohya] {
        let path = dir.join(format!("seed_{format:?}.safetensors"));
        weights.write(&path, format).unwrap();
        seeds.push(std::fs::read(&path).unwrap());
    }
    let fixture = alignprop_testing::tiny_sd().join("lora_peft/pytorch_lora_weights.safetensors");
    seeds.push(std::fs::read(fixture).unwrap());
    for s in &seeds {
        std::fs::write(dir.join("check.safetensors"), s).unwrap();
        LoraWeights::read(dir.join("check.safetensors")).unwrap();
    }

    let path = dir.join("mutant.safetensors");
    let (mut tried, mut ok, mut err) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    let mut rng = Rng(0x10_7a);
    while tried < MAX_CASES && started.elapsed() < TIME_LIMIT {
        let case_seed = rng.next();
        let mut case = Rng(case_seed);
        // The fixture is 30x the size of the written seeds: pick it less often.
        let base = &seeds[if case.below(8) == 0 { 3 } else { case.below(3) }];
        let mut bytes = mutate_safetensors(&mut case, base);
        if case.below(4) == 0 {
            bytes = mutate_safetensors(&mut case, &bytes);
        }
        std::fs::write(&path, &bytes).unwrap();
        let mut outcome = None;
        let peak = peak_during(|| {
            outcome = Some(catch_unwind(AssertUnwindSafe(|| LoraWeights::read(&path))));
        });
        match outcome.unwrap() {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(
                    !msg.contains('\n'),
                    "case seed {case_seed}: multi-line error {msg:?}"
                );
                err += 1;
            }
            Err(_) => {
                std::fs::write(dir.join(format!("panic-{case_seed}.safetensors")), &bytes).unwrap();
                panic!(
                    "case seed {case_seed} panicked (mutant kept in {})",
                    dir.display()
                );
            }
        }
        assert!(
            peak <= 64 * bytes.len() + (4 << 20),
            "case seed {case_seed}: {peak} bytes allocated for a {}-byte file",
            bytes.len()
        );
        tried += 1;
    }
    println!(
        "lora: {tried} mutated inputs tried in {:.1} s ({ok} read, {err} rejected)",
        started.elapsed().as_secs_f64()
    );
    assert!(tried >= 200, "too few cases in the time limit");
    assert!(ok > 0 && err > 0, "mutations too weak or too strong");
}
