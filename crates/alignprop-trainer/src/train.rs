//! The AlignProp training loop: sample trajectories, backpropagate the reward through them (checkpointed),
//! accumulate LoRA gradients, AdamW, evaluate on fixed prompts and noise, log, save the LoRA.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use alignprop_diffusion::unet::UNet2DConditionModel;
use alignprop_diffusion::vae::AutoencoderKL;
use alignprop_lora::LoraFormat;
use alignprop_pipeline::images::{captioned_grid, enlarge_to, labelled_stack, save_png, to_rgb8};
use alignprop_pipeline::{Conditioning, NoiseRng, StableDiffusion, denoise};
use alignprop_rewards::Reward;
use alignprop_rewards::compose::{Targeted, WeightedSum, WeightedTerm};
use alignprop_rewards::registry::{SUM_KIND, trainable_kind};
use alignprop_schedulers::{DdimScheduler, Scheduler};
use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor};
use serde::Serialize;

use crate::chain::{TrajectoryInput, trajectory};
use crate::checkpoint::{
    CheckpointState, OutputLock, config_differences, list_checkpoints, read_checkpoint,
    read_checkpoint_config, write_checkpoint,
};
use crate::config::{TrainConfig, read_prompts};
use crate::lora_params::{AdamW, LoraGrads, adapter_values, set_adapter_values};

