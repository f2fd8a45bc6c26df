//! The training loop on the tiny model with the brightness reward: the eval reward rises clearly, logs and
//! LoRA files are written, runs are reproducible, bad configs are clear errors.

use std::path::PathBuf;

use std::sync::atomic::{AtomicBool, Ordering};

use alignprop_trainer::config::RewardConfig;
use alignprop_trainer::{RunEnd, RunSummary, StepLog, TrainConfig, TrainError, Truncation, run};

type A = burn::backend::Autodiff<burn::backend::Flex>;

fn demo_config(out: &str) -> TrainConfig {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny_demo.toml");
    let mut cfg = TrainConfig::from_file(&root).unwrap();
    cfg.output.dir =
        std::env::temp_dir().join(format!("alignprop-train-{out}-{}", std::process::id()));
    cfg
}

/// Runs `cfg` on the CPU backend, resuming from its latest checkpoint when `resume`; with `stop_after = Some(n)`
/// the run is asked to stop after step `n` (as Ctrl-C does).
fn train(
    cfg: TrainConfig,
    resume: bool,
    stop_after: Option<usize>,
) -> Result<RunSummary, TrainError> {
    let stop = AtomicBool::new(false);
    let mut on_step = |s: &StepLog| {
        if Some(s.step) == stop_after {
            stop.store(true, Ordering::SeqCst);
        }
    };
    run::<A>(
        cfg,
        &Default::default(),
        resume,
        &stop,
        &mut on_step,
        &mut |_| {},
    )
}

/// One optimiser step of the demo config with `reward` (3 sampling steps, K = 1, no eval, output removed): its log.
fn one_step(name: &str, reward: RewardConfig) -> StepLog {
    let mut cfg = demo_config(name);
    cfg.reward = reward;
    cfg.train.steps = 1;
    cfg.sampling.steps = 3;
    cfg.truncation = Truncation::Fixed { k: 1 };
    cfg.eval.every = 100;
    cfg.validate().unwrap();
    let out = cfg.output.dir.clone();
    let s = train(cfg, false, None).unwrap();
    std::fs::remove_dir_all(out).ok();
    s.steps[0].clone()
}

