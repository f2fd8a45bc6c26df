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
/// The demo (its model, reward, target and learning rate; shortened to 8 steps of 6 sampling steps, seeded): the
/// eval brightness rises at every eval and by far more than its spread (measured: 0.433 -> 0.526 -> 0.727, the
/// demo's own 20 steps settle near its target 0.7), and every output is written.
fn brightness_rises_and_outputs_are_written() {
    let mut cfg = demo_config("rise");
    cfg.train.steps = 8;
    cfg.sampling.steps = 6;
    cfg.truncation = Truncation::Fixed { k: 2 };
    cfg.eval.every = 4;
    let dir = cfg.output.dir.clone();
    let summary = train(cfg, false, None).unwrap();
    let evals: Vec<f64> = summary.evals.iter().map(|e| e.eval_reward_mean).collect();
    eprintln!("eval brightness: {evals:?}");
    assert_eq!(evals.len(), 3);
    assert!(
        evals.windows(2).all(|w| w[1] > w[0] + 0.05),
        "eval reward did not rise at every eval: {evals:?}"
    );
    assert!(
        evals[2] > evals[0] + 0.2,
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
        "eval_00008.png",
        "before_after.png",
        "reward_curve.png",
        "pytorch_lora_weights.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let lora = alignprop_lora::LoraWeights::read(&summary.lora).unwrap();
    assert_eq!(lora.num_params(), 21_504);
    // TensorBoard's event file: every record's CRCs check, the scalars of every step and the eval images are there.
    let events: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let (version, scalars, images) = read_events(&std::fs::read(&events[0]).unwrap());
    assert_eq!(version, "brain.Event:2");
    let losses: Vec<(u64, f32)> = scalars
        .iter()
        .filter(|(_, tag, _)| tag == "train/loss")
        .map(|(s, _, v)| (*s, *v))
        .collect();
    assert_eq!(losses.len(), 8);
    for (log, (step, v)) in summary.steps.iter().zip(&losses) {
        assert_eq!((log.step as u64, log.loss as f32), (*step, *v));
    }
    let eval: Vec<(u64, f32)> = scalars
        .iter()
        .filter(|(_, tag, _)| tag == "eval/reward_mean")
        .map(|(s, _, v)| (*s, *v))
        .collect();
    let expected: Vec<(u64, f32)> = summary
        .evals
        .iter()
        .map(|e| (e.step as u64, e.eval_reward_mean as f32))
        .collect();
    assert_eq!(eval, expected);
    assert_eq!(images.len(), 3, "one eval grid per eval");
    for (step, png) in &images {
        let on_disk = std::fs::read(dir.join(format!("eval_{step:05}.png"))).unwrap();
        assert_eq!(png, &on_disk, "the event's image is the eval grid PNG");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Reads a TensorBoard event file as its record reader does (length and data CRCs checked), decoding the Event
/// protobuf fields the writer uses: `(file_version, [(step, tag, simple_value)], [(step, png)])`.
fn read_events(bytes: &[u8]) -> (String, Vec<(u64, String, f32)>, Vec<(u64, Vec<u8>)>) {
    use alignprop_trainer::tensorboard::masked_crc32c;
    fn varint(b: &[u8], i: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[*i];
            *i += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    /// `(field, wire type, payload)` of each field of a message.
    fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
        let (mut i, mut out) = (0, Vec::new());
        while i < b.len() {
            let key = varint(b, &mut i);
            let (field, wire) = (key >> 3, key & 7);
            let payload = match wire {
                0 => varint(b, &mut i).to_le_bytes().to_vec(),
                1 => {
                    i += 8;
                    b[i - 8..i].to_vec()
                }
                2 => {
                    let n = varint(b, &mut i) as usize;
                    i += n;
                    b[i - n..i].to_vec()
                }
                5 => {
                    i += 4;
                    b[i - 4..i].to_vec()
                }
                w => panic!("unexpected wire type {w}"),
            };
            out.push((field, wire, payload));
        }
        out
    }
    let (mut i, mut version) = (0, String::new());
    let (mut scalars, mut images) = (Vec::new(), Vec::new());
    while i < bytes.len() {
        let len_bytes = &bytes[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap());
        assert_eq!(crc, masked_crc32c(len_bytes), "length CRC at byte {i}");
        let data = &bytes[i + 12..i + 12 + len];
        let crc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked_crc32c(data), "data CRC at byte {i}");
        i += 16 + len;
        let event = fields(data);
        let step = event
            .iter()
            .find(|f| f.0 == 2)
            .map(|f| u64::from_le_bytes(f.2.clone().try_into().unwrap()))
            .unwrap_or(0);
        for (field, _, payload) in event {
            match field {
                3 => version = String::from_utf8(payload).unwrap(),
                5 => {
                    for (_, _, value) in fields(&payload) {
                        let value = fields(&value);
                        let tag = String::from_utf8(value[0].2.clone()).unwrap();
                        match value[1].0 {
                            2 => scalars.push((
                                step,
                                tag,
                                f32::from_le_bytes(value[1].2.clone().try_into().unwrap()),
                            )),
                            4 => {
                                let image = fields(&value[1].2);
                                images.push((step, image[3].2.clone()));
                            }
                            other => panic!("unexpected Summary.Value field {other}"),
                        }
                    }
                }
                _ => {}
            }
        }
    }
    (version, scalars, images)
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

    // Concept removal on the same CLIPModel: loss = +similarity, alone and in a sum with brightness.
    let concept = RewardTermConfig {
        kind: "concept".into(),
        path: Some(m.pickscore.clone()),
        concept: Some("a red circle".into()),
        ..Default::default()
    };
    let c = one_step(
        "concept",
        RewardConfig {
            kind: "concept".into(),
            path: concept.path.clone(),
            concept: concept.concept.clone(),
            ..Default::default()
        },
    );
    assert!(c.reward_mean.abs() <= 1.0 && c.grad_norm > 0.0);
    assert!((c.loss - c.reward_mean).abs() < 1e-6, "{c:?}");
    let mix = one_step(
        "concept-sum",
        RewardConfig {
            kind: "sum".into(),
            terms: vec![
                concept.clone(),
                RewardTermConfig {
                    kind: "brightness".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    );
    assert!(
        (mix.loss - (c.loss - (mix.reward_mean - c.reward_mean))).abs() < 1e-5,
        "{mix:?}"
    );
    let mut cfg = demo_config("concept-notext");
    cfg.reward = RewardConfig {
        kind: "concept".into(),
        path: concept.path.clone(),
        ..Default::default()
    };
    let e = cfg.validate().unwrap_err();
    assert!(e.contains("reward.concept"), "{e}");

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

/// Every LoRA value of a file, in key order (down then up of each module).
fn lora_values(path: &std::path::Path) -> Vec<f64> {
    let w = alignprop_lora::LoraWeights::read(path).unwrap();
    w.modules
        .values()
        .flat_map(|p| p.down.values.iter().chain(&p.up.values))
        .map(|&v| f64::from(v))
        .collect()
}

/// A cosine schedule with warm-up sets each step's learning rate by transformers' formula (logged per step), and
/// the moving average of the adapters is diffusers' EMAModel's over the saved per-step adapters, is saved beside
/// them, is what the eval scores (the same training numbers as without it, another final eval), and resumes.
#[test]
fn lr_schedule_and_ema_of_the_adapters() {
    use alignprop_trainer::schedule::lr_factor;
    use alignprop_trainer::{EmaConfig, LrSchedule};
    let small = |name: &str, ema: bool| {
        let mut cfg = demo_config(name);
        cfg.train.steps = 4;
        cfg.sampling.steps = 3;
        cfg.truncation = Truncation::Fixed { k: 1 };
        cfg.eval.every = 100;
        cfg.output.save_every = 1;
        cfg.optimizer.schedule = LrSchedule::Cosine;
        cfg.optimizer.warmup_steps = 1;
        cfg.ema = EmaConfig {
            enabled: ema,
            decay: 0.5,
            update_after_step: 0,
        };
        cfg
    };
    let cfg = small("ema", true);
    let (dir, lr, ema_cfg) = (cfg.output.dir.clone(), cfg.optimizer.lr, cfg.ema.clone());
    let with = train(cfg, false, None).unwrap();
    let lrs: Vec<f64> = with.steps.iter().map(|s| s.lr).collect();
    let want: Vec<f64> = (0..4)
        .map(|k| lr * lr_factor(LrSchedule::Cosine, 1, 4, k))
        .collect();
    assert_eq!(lrs, want);
    assert_eq!(lrs[0], 0.0, "warm-up starts at 0");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().all(|l| l.contains("\"lr\":")), "{metrics}");

    // The average by hand, from the raw adapters after each step.
    let raw: Vec<Vec<f64>> = (1..=4)
        .map(|s| lora_values(&dir.join(format!("lora_step{s:05}.safetensors"))))
        .collect();
    let mut shadow = raw[0].clone();
    for (n, w) in raw.iter().enumerate().skip(1) {
        let d = ema_cfg.decay_at(n as u64 + 1);
        assert!(d > 0.0 && d <= 0.5);
        for (s, x) in shadow.iter_mut().zip(w) {
            *s -= (1.0 - d) * (*s - x);
        }
    }
    for file in [
        "lora_step00004_ema.safetensors",
        "pytorch_lora_weights_ema.safetensors",
    ] {
        let got = lora_values(&dir.join(file));
        let worst = got
            .iter()
            .zip(&shadow)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "{file}: {worst}");
    }
    assert_ne!(shadow, raw[3], "the average lags the adapters");

    // Without the average: the same training, but the final eval scores other adapters.
    let plain = train(small("no-ema", false), false, None).unwrap();
    let key = |v: &[StepLog]| v.iter().map(|s| (s.loss, s.grad_norm)).collect::<Vec<_>>();
    assert_eq!(key(&with.steps), key(&plain.steps));
    assert_eq!(
        with.evals[0].eval_reward_mean,
        plain.evals[0].eval_reward_mean
    );
    assert_ne!(
        with.evals.last().unwrap().eval_reward_mean,
        plain.evals.last().unwrap().eval_reward_mean
    );
    assert!(
        !plain
            .lora
            .with_file_name("pytorch_lora_weights_ema.safetensors")
            .exists()
    );

    // Stopped after step 2 and resumed: the same average at the end.
    let first = small("ema-resumed", true);
    let dir_r = first.output.dir.clone();
    train(first, false, Some(2)).unwrap();
    train(small("ema-resumed", true), true, None).unwrap();
    assert_eq!(
        lora_values(&dir_r.join("pytorch_lora_weights_ema.safetensors")),
        lora_values(&dir.join("pytorch_lora_weights_ema.safetensors"))
    );
    for d in [dir, dir_r, plain.lora.parent().unwrap().to_path_buf()] {
        std::fs::remove_dir_all(&d).ok();
    }
}

/// Every method trains the demo: in a seeded 10-step run the eval reward rises, and each logs its own quantities
/// (K, ReFL's stop step, DRaFT-LV's per-copy rewards).
#[test]
fn every_method_raises_the_reward_in_ten_steps() {
    use alignprop_trainer::{MethodConfig, MethodKind, ReflLoss};
    let methods = [
        (
            "alignprop",
            MethodKind::Alignprop,
            ReflLoss::Reward,
            Truncation::Uniform { min: 1, max: 3 },
        ),
        (
            "draft_k",
            MethodKind::DraftK,
            ReflLoss::Reward,
            Truncation::Fixed { k: 2 },
        ),
        (
            "draft_lv",
            MethodKind::DraftLv,
            ReflLoss::Reward,
            Truncation::Fixed { k: 1 },
        ),
        (
            "refl",
            MethodKind::Refl,
            ReflLoss::Relu,
            Truncation::Fixed { k: 1 },
        ),
    ];
    for (name, kind, refl_loss, truncation) in methods {
        let mut cfg = demo_config(&format!("method-{name}"));
        cfg.train.steps = 10;
        cfg.eval.every = 100;
        cfg.output.save_every = 100;
        cfg.truncation = truncation;
        cfg.method = MethodConfig {
            kind,
            refl_loss,
            relu_margin: 1.0,
            ..Default::default()
        };
        let dir = cfg.output.dir.clone();
        let s = train(cfg, false, None).unwrap();
        let (first, last) = (&s.evals[0], s.evals.last().unwrap());
        eprintln!(
            "{name}: eval reward {:.4} -> {:.4}",
            first.eval_reward_mean, last.eval_reward_mean
        );
        assert!(
            last.eval_reward_mean > first.eval_reward_mean + 0.05,
            "{name}: eval reward {} -> {}",
            first.eval_reward_mean,
            last.eval_reward_mean
        );
        let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
        match kind {
            MethodKind::Refl => {
                // Stops drawn in the last quarter of the 10 steps (7 ..= 9); K is 1.
                assert!(
                    s.steps.iter().all(
                        |l| l.refl_stop.is_some_and(|x| (7.0..=9.0).contains(&x)) && l.k == 1.0
                    )
                );
                assert!(metrics.contains("\"refl_stop\":"));
            }
            MethodKind::DraftLv => {
                assert!(
                    s.steps
                        .iter()
                        .all(|l| l.copy_rewards.as_ref().is_some_and(|c| c.len() == 2))
                );
                assert!(metrics.contains("\"copy_rewards\":"));
            }
            _ => assert!(
                s.steps
                    .iter()
                    .all(|l| l.refl_stop.is_none() && l.copy_rewards.is_none())
            ),
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// The paper's object-count and concept-removal rewards train the demo (tiny fixture models): in a seeded 10-step
/// run, the count of "a photo of a cat" moves toward its target 0 (loss `|count - 0|`) and the similarity to the
/// concept "a red circle" falls (loss `+similarity`), each measured by the run's own evaluations.
#[test]
fn count_and_concept_rewards_train_in_ten_steps() {
    let dir = std::env::temp_dir().join(format!("alignprop-count-rw-{}", std::process::id()));
    let m =
        alignprop_testing::prompt_reward::write_prompt_reward_models(&dir.join("clip")).unwrap();
    let owl = alignprop_testing::prompt_reward::write_count_model(&dir.join("owlvit")).unwrap();
    // (name, reward, learning rate): the tiny random CLIP's cosine moves slowly at the demo's 0.003.
    let runs = [
        (
            "count",
            RewardConfig {
                kind: "count".into(),
                path: Some(owl),
                object: Some("a photo of a cat".into()),
                target: Some(0.0),
                ..Default::default()
            },
            0.003,
        ),
        (
            "concept",
            RewardConfig {
                kind: "concept".into(),
                path: Some(m.pickscore.clone()),
                concept: Some("a red circle".into()),
                ..Default::default()
            },
            0.01,
        ),
    ];
    for (name, reward, lr) in runs {
        let mut cfg = demo_config(&format!("reward-{name}"));
        cfg.reward = reward;
        cfg.optimizer.lr = lr;
        cfg.train.steps = 10;
        cfg.eval.every = 100;
        cfg.output.save_every = 100;
        cfg.validate().unwrap();
        let out = cfg.output.dir.clone();
        let s = train(cfg, false, None).unwrap();
        let (first, last) = (&s.evals[0], s.evals.last().unwrap());
        eprintln!(
            "{name}: eval score {:.4} -> {:.4}",
            first.eval_reward_mean, last.eval_reward_mean
        );
        // Both losses push the score down (the count toward 0, the similarity away from the concept).
        let drop = first.eval_reward_mean - last.eval_reward_mean;
        let want = 0.05 * first.eval_reward_mean.abs().max(0.1);
        assert!(
            drop > want,
            "{name}: eval score {} -> {} (wanted a drop of more than {want})",
            first.eval_reward_mean,
            last.eval_reward_mean
        );
        std::fs::remove_dir_all(&out).ok();
    }
    std::fs::remove_dir_all(&dir).ok();
}