/// Errors of a training run; each message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Pipeline(#[from] alignprop_pipeline::PipelineError),
    #[error(transparent)]
    Lora(#[from] alignprop_lora::LoraError),
    #[error(transparent)]
    Weights(#[from] alignprop_io::WeightError),
    #[error(transparent)]
    Tokenizer(#[from] alignprop_diffusion::tokenizer::TokenizerError),
    #[error(transparent)]
    Scheduler(#[from] alignprop_schedulers::ConfigError),
    #[error(
        "step {step}: the loss or a gradient is not finite ({what}); the update was skipped and the run stopped. \
             Lower the learning rate or the guidance scale, or check the reward."
    )]
    NonFinite { step: usize, what: String },
    #[error("{path}: {msg}")]
    Io { path: PathBuf, msg: String },
    /// The trajectory cannot be differentiated as asked (a reward's error is [`TrainError::Reward`] instead).
    #[error(transparent)]
    Chain(crate::chain::ChainError),
    /// The reward cannot score the images (wrong shape, missing prompts, a tokenizer failure), in training or in
    /// evaluation.
    #[error(transparent)]
    Reward(#[from] alignprop_rewards::RewardError),
}

impl From<crate::chain::ChainError> for TrainError {
    fn from(e: crate::chain::ChainError) -> Self {
        match e {
            crate::chain::ChainError::Reward(e) => Self::Reward(e),
            e => Self::Chain(e),
        }
    }
}

impl From<alignprop_diffusion::Error> for TrainError {
    fn from(e: alignprop_diffusion::Error) -> Self {
        match e {
            alignprop_diffusion::Error::Weights(e) => Self::Weights(e),
            alignprop_diffusion::Error::Tokenizer(e) => Self::Tokenizer(e),
        }
    }
}

/// One optimiser step's log line (written to `metrics.jsonl`).
#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub grad_norm: f64,
    /// Mean number of differentiated steps per trajectory.
    pub k: f64,
    pub time_s: f64,
    pub images_per_s: f64,
    /// Peak resident memory of the process so far (MiB; Linux `VmHWM`), where the OS reports it.
    pub peak_rss_mib: Option<f64>,
}

/// One evaluation (written to `eval.jsonl`).
#[derive(Clone, Debug, Serialize)]
pub struct EvalLog {
    pub step: usize,
    pub eval_reward_mean: f64,
    pub eval_reward_std: f64,
}

/// Builds the reward of a run: one reward, or a weighted sum (`reward.kind = "sum"`); a `target` turns a reward's
/// loss into `|score - target|`. Prompt rewards (`hps`, `pickscore`) need `tokenizer` (or a PickScore folder
/// holding one): see [`build_reward_with_tokenizer`].
pub fn build_reward<B: AutodiffBackend>(
    config: &crate::config::RewardConfig,
    device: &B::Device,
    dtype: DType,
) -> Result<Box<dyn Reward<B>>, TrainError> {
    build_reward_with_tokenizer(config, None, device, dtype)
}

/// [`build_reward`], with the tokenizer folder prompt rewards use when the config names none (the trainer passes
/// the SD model's `tokenizer/`: the same CLIP BPE as open_clip's and PickScore's).
pub fn build_reward_with_tokenizer<B: AutodiffBackend>(
    config: &crate::config::RewardConfig,
    default_tokenizer: Option<&Path>,
    device: &B::Device,
    dtype: DType,
) -> Result<Box<dyn Reward<B>>, TrainError> {
    let mut terms = Vec::new();
    for t in config.terms() {
        let kind =
            trainable_kind::<B>(&t.kind).map_err(|e| TrainError::Config(format!("reward {e}")))?;
        let tokenizers = t.tokenizer_candidates(default_tokenizer);
        let mut r = kind.build(&t.files(&tokenizers), device, dtype)?;
        if let Some(target) = t.target {
            r = Box::new(Targeted { inner: r, target });
        }
        terms.push(WeightedTerm {
            weight: t.weight,
            reward: r,
        });
    }
    Ok(if config.kind == SUM_KIND {
        Box::new(WeightedSum::new(terms))
    } else {
        terms.pop().expect("one term").reward
    })
}

/// A training run in progress.
pub struct Trainer<B: AutodiffBackend> {
    pub config: TrainConfig,
    pub sd: StableDiffusion<B>,
    pub scheduler: DdimScheduler,
    pub reward: Box<dyn Reward<B>>,
    pub optimizer: AdamW<B::InnerBackend>,
    pub prompts: Vec<String>,
    pub eval_prompts: Vec<String>,
    pub step: usize,
    rng: NoiseRng,
    out_dir: PathBuf,
    /// TensorBoard scalars and eval images (`events.out.tfevents.*` in the output folder).
    events: crate::tensorboard::EventWriter,
    /// Held while the trainer lives: a second run on the same output folder is refused.
    _lock: OutputLock,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Loads the model, injects fresh LoRA adapters, reads the prompts, prepares the output folder.
    pub fn new(config: TrainConfig, device: &B::Device) -> Result<Self, TrainError> {
        config.validate().map_err(TrainError::Config)?;
        let dtype = match config.model.dtype.as_str() {
            "f32" => DType::F32,
            "f64" => DType::F64,
            "bf16" => DType::BF16,
            // Refused rather than loss-scaled: float16's range (6e-5 .. 65504) loses the small reward gradients
            // that reach the early steps (they underflow) and the activations of a 512x512 UNet overflow it; bf16
            // has float32's range at the same memory, and every GPU that has f16 matrix cores since Ampere has bf16
            // ones. Sampling and evaluation (`alignprop sample --dtype f16`) stay available in f16.
            "f16" => {
                return Err(TrainError::Config(
                    "model.dtype 'f16' is not supported for training (float16 gradients underflow and its \
                     activations overflow without loss scaling): use model.dtype = \"bf16\" (the same memory, \
                     float32's range) or \"f32\""
                        .into(),
                ));
            }
            other => {
                return Err(TrainError::Config(format!(
                    "model.dtype '{other}' (expected f32, bf16 or f64)"
                )));
            }
        };
        // No model configured: the built-in demo model (embedded, written to the cache folder on first use).
        let model_dir = match config.model.path.clone() {
            Some(p) => p,
            None => crate::builtin::demo_model().map_err(TrainError::Config)?,
        };
        let mut sd = StableDiffusion::<B>::load(&model_dir, device, dtype)?;
        B::seed(device, config.train.seed);
        alignprop_lora::inject_seeded(&mut sd.unet, &config.lora, config.train.seed)?;
        let scheduler = DdimScheduler::new(&sd.scheduler_config, config.sampling.steps)
            .and_then(|s| s.with_eta(config.sampling.eta))
            .map_err(|e| TrainError::Config(e.to_string()))?;
        let reward = build_reward_with_tokenizer::<B>(
            &config.reward,
            Some(&model_dir.join("tokenizer")),
            device,
            dtype,
        )?;
        let prompts = read_prompts(&config.train.prompts).map_err(TrainError::Config)?;
        let eval_prompts = read_prompts(&config.eval.prompts).map_err(TrainError::Config)?;
        let out_dir = config.output.dir.clone();
        if out_dir.exists() && !out_dir.is_dir() {
            return Err(TrainError::Config(format!(
                "{}: output.dir exists and is not a folder",
                out_dir.display()
            )));
        }
        std::fs::create_dir_all(&out_dir).map_err(|e| io_err(&out_dir, e))?;
        let lock = OutputLock::acquire(&out_dir).map_err(TrainError::Config)?;
        let events =
            crate::tensorboard::EventWriter::create(&out_dir).map_err(TrainError::Config)?;
        let cfg_text =
            toml::to_string_pretty(&config).map_err(|e| TrainError::Config(e.to_string()))?;
        std::fs::write(out_dir.join("config.toml"), cfg_text).map_err(|e| io_err(&out_dir, e))?;
        Ok(Self {
            rng: NoiseRng::new(config.train.seed),
            optimizer: AdamW::new(config.optimizer.clone()),
            config,
            sd,
            scheduler,
            reward,
            prompts,
            eval_prompts,
            step: 0,
            out_dir,
            events,
            _lock: lock,
        })
    }

    fn resolution(&self) -> usize {
        self.config
            .sampling
            .resolution
            .unwrap_or_else(|| self.sd.default_image_size())
    }

    fn latent_shape(&self, batch: usize) -> [usize; 4] {
        let side = self.resolution() / self.sd.vae_factor();
        [batch, self.sd.unet.in_channels(), side, side]
    }

    fn text(&self, prompts: &[String]) -> Result<Conditioning<B::InnerBackend>, TrainError> {
        let c = self
            .sd
            .conditioning(prompts, &self.config.sampling.negative_prompt)?;
        Ok(Conditioning {
            uncond: c.uncond.inner(),
            cond: c.cond.inner(),
        })
    }

    /// One optimiser step (with gradient accumulation). Returns its log line.
    pub fn train_step(&mut self) -> Result<StepLog, TrainError> {
        let t0 = Instant::now();
        let cfg = self.config.clone();
        let n = cfg.sampling.steps;
        let (device, dtype) = (self.sd.device.clone(), self.sd.dtype);
        let mut acc = LoraGrads::default();
        let (mut losses, mut scores, mut ks) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.train.grad_accum {
            let batch: Vec<String> = (0..cfg.train.batch_size)
                .map(|_| self.prompts[self.rng.below(self.prompts.len() as u64) as usize].clone())
                .collect();
            let text = self.text(&batch)?;
            let shape = self.latent_shape(batch.len());
            let x_t = self.rng.normal_tensor(shape, &device, dtype);
            let noises: Vec<_> = (0..n)
                .map(|i| {
                    self.scheduler
                        .needs_noise(i)
                        .then(|| self.rng.normal_tensor(shape, &device, dtype))
                })
                .collect();
            let grad_steps = cfg.truncation.grad_steps(n, &mut self.rng);
            ks.push(grad_steps.iter().filter(|&&k| k).count() as f64);
            let reward = &self.reward;
            let coeff = cfg.reward.loss_coeff;
            let out = trajectory(TrajectoryInput {
                unet: &self.sd.unet,
                vae: &self.sd.vae,
                scheduler: &self.scheduler,
                text: &text,
                guidance: cfg.sampling.guidance_scale,
                x_t,
                noises: &noises,
                grad_steps: &grad_steps,
                loss_fn: |images| {
                    let (s, per_image) = reward.score_and_loss(images, &batch)?;
                    Ok((per_image.mean() * coeff, s))
                },
            })?;
            if !out.loss.is_finite() || out.scores.iter().any(|s| !s.is_finite()) {
                return Err(TrainError::NonFinite {
                    step: self.step + 1,
                    what: format!("loss {}", out.loss),
                });
            }
            losses.push(out.loss);
            scores.extend(out.scores);
            acc.add(out.grads);
        }
        acc.scale(1.0 / cfg.train.grad_accum as f64);
        // One device read for the finiteness check and the clipping: a NaN or infinity in any micro-batch's
        // gradient makes the accumulated norm non-finite, and the update is skipped.
        let grad_norm = acc.norm();
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step + 1,
                what: "LoRA gradient".into(),
            });
        }
        let grad_norm = self
            .optimizer
            .step_with_norm(&mut self.sd.unet, acc, grad_norm);
        self.step += 1;
        let (reward_mean, reward_std) = mean_std(&scores);
        let time_s = t0.elapsed().as_secs_f64();
        let log = StepLog {
            step: self.step,
            loss: losses.iter().sum::<f64>() / losses.len() as f64,
            reward_mean,
            reward_std,
            grad_norm,
            k: ks.iter().sum::<f64>() / ks.len() as f64,
            time_s,
            images_per_s: scores.len() as f64 / time_s,
            peak_rss_mib: peak_rss_mib(),
        };
        self.append_jsonl("metrics.jsonl", &log)?;
        self.events
            .scalars(
                log.step as u64,
                &[
                    ("train/loss", log.loss),
                    ("train/reward_mean", log.reward_mean),
                    ("train/reward_std", log.reward_std),
                    ("train/grad_norm", log.grad_norm),
                    ("train/k", log.k),
                    ("train/images_per_s", log.images_per_s),
                ],
            )
            .map_err(TrainError::Config)?;
        Ok(log)
    }

    /// Samples the eval prompts from fixed noise (no gradients), scores them, writes a PNG grid; a reward that
    /// cannot score them is a [`TrainError::Reward`].
    pub fn evaluate(&mut self) -> Result<EvalLog, TrainError> {
        let (device, dtype) = (self.sd.device.clone(), self.sd.dtype);
        let prompts = self.eval_prompts.clone();
        let text = self.text(&prompts)?;
        let mut rng = NoiseRng::new(self.config.eval.seed);
        let shape = self.latent_shape(prompts.len());
        let x_t = rng.normal_tensor(shape, &device, dtype);
        let n = self.config.sampling.steps;
        let noises: Vec<_> = (0..n)
            .map(|i| {
                self.scheduler
                    .needs_noise(i)
                    .then(|| rng.normal_tensor(shape, &device, dtype))
            })
            .collect();
        let unet: UNet2DConditionModel<B::InnerBackend> = self.sd.unet.valid();
        let latents = denoise(
            &unet,
            &self.scheduler,
            x_t,
            &text,
            self.config.sampling.guidance_scale,
            noises,
            &mut |_, _| {},
        );
        let vae: AutoencoderKL<B::InnerBackend> = self.sd.vae.valid();
        let images = vae.decode_scaled(latents);
        let scores: Vec<f64> = self
            .reward
            .score_with_prompts(Tensor::from_inner(images.clone()), &prompts)?
            .inner()
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("f64 scores");
        let (eval_reward_mean, eval_reward_std) = mean_std(&scores);
        // Small pictures (a tiny model's 64 pixels) are enlarged so that their captions fit under them.
        let pictures = enlarge_to(to_rgb8(images), 128);
        let path = self.out_dir.join(format!("eval_{:05}.png", self.step));
        let captions: Vec<Vec<String>> = prompts
            .iter()
            .zip(&scores)
            .map(|(p, s)| vec![p.clone(), format!("reward {s:.4}")])
            .collect();
        let picture = captioned_grid(&pictures, &captions, pictures.len().min(8));
        save_png(&picture, &path).map_err(|msg| TrainError::Io {
            path: path.clone(),
            msg,
        })?;
        let log = EvalLog {
            step: self.step,
            eval_reward_mean,
            eval_reward_std,
        };
        self.append_jsonl("eval.jsonl", &log)?;
        let png = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        let step = self.step as u64;
        self.events
            .scalars(
                step,
                &[
                    ("eval/reward_mean", eval_reward_mean),
                    ("eval/reward_std", eval_reward_std),
                ],
            )
            .and_then(|_| {
                self.events
                    .image(step, "eval/images", &png, picture.height(), picture.width())
            })
            .map_err(TrainError::Config)?;
        self.plot_rewards()?;
        Ok(log)
    }

    /// Writes a training checkpoint `<output.dir>/checkpoints/step_NNNNN` (LoRA, AdamW state, step, RNG) and
    /// deletes all but the newest `output.keep_last`.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf, TrainError> {
        let root = self.out_dir.join("checkpoints");
        std::fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
        let mut tensors = std::collections::BTreeMap::new();
        for (k, v) in adapter_values(&mut self.sd.unet).tensors {
            tensors.insert(format!("lora.{k}"), v);
        }
        for (k, v) in &self.optimizer.m.tensors {
            tensors.insert(format!("adam_m.{k}"), v.clone());
        }
        for (k, v) in &self.optimizer.v.tensors {
            tensors.insert(format!("adam_v.{k}"), v.clone());
        }
        let (rng, rng_spare) = self.rng.state();
        let state = CheckpointState {
            step: self.step,
            adam_step: self.optimizer.step,
            rng,
            rng_spare,
        };
        let dir = root.join(format!("step_{:05}", self.step));
        let config =
            toml::to_string_pretty(&self.config).map_err(|e| TrainError::Config(e.to_string()))?;
        write_checkpoint(&dir, &tensors, &state, &config).map_err(TrainError::Config)?;
        let all = list_checkpoints(&root);
        let keep = self.config.output.keep_last.max(1);
        for old in &all[..all.len().saturating_sub(keep)] {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(dir)
    }

    /// Continues from a checkpoint folder written by [`Trainer::save_checkpoint`]. The checkpoint's config must
    /// equal this run's outside `train.steps`, `eval.*` and `output.*` (anything else changes the numbers), unless
    /// `allow_config_change`; the error lists every differing key with both values.
    pub fn load_checkpoint(
        &mut self,
        dir: impl AsRef<Path>,
        allow_config_change: bool,
    ) -> Result<(), TrainError> {
        let dir = dir.as_ref();
        if let Some(saved) = read_checkpoint_config(dir).map_err(TrainError::Config)? {
            let now = toml::Value::try_from(&self.config)
                .map_err(|e| TrainError::Config(e.to_string()))?;
            let diffs = config_differences(&saved, &now);
            if !diffs.is_empty() && !allow_config_change {
                let list: Vec<String> = diffs
                    .iter()
                    .map(|(k, a, b)| format!("{k} (checkpoint {a}, now {b})"))
                    .collect();
                return Err(TrainError::Config(format!(
                    "{}: resuming with a different config: {}; resume with the checkpoint's config \
                     ({}/config.toml) or pass --allow-config-change",
                    dir.display(),
                    list.join(", "),
                    dir.display()
                )));
            }
        }
        // Adapters and optimiser state are f32 when the frozen base runs in half precision.
        let dtype = match self.sd.dtype {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        let (tensors, state) = read_checkpoint::<B::InnerBackend>(dir, &self.sd.device, dtype)
            .map_err(TrainError::Config)?;
        let mut lora = LoraGrads::default();
        let (mut m, mut v) = (LoraGrads::default(), LoraGrads::default());
        for (k, t) in tensors {
            if let Some(key) = k.strip_prefix("lora.") {
                lora.tensors.insert(key.to_string(), t);
            } else if let Some(key) = k.strip_prefix("adam_m.") {
                m.tensors.insert(key.to_string(), t);
            } else if let Some(key) = k.strip_prefix("adam_v.") {
                v.tensors.insert(key.to_string(), t);
            }
        }
        set_adapter_values(&mut self.sd.unet, &lora).map_err(|e| {
            TrainError::Config(format!(
                "{}: checkpoint does not fit this model: {e}",
                dir.display()
            ))
        })?;
        self.optimizer.m = m;
        self.optimizer.v = v;
        self.optimizer.step = state.adam_step;
        self.rng = NoiseRng::from_state(state.rng, state.rng_spare);
        self.step = state.step;
        // Steps logged after this checkpoint (by a run that crashed before its next one) are run again.
        for log in ["metrics.jsonl", "eval.jsonl"] {
            truncate_jsonl_after(&self.out_dir.join(log), self.step)?;
        }
        Ok(())
    }

    /// Writes the LoRA (diffusers/peft format) to `<output.dir>/<name>`, atomically.
    pub fn save_lora(&mut self, name: &str) -> Result<PathBuf, TrainError> {
        let path = self.out_dir.join(name);
        alignprop_lora::extract(&mut self.sd.unet).write(&path, LoraFormat::Peft)?;
        Ok(path)
    }

    /// Writes `before_after.png`: the first eval's grid over the last one's (the same prompts and seeds, each
    /// picture captioned with its reward), from `eval.jsonl` and the `eval_*.png` files, so a resumed run's
    /// picture starts from the run's first eval. Nothing is written before a second eval exists.
    pub fn draw_before_after(&self) -> Result<(), TrainError> {
        let evals: Vec<(u64, f64)> = self
            .read_log_fields("eval.jsonl", &["step", "eval_reward_mean"])?
            .iter()
            .map(|v| (v[0] as u64, v[1]))
            .collect();
        let (Some(first), Some(last)) = (evals.first(), evals.last()) else {
            return Ok(());
        };
        if first.0 == last.0 {
            return Ok(());
        }
        let grid = |step: u64| -> Result<image::RgbImage, TrainError> {
            let path = self.out_dir.join(format!("eval_{step:05}.png"));
            image::open(&path)
                .map(|i| i.to_rgb8())
                .map_err(|e| TrainError::Io {
                    path,
                    msg: format!("cannot read the eval grid: {e}"),
                })
        };
        let label = |what: &str, (step, mean): (u64, f64)| {
            format!(
                "{what} (step {step}): {} mean {mean:.4}",
                self.config.reward.kind
            )
        };
        let picture = labelled_stack(&[
            (label("before training", *first), grid(first.0)?),
            (label("after training", *last), grid(last.0)?),
        ]);
        let path = self.out_dir.join("before_after.png");
        save_png(&picture, &path).map_err(|msg| TrainError::Io { path, msg })
    }

    /// The numeric fields `keys` of every line of the output folder's JSONL log `file` that has them all, in file
    /// order (lines that do not parse are skipped; a log not written yet counts as empty).
    fn read_log_fields(&self, file: &str, keys: &[&str]) -> Result<Vec<Vec<f64>>, TrainError> {
        let log = self.out_dir.join(file);
        let text = match std::fs::read_to_string(&log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err(&log, e)),
        };
        Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| keys.iter().map(|k| v.get(*k)?.as_f64()).collect())
            .collect())
    }

    /// Redraws `reward_curve.png` from `metrics.jsonl` (the training reward's mean and std per step) and
    /// `eval.jsonl` (the eval reward), so a resumed run's curve includes the earlier steps. Lines that do not
    /// parse are skipped; a log not written yet counts as empty.
    fn plot_rewards(&self) -> Result<(), TrainError> {
        let train =
            self.read_log_fields("metrics.jsonl", &["step", "reward_mean", "reward_std"])?;
        let eval = self.read_log_fields("eval.jsonl", &["step", "eval_reward_mean"])?;
        let run_name = self
            .out_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| {
                let abs = self.out_dir.canonicalize().ok()?;
                Some(abs.file_name()?.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| self.out_dir.display().to_string());
        let reward = &self.config.reward;
        let y_label = if reward.kind == SUM_KIND {
            let terms: Vec<String> = reward
                .terms
                .iter()
                .map(|t| {
                    if t.weight == 1.0 {
                        t.kind.clone()
                    } else {
                        format!("{} {}", t.weight, t.kind)
                    }
                })
                .collect();
            format!("reward ({})", terms.join(" + "))
        } else {
            format!("{} reward", reward.kind)
        };
        let curve = crate::plot::RewardCurve {
            title: format!("reward: {run_name}"),
            y_label,
            train: train.iter().map(|v| (v[0], v[1], v[2])).collect(),
            eval: eval.iter().map(|v| (v[0], v[1])).collect(),
        };
        let path = self.out_dir.join("reward_curve.png");
        crate::plot::reward_curve(&curve, &path).map_err(|msg| TrainError::Io { path, msg })
    }

    fn append_jsonl<T: Serialize>(&self, file: &str, value: &T) -> Result<(), TrainError> {
        let path = self.out_dir.join(file);
        let line = serde_json::to_string(value).map_err(|e| TrainError::Config(e.to_string()))?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        writeln!(f, "{line}").map_err(|e| io_err(&path, e))
    }

    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub steps: Vec<StepLog>,
    pub evals: Vec<EvalLog>,
    pub lora: PathBuf,
    pub end: RunEnd,
}

