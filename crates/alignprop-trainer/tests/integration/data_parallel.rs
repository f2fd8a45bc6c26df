//! Data-parallel training on CPU devices through burn::collective (the workers are threads on one Flex device):
//! 2 and 3 workers compute the same adapters as 1 worker with the same global batch, a failing worker stops the
//! run with an error naming it and nothing hangs, Ctrl-C stops every worker with one checkpoint, and a run resumes
//! with another worker count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use alignprop_trainer::parallel::{InjectedFault, ParallelOptions};
use alignprop_trainer::{
    RunEnd, RunSummary, StepLog, TrainConfig, TrainError, Truncation, run, run_parallel,
};
use burn::backend::Flex;
use burn::tensor::{DType, Tensor};

type A = burn::backend::Autodiff<Flex>;

/// The demo config, small: 3 optimiser steps of `batch_size` 1, 3 sampling steps with DDIM noise (eta 0.5) and a
/// uniform truncation draw (so every random stream is exercised), no eval but the first and the last.
fn small(name: &str, dtype: &str, accum: usize) -> TrainConfig {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny_demo.toml");
    let mut cfg = TrainConfig::from_file(&root).unwrap();
    cfg.output.dir =
        std::env::temp_dir().join(format!("alignprop-dp-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&cfg.output.dir).ok();
    cfg.model.dtype = dtype.into();
    cfg.train.steps = 3;
    cfg.train.batch_size = 1;
    cfg.train.grad_accum = accum;
    cfg.sampling.steps = 3;
    cfg.sampling.eta = 0.5;
    cfg.truncation = Truncation::Uniform { min: 1, max: 2 };
    cfg.eval.every = 100;
    cfg.output.save_every = 100;
    cfg
}

/// Runs `cfg` on `workers` CPU workers (1: the single-device `run`), on a thread, failing the test after
/// `timeout` instead of hanging.
fn train_with(
    cfg: TrainConfig,
    workers: usize,
    resume: bool,
    options: ParallelOptions,
    stop_after: Option<usize>,
) -> Result<RunSummary, TrainError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        let mut on_step = |s: &StepLog| {
            if Some(s.step) == stop_after {
                stop.store(true, Ordering::SeqCst);
            }
        };
        let r = if workers == 1 {
            run::<A>(
                cfg,
                &Default::default(),
                resume,
                &stop,
                &mut on_step,
                &mut |_| {},
            )
        } else {
            let devices = vec![Default::default(); workers];
            run_parallel::<A>(
                cfg,
                &devices,
                resume,
                &stop,
                &options,
                &mut on_step,
                &mut |_| {},
            )
        };
        let _ = tx.send(r);
    });
    rx.recv_timeout(Duration::from_secs(600))
        .expect("the run hung (no result within 10 minutes)")
}

fn train(cfg: TrainConfig, workers: usize) -> RunSummary {
    train_with(cfg, workers, false, ParallelOptions::default(), None).unwrap()
}

/// The adapters of the newest checkpoint of a run folder, in f64.
fn adapters(out: &Path) -> BTreeMap<String, Vec<f64>> {
    let last = alignprop_trainer::checkpoint::list_checkpoints(&out.join("checkpoints"))
        .pop()
        .expect("a checkpoint");
    let (tensors, _) = alignprop_trainer::checkpoint::read_checkpoint::<Flex>(
        &last,
        &Default::default(),
        DType::F64,
    )
    .unwrap();
    tensors
        .into_iter()
        .filter(|(k, _)| k.starts_with("lora."))
        .map(|(k, t): (String, Tensor<Flex, 2>)| {
            (k, t.into_data().convert::<f64>().to_vec().unwrap())
        })
        .collect()
}

