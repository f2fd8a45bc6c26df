//! AlignProp training: reward backpropagation through the denoising chain into UNet LoRA adapters.
//!
//! Takes a Stable Diffusion model, a reward and a [`TrainConfig`] (TOML); gives LoRA gradients and updated adapters,
//! per-step metrics (JSONL), evaluation images, LoRA files and resumable checkpoints.
//!
//! - [`chain`]: one trajectory forward and our own checkpointed backward (memory flat in the number of kept steps).
//! - [`method`]: the `[method]` config (AlignProp, DRaFT-K, DRaFT-LV, ReFL); [`methods`]: ReFL's and DRaFT-LV's
//!   gradients on the same chain inputs (DRaFT-K is the chain with a fixed truncation).
//! - [`truncation`]: which steps carry gradient (fixed K, uniform, gaussian, per-step random detach).
//! - [`train`]: the loop (gradient accumulation, AdamW, evaluation, JSONL logs, LoRA checkpoints), [`config`]: TOML.
//! - [`lora_params`]: LoRA gradients and AdamW with global-norm clipping; [`schedule`]: learning-rate schedules
//!   (constant, linear, cosine, with warm-up); [`ema`]: the moving average of the adapters (eval and export).
//! - [`parallel`]: data-parallel training over several devices on burn's collective engine.
//! - [`builtin`]: the demo model and the preset configs, embedded, written to a cache folder on first use.

pub mod builtin;
pub mod chain;
pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod lora_params;
pub mod method;
pub mod methods;
pub mod parallel;
pub mod plot;
pub mod schedule;
pub mod tensorboard;
pub mod train;
pub mod truncation;

/// What a trajectory's loss closure returns when its reward cannot score the images.
pub use alignprop_rewards::RewardError;
pub use chain::{ChainError, TrajectoryInput, TrajectoryOutput, trajectory, trajectory_full_graph};
pub use config::TrainConfig;
pub use ema::EmaConfig;
pub use lora_params::{AdamW, AdamWConfig, LoraGrads};
pub use method::{MethodConfig, MethodKind, ReflLoss};
pub use parallel::{ParallelOptions, run_parallel};
pub use schedule::LrSchedule;
/// This crate's error ([`TrainError`]): every error of the crates below converts into it with `?`.
pub use train::TrainError as Error;
pub use train::{
    EvalLog, Resume, RunEnd, RunSummary, StepLog, TrainError, Trainer, WorkerRank, run,
};
pub use truncation::Truncation;
