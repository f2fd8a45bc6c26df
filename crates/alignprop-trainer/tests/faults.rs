//! Faults the training run survives, on the tiny model: a full disk while saving (injected), a second run on the
//! same output folder, a non-finite loss, a resume with a changed config, bad numbers in the config. The tests
//! share the process-wide fault injection, so they run one at a time.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;

use alignprop_trainer::checkpoint::{fail_writes_after, list_checkpoints, read_checkpoint};
use alignprop_trainer::{
    Resume, RunEnd, StepLog, TrainConfig, TrainError, Trainer, Truncation, run,
};
use burn::tensor::DType;

type A = burn::backend::Autodiff<burn::backend::Flex>;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The demo config made small: 2 sampling steps, K = 1, one image per step, no evals, a checkpoint every step.
fn small(name: &str, steps: usize) -> TrainConfig {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny_demo.toml");
    let mut cfg = TrainConfig::from_file(&root).unwrap();
    cfg.output.dir =
        std::env::temp_dir().join(format!("alignprop-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cfg.output.dir);
    cfg.train.steps = steps;
    cfg.train.batch_size = 1;
    cfg.sampling.steps = 2;
    cfg.truncation = Truncation::Fixed { k: 1 };
    cfg.eval.every = 1000;
    cfg.output.save_every = 1;
    cfg
}

fn train(
    cfg: TrainConfig,
    resume: Resume,
    on_step: &mut dyn FnMut(&StepLog),
) -> Result<alignprop_trainer::RunSummary, TrainError> {
    run::<A>(
        cfg,
        &Default::default(),
        resume,
        &AtomicBool::new(false),
        on_step,
        &mut |_| {},
    )
}

#[test]
fn disk_full_while_saving_keeps_the_previous_checkpoint_and_resumes_exactly() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let straight = small("straight", 2);
    let dir_a = straight.output.dir.clone();
    let a = train(straight, Resume::No, &mut |_| {}).unwrap();

    let cfg = small("diskfull", 2);
    let dir = cfg.output.dir.clone();
    // The disk fills up while step 2's checkpoint is written (its first file, half written).
    let err = train(cfg, Resume::No, &mut |s| {
        if s.step == 2 {
            fail_writes_after(0);
        }
    })
    .err()
    .expect("the full disk is an error");
    fail_writes_after(usize::MAX);
    let msg = err.to_string();
    assert!(
        msg.contains("No space left on device")
            && msg.contains("state.safetensors")
            && !msg.contains('\n'),
        "{msg}"
    );
    let root = dir.join("checkpoints");
    let left = list_checkpoints(&root);
    assert_eq!(
        left,
        vec![root.join("step_00001")],
        "only the complete checkpoint is listed"
    );
    assert!(
        !root.join("step_00002.tmp").exists(),
        "the half-written checkpoint was cleaned up"
    );
    let (_, state) =
        read_checkpoint::<burn::backend::Flex>(&left[0], &Default::default(), DType::F32)
            .expect("the previous checkpoint is intact");
    assert_eq!(state.step, 1);
    // Resumed after the disk was freed: the same final LoRA as the uninterrupted run.
    let b = train(small_keep("diskfull", 2), Resume::Checked, &mut |_| {}).unwrap();
    assert_eq!(b.end, RunEnd::Finished);
    assert_eq!(
        alignprop_lora::LoraWeights::read(&a.lora).unwrap(),
        alignprop_lora::LoraWeights::read(&b.lora).unwrap(),
        "final LoRA differs from the uninterrupted run's"
    );
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, [1, 2], "the replayed step is logged once: {metrics}");
    for d in [dir_a, dir] {
        std::fs::remove_dir_all(d).ok();
    }
}

/// [`small`] without clearing the output folder (to resume in it).
fn small_keep(name: &str, steps: usize) -> TrainConfig {
    let dir = std::env::temp_dir().join(format!("alignprop-faults-{name}-{}", std::process::id()));
    let keep = dir.with_extension("keep");
    let _ = std::fs::remove_dir_all(&keep);
    std::fs::rename(&dir, &keep).unwrap();
    let cfg = small(name, steps);
    std::fs::rename(&keep, &dir).unwrap();
    cfg
}