#[test]
fn brightness_rises_and_outputs_are_written() {
    let mut cfg = demo_config("rise");
    cfg.train.steps = 12;
    cfg.sampling.steps = 6;
    cfg.truncation = Truncation::Fixed { k: 2 };
    cfg.eval.every = 4;
    let dir = cfg.output.dir.clone();
    let summary = train(cfg, false, None).unwrap();
    let evals: Vec<f64> = summary.evals.iter().map(|e| e.eval_reward_mean).collect();
    eprintln!("eval brightness: {evals:?}");
    assert_eq!(evals.len(), 4);
    assert!(
        evals.windows(2).all(|w| w[1] > w[0]),
        "eval reward did not rise at every eval: {evals:?}"
    );
    assert!(
        evals[3] > evals[0] + 0.01,
        "eval reward did not rise clearly: {evals:?}"
    );
    assert!(
        summary
            .steps
            .iter()
            .all(|s| s.loss.is_finite() && s.grad_norm > 0.0 && s.k == 2.0)
    );
    for f in [
        "metrics.jsonl",
        "eval.jsonl",
        "config.toml",
        "eval_00000.png",
        "eval_00012.png",
        "pytorch_lora_weights.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let lora = alignprop_lora::LoraWeights::read(&summary.lora).unwrap();
    assert_eq!(lora.num_params(), 21_568);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn same_seed_same_numbers() {
    let mut runs = Vec::new();
    for name in ["rep-a", "rep-b"] {
        let mut cfg = demo_config(name);
        cfg.train.steps = 2;
        cfg.sampling.steps = 3;
        cfg.truncation = Truncation::Fixed { k: 3 };
        cfg.eval.every = 100;
        let dir = cfg.output.dir.clone();
        let s = train(cfg, false, None).unwrap();
        runs.push(
            s.steps
                .iter()
                .map(|l| (l.loss, l.grad_norm))
                .collect::<Vec<_>>(),
        );
        std::fs::remove_dir_all(&dir).ok();
    }
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn config_errors_are_clear() {
    let dir = std::env::temp_dir().join(format!("alignprop-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[train]\nstepz = 3\n").unwrap();
    let err = TrainConfig::from_file(&bad).unwrap_err();
    assert!(err.contains("stepz") && err.contains("bad.toml"), "{err}");
    let mut cfg = demo_config("err");
    cfg.truncation = Truncation::Fixed { k: 99 };
    let msg = train(cfg, false, None).err().unwrap().to_string();
    assert!(msg.contains("truncation k = 99"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resume_continues_with_the_same_numbers() {
    let small = |name: &str, steps: usize| {
        let mut cfg = demo_config(name);
        cfg.train.steps = steps;
        cfg.sampling.steps = 3;
        cfg.truncation = Truncation::Fixed { k: 2 };
        cfg.eval.every = 100;
        cfg.output.save_every = 2;
        cfg
    };
    // One run of 4 steps.
    let straight = small("straight", 4);
    let dir_a = straight.output.dir.clone();
    let a = train(straight, false, None).unwrap();
    // The same run stopped after step 2 (as Ctrl-C does), then resumed to step 4.
    let first = small("resumed", 4);
    let dir_b = first.output.dir.clone();
    let b1 = train(first, false, Some(2)).unwrap();
    assert_eq!(b1.end, RunEnd::Interrupted);
    assert_eq!(b1.steps.len(), 2);
    let b2 = train(small("resumed", 4), true, None).unwrap();
    assert_eq!(b2.end, RunEnd::Finished);
    let nums = |v: &[alignprop_trainer::StepLog]| {
        v.iter()
            .map(|s| (s.step, s.loss, s.grad_norm))
            .collect::<Vec<_>>()
    };
    let resumed: Vec<_> = nums(&b1.steps).into_iter().chain(nums(&b2.steps)).collect();
    assert_eq!(nums(&a.steps), resumed);
    let la = alignprop_lora::LoraWeights::read(&a.lora).unwrap();
    let lb = alignprop_lora::LoraWeights::read(&b2.lora).unwrap();
    assert_eq!(la, lb, "final LoRA differs after resume");
    // Resuming a folder without checkpoints is a clear error.
    let none = small("nothing", 2);
    let dir_c = none.output.dir.clone();
    let err = train(none, true, None).err().unwrap();
    assert!(err.to_string().contains("no checkpoint"), "{err}");
    for d in [dir_a, dir_b, dir_c] {
        std::fs::remove_dir_all(&d).ok();
    }
}

#[test]
fn shipped_configs_parse_and_validate() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = TrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(
                cfg.train.prompts.is_file(),
                "{}: prompt file missing",
                path.display()
            );
            n += 1;
        }
    }
    assert!(
        n >= 3,
        "expected the demo and the aesthetic presets, found {n} configs"
    );
    let k1 = TrainConfig::from_file(&dir.join("aesthetic_k1.toml")).unwrap();
    assert_eq!(
        (k1.truncation, k1.reward.kind.as_str(), k1.reward.loss_coeff),
        (Truncation::Fixed { k: 1 }, "aesthetic", 0.01)
    );
}

#[test]
fn weighted_sum_of_rewards_from_config() {
    let dir = std::env::temp_dir().join(format!("alignprop-sum-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_path = dir.join("sum.toml");
    std::fs::write(
        &cfg_path,
        "[reward]\nkind = \"sum\"\n[[reward.terms]]\nkind = \"brightness\"\nweight = 2.0\n\
         [[reward.terms]]\nkind = \"brightness\"\nweight = 0.5\ntarget = 1.0\n",
    )
    .unwrap();
    let parsed = TrainConfig::from_file(&cfg_path).unwrap();
    parsed.validate().unwrap();
    assert_eq!(parsed.reward.terms.len(), 2);
    // Errors name the term.
    let mut bad = parsed.clone();
    bad.reward.terms[1].kind = "clip".into();
    let e = bad.validate().unwrap_err();
    assert!(e.contains("reward.terms[1].kind 'clip'"), "{e}");
    bad.reward.terms.clear();
    assert!(bad.validate().unwrap_err().contains("at least one"));

    // One step of the sum against one step of plain brightness from the same seed: the same trajectory, so the
    // logged reward is 2.5x and the loss is 2 * (-b) + 0.5 * |b - 1| of the plain one's -b.
    let plain = one_step("plain", Default::default());
    let summed = one_step("summed", parsed.reward.clone());
    let b = plain.reward_mean;
    assert!(
        (summed.reward_mean - 2.5 * b).abs() < 1e-6,
        "{} vs {b}",
        summed.reward_mean
    );
    assert!((plain.loss + b).abs() < 1e-6);
    assert!(
        (summed.loss - (-2.0 * b + 0.5 * (1.0 - b))).abs() < 1e-5,
        "{} vs b = {b}",
        summed.loss
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// HPSv2 and PickScore (the tiny fixture models) as the reward of a run, alone and as terms of a sum: one step
/// each from the same seed (so the same trajectory); the losses are the rewards' own (`1 - score`, `-score`), the
/// sum adds them with their weights, and the reward gradient reaches the LoRA. The tokenizer defaults to the SD
/// model's `tokenizer/`.
#[test]
fn hps_and_pickscore_rewards_train_alone_and_in_a_sum() {
    use alignprop_trainer::config::RewardTermConfig;
    let dir = std::env::temp_dir().join(format!("alignprop-prompt-rw-{}", std::process::id()));
    let m = alignprop_testing::prompt_reward::write_prompt_reward_models(&dir).unwrap();
    let hps = RewardTermConfig {
        kind: "hps".into(),
        path: Some(m.hps_weights.clone()),
        config: Some(m.hps_config.clone()),
        ..Default::default()
    };
    let pick = RewardTermConfig {
        kind: "pickscore".into(),
        weight: 0.5,
        path: Some(m.pickscore.clone()),
        ..Default::default()
    };
    let single = |t: &RewardTermConfig| RewardConfig {
        kind: t.kind.clone(),
        path: t.path.clone(),
        config: t.config.clone(),
        ..Default::default()
    };
    let h = one_step("hps", single(&hps));
    let p = one_step("pick", single(&pick));
    let sum = one_step(
        "prompt-sum",
        RewardConfig {
            kind: "sum".into(),
            terms: vec![hps.clone(), pick.clone()],
            ..Default::default()
        },
    );
    eprintln!(
        "hps {} (loss {}), pickscore {} (loss {}), sum {} (loss {})",
        h.reward_mean, h.loss, p.reward_mean, p.loss, sum.reward_mean, sum.loss
    );
    assert!(h.reward_mean.abs() <= 1.0 && h.grad_norm > 0.0 && p.grad_norm > 0.0);
    assert!((h.loss - (1.0 - h.reward_mean)).abs() < 1e-5, "{h:?}");
    assert!((p.loss + p.reward_mean).abs() < 1e-5, "{p:?}");
    let want = h.reward_mean + 0.5 * p.reward_mean;
    assert!(
        (sum.reward_mean - want).abs() < 1e-5,
        "{} vs {want}",
        sum.reward_mean
    );
    assert!(
        (sum.loss - (h.loss + 0.5 * p.loss)).abs() < 1e-5,
        "{}",
        sum.loss
    );

    // Without a tokenizer anywhere the error lists where it looked.
    let e = match alignprop_trainer::train::build_reward::<A>(
        &single(&hps),
        &Default::default(),
        burn::tensor::DType::F32,
    ) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("built without a tokenizer"),
    };
    assert!(e.contains("no CLIP tokenizer found"), "{e}");
    // A missing path is a config error naming the key.
    let mut cfg = demo_config("hps-nopath");
    cfg.reward = RewardConfig {
        kind: "hps".into(),
        ..Default::default()
    };
    let e = cfg.validate().unwrap_err();
    assert!(
        e.contains("reward.path") && e.contains("HPS_v2_compressed.pt"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// float16 training is refused with a message that recommends bf16 (no loss scaling; see `ModelConfig::dtype`).
#[test]
fn f16_training_is_refused_with_bf16_recommended() {
    let mut cfg = demo_config("f16");
    cfg.model.dtype = "f16".into();
    let dir = cfg.output.dir.clone();
    let err = train(cfg, false, None)
        .err()
        .expect("f16 must be refused")
        .to_string();
    assert!(err.contains("f16") && err.contains("bf16"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