/// The largest difference between two adapter sets, relative to the largest value; also checks the keys match
/// and that training moved the adapters at all.
fn relative_difference(a: &BTreeMap<String, Vec<f64>>, b: &BTreeMap<String, Vec<f64>>) -> f64 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different adapters"
    );
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    for (k, va) in a {
        for (x, y) in va.iter().zip(&b[k]) {
            diff = diff.max((x - y).abs());
            scale = scale.max(x.abs());
        }
    }
    assert!(scale > 0.0, "all adapters are zero");
    diff / scale
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// 1 worker x accumulation 6, 2 workers x 3 and 3 workers x 2: the same global batch of 6 micro-batches, so the
/// same samples, rewards and adapters after 3 optimiser steps (float64: up to summation order, <= 1e-10
/// relative); the logged rewards are those of the global batch.
#[test]
fn two_and_three_workers_match_one_in_f64() {
    let one = small("f64-1", "f64", 6);
    let out1 = one.output.dir.clone();
    let s1 = train(one, 1);
    let base = adapters(&out1);
    for workers in [2, 3] {
        let cfg = small(&format!("f64-{workers}"), "f64", 6 / workers);
        let out = cfg.output.dir.clone();
        let s = train(cfg, workers);
        let d = relative_difference(&base, &adapters(&out));
        eprintln!("{workers} workers vs 1 (f64): max relative adapter difference {d:e}");
        assert!(d <= 1e-10, "{workers} workers differ from 1 by {d:e}");
        for (a, b) in s1.steps.iter().zip(&s.steps) {
            assert!((a.reward_mean - b.reward_mean).abs() <= 1e-10 * a.reward_mean.abs());
            assert!((a.loss - b.loss).abs() <= 1e-10 * a.loss.abs().max(1e-12));
            assert_eq!(a.k, b.k, "the truncation draws differ");
        }
        // Worker 0 alone writes the logs: one line per step, over the global batch.
        let m = metrics(&out);
        assert_eq!(m.len(), 3);
        assert!(out.join("pytorch_lora_weights.safetensors").is_file());
        std::fs::remove_dir_all(&out).ok();
    }
    std::fs::remove_dir_all(&out1).ok();
}

/// The same in float32, 1 worker x accumulation 6 against 2 x 3 and 3 x 2: the workers' gradients are summed in
/// another order than one worker's accumulation ((g0+g1+g2)+(g3+g4+g5) against g0+...+g5), so the adapters
/// differ by rounding only. AdamW divides each update by the root of its squared gradients, so the rounding of a
/// component whose gradient is near zero is magnified (float64 above shows the same: 1e-14 from 1e-16 rounding).
/// Measured: 1.1e-5 (2 workers) and 1.2e-5 (3 workers) relative after 3 steps at the demo config's learning rate
/// 0.003, 1.2e-4 for both at 0.005 (the rounding grows with the step size); the bound is 5e-4.
#[test]
fn two_and_three_workers_match_one_in_f32_up_to_rounding() {
    let one = small("f32-1", "f32", 6);
    let out1 = one.output.dir.clone();
    train(one, 1);
    let base = adapters(&out1);
    for workers in [2, 3] {
        let cfg = small(&format!("f32-{workers}"), "f32", 6 / workers);
        let out = cfg.output.dir.clone();
        train(cfg, workers);
        let d = relative_difference(&base, &adapters(&out));
        eprintln!("{workers} workers vs 1 (f32): max relative adapter difference {d:e}");
        assert!(d <= 5e-4, "{workers} workers differ from 1 by {d:e}");
        std::fs::remove_dir_all(&out).ok();
    }
    std::fs::remove_dir_all(&out1).ok();
}