#[test]
fn a_second_run_on_the_same_output_folder_is_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = small("lock", 1);
    let dir = cfg.output.dir.clone();
    let first = Trainer::<A>::new(cfg.clone(), &Default::default()).unwrap();
    let err = Trainer::<A>::new(cfg.clone(), &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("another training run") && err.contains(".lock") && !err.contains('\n'),
        "{err}"
    );
    drop(first);
    let second = Trainer::<A>::new(cfg.clone(), &Default::default()).expect("free again");
    drop(second);
    // A lock left by a killed run (its process is gone) is taken over.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(dir.join(".lock"), dead.to_string()).unwrap();
    let third = Trainer::<A>::new(cfg, &Default::default()).expect("stale lock taken over");
    drop(third);
    assert!(
        !dir.join(".lock").exists(),
        "the lock is removed with the trainer"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut cfg = small("nan", 3);
    // Finite but absurd: the first update makes the LoRA weights ~1e30 and the next forward overflows.
    cfg.optimizer.lr = 1e30;
    cfg.optimizer.max_grad_norm = None;
    let dir = cfg.output.dir.clone();
    let err = train(cfg, Resume::No, &mut |_| {})
        .err()
        .expect("a non-finite loss");
    match &err {
        TrainError::NonFinite { step, .. } => assert_eq!(*step, 2, "{err}"),
        other => panic!("expected NonFinite, got {other}"),
    }
    assert!(err.to_string().contains("Lower the learning rate"), "{err}");
    let root = dir.join("checkpoints");
    assert_eq!(list_checkpoints(&root), vec![root.join("step_00001")]);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn resuming_with_a_changed_config_is_refused_unless_allowed() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = small("changed", 1);
    let (dir, lr) = (cfg.output.dir.clone(), cfg.optimizer.lr);
    train(cfg, Resume::No, &mut |_| {}).unwrap();
    // More steps: allowed.
    let longer = small_keep("changed", 2);
    train(longer, Resume::Checked, &mut |_| {}).unwrap();
    // Another sampler length and learning rate: refused, naming both keys and values.
    let mut changed = small_keep("changed", 3);
    changed.sampling.steps = 3;
    changed.optimizer.lr = 0.01;
    let err = train(changed.clone(), Resume::Checked, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("sampling.steps (checkpoint 2, now 3)")
            && err.contains(&format!("optimizer.lr (checkpoint {lr}, now 0.01)"))
            && err.contains("--allow-config-change")
            && !err.contains('\n'),
        "{err}"
    );
    let s = train(changed, Resume::AllowConfigChange, &mut |_| {}).unwrap();
    assert_eq!(s.steps.len(), 1);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn non_finite_and_out_of_range_numbers_are_config_errors() {
    for (set, key) in [
        (
            (|c: &mut TrainConfig| c.optimizer.lr = f64::NAN) as fn(&mut TrainConfig),
            "optimizer.lr",
        ),
        (|c| c.optimizer.lr = 0.0, "optimizer.lr"),
        (
            |c| c.sampling.guidance_scale = f64::INFINITY,
            "sampling.guidance_scale",
        ),
        (|c| c.sampling.eta = -1.0, "sampling.eta"),
        (|c| c.optimizer.beta2 = 1.0, "beta2"),
        (
            |c| c.optimizer.max_grad_norm = Some(f64::NAN),
            "optimizer.max_grad_norm",
        ),
        (|c| c.reward.loss_coeff = f64::NAN, "reward.loss_coeff"),
        (
            |c| {
                c.sampling.steps = 10;
                c.truncation = Truncation::Gaussian {
                    mean: 42.0,
                    std: 5.0,
                }
            },
            "truncation gaussian",
        ),
    ] {
        let mut cfg = small("numbers", 1);
        set(&mut cfg);
        let err = cfg.validate().unwrap_err();
        assert!(err.contains(key) && !err.contains('\n'), "{key}: {err}");
    }
}

#[test]
fn a_new_run_over_an_earlier_runs_checkpoints_is_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cfg = small("over", 1);
    let dir = cfg.output.dir.clone();
    train(cfg, Resume::No, &mut |_| {}).unwrap();
    let err = train(small_keep("over", 1), Resume::No, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("checkpoints of an earlier run (newest step_00001)")
            && err.contains("--resume"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}
