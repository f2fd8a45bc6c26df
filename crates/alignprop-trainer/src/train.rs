//! The AlignProp training loop: sample trajectories, backpropagate the reward through them (checkpointed),
//! accumulate LoRA gradients, AdamW, evaluate on fixed prompts and noise, log, save the LoRA.

use std::any::TypeId;
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
use burn::backend::{Autodiff, Flex};
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
use crate::method::{MethodKind, ReflLoss};

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
    /// A panic in a data-parallel worker, caught so that the other workers stop too.
    #[error("panic: {0}")]
    Panic(String),
    /// Another worker of a data-parallel run failed (its own error is reported); this one stopped with it.
    #[error("worker {worker} failed, so this worker stopped too")]
    PeerFailed { worker: usize },
    /// A data-parallel worker's error, with the worker and its device.
    #[error("worker {worker} ({device}): {source}")]
    Worker {
        worker: usize,
        device: String,
        source: Box<TrainError>,
    },
    /// The collective all-reduce of a data-parallel run failed (burn::collective's error).
    #[error("data-parallel exchange failed: {0}")]
    Collective(String),
    /// The workers' adapters differ (they must be identical after every update).
    #[error("{0}")]
    ReplicaDrift(String),
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
    /// The learning rate of this step (`optimizer.lr` times the schedule's factor).
    pub lr: f64,
    /// ReFL: the mean stop step drawn for the step's micro-batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refl_stop: Option<f64>,
    /// DRaFT-LV: each re-noised copy's mean reward over the global batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_rewards: Option<Vec<f64>>,
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
    /// The moving average of the adapters (`[ema] enabled`; worker 0 only: it evaluates and saves).
    pub ema: Option<crate::ema::Ema<B::InnerBackend>>,
    /// Which worker of a data-parallel run this is (worker 0 of 1 alone).
    pub worker: WorkerRank,
    out_dir: PathBuf,
    /// TensorBoard scalars and eval images (`events.out.tfevents.*` in the output folder); worker 0 only.
    events: Option<crate::tensorboard::EventWriter>,
    /// Held while the trainer lives: a second run on the same output folder is refused; worker 0 only.
    _lock: Option<OutputLock>,
    /// Test hook of data-parallel runs: fail in this optimiser step (1-based).
    pub(crate) fault: Option<(usize, crate::parallel::InjectedFault)>,
}

/// A worker's place in a data-parallel run: `rank` of `world` workers over all devices and machines. Worker 0
/// evaluates and writes every output (logs, pictures, LoRA files, checkpoints); the others only compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerRank {
    pub rank: usize,
    pub world: usize,
}

impl WorkerRank {
    /// The only worker of a single-device run.
    pub const SOLE: Self = Self { rank: 0, world: 1 };

    /// Whether this worker writes the run's outputs (worker 0).
    pub fn writes_output(&self) -> bool {
        self.rank == 0
    }
}

/// One micro-batch's results, as logged over the global batch.
#[derive(Clone, Debug, PartialEq)]
pub struct MicroBatch {
    /// Global index in the optimiser step (`0 .. grad_accum x world`).
    pub index: usize,
    pub loss: f64,
    /// Differentiated steps of its trajectory.
    pub k: f64,
    /// ReFL: the stop step drawn for it.
    pub stop: Option<usize>,
    /// DRaFT-LV: each re-noised copy's mean reward over its images.
    pub copy_rewards: Vec<f64>,
    /// The reward of each of its images (DRaFT-LV: the mean over the copies).
    pub scores: Vec<f64>,
}

/// What one worker computed for its micro-batches of an optimiser step ([`Trainer::local_step`]).
pub struct LocalStep<B: burn::tensor::backend::Backend> {
    /// The sum over its micro-batches of their LoRA gradients.
    pub grads: LoraGrads<B>,
    pub micro: Vec<MicroBatch>,
}