/// ReFL and DRaFT-LV spread over workers as AlignProp does: their draws (ReFL's stop step, DRaFT-LV's re-noising)
/// come from (seed, step, global index), so 1 worker x accumulation 2 and 2 workers x 1 compute the same adapters
/// (float64) and log the same stop steps and per-copy rewards.
#[test]
fn refl_and_draft_lv_on_two_workers_match_one() {
    use alignprop_trainer::{MethodConfig, MethodKind};
    for kind in [MethodKind::Refl, MethodKind::DraftLv] {
        let with = |name: &str, accum: usize| {
            let mut cfg = small(name, "f64", accum);
            cfg.method = MethodConfig {
                kind,
                stop_min: Some(1),
                ..Default::default()
            };
            cfg
        };
        let one = with(&format!("{kind:?}-1"), 2);
        let out1 = one.output.dir.clone();
        let s1 = train(one, 1);
        let two = with(&format!("{kind:?}-2"), 1);
        let out2 = two.output.dir.clone();
        let s2 = train(two, 2);
        let d = relative_difference(&adapters(&out1), &adapters(&out2));
        eprintln!("{kind:?}: 2 workers vs 1 (f64): max relative adapter difference {d:e}");
        assert!(d <= 1e-10, "{kind:?}: {d:e}");
        for (a, b) in s1.steps.iter().zip(&s2.steps) {
            assert_eq!((a.refl_stop, a.k), (b.refl_stop, b.k));
            assert_eq!(
                a.copy_rewards.as_ref().map(Vec::len),
                b.copy_rewards.as_ref().map(Vec::len)
            );
            for (x, y) in a
                .copy_rewards
                .iter()
                .flatten()
                .zip(b.copy_rewards.iter().flatten())
            {
                assert!((x - y).abs() <= 1e-10 * x.abs().max(1e-12));
            }
        }
        match kind {
            MethodKind::Refl => assert!(
                s1.steps
                    .iter()
                    .all(|s| s.refl_stop.is_some_and(|x| (1.0..=2.0).contains(&x)))
            ),
            _ => assert!(
                s1.steps
                    .iter()
                    .all(|s| s.copy_rewards.as_ref().is_some_and(|c| c.len() == 2))
            ),
        }
        std::fs::remove_dir_all(&out1).ok();
        std::fs::remove_dir_all(&out2).ok();
    }
}

/// A worker that fails (an error or a panic, while loading or in a step) ends the run with an error naming that
/// worker and its device; the other workers stop with it (no hang: the helper fails after a timeout).
#[test]
fn a_failing_worker_stops_the_run_without_hanging() {
    for (i, (worker, step, panic)) in [
        (1, Some(2), false),
        (2, Some(1), true),
        (1, None, true),
        (0, Some(2), false),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = small(&format!("fail-{i}"), "f32", 1);
        let out = cfg.output.dir.clone();
        let options = ParallelOptions {
            fault: Some(InjectedFault {
                worker,
                step,
                panic,
            }),
        };
        let e = train_with(cfg, 3, false, options, None).unwrap_err();
        let msg = e.to_string();
        eprintln!("{msg}");
        assert!(
            msg.contains(&format!("worker {worker} (")) && msg.contains("injected fault"),
            "the error does not name the failing worker: {msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
        std::fs::remove_dir_all(&out).ok();
    }
}

/// Ctrl-C during a 2-worker run: both workers finish the step, worker 0 writes one checkpoint, the run ends
/// interrupted; resuming it with 1 worker (the same global batch: accumulation 2) gives the adapters of an
/// uninterrupted 1-worker run (float64).
#[test]
fn interrupt_and_resume_with_another_worker_count() {
    let mut cfg = small("resume-2", "f64", 1);
    cfg.train.steps = 4;
    let out = cfg.output.dir.clone();
    let s = train_with(cfg.clone(), 2, false, ParallelOptions::default(), Some(1)).unwrap();
    assert_eq!(s.end, RunEnd::Interrupted);
    let done = s.steps.len();
    assert!((1..4).contains(&done), "stopped after {done} steps");
    let ckpts = alignprop_trainer::checkpoint::list_checkpoints(&out.join("checkpoints"));
    assert_eq!(ckpts.len(), 1, "one checkpoint: {ckpts:?}");
    // A different split of another global batch is refused.
    let mut wrong = cfg.clone();
    wrong.train.grad_accum = 1;
    let e = train_with(wrong, 1, true, ParallelOptions::default(), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("global batch") && e.contains("grad_accum"),
        "{e}"
    );
    let mut resumed = cfg.clone();
    resumed.train.grad_accum = 2;
    let r = train_with(resumed, 1, true, ParallelOptions::default(), None).unwrap();
    assert_eq!(r.steps.len(), 4 - done);
    let mut straight = small("resume-1", "f64", 2);
    straight.train.steps = 4;
    let out1 = straight.output.dir.clone();
    train(straight, 1);
    let d = relative_difference(&adapters(&out1), &adapters(&out));
    eprintln!("interrupted 2-worker run resumed on 1 worker vs 1 worker: {d:e}");
    assert!(d <= 1e-10, "{d:e}");
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&out1).ok();
}