/// Whether [`run`] continues from the newest checkpoint. `bool` converts (`true`: [`Resume::Checked`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// A new run (evaluated before its first step).
    No,
    /// Continue; the checkpoint's config must equal this one outside `train.steps`, `eval.*`, `output.*`.
    Checked,
    /// Continue even though the config changed (the numbers will differ from an uninterrupted run).
    AllowConfigChange,
}

impl From<bool> for Resume {
    fn from(resume: bool) -> Self {
        if resume { Self::Checked } else { Self::No }
    }
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    Finished,
    /// `stop` was raised (e.g. Ctrl-C): a checkpoint was written first.
    Interrupted,
}

/// Runs the whole configured training: eval before the first step (unless resuming), every `eval.every` steps
/// and at the end; LoRA and checkpoint every `output.save_every` steps and at the end. With `resume`, continues
/// from the newest checkpoint under `<output.dir>/checkpoints`. When `stop` becomes true the current step
/// finishes, a checkpoint is written and the run returns [`RunEnd::Interrupted`].
pub fn run<B: AutodiffBackend>(
    config: TrainConfig,
    device: &B::Device,
    resume: impl Into<Resume>,
    stop: &AtomicBool,
    on_step: &mut dyn FnMut(&StepLog),
    on_eval: &mut dyn FnMut(&EvalLog),
) -> Result<RunSummary, TrainError> {
    let resume = resume.into();
    let mut trainer = Trainer::<B>::new(config, device)?;
    let mut evals = Vec::new();
    if resume != Resume::No {
        let root = trainer.out_dir.join("checkpoints");
        let latest = list_checkpoints(&root).pop().ok_or_else(|| {
            TrainError::Config(format!(
                "--resume: no checkpoint under {} (nothing to resume)",
                root.display()
            ))
        })?;
        trainer.load_checkpoint(&latest, resume == Resume::AllowConfigChange)?;
    } else {
        // A new run never mixes with an earlier one: checkpoints of another run are refused; the logs of a run
        // killed before its first checkpoint are dropped.
        let root = trainer.out_dir.join("checkpoints");
        if let Some(last) = list_checkpoints(&root).pop() {
            return Err(TrainError::Config(format!(
                "{}: the output folder holds checkpoints of an earlier run (newest {}): continue it with \
                 --resume, or choose another output.dir (--out), or delete the folder",
                trainer.out_dir.display(),
                last.file_name().unwrap_or_default().to_string_lossy()
            )));
        }
        for log in ["metrics.jsonl", "eval.jsonl"] {
            let path = trainer.out_dir.join(log);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&path, e)),
                _ => {}
            }
        }
        let e = trainer.evaluate()?;
        on_eval(&e);
        evals.push(e);
    }
    let total = trainer.config.train.steps;
    let (every, save_every) = (
        trainer.config.eval.every.max(1),
        trainer.config.output.save_every.max(1),
    );
    let mut steps = Vec::new();
    let mut end = RunEnd::Finished;
    while trainer.step < total {
        let log = trainer.train_step()?;
        on_step(&log);
        steps.push(log);
        if trainer.step % every == 0 || trainer.step == total {
            let e = trainer.evaluate()?;
            on_eval(&e);
            evals.push(e);
        }
        if trainer.step % save_every == 0 || trainer.step == total {
            trainer.save_lora(&format!("lora_step{:05}.safetensors", trainer.step))?;
            trainer.save_checkpoint()?;
        }
        if stop.load(Ordering::SeqCst) && trainer.step < total {
            if trainer.step % save_every != 0 {
                trainer.save_checkpoint()?;
            }
            end = RunEnd::Interrupted;
            break;
        }
    }
    let lora = trainer.save_lora("pytorch_lora_weights.safetensors")?;
    trainer.draw_before_after()?;
    Ok(RunSummary {
        steps,
        evals,
        lora,
        end,
    })
}

/// The process's peak resident set size in MiB (`VmHWM` in `/proc/self/status`; `None` elsewhere).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// Keeps the lines of a JSONL log whose `step` is at most `step` (rewritten through a temporary file and a rename;
/// a missing log is fine).
fn truncate_jsonl_after(path: &Path, step: usize) -> Result<(), TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, e)),
    };
    let keep = |l: &&str| {
        serde_json::from_str::<serde_json::Value>(l)
            .ok()
            .and_then(|v| v.get("step")?.as_u64())
            .is_some_and(|s| s as usize <= step)
    };
    let kept: Vec<&str> = text.lines().filter(keep).collect();
    if kept.len() == text.lines().count() {
        return Ok(());
    }
    let tmp = path.with_extension("jsonl.tmp");
    let body: String = kept.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&tmp, body).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn io_err(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}