/// A seed for one stream of draws (`stream`) of item `index` at optimiser step `step` of a run seeded `seed`
/// (splitmix64 finalisers chained: nearby inputs give unrelated seeds).
pub fn derive_seed(seed: u64, step: u64, index: u64, stream: u64) -> u64 {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    [step, index, stream]
        .into_iter()
        .fold(mix(seed), |h, x| mix(h ^ mix(x)))
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Loads the model, injects fresh LoRA adapters, reads the prompts, prepares the output folder.
    pub fn new(config: TrainConfig, device: &B::Device) -> Result<Self, TrainError> {
        Self::new_worker(config, device, WorkerRank::SOLE)
    }

    /// [`Trainer::new`] for worker `worker` of a data-parallel run: every worker loads its own copy of the model
    /// and gets the same adapters (seeded by `train.seed`); only worker 0 prepares the output folder.
    pub fn new_worker(
        config: TrainConfig,
        device: &B::Device,
        worker: WorkerRank,
    ) -> Result<Self, TrainError> {
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
        if TypeId::of::<B>() == TypeId::of::<Autodiff<Flex>>() {
            let bf16 = config.model.bf16_products;
            if bf16 && !alignprop_kernels::flex_bf16::bf16_supported() {
                return Err(TrainError::Config(
                    "model.bf16_products = true needs a CPU with AVX512_BF16 (AMD Zen 4+, Intel Cooper Lake / \
                     Sapphire Rapids+); this CPU has none: set it to false"
                        .into(),
                ));
            }
            alignprop_kernels::flex_bf16::set_bf16_products(bf16);
        }
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
        let (mut lock, mut events) = (None, None);
        if worker.writes_output() {
            std::fs::create_dir_all(&out_dir).map_err(|e| io_err(&out_dir, e))?;
            lock = Some(OutputLock::acquire(&out_dir).map_err(TrainError::Config)?);
            events = Some(
                crate::tensorboard::EventWriter::create(&out_dir).map_err(TrainError::Config)?,
            );
            let cfg_text =
                toml::to_string_pretty(&config).map_err(|e| TrainError::Config(e.to_string()))?;
            std::fs::write(out_dir.join("config.toml"), cfg_text)
                .map_err(|e| io_err(&out_dir, e))?;
        }
        let ema = (config.ema.enabled && worker.writes_output())
            .then(|| crate::ema::Ema::new(adapter_values(&mut sd.unet).tensors));
        Ok(Self {
            worker,
            fault: None,
            ema,
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
        let side = self.resolution();
        let c = self.sd.conditioning_sized(
            prompts,
            &self.config.sampling.negative_prompt,
            [side, side],
        )?;
        Ok(c.inner())
    }

    /// The generator of global sample `index` of optimiser step `step` (0-based): its prompt, initial latents and
    /// DDIM noise come from it alone, so the same step sees the same samples however the global batch is split
    /// over workers and micro-batches.
    fn sample_rng(&self, step: usize, index: usize) -> NoiseRng {
        NoiseRng::new(derive_seed(
            self.config.train.seed,
            step as u64,
            index as u64,
            0,
        ))
    }

    /// The truncation draw of global micro-batch `micro` of optimiser step `step` (its own stream).
    fn truncation_rng(&self, step: usize, micro: usize) -> NoiseRng {
        NoiseRng::new(derive_seed(
            self.config.train.seed,
            step as u64,
            micro as u64,
            1,
        ))
    }

    /// This worker's micro-batches of an optimiser step: global indices `rank * grad_accum ..` (the global batch is
    /// `batch_size x grad_accum x world` images).
    pub fn micro_batches(&self) -> std::ops::Range<usize> {
        let accum = self.config.train.grad_accum;
        self.worker.rank * accum..(self.worker.rank + 1) * accum
    }

    /// Runs this worker's micro-batches of the next optimiser step: the trajectories, their rewards and the
    /// summed (not averaged) LoRA gradients. Nothing is updated.
    pub fn local_step(&mut self) -> Result<LocalStep<B::InnerBackend>, TrainError> {
        let cfg = &self.config;
        let n = cfg.sampling.steps;
        let bs = cfg.train.batch_size;
        let (device, dtype) = (self.sd.device.clone(), self.sd.dtype);
        if let Some((step, fault)) = self.fault
            && step == self.step + 1
        {
            return crate::parallel::injected(fault);
        }
        let mut grads = LoraGrads::default();
        let mut micro = Vec::new();
        for m in self.micro_batches() {
            let mut rngs: Vec<NoiseRng> = (0..bs)
                .map(|j| self.sample_rng(self.step, m * bs + j))
                .collect();
            let batch: Vec<String> = rngs
                .iter_mut()
                .map(|r| self.prompts[r.below(self.prompts.len() as u64) as usize].clone())
                .collect();
            let text = self.text(&batch)?;
            let [_, c, h, w] = self.latent_shape(1);
            let draw = |rngs: &mut Vec<NoiseRng>| {
                let parts = rngs
                    .iter_mut()
                    .map(|r| r.normal_tensor::<B::InnerBackend, 4>([1, c, h, w], &device, dtype))
                    .collect();
                Tensor::cat(parts, 0)
            };
            let x_t = draw(&mut rngs);
            let noises: Vec<_> = (0..n)
                .map(|i| self.scheduler.needs_noise(i).then(|| draw(&mut rngs)))
                .collect();
            let method = &cfg.method;
            // ReFL draws its stop step from the truncation stream; the other methods their kept steps.
            let mut trng = self.truncation_rng(self.step, m);
            let (grad_steps, stop) = match method.kind {
                MethodKind::Refl => {
                    let (lo, hi) = method.stop_range(n);
                    (
                        vec![false; n],
                        Some(lo + trng.below((hi - lo + 1) as u64) as usize),
                    )
                }
                _ => (cfg.truncation.grad_steps(n, &mut trng), None),
            };
            // DRaFT-LV's re-noising draws continue each sample's own stream (after its DDIM noise).
            let renoise: Vec<_> = match method.kind {
                MethodKind::DraftLv => (0..method.copies).map(|_| draw(&mut rngs)).collect(),
                _ => Vec::new(),
            };
            let k = match method.kind {
                MethodKind::Refl | MethodKind::DraftLv => 1.0,
                _ => grad_steps.iter().filter(|&&k| k).count() as f64,
            };
            let reward = &self.reward;
            let coeff = cfg.reward.loss_coeff;
            let relu = (method.kind == MethodKind::Refl && method.refl_loss == ReflLoss::Relu)
                .then_some(method.relu_margin);
            let input = TrajectoryInput {
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
                    let per_image = match relu {
                        // ReFL.py's loss: relu(margin - score).
                        Some(margin) => (s.clone().neg() + margin).clamp_min(0.0),
                        None => per_image,
                    };
                    Ok((per_image.mean() * coeff, s))
                },
            };
            let out = match method.kind {
                MethodKind::Alignprop | MethodKind::DraftK => trajectory(input)?,
                MethodKind::DraftLv => crate::methods::draft_lv(input, &renoise)?,
                MethodKind::Refl => crate::methods::refl(input, stop.expect("ReFL's stop step"))?,
            };
            if !out.loss.is_finite() || out.scores.iter().any(|s| !s.is_finite()) {
                return Err(TrainError::NonFinite {
                    step: self.step + 1,
                    what: format!("loss {}", out.loss),
                });
            }
            grads.add(out.grads);
            micro.push(MicroBatch {
                index: m,
                loss: out.loss,
                k,
                stop,
                copy_rewards: out
                    .copy_scores
                    .iter()
                    .map(|c| c.iter().sum::<f64>() / c.len().max(1) as f64)
                    .collect(),
                scores: out.scores,
            });
        }
        Ok(LocalStep { grads, micro })
    }

    /// Applies the mean LoRA gradient of the global batch (`grads`, already averaged over all micro-batches) with
    /// AdamW and counts the step; `micro` holds every micro-batch of the global batch (in index order), `t0` the
    /// step's start. Every worker runs this with the same inputs, so the replicas stay identical. Returns the log
    /// line (written by [`Trainer::write_step_log`]).
    pub fn apply_step(
        &mut self,
        grads: LoraGrads<B::InnerBackend>,
        micro: &[MicroBatch],
        t0: Instant,
    ) -> Result<StepLog, TrainError> {
        // One device read for the finiteness check and the clipping: a NaN or infinity in any micro-batch's
        // gradient makes the accumulated norm non-finite, and the update is skipped.
        let grad_norm = grads.norm();
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step: self.step + 1,
                what: "LoRA gradient".into(),
            });
        }
        let o = &self.config.optimizer;
        self.optimizer.lr_factor = crate::schedule::lr_factor(
            o.schedule,
            o.warmup_steps,
            self.config.train.steps,
            self.step,
        );
        let lr = self.optimizer.lr();
        let grad_norm = self
            .optimizer
            .step_with_norm(&mut self.sd.unet, grads, grad_norm);
        self.step += 1;
        if let Some(ema) = &mut self.ema {
            ema.update(&self.config.ema, &adapter_values(&mut self.sd.unet).tensors);
        }
        let scores: Vec<f64> = micro
            .iter()
            .flat_map(|m| m.scores.iter().copied())
            .collect();
        let (reward_mean, reward_std) = mean_std(&scores);
        let count = micro.len().max(1) as f64;
        let time_s = t0.elapsed().as_secs_f64();
        Ok(StepLog {
            step: self.step,
            loss: micro.iter().map(|m| m.loss).sum::<f64>() / count,
            reward_mean,
            reward_std,
            grad_norm,
            k: micro.iter().map(|m| m.k).sum::<f64>() / count,
            lr,
            refl_stop: micro
                .iter()
                .map(|m| m.stop.map(|s| s as f64))
                .sum::<Option<f64>>()
                .map(|s| s / count),
            copy_rewards: micro
                .first()
                .filter(|m| !m.copy_rewards.is_empty())
                .map(|m0| {
                    (0..m0.copy_rewards.len())
                        .map(|j| micro.iter().map(|m| m.copy_rewards[j]).sum::<f64>() / count)
                        .collect()
                }),
            time_s,
            images_per_s: scores.len() as f64 / time_s,
            peak_rss_mib: peak_rss_mib(),
        })
    }

    /// Appends a step's line to `metrics.jsonl` and its scalars to the TensorBoard events (worker 0 only; the
    /// other workers write nothing).
    pub fn write_step_log(&mut self, log: &StepLog) -> Result<(), TrainError> {
        if !self.worker.writes_output() {
            return Ok(());
        }
        self.append_jsonl("metrics.jsonl", log)?;
        if let Some(events) = &mut self.events {
            events
                .scalars(
                    log.step as u64,
                    &[
                        ("train/loss", log.loss),
                        ("train/reward_mean", log.reward_mean),
                        ("train/reward_std", log.reward_std),
                        ("train/grad_norm", log.grad_norm),
                        ("train/k", log.k),
                        ("train/lr", log.lr),
                        ("train/images_per_s", log.images_per_s),
                    ],
                )
                .map_err(TrainError::Config)?;
        }
        Ok(())
    }

    /// One optimiser step of a single-worker run (with gradient accumulation). Returns its log line.
    pub fn train_step(&mut self) -> Result<StepLog, TrainError> {
        let t0 = Instant::now();
        let LocalStep { mut grads, micro } = self.local_step()?;
        grads.scale(1.0 / micro.len().max(1) as f64);
        let log = self.apply_step(grads, &micro, t0)?;
        self.write_step_log(&log)?;
        Ok(log)
    }

    /// Samples the eval prompts from fixed noise (no gradients), scores them, writes a PNG grid; a reward that
    /// cannot score them is a [`TrainError::Reward`]. With `[ema] enabled`, with the averaged adapters.
    pub fn evaluate(&mut self) -> Result<EvalLog, TrainError> {
        self.with_ema_adapters(Self::evaluate_current)
    }

    /// Runs `f` with the adapters set to their moving average (when there is one), then puts the trained ones back.
    fn with_ema_adapters<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, TrainError>,
    ) -> Result<T, TrainError> {
        let Some(shadow) = self.ema.as_ref().map(|e| LoraGrads {
            tensors: e.shadow.clone(),
        }) else {
            return f(self);
        };
        let trained = adapter_values(&mut self.sd.unet);
        set_adapter_values(&mut self.sd.unet, &shadow).map_err(TrainError::Config)?;
        let out = f(self);
        set_adapter_values(&mut self.sd.unet, &trained).map_err(TrainError::Config)?;
        out
    }

    fn evaluate_current(&mut self) -> Result<EvalLog, TrainError> {
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
        if let Some(events) = &mut self.events {
            events
                .scalars(
                    step,
                    &[
                        ("eval/reward_mean", eval_reward_mean),
                        ("eval/reward_std", eval_reward_std),
                    ],
                )
                .and_then(|_| {
                    events.image(step, "eval/images", &png, picture.height(), picture.width())
                })
                .map_err(TrainError::Config)?;
        }
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
        if let Some(ema) = &self.ema {
            for (k, v) in &ema.shadow {
                tensors.insert(format!("ema.{k}"), v.clone());
            }
        }
        let state = CheckpointState {
            step: self.step,
            adam_step: self.optimizer.step,
            workers: self.worker.world,
            ema_step: self.ema.as_ref().map(|e| e.step),
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
            // Read through today's config type, so that keys added since the checkpoint was written (at their
            // defaults) are no difference; a config this version cannot read is compared as it is.
            let saved = saved
                .clone()
                .try_into::<TrainConfig>()
                .ok()
                .and_then(|c| toml::Value::try_from(&c).ok())
                .unwrap_or(saved);
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
        // Any split of the same global batch over workers and accumulation resumes the same run.
        let saved_accum = read_checkpoint_config(dir)
            .map_err(TrainError::Config)?
            .and_then(|c| c.get("train")?.get("grad_accum")?.as_integer())
            .map_or(self.config.train.grad_accum, |a| a as usize);
        let (accum, world) = (self.config.train.grad_accum, self.worker.world);
        if saved_accum * state.workers != accum * world && !allow_config_change {
            return Err(TrainError::Config(format!(
                "{}: the checkpoint's global batch is {} micro-batches (train.grad_accum {saved_accum} x {} \
                 workers), this run's {} (train.grad_accum {accum} x {world} workers): set train.grad_accum \
                 to {} x {} / {world} workers, or pass --allow-config-change",
                dir.display(),
                saved_accum * state.workers,
                state.workers,
                accum * world,
                saved_accum,
                state.workers
            )));
        }
        let mut lora = LoraGrads::default();
        let (mut m, mut v) = (LoraGrads::default(), LoraGrads::default());
        let mut ema = std::collections::BTreeMap::new();
        for (k, t) in tensors {
            if let Some(key) = k.strip_prefix("lora.") {
                lora.tensors.insert(key.to_string(), t);
            } else if let Some(key) = k.strip_prefix("ema.") {
                ema.insert(key.to_string(), t);
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
        self.step = state.step;
        if let Some(e) = &mut self.ema {
            // A checkpoint written without the average (`[ema]` turned on at resume) starts it from the adapters.
            match state.ema_step {
                Some(n) if !ema.is_empty() => {
                    e.shadow = ema;
                    e.step = n;
                }
                _ => *e = crate::ema::Ema::new(lora.tensors.clone()),
            }
        }
        // Steps logged after this checkpoint (by a run that crashed before its next one) are run again.
        if self.worker.writes_output() {
            for log in ["metrics.jsonl", "eval.jsonl"] {
                truncate_jsonl_after(&self.out_dir.join(log), self.step)?;
            }
        }
        Ok(())
    }

    /// Writes the LoRA (diffusers/peft format) to `<output.dir>/<name>`, atomically.
    /// With `[ema] enabled`, the averaged adapters go beside it as `<stem>_ema.safetensors`.
    pub fn save_lora(&mut self, name: &str) -> Result<PathBuf, TrainError> {
        let path = self.out_dir.join(name);
        alignprop_lora::extract(&mut self.sd.unet).write(&path, LoraFormat::Peft)?;
        if self.ema.is_some() {
            let ema_path = ema_path(&path);
            self.with_ema_adapters(|t| {
                alignprop_lora::extract(&mut t.sd.unet).write(&ema_path, LoraFormat::Peft)?;
                Ok(())
            })?;
        }
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
/// finishes, a checkpoint is written and the run returns [`RunEnd::Interrupted`]. One device; for several see
/// [`crate::parallel::run_parallel`].
pub fn run<B: AutodiffBackend>(
    config: TrainConfig,
    device: &B::Device,
    resume: impl Into<Resume>,
    stop: &AtomicBool,
    on_step: &mut dyn FnMut(&StepLog),
    on_eval: &mut dyn FnMut(&EvalLog),
) -> Result<RunSummary, TrainError> {
    let trainer = Trainer::<B>::new(config, device)?;
    drive(
        Ok(trainer),
        &mut crate::parallel::Solo,
        resume.into(),
        stop,
        on_step,
        on_eval,
    )
}

/// How often (in optimiser steps) the workers of a data-parallel run compare checksums of their adapters.
pub const REPLICA_CHECK_EVERY: usize = 10;

/// The training loop of one worker (the only one, or one of a data-parallel run): every worker calls
/// `sync.exchange` at the same points (once after start-up, once per optimiser step), and every failure between
/// two exchanges (an error or a panic, on any worker) is carried into the next one, so all workers stop together
/// and none waits forever. `trainer` is the worker's loaded trainer, or why it could not load.
pub(crate) fn drive<B: AutodiffBackend>(
    trainer: Result<Trainer<B>, TrainError>,
    sync: &mut dyn crate::parallel::Exchange<B::InnerBackend>,
    resume: Resume,
    stop: &AtomicBool,
    on_step: &mut dyn FnMut(&StepLog),
    on_eval: &mut dyn FnMut(&EvalLog),
) -> Result<RunSummary, TrainError> {
    use crate::parallel::Contribution;
    let mut evals = Vec::new();
    let (mut trainer, mut pending) = match trainer {
        Ok(t) => (Some(t), None),
        Err(e) => (None, Some(e)),
    };
    let mut checksum = None;
    if let Some(t) = trainer.as_mut() {
        match guarded(|| {
            t.start(resume, &mut evals, on_eval)?;
            Ok(t.adapter_checksum())
        }) {
            Ok(c) => checksum = Some(c),
            Err(e) => pending = Some(e),
        }
    }
    let agreed = sync.exchange(
        Contribution {
            failed: pending.is_some(),
            stop: false,
            checksum,
            micro: Vec::new(),
            grads: None,
        },
        None,
    )?;
    if let Some(e) = pending.take() {
        return Err(e);
    }
    agreed.settle()?;
    let mut trainer = trainer.expect("a trainer where no worker failed");
    let layout = crate::parallel::step_layout(&mut trainer);
    let total = trainer.config.train.steps;
    let (every, save_every) = (
        trainer.config.eval.every.max(1),
        trainer.config.output.save_every.max(1),
    );
    let writer = trainer.worker.writes_output();
    let mut steps = Vec::new();
    let mut end = RunEnd::Finished;
    while trainer.step < total {
        let t0 = Instant::now();
        let check = trainer.step % REPLICA_CHECK_EVERY == 0;
        let local = match pending.take() {
            Some(e) => Err(e),
            None => guarded(|| trainer.local_step()),
        };
        let contribution = match &local {
            Ok(l) => Contribution {
                failed: false,
                stop: stop.load(Ordering::SeqCst),
                checksum: check.then(|| trainer.adapter_checksum()),
                micro: l.micro.clone(),
                grads: Some(l.grads.clone()),
            },
            Err(_) => Contribution::failure(),
        };
        let agreed = sync.exchange(contribution, Some(&layout))?;
        local?;
        agreed.settle()?;
        let mut stop_now = agreed.stop;
        let mut grads = agreed.grads.expect("gradients in a step's exchange");
        grads.scale(1.0 / agreed.micro.len().max(1) as f64);
        // The same inputs on every worker: the same update, or the same error on all of them.
        let log = trainer.apply_step(grads, &agreed.micro, t0)?;
        if writer {
            // Worker 0's outputs; an error here stops every worker at the next exchange.
            let t = &mut trainer;
            let outputs = guarded(|| {
                t.write_step_log(&log)?;
                on_step(&log);
                // One worker agrees with itself: a Ctrl-C seen so far (also in `on_step`) ends the run after
                // this step. Several workers stop at the step whose exchange first carries the flag.
                let stop_now = stop_now || (t.worker.world == 1 && stop.load(Ordering::SeqCst));
                if t.step % every == 0 || t.step == total {
                    let e = t.evaluate()?;
                    on_eval(&e);
                    evals.push(e);
                }
                if t.step % save_every == 0 || t.step == total {
                    t.save_lora(&format!("lora_step{:05}.safetensors", t.step))?;
                    t.save_checkpoint()?;
                }
                if stop_now && t.step < total && t.step % save_every != 0 {
                    t.save_checkpoint()?;
                }
                Ok(stop_now)
            });
            match outputs {
                Ok(s) => stop_now = s,
                Err(e) => pending = Some(e),
            }
        }
        steps.push(log);
        if stop_now && trainer.step < total {
            end = RunEnd::Interrupted;
            break;
        }
    }
    if let Some(e) = pending {
        return Err(e);
    }
    let lora = if writer {
        let lora = trainer.save_lora("pytorch_lora_weights.safetensors")?;
        trainer.draw_before_after()?;
        lora
    } else {
        trainer.out_dir.join("pytorch_lora_weights.safetensors")
    };
    Ok(RunSummary {
        steps,
        evals,
        lora,
        end,
    })
}

/// `dir/name.safetensors` -> `dir/name_ema.safetensors`: where the averaged adapters of a LoRA file go.
pub fn ema_path(lora: &Path) -> PathBuf {
    let stem = lora
        .file_stem()
        .map_or("lora".into(), |s| s.to_string_lossy());
    lora.with_file_name(format!("{stem}_ema.safetensors"))
}

/// Runs `f`, turning a panic into [`TrainError::Panic`] (a data-parallel worker must reach its next exchange).
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, TrainError>) -> Result<T, TrainError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Err(TrainError::Panic(msg))
        }
    }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Before the first step: with `resume`, loads the newest checkpoint (every worker); else worker 0 refuses an
    /// output folder holding another run's checkpoints, drops stale logs and evaluates the untrained model.
    fn start(
        &mut self,
        resume: Resume,
        evals: &mut Vec<EvalLog>,
        on_eval: &mut dyn FnMut(&EvalLog),
    ) -> Result<(), TrainError> {
        let root = self.out_dir.join("checkpoints");
        if resume != Resume::No {
            let latest = list_checkpoints(&root).pop().ok_or_else(|| {
                TrainError::Config(format!(
                    "--resume: no checkpoint under {} (nothing to resume)",
                    root.display()
                ))
            })?;
            return self.load_checkpoint(&latest, resume == Resume::AllowConfigChange);
        }
        if !self.worker.writes_output() {
            return Ok(());
        }
        // A new run never mixes with an earlier one: checkpoints of another run are refused; the logs of a run
        // killed before its first checkpoint are dropped.
        if let Some(last) = list_checkpoints(&root).pop() {
            return Err(TrainError::Config(format!(
                "{}: the output folder holds checkpoints of an earlier run (newest {}): continue it with \
                 --resume, or choose another output.dir (--out), or delete the folder",
                self.out_dir.display(),
                last.file_name().unwrap_or_default().to_string_lossy()
            )));
        }
        for log in ["metrics.jsonl", "eval.jsonl"] {
            let path = self.out_dir.join(log);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&path, e)),
                _ => {}
            }
        }
        let e = self.evaluate()?;
        on_eval(&e);
        evals.push(e);
        Ok(())
    }

    /// Two numbers that summarise the adapters (the sum of all values and of their squares), compared across
    /// the workers of a data-parallel run to catch replicas drifting apart.
    pub fn adapter_checksum(&mut self) -> [f64; 2] {
        let values = adapter_values(&mut self.sd.unet);
        let sums: Vec<Tensor<B::InnerBackend, 1>> = values
            .tensors
            .values()
            .map(|t| alignprop_kernels::sum_all(t.clone().cast(DType::F32)))
            .collect();
        if sums.is_empty() {
            return [0.0, 0.0];
        }
        let sum = alignprop_kernels::sum_all(Tensor::cat(sums, 0));
        let square = values.squared_norm().expect("adapters").cast(DType::F32);
        let v: Vec<f64> = Tensor::cat(vec![sum.cast(DType::F32), square], 0)
            .into_data()
            .convert::<f64>()
            .to_vec()
            .expect("f64");
        [v[0], v[1]]
    }
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
